"""What a serving instance's work costs on this machine: measured, fitted, for the simulator.

``measure`` runs the model (``ModelRunner``, the kernels the workers run) pinned to a CPU
set, in a process of its own started with taskset so that TVM sizes its thread pool to the
set, and times the three kinds of work an instance does:

- a prefill pass: pieces of one or several sequences, each ``length`` new tokens after
  ``context`` cached ones (the chunks of chunked prefill), with the last token's hidden
  state selected and projected to logits as the engines do;
- a decode step: ``batch`` sequences of ``context`` tokens each, one token each;
- a K/V hand-off's two ends: exporting a sequence's K/V to host arrays (the prefill
  worker, for each push) and importing it into a sequence (the decode worker, on install).

``fit`` turns the samples into linear models, the form the simulator evaluates:

    prefill pass  a + b * new tokens + c * sum(length * (context + length / 2))
    decode step   a + b * batch + c * sum(context)
    export, import   a + b * tokens

The attention term counts the query-key pairs a causal pass computes. ``StepCosts.for_cores``
extrapolates the fits measured on 1 and 2 cores to more by Amdahl's law per coefficient:
an estimate, marked as such wherever it is used.

    python3 bench/step_costs.py [--model M] [--dtype float32] [--cpu-sets 0 0,1] [--out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from recording import machine

PREFILL_SHAPES = [  # (pieces as (length, context)), the chunks the engines run
    ((16, 0),), ((64, 0),), ((256, 0),), ((1024, 0),), ((64, 512),), ((256, 512),),
    ((64, 1024),), ((256, 1024),), ((64, 0),) * 4, ((256, 0),) * 4, ((16, 0),) * 16,
]
DECODE_SHAPES = [(1, 128), (1, 1024), (4, 128), (4, 512), (16, 128), (16, 512), (32, 256)]
HANDOFF_TOKENS = [128, 512, 1024]


@dataclasses.dataclass(frozen=True)
class Linear:
    """``intercept + sum(coefficients[i] * features[i])``, seconds."""

    intercept: float
    coefficients: tuple[float, ...]

    def __call__(self, *features: float) -> float:
        return self.intercept + sum(c * f for c, f in zip(self.coefficients, features))

    def scaled(self, factors: tuple[float, ...]) -> Linear:
        """Each term times its factor (the intercept first)."""
        return Linear(self.intercept * factors[0],
                      tuple(c * f for c, f in zip(self.coefficients, factors[1:])))


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """One instance's costs: a CPU set of ``cores``, one model and weight format."""

    cores: int
    prefill: Linear   # (new tokens, attention pairs)
    decode: Linear    # (batch, total context)
    export: Linear    # (tokens)
    install: Linear   # (tokens)
    source: str = "measured"  # measured, extrapolated, or published (not measured here)

    def prefill_s(self, pieces: list[tuple[int, int]]) -> float:
        """A pass over ``pieces`` of (new tokens, tokens before them)."""
        return self.prefill(sum(n for n, _ in pieces),
                            sum(n * (c + n / 2) for n, c in pieces))

    def decode_s(self, batch: int, context: int) -> float:
        return self.decode(batch, context)

    def for_cores(self, cores: int, other: StepCosts) -> StepCosts:
        """These costs extrapolated to ``cores``, from how each term scaled between these
        and ``other`` (measured on another core count) by Amdahl's law: the share of a
        term that did not speed up stays, the rest divides by the cores."""
        if cores == self.cores:
            return self
        if cores == other.cores:
            return other
        small, large = sorted((self, other), key=lambda c: c.cores)

        def factors(a: Linear, b: Linear) -> tuple[float, ...]:
            out = []
            for x, y in zip((a.intercept, *a.coefficients), (b.intercept, *b.coefficients)):
                speedup = x / y if y > 0 and x > 0 else 1.0
                # time(k) = time(1) * (s + (1 - s) / k), s from the measured pair
                k1, k2 = small.cores, large.cores
                serial = float(np.clip((k2 / speedup - k1) / (k2 - k1), 0, 1))
                at = (serial + (1 - serial) * k1 / cores) if cores != k1 else 1.0
                out.append(float(at))
            return tuple(out)

        fields = {name: getattr(small, name).scaled(factors(getattr(small, name),
                                                            getattr(large, name)))
                  for name in ("prefill", "decode", "export", "install")}
        return StepCosts(cores, source="extrapolated", **fields)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StepCosts:
        fields = {k: Linear(v["intercept"], tuple(v["coefficients"])) if isinstance(v, dict)
                  else v for k, v in data.items()}
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A GPU's datasheet figures, for costs that were not measured here."""

    name: str
    flops: float          # dense BF16, per second
    bytes_per_s: float    # memory bandwidth
    source: str


