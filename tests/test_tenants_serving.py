"""Tenants through a local cluster's two APIs: their keys, their quotas, their place in line."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
import yaml
from conftest import local_cluster

from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from protos.vocabulary import Mode
from router.client import GenerationClient, generate_request
from router.options import RouterOptions
from router.tenants import RELOAD_CHECK_S, TenantOptions

CHAT_KEY, BATCH_KEY = "sk-chat-0123456789abcdef", "sk-batch-0123456789abcdef"
BULK_KEY = "sk-bulk-0123456789abcdef"
TENANTS = [
    {"name": "chat", "keys": [CHAT_KEY], "priority": "interactive"},
    {"name": "batch", "keys": [BATCH_KEY], "priority": "batch", "requests_per_s": 1},
    {"name": "bulk", "keys": [BULK_KEY], "priority": "batch"},
]


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": TENANTS}))
    return path


@pytest.fixture(scope="module")
def cluster(tenants_file):
    # One sequence at a time: every other request waits in the router's line.
    c = local_cluster(mode=Mode.AGGREGATED, http=True,
                      cache=CacheLimits(max_sequences=1, max_total_tokens=512,
                                        prefill_chunk_tokens=128),
                      router=RouterOptions(tenants=TenantOptions(file=str(tenants_file))))
    yield c
    c.stop()


def until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def running(cluster) -> float:
    return cluster.router.metrics.registry.get_sample_value("olmo_num_requests_running")


def http_status(cluster, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{cluster.http_url}/v1/completions", method="POST", headers=headers,
        data=b'{"prompt": "Hello", "max_tokens": 1}')
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def test_each_tenants_key_is_let_in_and_no_other(cluster):
    assert http_status(cluster, CHAT_KEY)[0] == 200
    assert http_status(cluster, None)[0] == 401
    assert http_status(cluster, "sk-unknown-0123456789abc")[0] == 401
    for key, code in ((CHAT_KEY, grpc.StatusCode.OK),
                      ("sk-unknown-0123456789abc", grpc.StatusCode.UNAUTHENTICATED)):
        client = GenerationClient(cluster.router_address, api_key=key)
        try:
            client.complete(generate_request([5, 6, 7], max_tokens=1), timeout=30)
            got = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            got = exc.code()
        finally:
            client.close()
        assert got == code


def test_a_tenant_over_its_rate_gets_429_with_retry_after_and_grpc_a_pushback(cluster):
    time.sleep(1.0)  # a full bucket: one request a second
    statuses = [http_status(cluster, BATCH_KEY) for _ in range(3)]
    assert statuses[0][0] == 200
    refused = [headers for status, headers in statuses if status == 429]
    assert refused and all(int(h["retry-after"]) >= 1 for h in refused)
    client = GenerationClient(cluster.router_address, api_key=BATCH_KEY)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.complete(generate_request([5, 6, 7], max_tokens=1), timeout=30)
    finally:
        client.close()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its requests quota" in err.value.details()
    assert int(dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"]) > 0
    metrics = urllib.request.urlopen(f"{cluster.http_url}/metrics", timeout=10).read().decode()
    assert 'olmo_tenant_requests_refused_total{tenant="batch"}' in metrics


def test_an_interactive_request_goes_ahead_of_batch_requests_waiting_longer(cluster):
    """The one sequence is busy; two batch requests wait; an interactive one that comes
    after them is served first."""
    order: list[str] = []
    lock = threading.Lock()

    def ask(key: str, name: str, max_tokens: int) -> None:
        client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key=key, max_retries=5)
        client.completions.create(model=DEMO_MODEL_DIR.name, prompt="Once upon a time",
                                  max_tokens=max_tokens, extra_body={"ignore_eos": True})
        with lock:
            order.append(name)

    busy = threading.Thread(target=ask, args=(CHAT_KEY, "busy", 400))
    busy.start()
    until(lambda: running(cluster) == 1)
    batch = [threading.Thread(target=ask, args=(BULK_KEY, f"batch {i}", 4)) for i in range(2)]
    for thread in batch:
        thread.start()
    # Both in line: one at its head (asking, not counted as waiting), one behind it.
    until(lambda: running(cluster) == 3 and cluster.router.admission.waiting() == 1)
    interactive = threading.Thread(target=ask, args=(CHAT_KEY, "interactive", 4))
    interactive.start()
    for thread in (busy, *batch, interactive):
        thread.join(timeout=120)
    assert order[:2] == ["busy", "interactive"], order


def test_a_key_added_to_the_file_is_let_in_without_a_restart(cluster, tenants_file):
    new_key = "sk-new-tenant-0123456789ab"
    assert http_status(cluster, new_key)[0] == 401
    tenants_file.write_text(yaml.safe_dump(
        {"tenants": [*TENANTS, {"name": "new", "keys": [new_key]}]}))
    time.sleep(RELOAD_CHECK_S + 0.1)
    assert http_status(cluster, new_key)[0] == 200
