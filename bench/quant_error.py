"""What quantized weights cost in accuracy: each dtype's logits against float32's.

For each checkpoint (the built-in demo model, the random OLMo-1B shape), float32 greedily
generates ``--tokens`` tokens after a random prompt. Every other dtype then runs the same
prompt and is fed float32's tokens (teacher forcing), and at each position we compare
its logits with float32's: relative error (max |difference| / max |float32 logit|) and
whether the greedy choice agrees. Free-running, we also report how many tokens its own
greedy generation shares with float32's before the first difference.

    python3 bench/quant_error.py [--tokens 64] [--dtype float16 q8f16 q4f16]
                                 [--out bench/results/quant_error.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from checkpoints import OLMO_1B, bench_checkpoint
from recording import write_results

from olmo_model.demo import DEMO_MODEL_DIR
from olmo_model.quantization import MODEL_DTYPES
from olmo_model.runtime import ModelRunner


def run(runner: ModelRunner, prompt: list[int], forced: list[int] | None, tokens: int
        ) -> tuple[list[np.ndarray], list[int]]:
    """Logits at each generated position, and the tokens fed (forced, or its greedy own)."""
    runner.add_sequence(0)
    try:
        logits = [runner.logits(runner.prefill([0], [prompt]))[0]]
        fed = []
        for i in range(tokens - 1):
            token = forced[i] if forced else int(np.argmax(logits[-1]))
            fed.append(token)
            logits.append(runner.decode([0], [token])[0])
        return logits, fed + [int(np.argmax(logits[-1]))]
    finally:
        runner.remove_sequence(0)


def compare(folder: Path, dtypes: list[str], tokens: int, seed: int = 0) -> dict:
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    prompt = np.random.default_rng(seed).integers(0, vocab, 64).tolist()
    reference, greedy = run(ModelRunner.from_checkpoint(folder, dtype="float32"), prompt,
                            None, tokens)
    out = {}
    for dtype in dtypes:
        runner = ModelRunner.from_checkpoint(folder, dtype=dtype)
        forced, _ = run(runner, prompt, greedy, tokens)
        _, own = run(runner, prompt, None, tokens)
        errors = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(forced, reference)]
        agree = [int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(forced, reference)]
        shared = next((i for i, (a, b) in enumerate(zip(own, greedy)) if a != b), tokens)
        out[dtype] = {"prefill_rel_error": errors[0],
                      "decode_rel_error_median": statistics.median(errors[1:]),
                      "decode_rel_error_max": max(errors[1:]),
                      "greedy_agreement": sum(agree) / len(agree),
                      "free_running_shared_prefix": shared, "tokens": tokens}
        del runner
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", nargs="+", choices=[d for d in MODEL_DTYPES if d != "float32"],
                        default=["float16", "q8f16", "q4f16"])
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quant_error.json"))
    args = parser.parse_args()
    checkpoints = {"demo": DEMO_MODEL_DIR}
    if not args.skip_1b:
        checkpoints["olmo-1b"] = bench_checkpoint("olmo-1b", OLMO_1B)
    results = {name: compare(folder, args.dtype, args.tokens)
               for name, folder in checkpoints.items()}
    print(f"\nagainst float32, {args.tokens} tokens teacher-forced after a 64-token prompt")
    print(f"{'model':<10}{'dtype':<9}{'prefill err':>12}{'decode err p50':>16}"
          f"{'decode err max':>16}{'greedy agree':>14}{'free-run prefix':>17}")
    for name, by_dtype in results.items():
        for dtype, r in by_dtype.items():
            print(f"{name:<10}{dtype:<9}{r['prefill_rel_error']:>12.4f}"
                  f"{r['decode_rel_error_median']:>16.4f}{r['decode_rel_error_max']:>16.4f}"
                  f"{r['greedy_agreement']:>14.2f}{r['free_running_shared_prefix']:>17}")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