# NVIDIA's H100 SXM5 datasheet: 989.5 TFLOPS dense BF16 (1,979 with sparsity), 3.35 TB/s.
H100_SXM = Accelerator("H100 SXM", 989.5e12, 3.35e12, "NVIDIA H100 datasheet")
COMPUTE_USE, BANDWIDTH_USE = 0.5, 0.7  # assumed shares of the datasheet figures a kernel reaches
PASS_OVERHEAD_S = 1e-3  # assumed: kernel launches and the engine's host work per pass


def published_costs(config: dict, accelerator: Accelerator = H100_SXM) -> StepCosts:
    """One GPU's costs for a model (its Hugging Face config), by the roofline from the
    datasheet's figures at the assumed shares above: not measured, marked ``published``.

    A pass reads every weight once and computes 2 FLOPs per parameter per token; a causal
    pass computes 4 * hidden FLOPs per attention pair and layer; a decode step reads each
    sequence's K/V; a hand-off's two ends copy it once through memory."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads",
                                                                 config["num_attention_heads"])
    head_dim = hidden // heads
    params = layers * (hidden * (heads + 2 * kv_heads) * head_dim + hidden * hidden
                       + 3 * hidden * config["intermediate_size"])
    params += config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    weight_bytes = 2 * params
    kv_bytes = 2 * 2 * layers * kv_heads * head_dim
    flops = accelerator.flops * COMPUTE_USE
    memory = accelerator.bytes_per_s * BANDWIDTH_USE
    read_weights = weight_bytes / memory + PASS_OVERHEAD_S
    copy = Linear(0.0, (2 * kv_bytes / memory,))
    return StepCosts(
        1, prefill=Linear(read_weights, (2 * params / flops, 4 * hidden * layers / flops)),
        decode=Linear(read_weights, (2 * params / flops, kv_bytes / memory)),
        export=copy, install=copy, source=f"published ({accelerator.source}; roofline)")


def fit(samples: dict) -> dict[str, Linear]:
    """Least-squares fits of the measured samples (non-negative terms: a term fitted
    below zero is dropped and the rest refitted)."""
    def solve(rows: list[list[float]], times: list[float]) -> Linear:
        x = np.asarray([[1.0, *row] for row in rows])
        y = np.asarray(times)
        keep = list(range(x.shape[1]))
        while True:
            solution, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
            if (solution >= 0).all() or len(keep) == 1:
                break
            keep.pop(int(np.argmin(solution)))
        full = np.zeros(x.shape[1])
        full[keep] = np.maximum(solution, 0)
        return Linear(float(full[0]), tuple(float(v) for v in full[1:]))

    prefill = samples["prefill"]
    decode = samples["decode"]
    return {
        "prefill": solve([[sum(n for n, _ in s["pieces"]),
                           sum(n * (c + n / 2) for n, c in s["pieces"])] for s in prefill],
                         [s["seconds"] for s in prefill]),
        "decode": solve([[s["batch"], s["batch"] * s["context"]] for s in decode],
                        [s["seconds"] for s in decode]),
        "export": solve([[s["tokens"]] for s in samples["export"]],
                        [s["seconds"] for s in samples["export"]]),
        "install": solve([[s["tokens"]] for s in samples["install"]],
                         [s["seconds"] for s in samples["install"]]),
    }


def measure(model: Path, dtype: str, repeats: int) -> dict:
    """The samples, measured in this process on the CPUs it may use."""
    from olmo_model.cache_limits import CacheLimits
    from olmo_model.runtime import ModelRunner

    runner = ModelRunner.from_checkpoint(model, dtype=dtype, limits=CacheLimits(
        max_sequences=48, max_total_tokens=24576, prefill_chunk_tokens=1024))
    vocab = runner.config.vocab_size
    rng = np.random.default_rng(0)
    ids = iter(range(1, 10**6))

    def tokens(n: int) -> np.ndarray:
        return rng.integers(1, vocab, n).astype(np.int32)

    def sequences(contexts: list[int]) -> list[int]:
        out = []
        for context in contexts:
            seq = next(ids)
            runner.add_sequence(seq)
            if context:
                runner.prefill([seq], [tokens(context)])
            out.append(seq)
        return out

    def release(seqs: list[int]) -> None:
        for seq in seqs:
            runner.remove_sequence(seq)

    def prefill_once(pieces) -> float:
        seqs = sequences([c for _, c in pieces])
        lengths = [n for n, _ in pieces]
        start = time.perf_counter()
        hidden = runner.forward(seqs, lengths, runner.embed(tokens(sum(lengths))))
        runner.logits(runner.select_last(hidden, lengths))
        seconds = time.perf_counter() - start
        release(seqs)
        return seconds

    def decode_once(batch: int, context: int) -> float:
        seqs = sequences([context] * batch)
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            runner.decode(seqs, tokens(batch))
            samples.append(time.perf_counter() - start)
        release(seqs)
        return statistics.median(samples)

    def handoff_once(n: int) -> tuple[float, float]:
        (seq,) = sequences([n])
        start = time.perf_counter()
        snapshot = runner.export_kv(seq, n)
        exported = time.perf_counter() - start
        (target,) = sequences([0])
        start = time.perf_counter()
        runner.import_kv(target, snapshot)
        installed = time.perf_counter() - start
        release([seq, target])
        return exported, installed

    prefill_once(((64, 0),))  # warm: code loaded, pages touched
    decode_once(2, 64)
    out = {"prefill": [], "decode": [], "export": [], "install": []}
    for pieces in PREFILL_SHAPES:
        out["prefill"].append({"pieces": [list(p) for p in pieces], "seconds": statistics.median(
            prefill_once(pieces) for _ in range(repeats))})
    for batch, context in DECODE_SHAPES:
        out["decode"].append({"batch": batch, "context": context, "seconds": statistics.median(
            decode_once(batch, context) for _ in range(repeats))})
    for n in HANDOFF_TOKENS:
        pairs = [handoff_once(n) for _ in range(repeats)]
        out["export"].append({"tokens": n, "seconds": statistics.median(p[0] for p in pairs)})
        out["install"].append({"tokens": n, "seconds": statistics.median(p[1] for p in pairs)})
    out["kv_bytes_per_token"] = int(
        2 * runner.config.num_hidden_layers * runner.config.num_key_value_heads
        * runner.config.head_dim * np.dtype(runner.dtype).itemsize)
    return out


def measure_pinned(model: Path, dtype: str, cpus: str, repeats: int) -> dict:
    """``measure`` in a process pinned to ``cpus`` (taskset's list syntax)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    done = subprocess.run(["taskset", "-c", cpus, sys.executable, str(Path(__file__)),
                           "--measure-here", "--model", str(model), "--dtype", dtype,
                           "--repeats", str(repeats)],
                          env=env, check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


