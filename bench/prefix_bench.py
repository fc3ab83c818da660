"""Prefix caching and KV-aware routing against no cache, on 2 prefill + 2 decode instances.

Two workloads, each against clusters started in turn in one run: cache off (every
prompt prefilled whole and pushed whole, as before prefix caching), cache on with
load-only routing, and cache on with KV-aware routing at each ``--kv-weights`` (1, and 4,
the default). Conditional disaggregation is on wherever the cache is: a decode
worker prefills a prompt itself when at most 64 tokens of it are uncached there.

(a) shared system prompt: every request is one 1024-token system prompt plus a unique
    32-64 token suffix; ``--clients`` closed-loop clients.
(b) chats: conversations of 4 turns, each turn resending the whole conversation (a
    512-token system prompt shared by all chats, then per turn a 32-64 token user
    message and the previous answer); every chat's first turn, then every chat's
    second, and so on (users think between turns), ``--clients`` requests at a time.

Requests come from a separate client process over gRPC. Reports TTFT p50/p90, request
and token throughput, the prefix hit rate (prompt tokens the instance that prefilled
them found cached, from the workers' counters), and K/V bytes pushed per request, as
medians of ``--rounds`` rounds (each configuration once per round, in rotating order;
ratios against the cache-off run of the same round). Prints a table and writes JSON.

    python3 bench/prefix_bench.py [--requests 48] [--chats 24] [--clients 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from checkpoints import SERVE, bench_checkpoint
from recording import write_results

from protos.vocabulary import Role

SYSTEM_TOKENS = {"shared": 1024, "chat": 512}
SUFFIX_TOKENS = (32, 64)
OUTPUT_TOKENS = {"shared": 16, "chat": 32}
TURNS = 4
CONFIGS = {
    "cache off": dict(prefix_cache=False, kv_weight=0.0, local_prefill_below_tokens=0),
    "cache, load-only routing": dict(prefix_cache=True, kv_weight=0.0),
}  # and KV-aware routing at each of --kv-weights


# --- the client process --------------------------------------------------------------

def timed(client, prompt: list[int], max_tokens: int) -> tuple[dict, list[int]]:
    from router.client import generate_request

    start = time.perf_counter()
    first, tokens = None, []
    for response in client.stream(generate_request(prompt, max_tokens, ignore_eos=True),
                                  timeout=600):
        if response.token_ids:
            first = first or time.perf_counter()
            tokens.extend(response.token_ids)
    return {"ttft": first - start, "prompt": len(prompt), "tokens": len(tokens)}, tokens


def suffix(rng, vocab: int) -> list[int]:
    return rng.integers(1, vocab, int(rng.integers(*SUFFIX_TOKENS, endpoint=True))).tolist()


def shared_workload(client, args, rng) -> list[dict]:
    system = rng.integers(1, args.vocab, SYSTEM_TOKENS["shared"]).tolist()
    prompts = [system + suffix(rng, args.vocab) for _ in range(args.requests)]
    with ThreadPoolExecutor(args.clients) as pool:
        return list(pool.map(lambda p: timed(client, p, OUTPUT_TOKENS["shared"])[0], prompts))


def chat_workload(client, args, rng) -> list[dict]:
    """Turn t of every chat, then turn t + 1: users think between turns, so the load a
    chat's next turn meets has nothing to do with where its last turn ran."""
    system = rng.integers(1, args.vocab, SYSTEM_TOKENS["chat"]).tolist()
    contexts = [list(system) for _ in range(args.chats)]
    results = []

    def turn(chat: int) -> dict:
        prompt = contexts[chat] + suffix(np.random.default_rng((args.seed, chat, len(
            contexts[chat]))), args.vocab)
        result, answer = timed(client, prompt, OUTPUT_TOKENS["chat"])
        contexts[chat] = prompt + answer
        return result

    with ThreadPoolExecutor(args.clients) as pool:
        for _ in range(TURNS):
            results += pool.map(turn, range(args.chats))
    return results


def client_main(args) -> None:
    from router.client import GenerationClient

    client = GenerationClient(args.address)
    rng = np.random.default_rng(args.seed)
    run = shared_workload if args.workload == "shared" else chat_workload
    start = time.perf_counter()
    results = run(client, args, rng)
    print(json.dumps({"wall": time.perf_counter() - start, "requests": results}))


# --- the server side ---------------------------------------------------------------------

def counters(cluster) -> dict:
    """What the instance leaders counted: prefix lookups and hits, K/V pushed."""
    decode = [s for s in cluster.decode if s.engine.chain is not None]
    prefill = [s for s in cluster.prefill if s.engine.chain is not None]
    total = {"kv_bytes": sum(s.stage.receiver.bytes_received for s in decode),
             "prefilled": sum(s.engine.counters.prefilled_tokens for s in [*decode, *prefill])}
    for role, servicers in ((Role.DECODE, decode), (Role.PREFILL, prefill)):
        stats = [s.engine.cache.stats() for s in servicers]
        total[f"{role}_query"] = sum(s.query_tokens for s in stats)
        total[f"{role}_hit"] = sum(s.hit_tokens for s in stats)
    total["local_prefills"] = cluster.router.metrics.registry.get_sample_value(
        "olmo_local_prefills_total") or 0
    return total


