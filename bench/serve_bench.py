"""Serving benchmark: disaggregated vs aggregated, Poisson arrivals, in one run.

For each mode a local cluster (router + workers over gRPC on 127.0.0.1) serves the same
random checkpoint. At each arrival rate, requests from a fixed prompt/output length mix
arrive as a Poisson process; we record TTFT, TPOT and end-to-end latency (p50/p90/p99),
throughput, goodput under an SLO, and KV transfer bytes and time. A separate sequential
probe measures what the KV handoff adds to TTFT for a 512-token prompt. Requests go over
gRPC, or with ``--api http`` over the OpenAI-compatible API (so any OpenAI-compatible load
generator can be compared against the same server).

    python3 bench/serve_bench.py [--rates 1 2 4] [--requests 24] [--api grpc|http] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from checkpoints import SERVE, bench_checkpoint
from clients import GrpcTarget, HttpTarget

from cluster.local_cluster import start_local_cluster
from olmo_model.kv_pages import CacheLimits
from protos import worker_pb2
from router.service import RouterOptions

PROMPT_LENGTHS = (32, 128, 512)
OUTPUT_LENGTHS = (16, 64)


def percentiles(values: list[float]) -> dict:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def poisson_run(target, rate: float, count: int, rng, vocab: int, slo: dict) -> dict:
    arrivals = np.cumsum(rng.exponential(1.0 / rate, count))
    work = [(rng.integers(1, vocab, int(rng.choice(PROMPT_LENGTHS))).tolist(),
             int(rng.choice(OUTPUT_LENGTHS))) for _ in range(count)]
    results: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def fire(i):
        delay = arrivals[i] - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        result = target.request(*work[i])
        with lock:
            results.append(result)

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(fire, range(count)))
    wall = time.perf_counter() - start
    good = [r for r in results if r["ttft"] <= slo["ttft"] and r["tpot"] <= slo["tpot"]]
    return {
        "rate": rate, "requests": count, "wall_s": wall,
        "ttft_s": percentiles([r["ttft"] for r in results]),
        "tpot_s": percentiles([r["tpot"] for r in results]),
        "e2e_s": percentiles([r["e2e"] for r in results]),
        "throughput_tok_s": sum(r["tokens"] for r in results) / wall,
        "goodput_req_s": len(good) / wall,
    }


def handoff_probe(target, vocab: int, repeats: int) -> float:
    """Median TTFT of a lone 512-token prompt."""
    rng = np.random.default_rng(5)
    samples = [target.request(rng.integers(1, vocab, 512).tolist(), 1)["ttft"]
               for _ in range(repeats)]
    return statistics.median(samples)


def prefill_transfer_totals(prefill_stats) -> tuple[int, float, int]:
    stats = [get(worker_pb2.StatsRequest()) for get in prefill_stats]
    return (sum(s.kv_bytes_sent for s in stats), sum(s.kv_transfer_ms for s in stats),
            sum(s.pushes for s in stats))


def start_cluster(model: Path, aggregated: bool, use_ray: bool):
    """(cluster, router address, per-prefill-worker Stats callables)."""
    if use_ray:
        from cluster.cluster_config import ClusterConfig, RoleConfig
        from cluster.ray_cluster import start_ray_cluster

        config = ClusterConfig(model=str(model), port=0, http_port=0, max_sequences=32,
                               max_total_tokens=32768, local_prefill_below_tokens=0,
                               mode="aggregated" if aggregated else "disaggregated",
                               prefill=RoleConfig(cpus=0.5), decode=RoleConfig(cpus=0.5))
        cluster = start_ray_cluster(config)
        stats = [w.stub.Stats for w in cluster.manager.scheduler.workers("prefill")]
        return cluster, cluster.address, stats
    limits = CacheLimits(max_num_sequences=32, max_total_tokens=32768, prefill_chunk_size=2048)
    cluster = start_local_cluster(model, num_prefill=1, num_decode=1, aggregated=aggregated,
                                  limits=limits, http_port=0,
                                  # every prompt pushed, as in the recorded runs
                                  options=RouterOptions(local_prefill_below=0))
    return cluster, cluster.router_address, [
        lambda request, p=p: p.Stats(request, None) for p in cluster.prefill]


def bench_mode(model: Path, aggregated: bool, args, vocab: int) -> dict:
    cluster, address, prefill_stats = start_cluster(model, aggregated, args.ray)
    target = GrpcTarget(address) if args.api == "grpc" else HttpTarget(cluster.http_url)
    try:
        target.request([1, 2, 3], 2)  # warm up
        out = {"handoff_ttft_512_s": handoff_probe(target, vocab, args.probe_repeats),
               "rates": []}
        rng = np.random.default_rng(0)
        slo = {"ttft": args.slo_ttft, "tpot": args.slo_tpot}
        before = prefill_transfer_totals(prefill_stats)
        for rate in args.rates:
            out["rates"].append(poisson_run(target, rate, args.requests, rng, vocab, slo))
        after = prefill_transfer_totals(prefill_stats)
        out["kv_bytes"] = after[0] - before[0]
        out["kv_transfer_ms"] = after[1] - before[1]
        out["kv_pushes"] = after[2] - before[2]
        return out
    finally:
        target.close()
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: a random 4-layer hidden-256 checkpoint)")
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--requests", type=int, default=24, help="per rate")
    parser.add_argument("--probe-repeats", type=int, default=5)
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.2, help="seconds")
    parser.add_argument("--api", choices=["grpc", "http"], default="grpc",
                        help="drive the gRPC Generate API or the OpenAI-compatible HTTP API")
    parser.add_argument("--ray", action="store_true",
                        help="workers as Ray actors in their own processes (default: one process)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_bench.json"))
    args = parser.parse_args()
    model = args.model or bench_checkpoint("serve", SERVE)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    results = {"model": str(model), "api": args.api,
               "workers": "ray actors" if args.ray else "one process",
               "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
               "disaggregated": bench_mode(model, False, args, vocab),
               "aggregated": bench_mode(model, True, args, vocab)}
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


def print_table(results: dict) -> None:
    d, a = results["disaggregated"], results["aggregated"]
    slo = results["slo"]
    print(f"\nmodel {results['model']} ({results['workers']}); SLO TTFT <= {slo['ttft_s']} s, "
          f"TPOT <= {slo['tpot_s']} s")
    print(f"{'mode':<8}{'rate':>6}{'TTFT p50/p90/p99 (ms)':>26}{'TPOT p50/p90 (ms)':>20}"
          f"{'E2E p50/p99 (s)':>18}{'tok/s':>8}{'good/s':>8}")
    for name, mode in (("disagg", d), ("agg", a)):
        for r in mode["rates"]:
            t, p, e = r["ttft_s"], r["tpot_s"], r["e2e_s"]
            print(f"{name:<8}{r['rate']:>6.1f}"
                  f"{1e3 * t['p50']:>10.0f}/{1e3 * t['p90']:.0f}/{1e3 * t['p99']:.0f}"
                  f"{1e3 * p['p50']:>13.1f}/{1e3 * p['p90']:.1f}"
                  f"{e['p50']:>11.2f}/{e['p99']:.2f}"
                  f"{r['throughput_tok_s']:>8.0f}{r['goodput_req_s']:>8.2f}")
    mb = d["kv_bytes"] / 2**20
    per_push = d["kv_transfer_ms"] / max(1, d["kv_pushes"])
    print(f"\nKV transfer: {mb:.1f} MiB in {d['kv_pushes']} pushes, {per_push:.1f} ms per push "
          f"({mb / max(1e-9, d['kv_transfer_ms'] / 1e3):.0f} MiB/s while pushing)")
    ratio = d["handoff_ttft_512_s"] / a["handoff_ttft_512_s"]
    print(f"TTFT of a lone 512-token prompt: disaggregated {1e3 * d['handoff_ttft_512_s']:.1f} ms,"
          f" aggregated {1e3 * a['handoff_ttft_512_s']:.1f} ms, ratio {ratio:.3f} "
          f"(goal <= 1.10)")


if __name__ == "__main__":
    main()
