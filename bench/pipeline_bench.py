"""What pipeline stages add to a decode step: hidden-state hops on loopback, in one run.

For decode instances of 1, 2 and 4 stages (over the same 4-layer random checkpoint, the
prefill side unstaged), measures the decode step time (median inter-token time at the
client) at batch 1 and batch 8, and reports the added time per step and per hop next
to the unstaged step. Prints a table and writes JSON.

    python3 bench/pipeline_bench.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checkpoints import SERVE, bench_checkpoint
from recording import write_results

from cluster.cluster_config import ClusterConfig, RoleConfig
from cluster.local_cluster import on_loopback, start_local_cluster
from olmo_model.cache_limits import CacheLimits
from router.client import GenerationClient, generate_request
from router.options import RouterOptions


def step_times(client: GenerationClient, batch: int, tokens: int) -> list[float]:
    """Inter-token gaps of ``batch`` concurrent requests (all decoding together)."""

    def one(i: int) -> list[float]:
        stamps = []
        for response in client.stream(generate_request([1 + i, 2, 3, 4], tokens,
                                                       ignore_eos=True)):
            if response.token_ids:
                stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps[1:], stamps[2:])]  # skip the first token

    with ThreadPoolExecutor(batch) as pool:
        return [gap for gaps in pool.map(one, range(batch)) for gap in gaps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline_bench.json"))
    args = parser.parse_args()
    model = bench_checkpoint("serve", SERVE)
    limits = CacheLimits(max_sequences=16, max_total_tokens=4096, prefill_chunk_tokens=1024)
    results = {"model": str(model), "layouts": []}
    for stages in args.stages:
        config = ClusterConfig(model=model, cache=limits, decode=RoleConfig(stages=stages),
                               router=RouterOptions(local_prefill_below_tokens=0))
        cluster = start_local_cluster(on_loopback(config))
        client = GenerationClient(cluster.router_address)
        try:
            step_times(client, 1, 4)  # warm up
            row = {"decode_stages": stages}
            for batch in (1, 8):
                medians = [statistics.median(step_times(client, batch, args.tokens))
                           for _ in range(args.repeats)]
                row[f"step_b{batch}_ms"] = 1000 * statistics.median(medians)
            results["layouts"].append(row)
        finally:
            client.close()
            cluster.stop()
    base = results["layouts"][0]
    print(f"\ndecode step time by decode-instance stage count ({model}):")
    print(f"{'stages':>7}{'b1 ms':>9}{'+/step':>9}{'+/hop':>8}{'b8 ms':>9}{'+/step':>9}"
          f"{'+/hop':>8}")
    for row in results["layouts"]:
        hops = row["decode_stages"] - 1
        cells = []
        for b in (1, 8):
            extra = row[f"step_b{b}_ms"] - base[f"step_b{b}_ms"]
            row[f"added_b{b}_ms"] = extra
            cells.append(f"{row[f'step_b{b}_ms']:>9.2f}{extra:>9.2f}"
                         f"{(extra / hops if hops else 0.0):>8.2f}")
        print(f"{row['decode_stages']:>7}" + "".join(cells))
    write_results(args.out, results)


if __name__ == "__main__":
    main()
