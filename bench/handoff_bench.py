"""KV handoff benchmark: what disaggregation adds to a lone prompt's TTFT, per transport.

For each model and prompt length, in one run: the TTFT of lone prompts (max_tokens 1,
medians of ``--repeats``) served aggregated (the decode worker prefills), disaggregated
with every push inline over gRPC, and disaggregated with same-host shared memory (the
default between workers on one host). The added TTFT is the handoff's cost. Workers are
Ray actors in their own processes (``--in-process`` puts them in this one). Per push,
each handoff step (export, encode, the whole push, assemble, install) and the push's
bandwidth come from the workers' own Stats.

    python3 bench/handoff_bench.py [--models DIR ...] [--olmo-1b] [--dtype float16]
                                   [--lengths 512 2040] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from checkpoints import OLMO_1B, SMALL, bench_checkpoint
from clients import GrpcTarget
from serve_bench import handoff_since, handoff_totals, start_cluster

from olmo_model.quantization import MODEL_DTYPES
from pipeline.options import WorkerOptions

# Mode: (aggregated, worker options). Prefix caching off: every repeat computes and
# ships its whole prompt.
MODES = {"aggregated": (True, WorkerOptions(prefix_cache=False)),
         "grpc": (False, WorkerOptions(prefix_cache=False, kv_shared_memory=False)),
         "shm": (False, WorkerOptions(prefix_cache=False, kv_shared_memory=True))}


def bench_mode(model: Path, mode: str, lengths: list[int], repeats: int, use_ray: bool,
               vocab: int, dtype: str) -> dict:
    aggregated, options = MODES[mode]
    cluster, address, stats = start_cluster(model, aggregated, use_ray, options, dtype)
    target = GrpcTarget(address)
    rng = np.random.default_rng(7)
    out = {}
    try:
        for length in lengths:  # warm-up: buffers made, each sender learns its peer's host
            target.request(rng.integers(1, vocab, length).tolist(), 1)
        for length in lengths:
            before = handoff_totals(stats)
            ttfts = [target.request(rng.integers(1, vocab, length).tolist(), 1)["ttft"]
                     for _ in range(repeats)]
            out[str(length)] = {"ttft_s": statistics.median(ttfts), "ttft_all_s": ttfts,
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
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    parser.add_argument("--olmo-1b", action="store_true",
                        help="also the random OLMo-1B-shaped checkpoint (made on first use)")
    parser.add_argument("--in-process", action="store_true",
                        help="workers in this process (default: Ray actors)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/handoff_bench.json"))
    args = parser.parse_args()
    models = list(args.models or [])
    if args.olmo_1b:
        models.append(bench_checkpoint("olmo-1b", OLMO_1B))
    models = models or [bench_checkpoint("small", SMALL)]
    results = {"workers": "one process" if args.in_process else "ray actors",
               "repeats": args.repeats, "dtype": args.dtype, "models": {}}
    for model in models:
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        results["models"][str(model)] = {
            mode: bench_mode(model, mode, args.lengths, args.repeats, not args.in_process, vocab,
                             args.dtype)
            for mode in args.modes}
    print_tables(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


def print_tables(results: dict) -> None:
    print(f"\nTTFT of a lone prompt, median of {results['repeats']} ({results['workers']}, "
          f"{results['dtype']}); added: over aggregated")
    print(f"{'model':<28}{'tokens':>7}{'aggregated':>12}{'grpc':>10}{'added':>8}"
          f"{'shm':>10}{'added':>8}")
    for model, modes in results["models"].items():
        agg = modes.get("aggregated", {})
        for length in next(iter(modes.values())):
            row = f"{Path(model).name:<28}{length:>7}"
            base = agg.get(length, {}).get("ttft_s")
            row += f"{1e3 * base:>10.1f}ms" if base else f"{'-':>12}"
            for mode in ("grpc", "shm"):
                ttft = modes.get(mode, {}).get(length, {}).get("ttft_s")
                if ttft is None:
                    row += f"{'-':>10}{'-':>8}"
                    continue
                added = f"{100 * (ttft / base - 1):+.1f}%" if base else "-"
                row += f"{1e3 * ttft:>8.1f}ms{added:>8}"
            print(row)
    print("\nPer push (ms; 'push' is the whole push as the sender waits for it, the steps "
          "inside it overlap)")
    print(f"{'model':<28}{'tokens':>7}{'via':>6}{'MiB':>7}{'export':>8}{'encode':>8}"
          f"{'push':>8}{'assemble':>10}{'install':>9}{'MiB/s':>8}")
    for model, modes in results["models"].items():
        for mode in ("grpc", "shm"):
            for length, run in modes.get(mode, {}).items():
                s = run["steps"]
                pushes = max(1, s["pushes"])
                mib = s["kv_bytes"] / pushes / 2**20
                print(f"{Path(model).name:<28}{length:>7}{mode:>6}{mib:>7.1f}"
                      f"{s['export_ms'] / pushes:>8.1f}{s['encode_ms'] / pushes:>8.1f}"
                      f"{s['transfer_ms'] / pushes:>8.1f}{s['assemble_ms'] / pushes:>10.1f}"
                      f"{s['install_ms'] / pushes:>9.1f}"
                      f"{mib * pushes / max(1e-9, s['transfer_ms'] / 1e3):>8.0f}")


if __name__ == "__main__":
    main()
