"""What the OpenAI-compatible HTTP layer adds over gRPC, on the same server, in one run.

Starts a one-process local cluster (serving checkpoint, 4 layers, hidden 256) with both
APIs, then, from a separate client process (so that client parsing does not share the
server's interpreter), sends lone requests one at a time (the layer's own cost), then
rounds of N concurrent streaming requests, alternating gRPC and HTTP (/v1/completions,
SSE, kept-alive connections). Reports the median TTFT and time per output token of each
API and their differences. Prints a table and writes JSON.

    python3 bench/http_bench.py [--streams 16] [--rounds 6] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
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
    """The client process: alternate gRPC and HTTP rounds; print JSON results."""
    from clients import GrpcTarget, HttpTarget

    targets = {"grpc": GrpcTarget(args.grpc), "http": HttpTarget(args.http)}
    # Lone requests first, alternating: the layer's own cost, without queueing noise.
    lone = {"grpc": [], "http": []}
    for i in range(LONE_REQUESTS + 2):
        for api, target in targets.items():
            result = target.request(prompts(1, args.vocab, 1000 + i)[0], 16)
            if i >= 2:  # two warm-ups
                lone[api].append(result)
    rounds = {"grpc": [], "http": [],
              "lone": {api: {"ttft_ms": 1e3 * statistics.median(r["ttft"] for r in results),
                             "tpot_ms": 1e3 * statistics.median(r["tpot"] for r in results)}
                       for api, results in lone.items()}}
    for round_no in range(args.rounds + 1):  # round 0 warms up
        for api, target in targets.items():
            work = prompts(args.streams, args.vocab, round_no)
            with ThreadPoolExecutor(args.streams) as pool:
                results = list(pool.map(lambda p, t=target: t.request(p, args.tokens), work))
            if round_no:
                rounds[api].append({
                    "ttft_ms": 1e3 * statistics.median(r["ttft"] for r in results),
                    "tpot_ms": 1e3 * statistics.median(r["tpot"] for r in results),
                    "tokens": sum(r["tokens"] for r in results)})
    print(json.dumps(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/http_bench.json"))
    add_client_process_args(parser)
    parser.add_argument("--http", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return

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
        done = subprocess.run(
            [sys.executable, __file__, "--client", "--grpc", cluster.router_address,
             "--http", cluster.http_url, "--vocab", str(vocab), "--streams", str(args.streams),
             "--rounds", str(args.rounds), "--tokens", str(args.tokens)],
            capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr
        rounds = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        cluster.stop()
    lone = rounds.pop("lone")
    summary = {api: {k: statistics.median(r[k] for r in rounds[api])
                     for k in ("ttft_ms", "tpot_ms")} for api in rounds}
    results = {"model": str(model), "streams": args.streams, "tokens": args.tokens,
               "prompt_tokens": PROMPT_TOKENS, "rounds": rounds, "median": summary,
               "lone": lone}
    print(f"\n{PROMPT_TOKENS}-token prompts ({model}); medians, ms:")
    print(f"{'':<26}{'gRPC TTFT':>10}{'HTTP TTFT':>10}{'diff':>8}{'gRPC TPOT':>11}"
          f"{'HTTP TPOT':>10}{'diff':>8}")
    for label, figures in ((f"lone requests (x{LONE_REQUESTS})", lone),
                           (f"{args.streams} streams (x{args.rounds} rounds)", summary)):
        g, h = figures["grpc"], figures["http"]
        print(f"{label:<26}{g['ttft_ms']:>10.2f}{h['ttft_ms']:>10.2f}"
              f"{h['ttft_ms'] - g['ttft_ms']:>8.2f}{g['tpot_ms']:>11.3f}{h['tpot_ms']:>10.3f}"
              f"{h['tpot_ms'] - g['tpot_ms']:>8.3f}")
    print("targets for HTTP over gRPC: < 2 ms TTFT, < 0.2 ms per token")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
