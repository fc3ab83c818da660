"""Random OLMo checkpoints in Hugging Face layout, made once and reused by the benchmarks."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

OLMO_1B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
               tie_word_embeddings=True)
SMALL = dict(vocab_size=50304, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
             tie_word_embeddings=True)


# Where the benchmarks keep their checkpoints, across runs.
BENCH_CHECKPOINTS = Path(tempfile.gettempdir()) / "olmo-bench-checkpoints"


def bench_checkpoint(name: str, shape: dict) -> Path:
    """The benchmarks' random checkpoint ``name`` of ``shape``, made on first use."""
    return make_checkpoint(BENCH_CHECKPOINTS / name, shape)


def make_checkpoint(folder: Path, shape: dict, std: float = 0.02) -> Path:
    """A random fp32 checkpoint in Hugging Face layout (std 0.02, as OLMo initializes; a
    larger std gives peaked logits, whose greedy choices no rounding difference flips)."""
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]

    def w(*dims):
        return (rng.standard_normal(dims, dtype=np.float32) * std)

    tensors = {"model.embed_tokens.weight": w(v, h)}
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            tensors[p + f"self_attn.{name}.weight"] = w(rows, h)
        tensors[p + "mlp.gate_proj.weight"] = w(i, h)
        tensors[p + "mlp.up_proj.weight"] = w(i, h)
        tensors[p + "mlp.down_proj.weight"] = w(h, i)
    save_file(tensors, str(folder / "model.safetensors"))
    write_config(folder, shape)
    return folder


def write_config(folder: Path, shape: dict) -> Path:
    """The config.json of a checkpoint of this shape (enough to compile it: weights are
    not needed until it runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "olmo", "architectures": ["OlmoForCausalLM"], "rope_theta": 10000.0,
              "hidden_act": "silu", "clip_qkv": None, "eos_token_id": 50279,
              "pad_token_id": 1, **shape}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# For correctness checks: small enough to compile in seconds, grouped-query attention.
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True)
SERVE = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
             tie_word_embeddings=True)
