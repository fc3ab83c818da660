"""What scoring a prompt costs: a completion of one token with and without echo +
logprobs (every prompt token's log-probability, lm-evaluation-harness's request).

One-process local cluster on a model folder (default: the demo model); fresh random
token-id prompts each time, so that neither kind finds a cached prefix; the two kinds
interleaved. Prints a table of medians and writes JSON.

    python3 bench/echo_bench.py [--model DIR] [--tokens 256 448] [--repeats 15]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

from recording import write_results

from cluster.cluster_config import ClusterConfig
from cluster.local_cluster import on_loopback, start_local_cluster
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import resolve_model_dir


def complete(url, model: str, prompt: list[int], echo: bool) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "logprobs": 1, "echo": echo}
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json"})
    reply = connection.getresponse()
    payload = json.loads(reply.read())
    seconds = time.perf_counter() - started
    connection.close()
    if reply.status != 200:
        raise RuntimeError(payload)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 448])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench/results/echo_bench.json"))
    args = parser.parse_args()
    model = resolve_model_dir(args.model)
    cluster = start_local_cluster(on_loopback(
        ClusterConfig(model=str(model), cache=CacheLimits(8, 8192, 512)), http=True))
    url, rng = urlparse(cluster.http_url), random.Random(0)
    vocab = cluster.decode[0].stage.runner.config.vocab_size
    rows = []
    try:
        for tokens in args.tokens:
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats + 2):  # the first two warm up
                for echo in (False, True):
                    prompt = [rng.randrange(1, vocab) for _ in range(tokens)]
                    times[echo].append(complete(url, model.name, prompt, echo))
            plain, echoed = (statistics.median(times[e][2:]) for e in (False, True))
            rows.append({"prompt_tokens": tokens, "plain_ms": 1e3 * plain,
                         "echo_ms": 1e3 * echoed, "ratio": echoed / plain})
    finally:
        cluster.stop()
    print(f"\n{'prompt':>8}{'plain ms':>10}{'echo ms':>10}{'ratio':>8}")
    for r in rows:
        print(f"{r['prompt_tokens']:>8}{r['plain_ms']:>10.1f}{r['echo_ms']:>10.1f}"
              f"{r['ratio']:>8.2f}")
    write_results(args.out, {"model": str(model), "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
