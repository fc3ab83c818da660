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
# allenai/OLMo-2-0425-1B's shape: OLMo-1B's blocks with RMSNorm after attention and MLP,
# QK-norm, an untied LM head over OLMo-2's padded 100352-token vocabulary.
OLMO2_1B = dict(model_type="olmo2", architectures=["Olmo2ForCausalLM"], vocab_size=100352,
                hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
# allenai/Olmo-3-1025-7B's shape: 3 sliding-window layers (4096 tokens) to 1 full, YaRN on
# the full ones for a 65K context. Stored in float16 (14 GB instead of 28).
OLMO3_7B = dict(model_type="olmo3", architectures=["Olmo3ForCausalLM"], vocab_size=100352,
                hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=65536,
                rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                sliding_window=4096,
                layer_types=["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                             for i in range(32)],
                rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32,
                              "beta_slow": 1, "original_max_position_embeddings": 8192,
                              "attention_factor": 1.2079441541679836})
# The small shape's OLMo-2 and OLMo-3 twins (a window of 256 tokens, 3 sliding layers to
# 1 full): what the sliding-window handoff saves, beside a model that has none.
SMALL_OLMO2 = dict(SMALL, model_type="olmo2", architectures=["Olmo2ForCausalLM"],
                   rope_theta=500000.0, rms_norm_eps=1e-6)
SMALL_OLMO3 = dict(SMALL_OLMO2, model_type="olmo3", architectures=["Olmo3ForCausalLM"],
                   sliding_window=256,
                   layer_types=["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                                for i in range(SMALL["num_hidden_layers"])])
# The shapes benchmarks take by name (``--shape``).
SHAPES = {"olmo-1b": OLMO_1B, "small": SMALL, "olmo2-1b": OLMO2_1B, "olmo3-7b": OLMO3_7B,
          "small-olmo2": SMALL_OLMO2, "small-olmo3": SMALL_OLMO3}
STORED_IN = {"olmo3-7b": np.float16}
# A shard of a checkpoint written in several files holds at most this many bytes (the
# 1B shapes fit one file, as llama.cpp's converter and our older runs had them).
SHARD_BYTES = 8 * 2**30


# Where the benchmarks keep their checkpoints, across runs.
BENCH_CHECKPOINTS = Path(tempfile.gettempdir()) / "olmo-bench-checkpoints"


def bench_checkpoint(name: str, shape: dict, root: Path = BENCH_CHECKPOINTS) -> Path:
    """The benchmarks' random checkpoint ``name`` of ``shape`` under ``root``, made on
    first use (stored as ``STORED_IN`` says for its name)."""
    return make_checkpoint(root / name, shape, dtype=STORED_IN.get(name, np.float32))


def make_checkpoint(folder: Path, shape: dict, std: float = 0.02,
                    dtype: type = np.float32) -> Path:
    """A random checkpoint in Hugging Face layout (std 0.02, as OLMo initializes; a
    larger std gives peaked logits, whose greedy choices no rounding difference flips),
    OLMo-1 or, by ``shape``'s model_type, OLMo-2/3; in shards of about SHARD_BYTES, with
    their index, when it is larger than one."""
    if (folder / "model.safetensors").is_file() or (folder / INDEX).is_file():
        return folder
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray] = {}

    def write(name: str) -> None:
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, tensor in _random_tensors(shape, std, dtype):
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > SHARD_BYTES:
            write(f"shard-{len(set(weight_map.values())) + 1:05d}.safetensors")
        shard[name] = tensor
    if not weight_map:
        write("model.safetensors")
    else:
        write(f"shard-{len(set(weight_map.values())) + 1:05d}.safetensors")
        total = sum((folder / name).stat().st_size for name in set(weight_map.values()))
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                "weight_map": weight_map}))
    write_config(folder, shape)
    return folder


INDEX = "model.safetensors.index.json"


def _random_tensors(shape: dict, std: float, dtype: type):
    """(name, tensor) of every weight of a checkpoint of ``shape``, one at a time."""
    rng = np.random.default_rng(0)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    post_norm = shape.get("model_type", "olmo") != "olmo"

    def w(*dims):
        return (rng.standard_normal(dims, dtype=np.float32) * std).astype(dtype)

    def norm(size):
        return (1 + rng.standard_normal(size, dtype=np.float32) * 0.1).astype(dtype)

    yield "model.embed_tokens.weight", w(v, h)
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            yield p + f"self_attn.{name}.weight", w(rows, h)
        yield p + "mlp.gate_proj.weight", w(i, h)
        yield p + "mlp.up_proj.weight", w(i, h)
        yield p + "mlp.down_proj.weight", w(h, i)
        if post_norm:
            yield p + "self_attn.q_norm.weight", norm(h)
            yield p + "self_attn.k_norm.weight", norm(kv)
            yield p + "post_attention_layernorm.weight", norm(h)
            yield p + "post_feedforward_layernorm.weight", norm(h)
    if post_norm:
        yield "model.norm.weight", norm(h)
    if not shape.get("tie_word_embeddings", False):
        yield "lm_head.weight", w(v, h)


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


def with_tokenizer(name: str, weights: Path, tokenizer_files: list[Path],
                   root: Path = BENCH_CHECKPOINTS) -> Path:
    """A checkpoint folder ``name`` under ``root``: ``weights``'s files and the tokenizer's,
    as links (no copy of the weights)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for source in [*weights.iterdir(), *tokenizer_files]:
        link = folder / source.name
        if not link.exists():
            link.symlink_to(source.resolve())
    return folder


def bpe_tokenizer(vocab_size: int = 50280, root: Path = BENCH_CHECKPOINTS) -> Path:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens (GPT-NeoX's, OLMo-1's size),
    trained here on the Python standard library's sources: a real vocabulary's mix of
    words, code and punctuation, for what depends on one (a grammar's token masks). Made
    once, in seconds; its EOS, <|endoftext|>, is token 0."""
    folder = root / f"bpe-{vocab_size}"
    path = folder / "tokenizer.json"
    if path.is_file():
        return path
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for source in sorted(stdlib.rglob("*.py")):
            if "site-packages" not in source.parts:
                try:
                    yield source.read_text("utf-8")
                except (UnicodeDecodeError, OSError):
                    pass

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path
