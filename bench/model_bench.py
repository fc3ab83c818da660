"""Compile, prefill and decode timings of the compiled OLMo beside transformers, in one run.

Builds (once, cached) a random checkpoint of each ``--shape`` (OLMo-1B by default;
OLMo-2-1B, OLMo-3-7B, or a small OLMo-1), then measures on it, for each ``--dtype`` in
turn: compile time, prefill of 128 and 512 tokens, decode ms/step at
batch 1 and 8; the same for transformers' OlmoForCausalLM (float32) on the CPU; and the
machine's read bandwidth with the decode floor it implies (bytes of the loaded weights /
what read_bandwidth.py's kernel reads per second on every CPU). Prints a table and
writes JSON. Medians of several runs; the machine is shared, so compare within a run.

    python3 bench/model_bench.py [--shape olmo-1b olmo2-1b] [--dtype float16 q8f16 q4f16]
                                 [--repeats 3] [--out bench/results/model_bench.json]

Several shapes are measured one after another and printed side by side at the end.
transformers is not run on OLMo-3-7B (its float32 weights would not fit in memory).

``q4f16``/``q8f16`` quantize the weights as they load (README, "Quantized weights").
Where a llama.cpp build is at hand (``--llama-cpp DIR``, ``$LLAMA_CPP_BIN`` or
``llama-bench`` on the PATH), llama.cpp runs the same checkpoint in the same run, each
of our dtypes in its weight type (F32, F16, Q8_0, Q4_0: bench/llama_cpp.py), and the
table sets the two side by side; otherwise, with float16 in the run, it sets our
quantized/float16 decode ratios beside llama.cpp's recorded ones (LLAMA_CPP_RECORDED).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from checkpoints import SHAPES, bench_checkpoint
from llama_cpp import LLAMA_TYPES, find_llama_cpp, gguf_files, median_of_rounds, run_llama_bench
from read_bandwidth import kernel_read_bandwidth
from recording import write_results

from olmo_model.quantization import MODEL_DTYPES


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
               dtype: str = "float32", between_rounds: Callable[[], None] = lambda: None
               ) -> dict:
    """Our model in ``dtype``: compile and load, then ``repeats`` rounds of prefills and
    decode steps; figures are medians over the rounds. ``between_rounds`` runs after each
    round (llama.cpp's turn, so that both see the same minutes of this shared machine)."""
    from olmo_model.cache_limits import CacheLimits
    from olmo_model.compiler import compile_model
    from olmo_model.config import OLMoConfig
    from olmo_model.loader import load_stage_params
    from olmo_model.runtime import ModelRunner

    config = OLMoConfig.from_file(folder)
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        artifact = compile_model(config, dtype=dtype, cache_dir=Path(cache))
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        params = load_stage_params(folder, artifact.param_names, artifact.param_shapes,
                                   artifact.stage, config.tie_word_embeddings, dtype,
                                   keep_quantized=False)
        load_s = time.perf_counter() - t  # reading, and quantizing for q4f16/q8f16
        runner = ModelRunner(artifact, params, CacheLimits(max_sequences=8,
                                                           max_total_tokens=8192,
                                                           prefill_chunk_tokens=1024))
    import tvm

    out = {"compile_s": compile_s, "load_s": load_s, "target": artifact.target, "dtype": dtype,
           "weight_bytes": sum(p.nbytes for p in params),
           "schedule_set": artifact.schedule_set, "tvm_threads": tvm.runtime.num_threads()}
    rng = np.random.default_rng(1)
    prompts = {n: rng.integers(0, config.vocab_size, n).tolist() for n in prefill_lengths}

    def prefill(prompt: list[int]) -> float:
        t = time.perf_counter()
        runner.add_sequence(0)
        runner.prefill([0], [prompt])
        runner.remove_sequence(0)
        return time.perf_counter() - t

    def decode_ms(batch: int, steps: int) -> float:
        ids = list(range(batch))
        for seq_id in ids:
            runner.add_sequence(seq_id)
        runner.prefill(ids, [[1, 2, 3, 4]] * batch)
        samples = []
        for _ in range(steps):
            t = time.perf_counter()
            runner.decode(ids, [5] * batch)
            samples.append(time.perf_counter() - t)
        for seq_id in ids:
            runner.remove_sequence(seq_id)
        return 1000 * statistics.median(samples)

    prefill(prompts[min(prefill_lengths)])  # warm: the cache's pages touched, code loaded
    decode_ms(1, 2)
    rounds = []
    for _ in range(repeats):
        figures = {f"prefill_{n}_s": prefill(prompt) for n, prompt in prompts.items()}
        rounds.append({**figures, **{f"decode_b{batch}_ms": decode_ms(batch, decode_steps)
                                     for batch in (1, 8)}})
        between_rounds()
    out.update(median_of_rounds(rounds))
    out["rounds"] = rounds
    return out


def bench_transformers(folder: Path, repeats: int, prefill_lengths: list[int],
                       decode_steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
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


# Shapes whose float32 weights do not fit this machine's memory beside ours.
TOO_LARGE_FOR_TRANSFORMERS = {"olmo3-7b"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, nargs="+", default=["olmo-1b"],
                        help="checkpoint shapes, each measured in this run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--dtype", choices=MODEL_DTYPES, nargs="+", default=["float32"],
                        help="weight dtypes of our model, each measured in this run "
                             "(transformers stays float32); q4f16/q8f16 quantize the "
                             "weights as they load")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--llama-cpp", type=Path, help="folder with llama-bench and "
                        "llama-quantize, to run llama.cpp on the same checkpoint (default: "
                        "$LLAMA_CPP_BIN, then the PATH; skipped if none; OLMo-1 shapes only)")
    parser.add_argument("--checkpoint-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "olmo-bench-checkpoints")
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_bench.json"))
    args = parser.parse_args()

    bandwidth = {**memory_bandwidth(), **kernel_read_bandwidth()}
    by_shape = {name: bench_shape(name, args, bandwidth) for name in args.shape}
    for results in by_shape.values():
        print_table(results, args.prefill)
    if len(by_shape) > 1:
        print_shapes_table(by_shape, args.prefill)
    write_results(args.out, next(iter(by_shape.values())) if len(by_shape) == 1
                  else {"by_shape": by_shape, "bandwidth": bandwidth})


def bench_shape(name: str, args: argparse.Namespace, bandwidth: dict) -> dict:
    """Every dtype of one shape (and llama.cpp, transformers beside them)."""
    shape = SHAPES[name]
    folder = bench_checkpoint(name, shape, args.checkpoint_dir)
    weight_bytes = float32_bytes(folder)
    olmo1 = shape.get("model_type", "olmo") == "olmo"
    llama_tools = find_llama_cpp(args.llama_cpp) if olmo1 else None
    llama_models = gguf_files(llama_tools, folder, args.dtype) if llama_tools else {}
    threads = len(os.sched_getaffinity(0))
    by_dtype, llama = {}, {}
    for dtype in args.dtype:
        theirs: list[dict] = []
        model = llama_models.get(dtype)

        def llama_round(model=model, theirs=theirs) -> None:
            if model is not None:
                theirs.append(run_llama_bench(llama_tools, model, threads, 1, args.prefill))

        ours = bench_ours(folder, args.repeats, args.prefill, args.decode_steps, dtype,
                          between_rounds=llama_round)
        # What a decode step reads: the parameters as loaded (quantized ones with scales).
        ours["decode_floor_ms"] = 1000 * ours["weight_bytes"] / (
            bandwidth["read_kernel_gbps"] * 1e9)
        ours["decode_b1_weight_gbps"] = ours["weight_bytes"] / ours["decode_b1_ms"] / 1e6
        by_dtype[dtype] = ours
        if theirs:
            llama[dtype] = {"type": LLAMA_TYPES[dtype], **median_of_rounds(theirs),
                            "rounds": theirs,
                            "ours_over_theirs": paired_ratios(ours["rounds"], theirs)}
    first = by_dtype[args.dtype[0]]
    results = {
        "shape": name, "weight_bytes": weight_bytes, "dtype": args.dtype[0],
        "our_weight_bytes": first["weight_bytes"], "bandwidth": bandwidth,
        "decode_floor_ms": first["decode_floor_ms"], "ours": first, "ours_by_dtype": by_dtype,
        "tvm_num_threads": first["tvm_threads"],
    }
    if llama:
        results["llama_cpp"] = llama
    elif name == "olmo-1b":
        results["llama_cpp_recorded"] = LLAMA_CPP_RECORDED
    if not args.skip_transformers and name not in TOO_LARGE_FOR_TRANSFORMERS:
        results["transformers"] = bench_transformers(folder, args.repeats, args.prefill,
                                                     args.decode_steps)
    return results


def float32_bytes(folder: Path) -> int:
    """What a checkpoint's tensors take in float32, from its safetensors headers."""
    from safetensors import safe_open

    from olmo_model.loader import SafetensorsCheckpoint

    elements = 0
    for file in sorted(set(SafetensorsCheckpoint(folder).files.values())):
        with safe_open(str(file), framework="numpy") as f:
            elements += sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
    return 4 * elements


def print_shapes_table(by_shape: dict, prefill_lengths: list[int]) -> None:
    """Every shape's prefill and decode per dtype, side by side (this run)."""
    dtypes = list(next(iter(by_shape.values()))["ours_by_dtype"])
    keys = [f"prefill_{n}_s" for n in prefill_lengths] + ["decode_b1_ms", "decode_b8_ms"]
    print("\nshapes side by side (ours; prefill in s, decode in ms per step)")
    print(f"{'shape':<10}{'dtype':<9}{'weights GB':>11}" + "".join(f"{k:>16}" for k in keys))
    for name, results in by_shape.items():
        for dtype in dtypes:
            ours = results["ours_by_dtype"][dtype]
            print(f"{name:<10}{dtype:<9}{ours['weight_bytes'] / 1e9:>11.2f}"
                  + "".join(f"{ours[k]:>16.3f}" for k in keys))


def paired_ratios(ours: list[dict], theirs: list[dict]) -> dict:
    """Median over rounds of ours / llama.cpp's figure of the same round."""
    return {key: statistics.median(o[key] / t[key] for o, t in zip(ours, theirs))
            for key in theirs[0] if key in ours[0]}


# llama.cpp on this machine (issue 18: 2 threads, an OLMo-1B-shaped random checkpoint
# converted with llama.cpp's converter, `llama-bench -p 128,512 -n 64 -t 2`), as ms per
# token for decode and seconds per prompt for prefill. Not re-run here (llama.cpp is not
# installed); the machine's speed drifts between days, so compare ratios to our own
# float16 in the same run rather than these absolute figures.
LLAMA_CPP_RECORDED = {
    "float32": {"decode_b1_ms": 1000 / 6.9, "prefill_512_s": 512 / 56},
    "float16": {"decode_b1_ms": 1000 / 14.4, "prefill_512_s": 512 / 83},
    "q8f16": {"decode_b1_ms": 1000 / 19.1, "prefill_512_s": 512 / 88},  # Q8_0
    "q4f16": {"decode_b1_ms": 1000 / 39.2, "prefill_512_s": 512 / 123},  # Q4_0
}


def print_table(results: dict, prefill_lengths: list[int]) -> None:
    by_dtype = results.get("ours_by_dtype") or {results.get("dtype", "float32"): results["ours"]}
    ref, bw = results.get("transformers", {}), results["bandwidth"]
    print(f"\n{results['shape']}: {results['weight_bytes'] / 1e9:.2f} GB fp32 weights; read "
          f"{bw['read_gbps']:.1f} GB/s (numpy, 1 thread), "
          f"{bw.get('read_all_cpus_gbps', float('nan')):.1f} GB/s (numpy, "
          f"{bw.get('read_threads', '?')} threads), read kernel "
          f"{bw.get('read_kernel_gbps', float('nan')):.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s")
    print(f"TVM threads: {results.get('tvm_num_threads', '?')}, torch threads: "
          f"{ref.get('torch_threads', '-')}\n")
    # A row is a key of the results (ours and transformers' alike, where they have it) or
    # a figure derived from ours.
    rows = [("weights (GB)", lambda o: o["weight_bytes"] / 1e9),
            ("compile (s)", "compile_s"), ("load + quantize (s)", "load_s")]
    rows += [(f"prefill {n} tokens (s)", f"prefill_{n}_s") for n in prefill_lengths]
    rows += [("decode batch 1 (ms/step)", "decode_b1_ms"),
             ("decode batch 8 (ms/step)", "decode_b8_ms"),
             ("decode b1 weight read GB/s", "decode_b1_weight_gbps"),
             ("decode b1 / floor", lambda o: o["decode_b1_ms"] / o["decode_floor_ms"]),
             ("decode b8 / b1", lambda o: o["decode_b8_ms"] / o["decode_b1_ms"])]
    columns = list(by_dtype)
    print(f"{'metric':<28}" + "".join(f"{'ours ' + d:>15}" for d in columns)
          + f"{'transformers':>14}")
    for label, value in rows:
        keyed = isinstance(value, str)
        cells = [by_dtype[d].get(value) if keyed else value(by_dtype[d]) for d in columns]
        theirs = ref.get(value) if keyed else None
        print(f"{label:<28}" + "".join(f"{c:>15.3f}" if c is not None else f"{'-':>15}"
                                       for c in cells)
              + (f"{theirs:>14.3f}" if theirs else f"{'-':>14}"))
    if results.get("llama_cpp"):
        print_llama_cpp_table(by_dtype, results["llama_cpp"], prefill_lengths)
    llama = results.get("llama_cpp_recorded")
    if llama and "float16" in by_dtype:
        print("\nagainst float16 in this run (ours) and llama.cpp's recorded F16 (theirs):")
        for d in columns:
            if d in llama and d != "float16":
                ours = by_dtype[d]["decode_b1_ms"] / by_dtype["float16"]["decode_b1_ms"]
                theirs = llama[d]["decode_b1_ms"] / llama["float16"]["decode_b1_ms"]
                print(f"  decode b1 {d} / float16: ours {ours:.2f}, llama.cpp {theirs:.2f}")


def print_llama_cpp_table(by_dtype: dict, llama: dict, prefill_lengths: list[int]) -> None:
    """Ours against llama.cpp per dtype: each one's median, and the median of the rounds'
    ratios (ours / llama.cpp; below 1, ours is faster)."""
    some = next(iter(llama.values()))
    print(f"\nagainst llama.cpp in this run (build {some.get('build_commit')}, "
          f"{some.get('threads')} threads, the same checkpoint, rounds interleaved); each "
          "cell: llama.cpp, ours, ours / llama.cpp (median of the rounds' ratios)")
    metrics = [(f"prefill {n} (s)", f"prefill_{n}_s") for n in prefill_lengths]
    metrics.append(("decode b1 (ms)", "decode_b1_ms"))
    print(f"{'dtype':<9}{'llama.cpp':>10}" + "".join(f"{label:>30}" for label, _ in metrics))
    for dtype, theirs in llama.items():
        cells = []
        for _, key in metrics:
            ours, their = by_dtype[dtype].get(key), theirs.get(key)
            ratio = theirs.get("ours_over_theirs", {}).get(key)
            cells.append(f"{their:>9.3f} {ours:>9.3f} {ratio:>8.2f}x"
                         if ours and their and ratio else f"{'-':>30}")
        print(f"{dtype:<9}{theirs['type']:>10}" + "".join(f"{c:>30}" for c in cells))


if __name__ == "__main__":
    main()
