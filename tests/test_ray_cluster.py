"""The router owns the cluster through a real local Ray: placement, failure, scaling."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.cluster_config import ClusterConfig, RoleConfig
from protos import worker_pb2
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

ray = pytest.importorskip("ray")

PROMPT = "The Python interpreter"


@pytest.fixture(scope="module")
def cluster():
    from cluster.ray_cluster import start_ray_cluster

    # Every prompt goes through a prefill worker (local_prefill_below_tokens=0): the pushes
    # show which decode workers served.
    config = ClusterConfig(router=RouterOptions(port=0, http_port=0, local_prefill_below_tokens=0),
                           prefill=RoleConfig(instances=2, cpus=0.4),
                           decode=RoleConfig(instances=2, cpus=0.4, max_instances=4),
                           health_interval_s=0.5)
    c = start_ray_cluster(config, num_cpus=2)
    yield c
    c.stop()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    c = GenerationClient(cluster.address)
    yield c
    c.close()


def stats(cluster, role: str) -> dict[str, worker_pb2.WorkerStats]:
    out = {}
    for worker in cluster.manager.scheduler.workers(role):
        out[worker.address] = worker.stub.Stats(worker_pb2.StatsRequest(), timeout=5)
    return out


def instance(cluster, address: str):
    return next(i for i in cluster.manager.status() if i.address == address)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def decode_idle(cluster) -> bool:
    return all(s.used_pages == 0 and s.reservations == 0 and s.running_sequences == 0
               for s in stats(cluster, "decode").values())


def test_one_prefill_two_decode_instances_serve_across_both(cluster, client):
    status = cluster.manager.status()
    assert sorted(i.name for i in status) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
    assert all(i.state == "healthy" and i.address.startswith("127.0.0.1:") for i in status)
    before = {a: s.kv_bytes_received for a, s in stats(cluster, "decode").items()}
    requests = [generate_request(PROMPT + " " * i, max_tokens=8, ignore_eos=True)
                for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda r: client.complete(r, timeout=60), requests))
    assert all(len(ids) == 8 for ids, _, _ in results)
    after = stats(cluster, "decode")
    assert all(after[a].kv_bytes_received > before[a] for a in before), "a decode worker idled"


def test_killed_decode_actor_mid_stream_resumes_and_is_replaced(cluster, client):
    request = generate_request(PROMPT, max_tokens=400, ignore_eos=True)
    reference, _, _ = client.complete(request, timeout=60)

    start = time.monotonic()
    call = client.stream(request, timeout=60)
    streamed = [next(call).token_ids[0] for _ in range(3)]
    busy = [a for a, s in stats(cluster, "decode").items() if s.running_sequences]
    assert busy, "the request finished before the test could kill its worker"
    victim = instance(cluster, busy[0])
    ray.kill(victim.actor, no_restart=False)
    streamed += [t for response in call for t in response.token_ids]
    assert time.monotonic() - start < 10
    assert streamed == reference

    wait_for(lambda: instance_by_name(cluster, victim.name).restarts >= 1
             and instance_by_name(cluster, victim.name).state == "healthy", 60,
             "Ray to restart the decode worker")
    replacement = instance_by_name(cluster, victim.name).address
    before = stats(cluster, "decode")[replacement].kv_bytes_received
    for _ in range(6):
        client.complete(generate_request(PROMPT, max_tokens=4), timeout=30)
    assert stats(cluster, "decode")[replacement].kv_bytes_received > before


def instance_by_name(cluster, name: str):
    return next(i for i in cluster.manager.status() if i.name == name)


def test_killed_prefill_actor_with_queued_requests_loses_nothing(cluster, client):
    prompts = [[7 + i] * 400 for i in range(6)]
    outcomes: list[object] = []

    def run(prompt):
        try:
            outcomes.append(client.complete(generate_request(prompt, max_tokens=4), timeout=60))
        except grpc.RpcError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    victim = instance_by_name(cluster, "prefill-0")
    ray.kill(victim.actor, no_restart=False)
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == len(prompts)
    for outcome in outcomes:
        if isinstance(outcome, grpc.RpcError):
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome.details()
        else:
            assert len(outcome[0]) == 4
    wait_for(lambda: decode_idle(cluster), 35, "decode workers to hold no pages")


def test_scale_up_and_drain_while_requests_flow(cluster, client):
    wait_for(lambda: all(i.state == "healthy" for i in cluster.manager.status()), 60,
             "every instance to be healthy")
    stop = threading.Event()
    results: list[object] = []

    def traffic():
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline and len(results) < 400:
            try:
                ids, _, _ = client.complete(generate_request(PROMPT, max_tokens=6,
                                                             ignore_eos=True), timeout=30)
                results.append(len(ids))
            except grpc.RpcError as exc:
                results.append(exc)

    senders = [threading.Thread(target=traffic) for _ in range(3)]
    for t in senders:
        t.start()
    try:
        cluster.manager.scale("decode", 3)
        assert cluster.manager.count("decode") == 3
        time.sleep(1.0)
        cluster.manager.scale("decode", 1, drain_timeout=30)
        cluster.manager.scale("prefill", 1, drain_timeout=30)
    finally:
        stop.set()
        for t in senders:
            t.join(timeout=60)
    assert cluster.manager.count("decode") == 1 and cluster.manager.count("prefill") == 1
    assert results and all(r == 6 for r in results), [r for r in results if r != 6][:3]
    assert len(cluster.manager.scheduler.workers("decode")) == 1


def test_the_admin_api_needs_the_cluster_secret(cluster):
    from protos import admin_pb2, admin_pb2_grpc
    from protos.grpc_server import channel

    for secret in (None, "a-guess"):
        stub = admin_pb2_grpc.ClusterAdminStub(channel(cluster.address, secret))
        with pytest.raises(grpc.RpcError) as err:
            stub.Scale(admin_pb2.ScaleRequest(role="prefill", instances=0), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stub = admin_pb2_grpc.ClusterAdminStub(channel(cluster.address, cluster.manager.secret))
    status = stub.Status(admin_pb2.StatusRequest(), timeout=10)
    assert {i.role for i in status.instances} == {"prefill", "decode"}
    # Scale is bounded (max_instances, or MAX_SCALE_INSTANCES where the config sets none).
    with pytest.raises(grpc.RpcError) as err:
        stub.Scale(admin_pb2.ScaleRequest(role="decode", instances=41), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 4 decode instances" in err.value.details()


def test_the_openai_api_serves_from_the_ray_cluster(cluster):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{cluster.http_url}/health", timeout=10) as reply:
        assert json.loads(reply.read())["status"] == "ok"
    request = urllib.request.Request(
        f"{cluster.http_url}/v1/completions", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                         "ignore_eos": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as reply:
        body = json.loads(reply.read())
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["text"]
