"""Compiling an instance layout's stage libraries: one after another, or side by side.

What a cluster pays at start on a cold cache (and a clean clone's test suite, many times
over): the libraries of a prefill instance of ``--prefill-stages`` stages and a decode
instance of ``--decode-stages`` (the demo model by default), compiled into a fresh cache
(a) one after another in a fresh process, as workers did before
``artifact.compile_side_by_side``, and (b) side by side, one per CPU. The two alternate
over ``--rounds`` rounds, each into a cache of its own. Prints a table and writes JSON.

    python3 bench/compile_bench.py [--prefill-stages 2] [--decode-stages 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recording import write_results

ONE_AFTER_ANOTHER = """
import sys
from olmo_model.compiler import compile_model
from olmo_model.config import OLMoConfig
from olmo_model.stages import StageSpec
config = OLMoConfig.from_file(sys.argv[1])
for count in map(int, sys.argv[2:]):
    for stage in range(count):
        compile_model(config, StageSpec.of(config.num_hidden_layers, count, stage))
"""
SIDE_BY_SIDE = """
import sys
from cluster.worker_spec import WorkerSpec
WorkerSpec.of(sys.argv[1]).compile(map(int, sys.argv[2:]))
"""


def timed(script: str, model: str, counts: list[int]) -> float:
    """Seconds a fresh process takes to compile the libraries into a fresh cache."""
    env = {**os.environ, "OLMO_CACHE_DIR": tempfile.mkdtemp(prefix="compile-bench-")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script, model, *map(str, counts)], env=env,
                   check=True, capture_output=True, timeout=3600)
    return time.perf_counter() - start


def main() -> None:
    from olmo_model.artifact import target_description
    from olmo_model.config import OLMoConfig
    from olmo_model.demo import DEMO_MODEL_DIR
    from olmo_model.stages import StageSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR))
    parser.add_argument("--prefill-stages", type=int, default=2)
    parser.add_argument("--decode-stages", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/compile_bench.json"))
    args = parser.parse_args()
    counts = sorted({args.prefill_stages, args.decode_stages})
    config = OLMoConfig.from_file(args.model)
    layers = config.num_hidden_layers
    libraries = {(s.layer_begin, s.layer_end) for c in counts
                 for s in (StageSpec.of(layers, c, i) for i in range(c))}
    times: dict[str, list[float]] = {"one after another": [], "side by side": []}
    for _ in range(args.rounds):
        times["one after another"].append(timed(ONE_AFTER_ANOTHER, args.model, counts))
        times["side by side"].append(timed(SIDE_BY_SIDE, args.model, counts))
    print(f"\n{len(libraries)} libraries ({counts} stages of {args.model}, "
          f"{layers} layers), {os.cpu_count()} CPUs; seconds per round:")
    for name, seconds in times.items():
        print(f"{name:<20}{statistics.median(seconds):>8.1f}   rounds: "
              + ", ".join(f"{s:.1f}" for s in seconds))
    ratio = statistics.median(times["one after another"]) / statistics.median(
        times["side by side"])
    print(f"side by side is {ratio:.2f}x as fast")
    write_results(args.out, {"model": args.model, "stage_counts": counts,
                             "libraries": len(libraries), "target": json.dumps(
                                 target_description("llvm")), "seconds": times,
                             "ratio": ratio})


if __name__ == "__main__":
    main()