def calibrate(model: Path, dtype: str, cpu_sets: list[str], repeats: int = 3) -> dict:
    """Per CPU set: the samples, the fits, and how well the fits reproduce the samples."""
    out = {"model": str(model), "dtype": dtype, "machine": machine(), "sets": {}}
    for cpus in cpu_sets:
        samples = measure_pinned(model, dtype, cpus, repeats)
        fits = fit(samples)
        costs = StepCosts(len(cpus.split(",")), **fits)
        errors = [abs(costs.prefill_s([tuple(p) for p in s["pieces"]]) / s["seconds"] - 1)
                  for s in samples["prefill"]]
        errors += [abs(costs.decode_s(s["batch"], s["batch"] * s["context"]) / s["seconds"] - 1)
                   for s in samples["decode"]]
        out["sets"][cpus] = {"costs": costs.to_json(), "samples": samples,
                             "fit_error_median": statistics.median(errors),
                             "fit_error_max": max(errors)}
        out["kv_bytes_per_token"] = samples["kv_bytes_per_token"]
    return out


def print_table(calibration: dict) -> None:
    print(f"\n{Path(calibration['model']).name} ({calibration['dtype']}): fitted costs, ms")
    print(f"{'cpus':<8}{'prefill 256':>12}{'prefill 1024':>13}{'decode b1':>10}"
          f"{'decode b16':>11}{'export 512':>11}{'install 512':>12}{'fit err med/max':>17}")
    for cpus, entry in calibration["sets"].items():
        c = StepCosts.from_json(entry["costs"])
        print(f"{cpus:<8}{1e3 * c.prefill_s([(256, 0)]):>12.1f}"
              f"{1e3 * c.prefill_s([(1024, 0)]):>13.1f}{1e3 * c.decode_s(1, 256):>10.2f}"
              f"{1e3 * c.decode_s(16, 16 * 256):>11.2f}{1e3 * c.export(512):>11.2f}"
              f"{1e3 * c.install(512):>12.2f}"
              f"{entry['fit_error_median']:>9.1%} / {entry['fit_error_max']:.1%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: the hidden-512 8-layer bench checkpoint)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cpu-sets", nargs="+", default=["0", "0,1"],
                        help="CPU sets to measure on (taskset lists), one instance each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure-here", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_costs.json"))
    args = parser.parse_args(argv)
    if args.model is None:
        from checkpoints import SMALL, bench_checkpoint

        args.model = bench_checkpoint("small", SMALL)
    if args.measure_here:
        print(json.dumps(measure(args.model, args.dtype, args.repeats)))
        return
    calibration = calibrate(args.model.resolve(), args.dtype, args.cpu_sets, args.repeats)
    print_table(calibration)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(calibration, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
