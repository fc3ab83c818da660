"""A router started again over running workers: warm from their KV events, or cold.

Multi-turn chats (a 512-token system prompt of each chat's own, then per turn a 32-64
token user message and the previous answer; every chat's turn t, then every chat's turn
t + 1. With a system prompt they all shared, KV-aware routing keeps every chat on the
instance that cached it first, and a router that starts cold finds that out from its
first request)
on two aggregated decode instances of the serving checkpoint (4 layers, hidden 256).
Turns 1 to 3 go through one router, ``--clients`` requests at a time (so that load
spreads the chats over both instances); then a second router is started over the same
workers (the first one stopped) and turn 4 goes through it, one request at a time, the
chats in a shuffled order. Three
runs, each on a cluster of its own: the second router with KV events (the workers tell
it what they cache), the second router without (it estimates from what it has sent,
which is nothing yet), and no restart (turn 4 through the first router: the warm hit
rate). Reports the prefix hit rate (prompt tokens found cached, from each response's
usage) over turn 4's first ``--first`` requests and over all of it, and how many of
those first requests went where their chat was cached. Prints a table and writes JSON.

    python3 bench/router_restart_bench.py [--chats 24] [--first 10] [--clients 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from checkpoints import SERVE, bench_checkpoint
from recording import write_results

SYSTEM_TOKENS, SUFFIX_TOKENS, ANSWER_TOKENS, TURNS = 512, (32, 64), 32, 4
RUNS = {"restart, KV events": dict(restart=True, kv_events=True),
        "restart, estimate only": dict(restart=True, kv_events=False),
        "no restart": dict(restart=False, kv_events=True)}


def turn(client, context: list[int], rng, vocab: int) -> tuple[list[int], int, int]:
    """One chat turn: its prompt and answer (the chat's next context), its prompt's
    length, and how many of its tokens were found cached."""
    from router.client import generate_request

    prompt = context + rng.integers(1, vocab, int(rng.integers(*SUFFIX_TOKENS,
                                                               endpoint=True))).tolist()
    answer, cached = [], 0
    for response in client.stream(generate_request(prompt, ANSWER_TOKENS, ignore_eos=True),
                                  timeout=300):
        answer += response.token_ids
        cached = max(cached, response.usage.cached_tokens)
    return prompt + answer, len(prompt), cached


def run(model: Path, args, restart: bool, kv_events: bool) -> dict:
    from cluster.cluster_config import ClusterConfig, RoleConfig
    from cluster.local_cluster import on_loopback, start_local_cluster
    from olmo_model.cache_limits import CacheLimits
    from protos.vocabulary import Mode, Role
    from router.client import GenerationClient
    from router.options import RouterOptions
    from router.server import serve_router, static_scheduler

    options = RouterOptions(kv_events=kv_events)
    config = ClusterConfig(model=model, mode=Mode.AGGREGATED,
                           decode=RoleConfig(instances=2),
                           cache=CacheLimits(16, 16384, 512), router=options)
    cluster = start_local_cluster(on_loopback(config))
    vocab, rng = SERVE["vocab_size"], np.random.default_rng(args.seed)
    contexts = [rng.integers(1, vocab, SYSTEM_TOKENS).tolist() for _ in range(args.chats)]
    second = None
    try:
        client = GenerationClient(cluster.router_address)
        with ThreadPoolExecutor(args.clients) as pool:  # load spreads the chats
            for t in range(TURNS - 1):
                contexts = list(pool.map(
                    lambda c, now=contexts, t=t: turn(
                        client, now[c], np.random.default_rng((args.seed, t, c)), vocab)[0],
                    range(args.chats)))
        client.close()
        address = cluster.router_address
        if restart:
            decode = [w.address for w in cluster.router.scheduler.workers(Role.DECODE)]
            cluster.servers[-1].stop(grace=0.5)  # the router's: started last
            cluster.router.close()
            options = dataclasses.replace(cluster.router.options, host="127.0.0.1", port=0)
            second, router = serve_router(model, static_scheduler([], decode, cluster.secret,
                                                                  options), options)
            address = f"127.0.0.1:{second.port}"
        client = GenerationClient(address)
        last = []
        # Users come back in an order of their own (in turn order, a load-only pick's
        # round robin would send each chat back where it was, by chance).
        for chat in np.random.default_rng(args.seed + 1).permutation(args.chats):
            contexts[chat], prompt, cached = turn(client, contexts[chat], rng, vocab)
            last.append({"prompt": prompt, "cached": cached})
        client.close()
    finally:
        if second is not None:
            second.stop(grace=0.5)
            router.close()
        cluster.stop()
    return {"turn4": last}


def hit_rate(requests: list[dict]) -> float:
    return sum(r["cached"] for r in requests) / sum(r["prompt"] for r in requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=24)
    parser.add_argument("--first", type=int, default=10)
    parser.add_argument("--clients", type=int, default=6,
                        help="requests at a time in turns 1-3 (so load spreads the chats)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=Path("bench/results/router_restart_bench.json"))
    args = parser.parse_args()
    model = bench_checkpoint("serve", SERVE)
    results = {name: run(model, args, **how) for name, how in RUNS.items()}
    print(f"\n{args.chats} chats, turn 4 after turns 1-3 ({model}); prefix hit rate, "
          "prompt tokens found cached:")
    print(f"{'':<24}{f'first {args.first}':>10}{'all':>8}{'first hits':>12}")
    for name, r in results.items():
        first = r["turn4"][:args.first]
        r["first_hit_rate"], r["hit_rate"] = hit_rate(first), hit_rate(r["turn4"])
        r["first_hits"] = sum(1 for x in first if x["cached"] >= SYSTEM_TOKENS)
        print(f"{name:<24}{r['first_hit_rate']:>10.1%}{r['hit_rate']:>8.1%}"
              f"{r['first_hits']:>9} / {len(first)}")
    print("(a first hit: the request found its chat cached, at least its system prompt)")
    write_results(args.out, {"model": str(model), "chats": args.chats, "first": args.first,
                             "seed": args.seed, "runs": results})


if __name__ == "__main__":
    main()
