"""``olmo-serve``: the command line for the OLMo serving cluster."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="folder with config.json, *.safetensors, tokenizer.json "
                             "(default: the built-in tiny demo model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--target", default="llvm", help="llvm (this CPU) or cuda")


def _generate(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from olmo_model.demo import resolve_model_dir
    from olmo_model.generate import greedy_generate
    from olmo_model.runtime import ModelRunner

    model_dir = resolve_model_dir(args.model)
    start = time.perf_counter()
    runner = ModelRunner.from_checkpoint(model_dir, dtype=args.dtype, target=args.target)
    load_seconds = time.perf_counter() - start
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        print("error: the prompt is empty after tokenization", file=sys.stderr)
        return 2
    result = greedy_generate(runner, prompt_ids, args.max_tokens,
                             stop_ids=runner.config.eos_token_id)
    print(args.prompt + tokenizer.decode(result.tokens))
    print(f"\nmodel {model_dir} | load+compile {load_seconds:.1f}s "
          f"({'cached' if runner.artifact.from_cache else 'compiled'}) | "
          f"prompt {len(prompt_ids)} tokens, prefill {1000 * result.prefill_seconds:.1f} ms | "
          f"{len(result.tokens)} tokens, decode {result.ms_per_token:.1f} ms/token",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olmo-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="compile the model and print a greedy continuation")
    gen.add_argument("prompt", nargs="?", default="The Python interpreter")
    gen.add_argument("--max-tokens", type=int, default=48)
    _add_model_flags(gen)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