def run_config(model: Path, vocab: int, workload: str, config: dict, args) -> dict:
    from cluster.cluster_config import ClusterConfig, RoleConfig
    from cluster.local_cluster import on_loopback, start_local_cluster
    from olmo_model.cache_limits import CacheLimits
    from pipeline.options import WorkerOptions
    from router.options import RouterOptions

    options = RouterOptions(kv_weight=config["kv_weight"],
                            local_prefill_below_tokens=config.get("local_prefill_below", 64))
    cluster = start_local_cluster(on_loopback(ClusterConfig(
        model=model, cache=CacheLimits(16, 32768, 2048), router=options,
        worker=WorkerOptions(config["prefix_cache"]), prefill=RoleConfig(instances=2),
        decode=RoleConfig(instances=2))))
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--client", "--address", cluster.router_address,
             "--vocab", str(vocab), "--workload", workload, "--requests", str(args.requests),
             "--chats", str(args.chats), "--clients", str(args.clients),
             "--seed", str(args.seed)],
            capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, done.stderr
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        after = counters(cluster)
    finally:
        cluster.stop()
    requests = measured["requests"]
    ttfts = [1e3 * r["ttft"] for r in requests]
    prompt_tokens = sum(r["prompt"] for r in requests)
    return {
        "requests": len(requests), "wall_s": measured["wall"],
        "ttft_ms": {"p50": float(np.percentile(ttfts, 50)),
                    "p90": float(np.percentile(ttfts, 90))},
        "requests_per_s": len(requests) / measured["wall"],
        "output_tokens_per_s": sum(r["tokens"] for r in requests) / measured["wall"],
        "prompt_tokens": prompt_tokens,
        # Prompt tokens the instance that prefilled them (decode or prefill) found cached.
        "hit_rate": 1 - after["prefilled"] / prompt_tokens,
        "decode_hit_rate": after["decode_hit"] / max(1, after["decode_query"]),
        "kv_bytes_per_request": after["kv_bytes"] / len(requests),
        "local_prefills": int(after["local_prefills"]), "counters": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="workload (a) requests")
    parser.add_argument("--chats", type=int, default=24, help="workload (b) conversations")
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each configuration this many times, in rotating order")
    parser.add_argument("--kv-weights", type=float, nargs="+", default=[1.0, 4.0],
                        help="a KV-aware configuration per routing weight")
    parser.add_argument("--workloads", nargs="+", default=["shared", "chat"],
                        choices=["shared", "chat"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix_bench.json"))
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return

    model = bench_checkpoint("serve", SERVE)
    vocab = SERVE["vocab_size"]
    results = {"model": str(model), "clients": args.clients, "rounds": args.rounds,
               "workloads": {}}
    configs = dict(CONFIGS)
    for weight in args.kv_weights:
        configs[f"cache, KV-aware, weight {weight:g}"] = dict(prefix_cache=True,
                                                              kv_weight=weight)
    names = list(configs)
    for workload in args.workloads:
        rounds: dict[str, list[dict]] = {name: [] for name in names}
        for round_no in range(args.rounds):
            # Rotated, so that no configuration always runs first (or last) in a round.
            for name in names[round_no % len(names):] + names[:round_no % len(names)]:
                rounds[name].append(run_config(model, vocab, workload, configs[name], args))
        results["workloads"][workload] = {name: summarize(runs, rounds["cache off"])
                                          for name, runs in rounds.items()}
    report(results)
    write_results(args.out, results)


def summarize(runs: list[dict], baseline: list[dict]) -> dict:
    """Medians over rounds; ratios to the cache-off run of the same round, then medians."""
    def median(values):
        return float(np.median(values))

    return {
        "requests": runs[0]["requests"], "rounds": runs,
        "ttft_ms": {q: median([r["ttft_ms"][q] for r in runs]) for q in ("p50", "p90")},
        "ttft_p50_x_off": median([b["ttft_ms"]["p50"] / r["ttft_ms"]["p50"]
                                  for r, b in zip(runs, baseline)]),
        "bytes_x_off": median([b["kv_bytes_per_request"] / max(1.0, r["kv_bytes_per_request"])
                               for r, b in zip(runs, baseline)]),
        **{key: median([r[key] for r in runs])
           for key in ("requests_per_s", "output_tokens_per_s", "hit_rate",
                       "kv_bytes_per_request", "local_prefills")},
    }


def report(results: dict) -> None:
    titles = {"shared": "(a) 1024-token shared system prompt + 32-64 token suffix",
              "chat": f"(b) {TURNS}-turn chats (512-token system prompt)"}
    for workload, configs in results["workloads"].items():
        print(f"\n{titles[workload]}, {configs['cache off']['requests']} requests, "
              f"{results['clients']} clients, 2 prefill + 2 decode; medians of "
              f"{results['rounds']} rounds:")
        print(f"{'':<29}{'TTFT p50':>9}{'p90':>8}{'x off':>7}{'req/s':>7}{'tok/s':>7}"
              f"{'hit':>7}{'KV KiB/req':>11}{'x off':>7}{'local':>6}   TTFT p50 by round")
        for name, r in configs.items():
            by_round = " ".join(f"{run['ttft_ms']['p50']:.0f}" for run in r["rounds"])
            print(f"{name:<29}{r['ttft_ms']['p50']:>9.1f}{r['ttft_ms']['p90']:>8.1f}"
                  f"{r['ttft_p50_x_off']:>7.1f}{r['requests_per_s']:>7.2f}"
                  f"{r['output_tokens_per_s']:>7.0f}{100 * r['hit_rate']:>6.0f}%"
                  f"{r['kv_bytes_per_request'] / 1024:>11.1f}{r['bytes_x_off']:>7.1f}"
                  f"{r['local_prefills']:>6.0f}   {by_round}")
    print("\ngoals: (a) TTFT p50 >= 5x lower with cache + KV-aware routing, hit rate >= 90%;"
          " (b) K/V bytes per request >= 10x lower")


if __name__ == "__main__":
    main()
