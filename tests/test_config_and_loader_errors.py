"""Configs and checkpoints we cannot serve are refused with a message that says why."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from olmo_model.config import ConfigError, OLMoConfig
from olmo_model.loader import CheckpointError, load_stage_params
from olmo_model.stages import StageSpec

BASE = {
    "model_type": "olmo", "vocab_size": 320, "hidden_size": 64, "num_attention_heads": 4,
    "num_hidden_layers": 2, "intermediate_size": 96, "max_position_embeddings": 256,
    "rope_theta": 10000.0,
}


def write_config(tmp_path, **changes):
    raw = {**BASE, **changes}
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gpt2"}, "'olmo', 'olmo2', 'olmo3'"),
        ({"model_type": "olmoe"}, "'olmoe'.*mixture of experts"),
        ({"model_type": "olmo3", "layer_types": ["full_attention"]}, "names 1 layers"),
        ({"model_type": "olmo3", "layer_types": ["full_attention", "local"]}, "layer_types"),
        ({"model_type": "olmo3", "sliding_window": 0}, "sliding_window must be a positive"),
        ({"model_type": "olmo2", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
         "original_max_position_embeddings"),
        ({"rope_theta": None}, "rope_theta"),
        ({"hidden_act": "mish"}, "hidden_act 'mish'"),
        ({"clip_qkv": 0}, "clip_qkv must be > 0"),
        ({"clip_qkv": -1.5}, "clip_qkv must be > 0"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"rope_scaling": {"rope_type": "linear"}}, "positive 'factor'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"max_position_embeddings": None}, "context window"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_bad_config_is_refused_with_reason(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        OLMoConfig.from_file(write_config(tmp_path, **changes))


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        OLMoConfig.from_file(tmp_path)


def test_new_rope_parameters_layout_and_max_sequence_length(tmp_path):
    folder = write_config(tmp_path, rope_theta=None, max_position_embeddings=None,
                          max_sequence_length=512,
                          rope_parameters={"rope_type": "linear", "factor": 2.0,
                                           "rope_theta": 5e5})
    config = OLMoConfig.from_file(folder)
    assert config.rope_theta == 5e5
    assert config.rope_scale == 0.5
    assert config.context_window_size == 512
    assert config.num_key_value_heads == 4 and config.head_dim == 16


def _params(folder, tied=False):
    config = OLMoConfig.from_file(folder)
    from olmo_model.model import OLMoForCausalLM

    model = OLMoForCausalLM(config)
    names, shapes = zip(*[(n, [int(d) for d in p.shape]) for n, p in model.named_parameters()])
    return load_stage_params(folder, names, shapes, StageSpec.full(2), tied, "float32")


def test_missing_tensor_is_named(tmp_path, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        _params(broken)


def test_wrong_shape_is_named(tmp_path, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors[
        "model.layers.0.self_attn.o_proj.weight"][:, :32].copy()
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"o_proj.weight has shape \[64, 32\]"):
        _params(broken)


def test_pytorch_bin_only_checkpoint_says_how_to_convert(tmp_path):
    folder = write_config(tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        _params(folder)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(folder / "config.json", sharded)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_file({n: tensors[n] for n in shard_names}, sharded / shard)
        weight_map.update({n: shard for n in shard_names})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for ours, theirs in zip(_params(sharded), _params(folder)):
        assert (ours == theirs).all()
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        _params(sharded)


def test_float16_checkpoint_is_cast_to_the_requested_dtype(tmp_path, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    half = tmp_path / "half"
    shutil.copytree(folder, half)
    tensors = load_file(half / "model.safetensors")
    save_file({n: t.astype("float16") for n, t in tensors.items()}, half / "model.safetensors")
    params = _params(half)
    assert all(p.dtype == "float32" for p in params)
