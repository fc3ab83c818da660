"""Where a decode step's time goes on the server: the model runner vs everything around it.

Starts a one-stage local cluster on the serving benchmark's random checkpoint, wraps the
decode engine's step and the runner's kernels (embed, forward, select_last, logits) with
timers, and drives greedy decoding at batch 1 and batch 8. Reports the median step time,
the median time per step spent outside the runner (building the batch, dispatching it
through the stage chain, sampling bookkeeping, emitting tokens) and the median period
from one step's start to the next (the engine loop's whole round, which is what the
client sees as the inter-token time, less the router's relay). Prints a table and
writes JSON.

    python3 bench/step_bench.py [--tokens 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checkpoints import SERVE, bench_checkpoint
from recording import write_results

from cluster.cluster_config import ClusterConfig
from cluster.local_cluster import on_loopback, start_local_cluster
from decode_worker.engine import DecodeEngine
from olmo_model.cache_limits import CacheLimits
from olmo_model.runtime import ModelRunner
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

RUNNER_KERNELS = ("embed", "forward", "select_last", "logits")


class StepTimer:
    """Times DecodeEngine._step, and the runner calls made inside it, on every engine."""

    def __init__(self):
        # (batch, start, step seconds, runner seconds)
        self.records: list[tuple[int, float, float, float]] = []
        self._local = threading.local()

    def install(self) -> None:
        for name in RUNNER_KERNELS:
            setattr(ModelRunner, name, self._timed_kernel(getattr(ModelRunner, name)))
        DecodeEngine._step = self._timed_step(DecodeEngine._step)

    def _timed_kernel(self, kernel):
        local = self._local

        def timed(runner, *args, **kwargs):
            start = time.perf_counter()
            try:
                return kernel(runner, *args, **kwargs)
            finally:
                if getattr(local, "in_step", False):
                    local.runner += time.perf_counter() - start
        return timed

    def _timed_step(self, step):
        local, records = self._local, self.records

        def timed(engine):
            batch = len(engine.scheduler.running())
            local.in_step, local.runner = True, 0.0
            start = time.perf_counter()
            try:
                return step(engine)
            finally:
                local.in_step = False
                if batch:
                    records.append((batch, start, time.perf_counter() - start, local.runner))
        return timed


def decode_together(client: GenerationClient, batch: int, tokens: int) -> None:
    requests = [generate_request([1 + i, 2, 3, 4], tokens, ignore_eos=True)
                for i in range(batch)]
    with ThreadPoolExecutor(batch) as pool:
        list(pool.map(lambda r: client.complete(r, timeout=300), requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_bench.json"))
    args = parser.parse_args()
    model = bench_checkpoint("serve", SERVE)
    timer = StepTimer()
    timer.install()
    config = ClusterConfig(model=model, cache=CacheLimits(16, 4096, 1024),
                           router=RouterOptions(local_prefill_below_tokens=0))
    cluster = start_local_cluster(on_loopback(config))
    client = GenerationClient(cluster.router_address)
    results = {"model": str(model), "batches": []}
    try:
        decode_together(client, 1, 8)  # warm up
        for batch in (1, 8):
            timer.records.clear()
            for _ in range(args.repeats):
                decode_together(client, batch, args.tokens)
            rows = [r for r in timer.records if r[0] == batch]
            periods = [b[1] - a[1] for a, b in zip(rows, rows[1:])]
            results["batches"].append({
                "batch": batch, "steps": len(rows),
                "step_ms": 1e3 * statistics.median(r[2] for r in rows),
                "runner_ms": 1e3 * statistics.median(r[3] for r in rows),
                "outside_runner_us": 1e6 * statistics.median(r[2] - r[3] for r in rows),
                "period_ms": 1e3 * statistics.median(periods)})
    finally:
        client.close()
        cluster.stop()
    print(f"\ndecode step on the server, one-stage instance ({model}):")
    print(f"{'batch':>6}{'steps':>7}{'step ms':>9}{'runner ms':>11}{'outside us':>12}"
          f"{'period ms':>11}")
    for row in results["batches"]:
        print(f"{row['batch']:>6}{row['steps']:>7}{row['step_ms']:>9.2f}{row['runner_ms']:>11.2f}"
              f"{row['outside_runner_us']:>12.0f}{row['period_ms']:>11.2f}")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
