"""A bounded soak: a few hundred mixed requests, random cancellations and deadlines, and a
decode worker killed and replaced midway. Afterwards every page is free, nothing is left
waiting anywhere, and memory has not grown."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from conftest import local_cluster, wait_until_cluster_idle

from cluster.cluster_config import RoleConfig
from cluster.worker_spec import WorkerSpec
from decode_worker.servicer import serve_decode
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

REQUESTS = 240
LIMITS = CacheLimits(max_sequences=8, max_total_tokens=2048, prefill_chunk_tokens=512)
EXPECTED_FAILURES = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_mixed_traffic_with_cancellations_and_a_lost_worker_leaves_nothing_behind():
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS,
                            router=RouterOptions(local_prefill_below_tokens=0),
                            prefill=RoleConfig(instances=1), decode=RoleConfig(instances=2))
    client = GenerationClient(cluster.router_address)
    scheduler = cluster.router.scheduler
    outcomes: list[object] = []
    lock = threading.Lock()
    issued = threading.Semaphore(0)
    started = time.monotonic()

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        sampled = rng.random() < 0.5
        request = generate_request(
            rng.integers(1, 2000, int(rng.integers(5, 120))).tolist(),
            max_tokens=int(rng.integers(1, 24)), ignore_eos=True,
            temperature=0.8 if sampled else 0.0, seed=i if sampled else None)
        kind = rng.random()
        try:
            if kind < 0.25:  # cancelled at a random moment
                call = client.stream(request, timeout=60)
                issued.release()
                time.sleep(float(rng.uniform(0, 0.05)))
                call.cancel()
                outcome = "cancelled"
            else:
                timeout = float(rng.uniform(0.05, 0.3)) if kind < 0.35 else 60
                issued.release()
                ids, _, _ = client.complete(request, timeout=timeout)
                outcome = "ok" if len(ids) == request.sampling.max_tokens else "short"
        except grpc.RpcError as exc:
            outcome = exc.code()
        with lock:
            outcomes.append(outcome)

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(REQUESTS)]
            for _ in range(REQUESTS // 3):
                issued.acquire()
            memory_early = rss_mib()
            for _ in range(REQUESTS // 3):
                issued.acquire()
            # A decode worker dies mid-traffic; a new one takes its place.
            victim = cluster.decode[1]
            victim_address = scheduler.workers("decode")[1].address
            next(s for s in cluster.servers if f"127.0.0.1:{s.port}" == victim_address).stop(0)
            victim.engine.stop()
            scheduler.remove(victim_address)
            server, replacement = serve_decode(WorkerSpec.of(None, limits=LIMITS).runner(),
                                               secret=cluster.secret)
            cluster.servers.insert(0, server)
            cluster.decode[1] = replacement
            scheduler.add(f"127.0.0.1:{server.port}", "decode")
            for future in futures:
                future.result(timeout=120)
        elapsed = time.monotonic() - started
        assert len(outcomes) == REQUESTS
        ok = outcomes.count("ok")
        lost = [o for o in outcomes
                if o not in ("ok", "cancelled") and o not in EXPECTED_FAILURES]
        assert "short" not in outcomes
        # The requests on the killed worker resume elsewhere; a few may still fail
        # UNAVAILABLE (their prefill was pushing to it), never anything else.
        assert all(o == grpc.StatusCode.UNAVAILABLE for o in lost), lost
        assert len(lost) <= 8 and ok >= REQUESTS // 2, (ok, lost)
        assert elapsed < 60
        wait_until_cluster_idle(cluster)
        assert rss_mib() - memory_early < 100
    finally:
        client.close()
        cluster.stop()
