"""Compile, prefill and decode timings of the compiled OLMo beside transformers, in one run.

Builds (once, cached) a random OLMo-1B-shaped checkpoint, then measures on it:
compile time, prefill of 128 and 512 tokens, decode ms/step at batch 1 and 8, the same
for transformers' OlmoForCausalLM on the CPU, and the machine's memory bandwidth with
the decode floor it implies (weight bytes / read bandwidth on all CPUs). Prints a table
and writes JSON. Medians of several runs; the machine is shared, so compare ratios within a run.

    python3 bench/model_bench.py [--small] [--dtype float16] [--repeats 3]
                                 [--out bench/results/model_bench.json]

``--dtype`` sets the weight dtype of our compiled model (transformers stays float32, the
reference); the decode floor is computed for the bytes our weights occupy in that dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from checkpoints import OLMO_1B, SMALL, make_checkpoint


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Large-array read (sum) bandwidth on one thread and on all CPUs, and copy, in GB/s.

    Medians. The decode floor uses the all-CPU read: our kernels read weights on every
    thread, as numpy's single-threaded sum does not.
    """
    n = int(gib * 2**30) // 4
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    parts = np.array_split(src, threads)
    reads, parallel_reads, copies = [], [], []
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL while summing
        for _ in range(repeats):
            t = time.perf_counter()
            src.sum()
            reads.append(src.nbytes / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            parallel_reads.append(src.nbytes / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            np.copyto(dst, src)
            copies.append(2 * src.nbytes / (time.perf_counter() - t) / 1e9)
    return {"read_gbps": statistics.median(reads),
            "read_all_cpus_gbps": statistics.median(parallel_reads),
            "read_threads": threads, "copy_gbps": statistics.median(copies)}


def timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def bench_ours(folder: Path, repeats: int, prefill_lengths: list[int], decode_steps: int,
               dtype: str = "float32") -> dict:
    from olmo_model.compiler import compile_model
    from olmo_model.config import OLMoConfig
    from olmo_model.kv_pages import CacheLimits
    from olmo_model.loader import load_stage_params
    from olmo_model.runtime import ModelRunner

    config = OLMoConfig.from_file(folder)
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        artifact = compile_model(config, dtype=dtype, cache_dir=Path(cache))
        compile_s = time.perf_counter() - t
        params = load_stage_params(folder, artifact.param_names, artifact.param_shapes,
                                   artifact.stage, config.tie_word_embeddings, dtype)
        runner = ModelRunner(artifact, params, CacheLimits(max_num_sequences=8,
                                                           max_total_tokens=8192,
                                                           prefill_chunk_size=1024))
    import tvm

    out = {"compile_s": compile_s, "target": artifact.target, "dtype": dtype,
           "schedule_set": artifact.schedule_set, "tvm_threads": tvm.runtime.num_threads()}
    rng = np.random.default_rng(1)
    for n in prefill_lengths:
        prompt = rng.integers(0, config.vocab_size, n).tolist()

        def prefill(prompt=prompt):
            runner.add_sequence(0)
            runner.prefill([0], [prompt])
            runner.remove_sequence(0)

        out[f"prefill_{n}_s"] = timed(prefill, repeats)
    for batch in (1, 8):
        ids = list(range(batch))
        for seq_id in ids:
            runner.add_sequence(seq_id)
        runner.prefill(ids, [[1, 2, 3, 4]] * batch)
        steps = []
        for _ in range(decode_steps):
            t = time.perf_counter()
            runner.decode(ids, [5] * batch)
            steps.append(time.perf_counter() - t)
        for seq_id in ids:
            runner.remove_sequence(seq_id)
        out[f"decode_b{batch}_ms"] = 1000 * statistics.median(steps)
    return out


def bench_transformers(folder: Path, repeats: int, prefill_lengths: list[int],
                       decode_steps: int) -> dict:
    import torch
    from transformers import OlmoForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = OlmoForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {"torch_threads": torch.get_num_threads()}
    rng = np.random.default_rng(1)
    with torch.inference_mode():
        for n in prefill_lengths:
            ids = torch.tensor([rng.integers(0, model.config.vocab_size, n).tolist()])
            out[f"prefill_{n}_s"] = timed(
                lambda ids=ids: model(ids, use_cache=True, logits_to_keep=1), repeats)
        for batch in (1, 8):
            ids = torch.full((batch, 4), 3)
            cache = model(ids, use_cache=True).cache
            token = torch.full((batch, 1), 5)
            steps = []
            for _ in range(decode_steps):
                t = time.perf_counter()
                cache = model(token, cache=cache, use_cache=True).cache
                steps.append(time.perf_counter() - t)
            out[f"decode_b{batch}_ms"] = 1000 * statistics.median(steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="hidden-512, 8-layer shape")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="weight dtype of our model (transformers stays float32)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--checkpoint-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "olmo-bench-checkpoints")
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_bench.json"))
    args = parser.parse_args()

    shape = SMALL if args.small else OLMO_1B
    name = "small" if args.small else "olmo-1b"
    folder = make_checkpoint(args.checkpoint_dir / name, shape)
    # The checkpoint is float32; our weights take half the bytes in float16.
    weight_bytes = (folder / "model.safetensors").stat().st_size
    our_weight_bytes = weight_bytes // 2 if args.dtype == "float16" else weight_bytes
    bandwidth = memory_bandwidth()
    results = {
        "shape": name, "weight_bytes": weight_bytes, "dtype": args.dtype,
        "our_weight_bytes": our_weight_bytes, "bandwidth": bandwidth,
        "decode_floor_ms": 1000 * our_weight_bytes / (bandwidth["read_all_cpus_gbps"] * 1e9),
        "ours": bench_ours(folder, args.repeats, args.prefill, args.decode_steps, args.dtype),
    }
    results["tvm_num_threads"] = results["ours"]["tvm_threads"]
    if not args.skip_transformers:
        results["transformers"] = bench_transformers(folder, args.repeats, args.prefill,
                                                     args.decode_steps)
    print_table(results, args.prefill)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


def print_table(results: dict, prefill_lengths: list[int]) -> None:
    ours, ref = results["ours"], results.get("transformers", {})
    bw = results["bandwidth"]
    dtype = results.get("dtype", "float32")
    print(f"\n{results['shape']}: {results['weight_bytes'] / 1e9:.2f} GB fp32 weights "
          f"(ours in {dtype}: {results.get('our_weight_bytes', results['weight_bytes']) / 1e9:.2f}"
          f" GB); read {bw['read_gbps']:.1f} GB/s (1 thread), "
          f"{bw.get('read_all_cpus_gbps', float('nan')):.1f} GB/s ({bw.get('read_threads', '?')} "
          f"threads), copy {bw['copy_gbps']:.1f} GB/s; "
          f"decode floor ({dtype}) {results['decode_floor_ms']:.0f} ms/token")
    print(f"compile: {ours['compile_s']:.1f} s; schedules: {ours.get('schedule_set', '?')}; "
          f"TVM threads: {ours.get('tvm_threads', '?')}, torch threads: "
          f"{ref.get('torch_threads', '-')}\n")
    rows = [(f"prefill {n} tokens (s)", f"prefill_{n}_s") for n in prefill_lengths]
    rows += [("decode batch 1 (ms/step)", "decode_b1_ms"), ("decode batch 8 (ms/step)",
                                                             "decode_b8_ms")]
    print(f"{'metric':<28}{'ours ' + dtype:>14}{'transformers':>14}{'ours/ref':>10}")
    for label, key in rows:
        a, b = ours.get(key), ref.get(key)
        ratio = f"{a / b:.2f}" if a and b else "-"
        print(f"{label:<28}{a:>14.3f}{(b if b else float('nan')):>14.3f}{ratio:>10}")
    print(f"{'decode b1 / floor':<28}{ours['decode_b1_ms'] / results['decode_floor_ms']:>14.2f}")
    print(f"{'decode b8 / b1':<28}{ours['decode_b8_ms'] / ours['decode_b1_ms']:>14.2f}")


if __name__ == "__main__":
    main()
