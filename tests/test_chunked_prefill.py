"""Chunked prefill on a decode worker: a long prompt prefilled there (aggregated mode,
or a short uncached rest) runs one chunk per engine loop, and the sequences already
decoding take a step between its chunks instead of waiting for all of it."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import hf_greedy, local_cluster, wait_until_cluster_idle

from cluster.cluster_config import RoleConfig
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from protos.vocabulary import Mode
from router.client import generate_request

CHUNK = 32
LIMITS = CacheLimits(max_sequences=8, max_total_tokens=4096, prefill_chunk_tokens=CHUNK)
RUNNING = list(range(40, 48))                      # decoding when the long prompt arrives
LONG = [(7 * i) % 1900 + 50 for i in range(320)]   # ten chunks


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(DEMO_MODEL_DIR, mode=Mode.AGGREGATED, cache=LIMITS,
                      decode=RoleConfig(instances=1))
    yield c
    c.stop()


def stream_in_background(client, prompt, max_tokens, arrivals, lock, name):
    """Read a greedy stream on a thread, noting each token's arrival in ``arrivals``."""
    ids: list[int] = []

    def read():
        for response in client.stream(generate_request(prompt, max_tokens=max_tokens,
                                                       ignore_eos=True), timeout=60):
            with lock:
                ids.extend(response.token_ids)
                arrivals.extend([name] * len(response.token_ids))

    thread = threading.Thread(target=read)
    thread.start()
    return thread, ids


def test_running_streams_decode_between_a_long_prompts_chunks(cluster, client, demo_reference):
    arrivals: list[str] = []
    lock = threading.Lock()
    running, running_ids = stream_in_background(client, RUNNING, 120, arrivals, lock, "running")
    deadline = time.monotonic() + 30
    while arrivals.count("running") < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    with lock:
        before = len(arrivals)
    long, long_ids = stream_in_background(client, LONG, 8, arrivals, lock, "long")
    long.join(60)
    running.join(60)
    assert long_ids == hf_greedy(demo_reference, LONG, 8)
    assert running_ids == hf_greedy(demo_reference, RUNNING, 120)
    # Ten chunks, a decode step after each: the running stream gained about ten tokens
    # before the long prompt's first. Prefilled in one go, it would gain one or two.
    during = arrivals[before:arrivals.index("long")]
    assert during.count("running") >= 6, during
    wait_until_cluster_idle(cluster)


def test_a_request_cancelled_mid_prefill_frees_everything(cluster, client):
    arrivals: list[str] = []
    lock = threading.Lock()
    running, running_ids = stream_in_background(client, RUNNING, 120, arrivals, lock,
                                                "running")
    call = client.stream(generate_request(LONG + LONG[:140], max_tokens=8, ignore_eos=True),
                         timeout=60)
    scheduler = cluster.decode[0].engine.scheduler
    deadline = time.monotonic() + 30
    while not any(0 < r.prefilled < len(r.prompt_ids) - r.cached_tokens
                  for r in scheduler.requests()):
        assert time.monotonic() < deadline, "the long prompt was never seen mid-prefill"
        time.sleep(0.001)
    call.cancel()
    running.join(60)
    assert len(running_ids) == 120  # the stream beside it never noticed
    wait_until_cluster_idle(cluster)
