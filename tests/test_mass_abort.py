"""Page accounting under a mass abort: hundreds of requests given up mid-stream, while
others are admitted into the pages they free, must never leave an admitted request
without a page (TVM's "No page can be allocated" mid-stream) or a page held after.

The cache is small (a few requests' worth) and prompts share a prefix, so reservations,
forks of cached prefixes, evictions and aborts all interleave. Bounded: a fixed number
of requests, each with a deadline.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from conftest import leader_stats, local_cluster, wait_until_cluster_idle

from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

LIMITS = CacheLimits(max_sequences=16, max_total_tokens=1024, prefill_chunk_tokens=256)
REQUESTS = 240
ABORTED = 180
SHARED = [5] * 48  # three pages every prompt shares


def test_hundreds_of_aborts_mid_stream_leave_every_admitted_request_its_pages():
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS,
                            router=RouterOptions(max_waiting_requests=REQUESTS))
    client = GenerationClient(cluster.router_address)
    rng = random.Random(0)
    abort_after = {i: rng.randint(1, 20) for i in rng.sample(range(REQUESTS), ABORTED)}
    prompts = [SHARED + [7 + i % 11] * rng.randint(1, 40) for i in range(REQUESTS)]
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> int:
        call = client.stream(generate_request(prompts[i], max_tokens=24, ignore_eos=True),
                             timeout=120)
        tokens = 0
        try:
            for response in call:
                tokens += len(response.token_ids)
                if tokens >= abort_after.get(i, 10**9):
                    call.cancel()
                    return -1
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                with lock:
                    errors.append(f"{exc.code().name}: {exc.details()}")
        return tokens

    try:
        with ThreadPoolExecutor(24) as pool:
            counts = list(pool.map(one, range(REQUESTS)))
        assert not errors, errors[:5]
        assert all(counts[i] == 24 for i in range(REQUESTS) if i not in abort_after)
        wait_until_cluster_idle(cluster)
        for stats in leader_stats(cluster.decode):
            assert stats.free_pages + stats.cached_pages == stats.total_pages
    finally:
        client.close()
        cluster.stop()
