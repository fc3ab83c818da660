"""llama.cpp on the same checkpoint and CPU as our model: the yardstick of issue 18.

Where a llama.cpp build is at hand (a folder holding ``llama-bench`` and
``llama-quantize``), this writes our random Hugging Face checkpoint as a float32 GGUF
(``gguf`` from PyPI; no tokenizer: llama.cpp's ``no_vocab`` model, as ``llama-bench``
feeds random token ids anyway), makes the F16, Q8_0 and Q4_0 files with
``llama-quantize``, and runs ``llama-bench -p 128,512 -n 64 -t THREADS``: prefill of
128 and 512 tokens and batch-1 decode, per weight format. Nothing is downloaded or built
here; without the tools the bench says so and is skipped.

    python3 bench/llama_cpp.py --llama-cpp ~/llama.cpp/build/bin [--shape small] [--dtype ...]

``bench/model_bench.py --llama-cpp DIR`` runs it beside our model in the same run, a
repetition of llama-bench after each round of ours, so that both see the same minutes of
a shared machine whose memory speed drifts by tens of percent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

# Our model dtypes, as llama.cpp's weight types.
LLAMA_TYPES = {"float32": "F32", "float16": "F16", "q8f16": "Q8_0", "q4f16": "Q4_0"}
PROMPT_LENGTHS = (128, 512)
DECODE_TOKENS = 64


def find_llama_cpp(folder: Path | None) -> Path | None:
    """The folder holding llama-bench and llama-quantize: ``folder``, ``$LLAMA_CPP_BIN``,
    or where ``llama-bench`` is on the PATH; None if they are not there."""
    candidates = [folder, os.environ.get("LLAMA_CPP_BIN")]
    on_path = shutil.which("llama-bench")
    candidates.append(Path(on_path).parent if on_path else None)
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).is_file()
                             for tool in ("llama-bench", "llama-quantize")):
            return Path(candidate)
    return None


def write_gguf(checkpoint: Path, out: Path) -> Path:
    """Our float32 Hugging Face OLMo checkpoint as a float32 GGUF of llama.cpp's ``olmo``."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), "olmo")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_eps(1e-5)  # OLMo's non-affine LayerNorm
    if config.get("clip_qkv"):
        writer.add_clamp_kqv(config["clip_qkv"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("no_vocab")
    writer.add_vocab_size(config["vocab_size"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    if "lm_head.weight" in tensors and not config.get("tie_word_embeddings"):
        writer.add_tensor("output.weight", tensors["lm_head.weight"])
    for layer in range(config["num_hidden_layers"]):
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{layer}.{theirs}.weight",
                              tensors[f"model.layers.{layer}.{ours}.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def gguf_files(tools: Path, checkpoint: Path, dtypes: Sequence[str]) -> dict[str, Path]:
    """One GGUF per dtype llama.cpp has a type for (made once, kept in the checkpoint's
    ``gguf`` folder across runs)."""
    folder = checkpoint / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "model-F32.gguf"
    if not f32.is_file():
        write_gguf(checkpoint, folder / "model-F32.partial.gguf").replace(f32)
    files = {}
    for dtype in (d for d in dtypes if d in LLAMA_TYPES):
        kind = LLAMA_TYPES[dtype]
        path = folder / f"model-{kind}.gguf"
        if kind != "F32" and not path.is_file():
            partial = folder / f"model-{kind}.partial.gguf"
            subprocess.run([str(tools / "llama-quantize"), str(f32), str(partial), kind],
                           check=True, capture_output=True, timeout=1800)
            partial.replace(path)
        files[dtype] = path
    return files


def run_llama_bench(tools: Path, model: Path, threads: int, repetitions: int,
                    prompt_lengths: Sequence[int] = PROMPT_LENGTHS) -> dict:
    """llama-bench's prefill and decode figures, as model_bench's keys (seconds per
    prompt, ms per decode step), averaged over its repetitions."""
    lengths = ",".join(str(n) for n in prompt_lengths)
    done = subprocess.run(
        [str(tools / "llama-bench"), "-m", str(model), "-p", lengths, "-n", str(DECODE_TOKENS),
         "-t", str(threads), "-r", str(repetitions), "-o", "json"],
        check=True, capture_output=True, text=True, timeout=3600)
    out = {}
    for test in json.loads(done.stdout):
        # avg_ts: tokens per second, averaged over the repetitions.
        if test["n_gen"] == 0:
            out[f"prefill_{test['n_prompt']}_s"] = test["n_prompt"] / test["avg_ts"]
        else:
            out["decode_b1_ms"] = 1000 / test["avg_ts"]
        out.setdefault("build_commit", test.get("build_commit"))
        out.setdefault("cpu_info", test.get("cpu_info"))
        out.setdefault("threads", test.get("n_threads"))
    out["model_bytes"] = model.stat().st_size
    return out


def median_of_rounds(rounds: Sequence[dict]) -> dict:
    """The median of each figure over rounds (dicts with the same keys; other values
    are taken from the first)."""
    first = rounds[0]
    return {key: statistics.median(r[key] for r in rounds)
            if isinstance(value, (int, float)) and key != "threads" else value
            for key, value in first.items()}


def bench_llama_cpp(tools: Path, checkpoint: Path, dtypes: list[str], threads: int,
                    repetitions: int = 3) -> dict:
    """{dtype: llama-bench's figures} for each of our dtypes llama.cpp has a type for."""
    files = gguf_files(tools, checkpoint, dtypes)
    return {dtype: {"type": LLAMA_TYPES[dtype],
                    **run_llama_bench(tools, path, threads, repetitions)}
            for dtype, path in files.items()}


def main() -> None:
    from checkpoints import SHAPES, bench_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, help="folder with llama-bench and "
                        "llama-quantize (default: $LLAMA_CPP_BIN, then the PATH)")
    parser.add_argument("--shape", choices=["olmo-1b", "small"], default="olmo-1b",
                        help="the checkpoint's shape (OLMo-1 shapes: GGUF files of OLMo-1 "
                             "only are written)")
    parser.add_argument("--dtype", nargs="+", choices=list(LLAMA_TYPES), default=list(LLAMA_TYPES))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    tools = find_llama_cpp(args.llama_cpp)
    if tools is None:
        raise SystemExit("no llama.cpp build found (llama-bench and llama-quantize): pass "
                         "--llama-cpp or set LLAMA_CPP_BIN")
    checkpoint = bench_checkpoint(args.shape, SHAPES[args.shape])
    print(json.dumps(bench_llama_cpp(tools, checkpoint, args.dtype, args.threads,
                                     args.repetitions), indent=2))


if __name__ == "__main__":
    main()
