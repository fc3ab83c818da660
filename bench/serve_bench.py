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
import dataclasses
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from checkpoints import SERVE, bench_checkpoint
from clients import GrpcTarget, HttpTarget
from recording import write_results
from slo import percentiles

from cluster.local_cluster import on_loopback, start_local_cluster
from olmo_model.cache_limits import CacheLimits
from pipeline.options import WorkerOptions
from protos import worker_pb2
from protos.vocabulary import Mode, Role
from router.options import RouterOptions

PROMPT_LENGTHS = (32, 128, 512)
OUTPUT_LENGTHS = (16, 64)


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


# The handoff's totals, summed over the workers of each role: (role, field) by name.
HANDOFF_FIELDS = {"kv_bytes": (Role.PREFILL, "kv_bytes_sent"),
                  "pushes": (Role.PREFILL, "pushes"),
                  "export_ms": (Role.PREFILL, "kv_export_ms"),
                  "encode_ms": (Role.PREFILL, "kv_encode_ms"),
                  "transfer_ms": (Role.PREFILL, "kv_transfer_ms"),
                  "assemble_ms": (Role.DECODE, "kv_assemble_ms"),
                  "install_ms": (Role.DECODE, "kv_install_ms")}


def handoff_totals(stats_calls: dict) -> dict[str, float]:
    stats = {role: [get(worker_pb2.StatsRequest()) for get in calls]
             for role, calls in stats_calls.items()}
    return {name: sum(getattr(s, field) for s in stats[role])
            for name, (role, field) in HANDOFF_FIELDS.items()}


def handoff_since(stats_calls: dict, before: dict[str, float]) -> dict[str, float]:
    after = handoff_totals(stats_calls)
    return {name: after[name] - before[name] for name in after}


# A lone OLMo-1B prompt of 512 tokens prefills for 15-60 s on half a CPU: more than the
# router's default 30 s before a first token (after which it is cut and retried) and
# than the default 30 s lease within which a decode reservation's K/V must come.
FIRST_TOKEN_TIMEOUT_S = 300.0
LEASE_MS = 300_000


def start_cluster(model: Path, aggregated: bool, use_ray: bool,
                  worker_options: WorkerOptions | None = None, dtype: str | None = None,
                  chunk_tokens: int = 2048):
    """(cluster, router address, Stats callables of each role's workers); prompts are
    prefilled in passes of at most ``chunk_tokens``."""
    worker_options = worker_options or WorkerOptions()
    if use_ray:
        from cluster.cluster_config import ClusterConfig, RoleConfig
        from cluster.ray_cluster import start_ray_cluster

        config = ClusterConfig(model=str(model), dtype=dtype, port=0, http_port=0,
                               max_sequences=32,
                               max_total_tokens=32768, prefill_chunk_tokens=chunk_tokens,
                               local_prefill_below_tokens=0,
                               mode="aggregated" if aggregated else "disaggregated",
                               prefill=RoleConfig(cpus=0.5), decode=RoleConfig(cpus=0.5),
                               first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S, lease_ms=LEASE_MS,
                               # the cluster's names for the worker options are theirs
                               **dataclasses.asdict(worker_options))
        cluster = start_ray_cluster(config)
        scheduler = cluster.manager.scheduler
        return cluster, cluster.address, {role: [w.stub.Stats for w in scheduler.workers(role)]
                                          for role in Role}
    limits = CacheLimits(max_sequences=32, max_total_tokens=32768,
                         prefill_chunk_tokens=chunk_tokens)
    config = ClusterConfig(
        model=model, mode=Mode.AGGREGATED if aggregated else Mode.DISAGGREGATED, dtype=dtype,
        cache=limits, worker=worker_options,
        # every prompt pushed, as in the recorded runs
        router=RouterOptions(local_prefill_below_tokens=0, lease_ms=LEASE_MS,
                             first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S))
    cluster = start_local_cluster(on_loopback(config, http=True))
    return cluster, cluster.router_address, {
        role: [lambda request, s=s: s.Stats(request, None) for s in servicers]
        for role, servicers in ((Role.PREFILL, cluster.prefill), (Role.DECODE, cluster.decode))}


def bench_mode(model: Path, aggregated: bool, args, vocab: int) -> dict:
    cluster, address, stats = start_cluster(model, aggregated, args.ray)
    target = GrpcTarget(address) if args.api == "grpc" else HttpTarget(cluster.http_url)
    try:
        target.request([1, 2, 3], 2)  # warm up
        before = handoff_totals(stats)
        out = {"handoff_ttft_512_s": handoff_probe(target, vocab, args.probe_repeats)}
        out["handoff_512"] = handoff_since(stats, before)  # the lone prompts' pushes alone
        out["rates"] = []
        rng = np.random.default_rng(0)
        slo = {"ttft": args.slo_ttft, "tpot": args.slo_tpot}
        before = handoff_totals(stats)
        for rate in args.rates:
            out["rates"].append(poisson_run(target, rate, args.requests, rng, vocab, slo))
        totals = handoff_since(stats, before)
        out["kv_bytes"] = totals["kv_bytes"]
        out["kv_transfer_ms"] = totals["transfer_ms"]
        out["kv_pushes"] = totals["pushes"]
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
    write_results(args.out, results)


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
    print_handoff_steps(d["handoff_512"])
    ratio = d["handoff_ttft_512_s"] / a["handoff_ttft_512_s"]
    print(f"TTFT of a lone 512-token prompt: disaggregated {1e3 * d['handoff_ttft_512_s']:.1f} ms,"
          f" aggregated {1e3 * a['handoff_ttft_512_s']:.1f} ms, ratio {ratio:.3f} "
          f"(goal <= 1.10)")


def print_handoff_steps(steps: dict[str, float]) -> None:
    """Per push of the lone 512-token prompts: each step's time (the transfer is the whole
    push as the sender waits for it; the steps inside it overlap) and the bandwidth."""
    pushes = max(1, steps["pushes"])
    mib = steps["kv_bytes"] / pushes / 2**20
    print(f"\nKV handoff of a lone 512-token prompt, per push ({mib:.1f} MiB, "
          f"{steps['pushes']:.0f} pushes):")
    print(f"{'step':<12}{'ms':>8}   where")
    for name, where in (("export", "prefill: K/V out of the pages"),
                        ("encode", "prefill: copies into chunks, checksum"),
                        ("transfer", "prefill: the whole push, encode and verdict included"),
                        ("assemble", "decode: verify, copy chunks into arrays"),
                        ("install", "decode: K/V into the pages")):
        print(f"{name:<12}{steps[name + '_ms'] / pushes:>8.1f}   {where}")
    seconds = steps["transfer_ms"] / 1000
    print(f"bandwidth while pushing: {mib * pushes / max(1e-9, seconds):.0f} MiB/s")


if __name__ == "__main__":
    main()
