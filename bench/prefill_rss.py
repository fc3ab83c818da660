"""Prefill memory over a soak of many prompt lengths: does RSS stay flat after warm-up?

A prefill pass allocates activations sized by its token count. TVM's default (pooled)
allocator keeps a buffer of every size it has handed out, so each new prompt length
left megabytes behind for good; runners on the CPU now allocate afresh
(olmo_model/runtime.py). This runs the prefill worker's pass (a sequence added, its
layers in groups as the worker pushes them, the last hidden state read, the sequence
removed) over ``--requests`` prompts of ``--lengths`` distinct lengths, after a warm-up
of ``--warmup`` prompts, once per allocator, each in a process of its own (the allocator
is per process): ``naive`` (what runners use) and ``pooled`` (TVM's default, the
baseline). RSS is read after warm-up and every ``--requests``/10 prompts.

    python3 bench/prefill_rss.py [--model DIR] [--requests 1000] [--lengths 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from checkpoints import SMALL, bench_checkpoint
from recording import rss_mib, write_results

ALLOCATORS = ("naive", "pooled")


def soak(model: Path, allocator: str, requests: int, lengths: int, warmup: int) -> dict:
    """One allocator's soak, in this process."""
    from tvm.runtime.vm import VirtualMachine

    import olmo_model.runtime as runtime

    # This allocator, whatever the runner would choose.
    runtime.VirtualMachine = lambda library, device, memory_cfg=None: VirtualMachine(
        library, device, memory_cfg=allocator)
    runner = runtime.ModelRunner.from_checkpoint(model)
    groups = runner.layer_groups(4)
    rng = np.random.default_rng(0)
    sizes = [64 + 3 * i for i in range(lengths)]
    seconds = []

    def prefill(seq_id: int, length: int) -> None:
        ids = rng.integers(0, runner.config.vocab_size, length).astype("int32")
        runner.add_sequence(seq_id)
        try:
            start = time.perf_counter()
            out = runner.forward([seq_id], [length], runner.embed(ids), layer_groups=groups)
            runner.select_last(out, [length]).numpy()
            seconds.append(time.perf_counter() - start)
        finally:
            runner.remove_sequence(seq_id)

    for i in range(warmup):
        prefill(i, sizes[i % len(sizes)])
    after_warmup = rss_mib()
    marks = []
    for i in range(requests):
        prefill(warmup + i, sizes[(warmup + i) % len(sizes)])
        if (i + 1) % max(1, requests // 10) == 0:
            marks.append(round(rss_mib(), 1))
    return {"rss_after_warmup_mib": round(after_warmup, 1), "rss_marks_mib": marks,
            "growth_after_warmup_pct": round(100 * (max(marks) - after_warmup)
                                             / after_warmup, 1),
            "prefill_ms_median": round(1e3 * statistics.median(seconds), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: the random hidden-512 8-layer checkpoint)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--lengths", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS),
                        choices=ALLOCATORS)
    parser.add_argument("--child", choices=ALLOCATORS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefill_rss.json"))
    args = parser.parse_args()
    model = args.model or bench_checkpoint("small", SMALL)
    if args.child:
        print(json.dumps(soak(model, args.child, args.requests, args.lengths, args.warmup)))
        return
    results = {"model": str(model), "requests": args.requests, "lengths": args.lengths,
               "warmup": args.warmup, "allocators": {}}
    for allocator in args.allocators:
        child = subprocess.run(
            [sys.executable, __file__, "--child", allocator, "--model", str(model),
             "--requests", str(args.requests), "--lengths", str(args.lengths),
             "--warmup", str(args.warmup)],
            check=True, capture_output=True, text=True)
        results["allocators"][allocator] = json.loads(child.stdout.strip().splitlines()[-1])
    print_table(results)
    write_results(args.out, results)


def print_table(results: dict) -> None:
    print(f"\nPrefill RSS over {results['requests']} prompts of {results['lengths']} lengths, "
          f"after {results['warmup']} to warm up ({Path(results['model']).name})")
    print(f"{'allocator':<10}{'after warm-up':>15}{'peak':>10}{'growth':>9}{'prefill':>10}")
    for name, r in results["allocators"].items():
        print(f"{name:<10}{r['rss_after_warmup_mib']:>11.0f} MiB{max(r['rss_marks_mib']):>6.0f} MiB"
              f"{r['growth_after_warmup_pct']:>8.1f}%{r['prefill_ms_median']:>8.1f}ms")


if __name__ == "__main__":
    main()
