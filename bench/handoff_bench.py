"""KV handoff benchmark: what disaggregation adds to a lone prompt's TTFT, per transport.

For each model, prefill chunk size, transport and prompt length, in one run: the TTFT of
lone prompts (max_tokens 1) pushed from the prefill worker, against the same cluster's
decode worker prefilling the prompt itself (as an aggregated worker does, in chunks of
the same size), the two alternating request by request, so that the machine's drift
falls on both alike. The added TTFT is the handoff's cost: the ratio of the medians of
``--repeats`` each, and the median of the paired differences. Transports: every push
inline over gRPC, or through same-host shared memory (the default between workers on
one host). A prompt longer than a chunk streams: each chunk's K/V is pushed while the
next computes; the ``-whole`` modes push it all after the last chunk instead. Within a
pass, the K/V of each of ``--layer-groups`` groups of layers is pushed while the next
group computes (1: the pass's K/V in one push). Workers
are Ray actors in their own processes (``--in-process`` puts them in this one). Per
push, each handoff step (export, encode, the whole push, assemble, install) and the
push's bandwidth come from the workers' own Stats.

    python3 bench/handoff_bench.py [--models DIR ...] [--shape olmo-1b small-olmo3 ...]
                                   [--dtype float16]
                                   [--lengths 512 2040] [--chunk-tokens 2048 512]
                                   [--modes grpc shm grpc-whole shm-whole] [--repeats 5]
                                   [--layer-groups 1 2 4 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
from checkpoints import SHAPES, SMALL, bench_checkpoint
from clients import GrpcTarget
from recording import write_results
from serve_bench import handoff_since, handoff_totals, start_cluster

from olmo_model.quantization import MODEL_DTYPES
from pipeline.options import WorkerOptions

# Prefix caching off: every repeat computes and ships its whole prompt.
MODES = {"grpc": WorkerOptions(prefix_cache=False, kv_shared_memory=False),
         "shm": WorkerOptions(prefix_cache=False, kv_shared_memory=True),
         "grpc-whole": WorkerOptions(prefix_cache=False, kv_shared_memory=False,
                                     kv_streaming=False),
         "shm-whole": WorkerOptions(prefix_cache=False, kv_shared_memory=True,
                                    kv_streaming=False)}
# A decode worker prefills a prompt itself when at most this many tokens are uncached.
ALWAYS_LOCAL = 1 << 30


def bench_mode(model: Path, mode: str, lengths: list[int], repeats: int, use_ray: bool,
               vocab: int, dtype: str, chunk_tokens: int, layer_groups: int) -> dict:
    options = dataclasses.replace(MODES[mode], kv_layer_groups=layer_groups)
    cluster, address, stats = start_cluster(model, False, use_ray, options, dtype,
                                            chunk_tokens)
    router = cluster.router
    pushed = router.options  # every prompt pushed (local_prefill_below 0)
    local = dataclasses.replace(pushed, local_prefill_below_tokens=ALWAYS_LOCAL)
    target = GrpcTarget(address)
    rng = np.random.default_rng(7)

    def ttft(length: int, options) -> float:
        router.options = options  # read afresh by each request's reservation
        return target.request(rng.integers(1, vocab, length).tolist(), 1)["ttft"]

    out = {}
    try:
        for length in lengths:  # warm-up: buffers made, each sender learns its peer's host
            ttft(length, local), ttft(length, pushed)
        for length in lengths:
            before = handoff_totals(stats)
            pairs = []
            for i in range(repeats):  # which goes first alternates too
                first, second = (local, pushed) if i % 2 == 0 else (pushed, local)
                a, b = ttft(length, first), ttft(length, second)
                pairs.append((a, b) if first is local else (b, a))
            agg, disagg = ([p[k] for p in pairs] for k in (0, 1))
            out[str(length)] = {
                "aggregated_ttft_s": statistics.median(agg), "ttft_s": statistics.median(disagg),
                "added": statistics.median(disagg) / statistics.median(agg) - 1,
                "paired_added_s": statistics.median(d - a for a, d in pairs),
                "aggregated_all_s": agg, "ttft_all_s": disagg,
                "steps": handoff_since(stats, before)}
        return out
    finally:
        target.close()
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", default=None,
                        help="model folders (default: the random hidden-512 8-layer checkpoint)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2040],
                        help="prompt tokens (2040: the longest that fits a 2048 window with "
                             "its one output token)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["grpc", "shm"], choices=list(MODES))
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=[2048],
                        help="prefill chunk sizes to sweep (prompt tokens per pass)")
    parser.add_argument("--layer-groups", type=int, nargs="+", default=[4],
                        help="groups of layers a prefill pass pushes one by one, to sweep "
                             "(1: the pass's K/V in one push)")
    parser.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    parser.add_argument("--shape", choices=SHAPES, nargs="+", default=[],
                        help="also random checkpoints of these shapes (made on first use): "
                             "olmo-1b; small-olmo2 and small-olmo3 for the sliding window")
    parser.add_argument("--in-process", action="store_true",
                        help="workers in this process (default: Ray actors)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/handoff_bench.json"))
    args = parser.parse_args()
    models = list(args.models or [])
    models += [bench_checkpoint(name, SHAPES[name]) for name in args.shape]
    models = models or [bench_checkpoint("small", SMALL)]
    results = {"workers": "one process" if args.in_process else "ray actors",
               "repeats": args.repeats, "dtype": args.dtype, "models": {}}
    for model in models:
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        results["models"][str(model)] = {
            str(chunk): {mode: {str(groups): bench_mode(model, mode, args.lengths, args.repeats,
                                                        not args.in_process, vocab, args.dtype,
                                                        chunk, groups)
                                for groups in args.layer_groups}
                         for mode in args.modes}
            for chunk in args.chunk_tokens}
    print_tables(results)
    write_results(args.out, results)


def each_run(results: dict):
    """(model name, chunk, mode, layer groups, tokens, run) for every measured case, in
    run order."""
    for model, chunks in results["models"].items():
        for chunk, modes in chunks.items():
            for mode, sweep in modes.items():
                for groups, runs in sweep.items():
                    for length, run in runs.items():
                        yield Path(model).name, chunk, mode, groups, length, run


def print_tables(results: dict) -> None:
    print(f"\nTTFT of a lone prompt, median of {results['repeats']} each ({results['workers']}, "
          f"{results['dtype']}): the decode worker prefilling it (aggregated) against the "
          "prefill worker pushing it, alternating")
    print(f"{'model':<16}{'chunk':>6}{'tokens':>7}{'via':>11}{'groups':>7}{'aggregated':>12}"
          f"{'disaggregated':>15}{'added':>8}{'paired':>10}")
    for model, chunk, mode, groups, length, r in each_run(results):
        print(f"{model:<16}{chunk:>6}{length:>7}{mode:>11}{groups:>7}"
              f"{1e3 * r['aggregated_ttft_s']:>10.1f}ms{1e3 * r['ttft_s']:>13.1f}ms"
              f"{100 * r['added']:>+7.1f}%{1e3 * r['paired_added_s']:>+8.1f}ms")
    print("\nPer push (ms; 'push' is the whole push as the sender waits for it, the steps "
          "inside it overlap; a prompt makes a push per chunk and layer group; install: per "
          "prompt)")
    print(f"{'model':<16}{'chunk':>6}{'tokens':>7}{'via':>11}{'groups':>7}{'pushes':>7}"
          f"{'MiB':>7}{'export':>8}{'encode':>8}{'push':>8}{'assemble':>10}{'install':>9}"
          f"{'MiB/s':>8}")
    for model, chunk, mode, groups, length, run in each_run(results):
        s = run["steps"]
        pushes = max(1, s["pushes"])
        mib = s["kv_bytes"] / pushes / 2**20
        print(f"{model:<16}{chunk:>6}{length:>7}{mode:>11}{groups:>7}"
              f"{pushes / results['repeats']:>7.0f}{mib:>7.1f}"
              f"{s['export_ms'] / pushes:>8.1f}{s['encode_ms'] / pushes:>8.1f}"
              f"{s['transfer_ms'] / pushes:>8.1f}{s['assemble_ms'] / pushes:>10.1f}"
              f"{s['install_ms'] / results['repeats']:>9.1f}"
              f"{mib * pushes / max(1e-9, s['transfer_ms'] / 1e3):>8.0f}")


if __name__ == "__main__":
    main()
