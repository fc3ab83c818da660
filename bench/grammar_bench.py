"""What a structured output costs the decode worker: the decode step at batch 8 with a
JSON-schema grammar on every sequence against the same step without one, and a schema's
first compile against its cached reuse.

One-stage aggregated local cluster on a random checkpoint of ``--shape`` with a 50K-token
byte-level BPE vocabulary (bench/checkpoints.py trains it here: token masks depend on a
real vocabulary), per weight format. The grammar (a list of at least 1000 records) keeps
every sequence going to max_tokens, so every step runs at batch 8; the two kinds of round
alternate, which goes first alternating too. Step times come from timers around the
engine's step (step_bench.py's). Prints a table of medians and paired ratios, writes JSON.

    python3 bench/grammar_bench.py [--shape small] [--dtype float32 q4f16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checkpoints import SHAPES, bench_checkpoint, bpe_tokenizer, with_tokenizer
from recording import write_results
from step_bench import StepTimer

from cluster.cluster_config import ClusterConfig
from cluster.local_cluster import on_loopback, start_local_cluster
from olmo_model.cache_limits import CacheLimits
from pipeline.ops import OutputGrammar
from protos.vocabulary import GrammarKind, Mode
from router.client import GenerationClient, generate_request

BATCH = 8
RECORD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
    "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "maxItems": 3},
    "score": {"type": "number", "minimum": 0, "maximum": 1},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "email"]}
# Never complete within max_tokens: every sequence decodes to the end, under the grammar.
RECORDS = {"type": "array", "items": RECORD, "minItems": 1000}
# Schemas whose compile is timed: the records, a wide flat object, a nested one.
COMPILED = {
    "records": RECORDS,
    "flat-40": {"type": "object", "properties": {
        f"field_{i}": [{"type": "string", "maxLength": 32}, {"type": "integer"},
                       {"type": "boolean"}, {"enum": ["x", "y", "z"]}][i % 4]
        for i in range(40)}, "required": [f"field_{i}" for i in range(0, 40, 3)]},
    "nested-4": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "object", "properties": {
            "d": {"type": "array", "items": RECORD, "maxItems": 4}}}}}}}}},
}


def decode_together(client: GenerationClient, tokens: int, grammar: bool) -> None:
    requests = []
    for i in range(BATCH):
        request = generate_request([1 + i, 2, 3, 4], tokens, ignore_eos=not grammar)
        if grammar:
            request.sampling.structured_output.json_schema = json.dumps(RECORDS)
        requests.append(request)
    with ThreadPoolExecutor(BATCH) as pool:
        replies = list(pool.map(lambda r: client.complete(r, timeout=600), requests))
    if any(len(ids) != tokens for ids, _, _ in replies):
        raise RuntimeError("a sequence ended early: the step batch was not constant")


def step_ms(timer: StepTimer) -> tuple[float, float]:
    """(median step, median time outside the model runner) of the recorded full-batch
    steps, in ms."""
    rows = [r for r in timer.records if r[0] == BATCH]
    return (1e3 * statistics.median(r[2] for r in rows),
            1e3 * statistics.median(r[2] - r[3] for r in rows))


def compile_times(grammars) -> dict:
    """Each schema's first compile (made unique, so no cache holds it) and a cached reuse."""
    out = {}
    for name, schema in COMPILED.items():
        unique = json.dumps({**schema, "title": uuid.uuid4().hex})
        grammar = OutputGrammar(GrammarKind.JSON_SCHEMA, unique)
        start = time.perf_counter()
        grammars.compile(grammar)
        first = time.perf_counter() - start
        start = time.perf_counter()
        grammars.compile(grammar)
        out[name] = {"first_ms": 1e3 * first, "cached_ms": 1e3 * (time.perf_counter() - start),
                     "schema_bytes": len(unique)}
    return out


def run_format(model: Path, dtype: str, tokens: int, rounds: int, timer: StepTimer) -> dict:
    config = ClusterConfig(model=str(model), dtype=dtype, mode=Mode.AGGREGATED,
                           cache=CacheLimits(16, 8192, 1024))
    cluster = start_local_cluster(on_loopback(config))
    client = GenerationClient(cluster.router_address)
    try:
        grammars = cluster.decode[0].stage.grammars
        grammars.compile(OutputGrammar(GrammarKind.JSON_OBJECT))  # loads xgrammar
        compiled = compile_times(grammars)
        decode_together(client, 8, grammar=False)  # warm up both
        decode_together(client, 8, grammar=True)
        paired = []
        for i in range(rounds):
            arms = {}
            for grammar in ((False, True) if i % 2 == 0 else (True, False)):
                timer.records.clear()
                decode_together(client, tokens, grammar)
                arms[grammar] = step_ms(timer)
            paired.append({"plain_step_ms": arms[False][0], "grammar_step_ms": arms[True][0],
                           "plain_outside_ms": arms[False][1],
                           "grammar_outside_ms": arms[True][1],
                           "ratio": arms[True][0] / arms[False][0]})
    finally:
        client.close()
        cluster.stop()
    ratios = [p["ratio"] for p in paired]
    return {"dtype": dtype, "rounds": paired, "compile": compiled,
            "plain_step_ms": statistics.median(p["plain_step_ms"] for p in paired),
            "grammar_step_ms": statistics.median(p["grammar_step_ms"] for p in paired),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", nargs="+", default=["float32", "q4f16"])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/grammar_bench.json"))
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    tokenizer = bpe_tokenizer()
    model = with_tokenizer(f"{args.shape}-bpe", bench_checkpoint(args.shape, shape),
                           [tokenizer])
    timer = StepTimer()
    timer.install()
    results = {"model": str(model), "shape": args.shape, "batch": BATCH,
               "tokens": args.tokens, "formats": []}
    for dtype in args.dtype:
        results["formats"].append(run_format(model, dtype, args.tokens, args.rounds, timer))
    print(f"\ndecode step at batch {BATCH}, JSON-schema grammar on every sequence vs none "
          f"({args.shape}, 50K-token BPE vocabulary; medians of {args.rounds} paired rounds):")
    print(f"{'dtype':>8}{'plain ms':>10}{'grammar ms':>12}{'ratio':>8}{'min':>7}{'max':>7}")
    for f in results["formats"]:
        print(f"{f['dtype']:>8}{f['plain_step_ms']:>10.2f}{f['grammar_step_ms']:>12.2f}"
              f"{f['ratio_median']:>8.3f}{f['ratio_min']:>7.3f}{f['ratio_max']:>7.3f}")
    print("\nschema compile (ms): first / cached")
    for name, row in results["formats"][0]["compile"].items():
        print(f"{name:>10}: {row['first_ms']:8.1f} / {row['cached_ms']:.3f}  "
              f"({row['schema_bytes']} bytes)")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
