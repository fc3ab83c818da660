"""Speculative decoding by prompt lookup: decode tokens/s with drafts verified against the
same cluster without, per workload, batch size and weight format, with the acceptance
rate the difference comes from.

Three workloads, greedy:
- ``grounded``: a passage of Python's own documentation (what the demo model was trained
  on), then a line asking it again and the passage's first words: a continuation that may
  copy the passage, as summaries, edits and retrieval answers copy their prompts;
- ``random``: random token ids, nothing to copy;
- ``json``: random token ids and a JSON-schema grammar of many alike records
  (grammar_bench.py's), whose keys and punctuation recur in the output.

Two aggregated one-process clusters on the same model, one with
``worker.speculative_tokens`` and one without, up side by side; each round runs a batch
on both, which goes first alternating. Decode tokens/s per request are its tokens after
the first over the time from its first token to its last; medians over requests and
rounds. Prints a table and writes JSON.

    python3 bench/spec_bench.py [--model DIR | --shape olmo-1b] [--dtype float32 q4f16]
                                [--batch 1 4 16] [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checkpoints import SHAPES, bench_checkpoint, with_tokenizer
from grammar_bench import RECORDS
from recording import write_results

from cluster.cluster_config import ClusterConfig
from cluster.local_cluster import on_loopback, start_local_cluster
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import resolve_model_dir
from pipeline.options import WorkerOptions
from protos.vocabulary import Mode
from router.client import GenerationClient, generate_request

WORKLOADS = ("grounded", "random", "json")


def grounded_prompts(count: int, seed: int) -> list[str]:
    """Passages of pydoc's topics, each followed by a request to repeat it and its start."""
    from pydoc_data.topics import topics

    texts = [t for t in topics.values() if len(t) > 1500]
    rng = random.Random(seed)
    prompts = []
    for text in rng.sample(texts, count):
        passage = text[:600]
        prompts.append(f"{passage}\n\nOnce more, word for word:\n\n{passage[:80]}")
    return prompts


def random_prompts(count: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(256)] for _ in range(count)]


def decode_rates(client: GenerationClient, prompts: list, tokens: int,
                 schema: str = "") -> list[float]:
    """Each request's decode tokens/s (after its first token), run together; under the
    JSON ``schema`` if one is given (which must not end within ``tokens``)."""
    def one(prompt) -> float:
        request = generate_request(prompt, max_tokens=tokens, ignore_eos=not schema)
        if schema:
            request.sampling.structured_output.json_schema = schema
        times = []
        for response in client.stream(request, timeout=900):
            times += [time.perf_counter()] * len(response.token_ids)
        return (len(times) - 1) / (times[-1] - times[0])

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def counters(cluster) -> tuple[int, int]:
    c = cluster.decode[0].engine.counters
    return c.drafted_tokens, c.accepted_tokens


def run_format(model: Path, dtype: str, args) -> list[dict]:
    clusters = {spec: start_local_cluster(on_loopback(ClusterConfig(
        model=str(model), dtype=dtype, mode=Mode.AGGREGATED,
        # Small prefill chunks: on a 1B model a 1024-token chunk holds the worker for
        # seconds, past the router's wait for a reservation's answer.
        cache=CacheLimits(16, 16384, 256),
        worker=WorkerOptions(speculative_tokens=spec))))
        for spec in (0, args.speculative_tokens)}
    clients = {spec: GenerationClient(c.router_address) for spec, c in clusters.items()}
    vocab = clusters[0].decode[0].stage.runner.config.vocab_size
    rows = []
    try:
        for client in clients.values():
            decode_rates(client, random_prompts(1, 99, vocab), 8)  # warm up
        for workload in args.workload:
            for batch in args.batch:
                rates = {spec: [] for spec in clients}
                drafted = accepted = 0
                for round_ in range(args.rounds):
                    prompts = (grounded_prompts(batch, round_) if workload == "grounded"
                               else random_prompts(batch, round_, vocab))
                    schema = json.dumps(RECORDS) if workload == "json" else ""
                    order = list(clients) if round_ % 2 == 0 else list(clients)[::-1]
                    for spec in order:
                        before = counters(clusters[spec])
                        rates[spec] += decode_rates(clients[spec], prompts, args.tokens,
                                                    schema)
                        if spec:
                            after = counters(clusters[spec])
                            drafted += after[0] - before[0]
                            accepted += after[1] - before[1]
                off = statistics.median(rates[0])
                on = statistics.median(rates[args.speculative_tokens])
                rows.append({"dtype": dtype, "workload": workload, "batch": batch,
                             "off_tokens_per_s": off, "on_tokens_per_s": on, "ratio": on / off,
                             "drafted": drafted, "accepted": accepted,
                             "acceptance": accepted / drafted if drafted else None,
                             "off_rates": rates[0],
                             "on_rates": rates[args.speculative_tokens]})
                print(f"{dtype:>8} {workload:>9} {batch:>5} {off:9.1f} {on:9.1f} "
                      f"{on / off:7.2f} {accepted:>6}/{drafted:<6}", flush=True)
    finally:
        for client in clients.values():
            client.close()
        for cluster in clusters.values():
            cluster.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="a benchmark checkpoint of this shape instead (random weights)")
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workload", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speculative-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/spec_bench.json"))
    args = parser.parse_args()
    model = resolve_model_dir(args.model)
    if args.shape:  # random weights, with the demo model's tokenizer for the passages
        model = with_tokenizer(f"{args.shape}-with-tokenizer",
                               bench_checkpoint(args.shape, SHAPES[args.shape]),
                               [model / "tokenizer.json", model / "tokenizer_config.json"])
    print(f"{'dtype':>8} {'workload':>9} {'batch':>5} {'off t/s':>9} {'on t/s':>9} "
          f"{'ratio':>7} accepted/drafted")
    rows = []
    for dtype in args.dtype:
        rows += run_format(model, dtype, args)
    write_results(args.out, {"model": str(model), "tokens": args.tokens,
                             "speculative_tokens": args.speculative_tokens,
                             "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
