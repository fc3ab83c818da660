"""Per-client limits against a real router: a client over its share of the router waits in
its own line and is then refused with a time to retry, on both APIs, while another client
is served at once; one client cannot hold more than its connections.

Clients are told apart by address. Each test's HTTP clients connect from loopback
addresses of their own (127.0.0.2 and up, still to the router on 127.0.0.1); gRPC cannot
choose its source address, so the gRPC test is the only one that spends 127.0.0.1's.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlparse

import grpc
import pytest
from conftest import local_cluster

from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from router.client import GenerationClient, generate_request
from router.client_budget import ClientLimits
from router.options import RouterOptions

# A request costs the router about a millisecond: at this share, 0.2 s of budget or more.
LIMITS = ClientLimits(share=0.005, burst_s=1.0, max_connections=16)
COMPLETION = json.dumps({"model": DEMO_MODEL_DIR.name, "prompt": "The Python interpreter",
                         "max_tokens": 2}).encode()


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(DEMO_MODEL_DIR, cache=CacheLimits(8, 4096, 512), http=True,
                      router=RouterOptions(clients=LIMITS))
    yield c
    c.stop()


def request(cluster, source: str, path: str = "/v1/models", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, float]:
    """(status, headers, seconds) of one request from loopback address ``source``."""
    url = urlparse(cluster.http_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30,
                                            source_address=(source, 0))
    started = time.monotonic()
    try:
        connection.request("POST" if body else "GET", path, body,
                           {"Content-Type": "application/json", **(headers or {})})
        reply = connection.getresponse()
        payload = reply.read()
        reply_headers = {k.lower(): v for k, v in reply.getheaders()}
        if reply.status == 429:
            assert json.loads(payload)["error"]["type"] == "rate_limit_error"
        return reply.status, reply_headers, time.monotonic() - started
    finally:
        connection.close()


def client_counters(cluster) -> dict[str, float]:
    """The router's per-client counters, read from /metrics as another client."""
    url = urlparse(cluster.http_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30,
                                            source_address=("127.0.0.250", 0))
    connection.request("GET", "/metrics")
    metrics = connection.getresponse().read().decode()
    connection.close()
    return {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith("olmo_client_requests_")}


def refused_count(cluster) -> float:
    return client_counters(cluster)["olmo_client_requests_refused_total"]


def flood(cluster, source: str, count: int, threads: int = 12, **kwargs) -> list:
    """``count`` requests from ``source`` on ``threads`` threads at once; their answers."""
    answers, lock = [], threading.Lock()

    def send(n: int) -> None:
        for _ in range(n):
            answer = request(cluster, source, **kwargs)
            with lock:
                answers.append(answer)

    workers = [threading.Thread(target=send, args=(count // threads,)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    return answers


def test_a_client_over_its_share_waits_then_is_refused_and_others_are_served(cluster):
    answers = []
    flooding = threading.Thread(target=lambda: answers.extend(flood(cluster, "127.0.0.2", 48)))
    flooding.start()
    time.sleep(0.5)  # the flooder is past its burst and in its line
    others = [request(cluster, "127.0.0.3", "/v1/completions", COMPLETION) for _ in range(3)]
    flooding.join(timeout=120)
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) >= 5 and statuses.count(429) >= 5, statuses
    assert set(statuses) <= {200, 429}
    refused = [headers for status, headers, _ in answers if status == 429]
    assert all(int(h["retry-after"]) >= 1 for h in refused)
    # A waiting request waited its client's turn; another client never waits for it.
    assert max(seconds for status, _, seconds in answers if status == 200) > 0.15
    assert [status for status, _, _ in others] == [200] * 3
    assert max(seconds for _, _, seconds in others) < 1.0, others
    assert refused_count(cluster) >= statuses.count(429)
    assert client_counters(cluster)["olmo_client_requests_waited_total"] > 0


def test_a_forwarding_header_does_not_make_a_new_client(cluster):
    flood(cluster, "127.0.0.4", 24)
    status, _, seconds = request(cluster, "127.0.0.4", headers={"X-Forwarded-For": "10.9.9.9"})
    assert status == 429 or seconds > 0.15  # still 127.0.0.4, still over its share
    status, _, seconds = request(cluster, "127.0.0.5")
    assert status == 200 and seconds < 0.15


def test_a_client_over_its_share_is_refused_on_grpc_with_a_retry_pushback(cluster):
    client = GenerationClient(cluster.router_address)
    codes, pushbacks, lock = [], [], threading.Lock()

    def send() -> None:
        for _ in range(3):
            try:
                client.complete(generate_request([5, 6, 7], max_tokens=1), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                trailers = dict(exc.trailing_metadata() or ())
                with lock:
                    pushbacks.append(int(trailers.get("grpc-retry-pushback-ms", 0)))
            with lock:
                codes.append(code)

    workers = [threading.Thread(target=send) for _ in range(12)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
    finally:
        client.close()
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert pushbacks and min(pushbacks) > 0


def test_one_client_holds_at_most_its_connections(cluster):
    url = urlparse(cluster.http_url)
    held = [socket.create_connection((url.hostname, url.port), timeout=10,
                                     source_address=("127.0.0.6", 0))
            for _ in range(LIMITS.max_connections)]
    try:
        extra = socket.create_connection((url.hostname, url.port), timeout=10,
                                         source_address=("127.0.0.6", 0))
        with extra:
            answer = extra.recv(1024)
            assert answer.startswith(b"HTTP/1.1 429"), answer
            assert extra.recv(1024) == b""  # and closed
        assert request(cluster, "127.0.0.7")[0] == 200  # another client connects
    finally:
        held.pop().close()
    time.sleep(0.2)
    assert request(cluster, "127.0.0.6")[0] == 200  # a freed slot is the client's again
    for sock in held:
        sock.close()


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget():
    """The proxy (127.0.0.x here) holds as many connections as its clients need; the
    budgets go by the X-Forwarded-For it writes."""
    limits = ClientLimits(share=0.005, burst_s=1.0, max_connections=2,
                          trusted_proxies="127.0.0.0/8")
    proxied = local_cluster(DEMO_MODEL_DIR, cache=CacheLimits(8, 4096, 512), http=True,
                            router=RouterOptions(clients=limits))
    try:
        answers = []
        flooding = threading.Thread(target=lambda: answers.extend(flood(
            proxied, "127.0.0.2", 48, headers={"X-Forwarded-For": "198.51.100.1"})))
        flooding.start()
        time.sleep(0.5)
        other = [request(proxied, "127.0.0.2", headers={"X-Forwarded-For": "198.51.100.2"})
                 for _ in range(3)]
        flooding.join(timeout=120)
        refused = refused_count(proxied)
    finally:
        proxied.stop()
    statuses = [status for status, _, _ in answers]
    assert statuses.count(429) >= 5 and statuses.count(200) >= 5, statuses
    assert refused == statuses.count(429)  # all by the budget: none by a connection cap
    assert [status for status, _, _ in other] == [200] * 3
    assert max(seconds for _, _, seconds in other) < 1.0
