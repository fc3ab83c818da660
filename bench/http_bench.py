"""What the OpenAI-compatible HTTP layer adds over gRPC, on the same server, in one run.

Starts a one-process local cluster (serving checkpoint, 4 layers, hidden 256) with both
APIs, then, from a separate client process (so that client parsing does not share the
server's interpreter), sends lone requests one at a time (the layer's own cost), then
rounds of N concurrent streaming requests, alternating gRPC and HTTP (/v1/completions,
SSE, kept-alive connections). Reports the median TTFT and time per output token of each
API and their differences. Prints a table and writes JSON.

With ``--tracing``, what request traces cost instead, two ways (spans go as
tracing.configure sends them: batched OTLP/gRPC, here to bench/trace_sink.py in a process
of its own). Within runs: each lone request and each round is sent twice, traced (a
sampled traceparent) and untraced (an unsampled one), in alternating order, so that the
machine's drift cancels; the background work of exporting falls on both. Across runs:
pairs of client runs, one with tracing off and one with every request traced, in
alternating order. Reports each API's TTFT and TPOT medians traced over untraced and on
over off, and the share of each traced request's TTFT that its spans cover.

    python3 bench/http_bench.py [--streams 16] [--rounds 6] [--tokens 64]
    python3 bench/http_bench.py --tracing [--pairs 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from checkpoints import SERVE, bench_checkpoint
from clients import add_client_process_args
from recording import write_results

PROMPT_TOKENS = 32
LONE_REQUESTS = 30


def prompts(streams: int, vocab: int, round_no: int) -> list[list[int]]:
    rng = np.random.default_rng(round_no)
    return [rng.integers(1, vocab, PROMPT_TOKENS).tolist() for _ in range(streams)]


def client_main(args) -> None:
    """The client process: alternate gRPC and HTTP rounds (with ``--alternate-traces``,
    each traced and untraced too); print JSON results."""
    from clients import GrpcTarget, HttpTarget

    targets = {"grpc": GrpcTarget(args.grpc), "http": HttpTarget(args.http)}
    # A traced request sends a sampled traceparent, an untraced one an unsampled one.
    states = (("traced", "01"), ("untraced", "00")) if args.alternate_traces else (("", ""),)

    def variants(turn: int) -> list[tuple[str, object, str]]:
        """(label, target, traceparent flags) of each way to send, in this turn's order."""
        order = states if turn % 2 == 0 else states[::-1]
        return [(f"{api} {state}".strip(), target, flags)
                for api, target in targets.items() for state, flags in order]

    def traceparent(flags: str) -> str:
        return f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-{flags}"

    # Lone requests first, alternating: the layer's own cost, without queueing noise.
    # Every request has a prompt of its own: none finds another's prefix cached.
    lone: dict[str, list] = {label: [] for label, _, _ in variants(0)}
    for i in range(args.lone + 2):
        for k, (label, target, flags) in enumerate(variants(i)):
            result = target.request(prompts(1, args.vocab, 10_000 + 8 * i + k)[0], 16,
                                    traceparent=traceparent(flags) if flags else "")
            if i >= 2:  # two warm-ups
                lone[label].append(result)
    rounds = {**{label: [] for label in lone},
              "lone": {label: {"ttft_ms": 1e3 * statistics.median(r["ttft"] for r in results),
                               "tpot_ms": 1e3 * statistics.median(r["tpot"] for r in results)}
                       for label, results in lone.items()}}
    for round_no in range(args.rounds + 1):  # round 0 warms up
        for k, (label, target, flags) in enumerate(variants(round_no)):
            work = prompts(args.streams, args.vocab, 8 * round_no + k)
            with ThreadPoolExecutor(args.streams) as pool:
                results = list(pool.map(lambda p, t=target, f=flags: t.request(
                    p, args.tokens, traceparent=traceparent(f) if f else ""), work))
            if round_no:
                rounds[label].append({
                    "ttft_ms": 1e3 * statistics.median(r["ttft"] for r in results),
                    "tpot_ms": 1e3 * statistics.median(r["tpot"] for r in results),
                    "tokens": sum(r["tokens"] for r in results)})
    print(json.dumps(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--lone", type=int, default=LONE_REQUESTS,
                        help="lone requests per API before the rounds")
    parser.add_argument("--tracing", action="store_true",
                        help="compare tracing off and on instead of gRPC and HTTP")
    parser.add_argument("--pairs", type=int, default=5,
                        help="--tracing: interleaved runs, and off/on pairs of runs")
    parser.add_argument("--alternate-traces", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    add_client_process_args(parser)
    parser.add_argument("--http", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    args.out = args.out or Path("bench/results/" + ("trace_bench.json" if args.tracing
                                                    else "http_bench.json"))

    from cluster.cluster_config import ClusterConfig
    from cluster.local_cluster import on_loopback, start_local_cluster
    from olmo_model.cache_limits import CacheLimits
    from router.options import RouterOptions

    model = bench_checkpoint("serve", SERVE)
    vocab = SERVE["vocab_size"]
    config = ClusterConfig(model=model, cache=CacheLimits(32, 8192, 1024),
                           router=RouterOptions(local_prefill_below_tokens=0))
    cluster = start_local_cluster(on_loopback(config, http=True))
    try:
        if args.tracing:
            compare_tracing(cluster, vocab, args, model)
            return
        rounds = client_run(cluster, vocab, args)
    finally:
        cluster.stop()
    summary = medians(rounds)["streams"]
    lone = rounds.pop("lone")
    results = {"model": str(model), "streams": args.streams, "tokens": args.tokens,
               "prompt_tokens": PROMPT_TOKENS, "rounds": rounds, "median": summary,
               "lone": lone}
    print(f"\n{PROMPT_TOKENS}-token prompts ({model}); medians, ms:")
    print(f"{'':<26}{'gRPC TTFT':>10}{'HTTP TTFT':>10}{'diff':>8}{'gRPC TPOT':>11}"
          f"{'HTTP TPOT':>10}{'diff':>8}")
    for label, figures in ((f"lone requests (x{args.lone})", lone),
                           (f"{args.streams} streams (x{args.rounds} rounds)", summary)):
        g, h = figures["grpc"], figures["http"]
        print(f"{label:<26}{g['ttft_ms']:>10.2f}{h['ttft_ms']:>10.2f}"
              f"{h['ttft_ms'] - g['ttft_ms']:>8.2f}{g['tpot_ms']:>11.3f}{h['tpot_ms']:>10.3f}"
              f"{h['tpot_ms'] - g['tpot_ms']:>8.3f}")
    print("targets for HTTP over gRPC: < 2 ms TTFT, < 0.2 ms per token")
    write_results(args.out, results)


def client_run(cluster, vocab: int, args, alternate_traces: bool = False) -> dict:
    """One run of the client process against ``cluster``: its rounds, by API (and, with
    ``alternate_traces``, traced or not)."""
    done = subprocess.run(
        [sys.executable, __file__, "--client", "--grpc", cluster.router_address,
         "--http", cluster.http_url, "--vocab", str(vocab), "--streams", str(args.streams),
         "--rounds", str(args.rounds), "--tokens", str(args.tokens), "--lone", str(args.lone),
         *(["--alternate-traces"] if alternate_traces else [])],
        capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def medians(run: dict) -> dict:
    """A client run's TTFT and TPOT medians: lone requests, and over its rounds."""
    return {"lone": run["lone"],
            "streams": {label: {k: statistics.median(r[k] for r in rounds)
                                for k in ("ttft_ms", "tpot_ms")}
                        for label, rounds in run.items() if label != "lone"}}


def compare_tracing(cluster, vocab: int, args, model: Path) -> None:
    """What tracing costs, measured two ways (see the docstring): requests traced or not
    in turn within one run, and runs with tracing off and on in turn."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from protos import tracing

    sink = subprocess.Popen([sys.executable, str(Path(__file__).parent / "trace_sink.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        # As tracing.configure sets it up, to the sink's address.
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{port}",
                                                        insecure=True))
        resource = Resource.create({SERVICE_NAME: "olmo-bench"})
        # Within a run: only requests whose client sends a sampled traceparent are traced.
        interleaved = []
        for run in range(args.pairs):
            tracing.install(processor, resource, sample_ratio=0.0)
            interleaved.append(medians(client_run(cluster, vocab, args, True)))
            print(f"interleaved run {run}: {json.dumps(interleaved[-1])}", flush=True)
        pairs = []
        for pair in range(args.pairs):
            runs = {}
            for state in ("off", "on") if pair % 2 == 0 else ("on", "off"):
                tracing.install(processor if state == "on" else None, resource)
                runs[state] = medians(client_run(cluster, vocab, args))
                print(f"pair {pair} tracing {state}: {json.dumps(runs[state])}", flush=True)
            pairs.append(runs)
        tracing.install(None)
        processor.shutdown()  # what is batched goes out first
        sink.stdin.close()
        collected = json.loads(sink.stdout.readline())
    finally:
        sink.kill()
    parts = [(part, api, k) for part in ("lone", "streams") for api in ("grpc", "http")
             for k in ("ttft_ms", "tpot_ms")]
    within = {f"{part} {api} {k}": [r[part][f"{api} traced"][k] / r[part][f"{api} untraced"][k]
                                    for r in interleaved] for part, api, k in parts}
    across = {f"{part} {api} {k}": [p["on"][part][api][k] / p["off"][part][api][k]
                                    for p in pairs] for part, api, k in parts}
    coverage = sorted(collected["ttft_coverage"])
    results = {"model": str(model), "streams": args.streams, "tokens": args.tokens,
               "prompt_tokens": PROMPT_TOKENS, "lone": args.lone, "rounds": args.rounds,
               "interleaved_runs": interleaved, "pairs": pairs,
               "traced_over_untraced": within, "on_over_off": across,
               "collected": {"spans": collected["spans"], "traces": collected["traces"],
                             "ttft_coverage": coverage}}
    print(f"\n{model}: lone = {args.lone} requests per API and state, streams = "
          f"{args.streams} x {args.rounds} rounds; median (min-max) of {args.pairs} runs")
    print(f"{'':<24}{'traced / untraced':>26}{'tracing on / off':>26}")
    for label in within:
        cells = [f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
                 for v in (within[label], across[label])]
        print(f"  {label:<22}{cells[0]:>26}{cells[1]:>26}")
    if coverage:
        print(f"{collected['spans']} spans in {collected['traces']} traces; TTFT covered by "
              f"spans: median {statistics.median(coverage):.1%}, 5th percentile "
              f"{coverage[len(coverage) // 20]:.1%}, lowest {coverage[0]:.1%} "
              f"({len(coverage)} requests)")
    print("targets: TTFT p50 at most 1.02x with tracing on; spans cover >= 95% of TTFT")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
