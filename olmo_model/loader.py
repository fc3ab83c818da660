"""Load a Hugging Face OLMo safetensors checkpoint into a stage's parameter list.

Maps Hugging Face tensor names onto ours once, fusing q/k/v into ``qkv_proj`` and
gate/up into ``gate_up_proj`` as MLC LLM does, and shifting layer numbers to the
stage-local numbering a stage module uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from . import quantized_cache
from .quantization import activation_dtype, quantize, weight_format
from .stages import StageSpec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded, with what to do about it."""


# A quantized layer's stored weights and scales both come from its float weight.
_QUANTIZED = (".q_weight", ".q_scale")


def hf_sources(param_name: str, stage: StageSpec, tied: bool) -> list[str]:
    """The Hugging Face tensors (concatenated on axis 0) that make one of our parameters."""
    if param_name.endswith(_QUANTIZED):
        param_name = param_name.rsplit(".", 1)[0] + ".weight"
    match = _LAYER.match(param_name)
    if match:
        layer = stage.layer_begin + int(match.group(1))
        suffix = match.group(2)
        return [f"model.layers.{layer}.{part}" for part in _FUSED.get(suffix, (suffix,))]
    if param_name == "lm_head.weight" and tied:
        return ["model.embed_tokens.weight"]
    return [param_name]


class SafetensorsCheckpoint:
    """Tensor lookup across one or many safetensors files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"model folder {self.folder} does not exist")
        self.files = self._tensor_files()

    def _tensor_files(self) -> dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object")
            files = {name: self.folder / shard for name, shard in weight_map.items()}
            absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
            if absent:
                raise CheckpointError(
                    f"{index} names shard(s) that are missing: {', '.join(absent)}")
            return files
        single = self.folder / SINGLE_FILE
        if not single.is_file():
            found = sorted(self.folder.glob("*.safetensors"))
            if len(found) == 1:
                single = found[0]
            elif any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
                raise CheckpointError(
                    f"{self.folder} holds only PyTorch pickle weights (.bin/.pt); convert them to "
                    "safetensors first, e.g. load with transformers and call "
                    "model.save_pretrained(folder, safe_serialization=True)"
                )
            else:
                raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.folder}")
        with safe_open(str(single), framework="numpy") as f:
            return {name: single for name in f.keys()}

    def names(self) -> set[str]:
        return set(self.files)

    def read(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise CheckpointError(f"checkpoint in {self.folder} lacks tensor {name!r}")
        with safe_open(str(self.files[name]), framework="numpy") as f:
            try:
                return f.get_tensor(name)
            except TypeError:
                # numpy has no bfloat16; read the raw bytes and let ml_dtypes name them.
                return _read_bfloat16(self.files[name], name)


def load_stage_params(folder: str | Path, param_names: Sequence[str],
                      param_shapes: Sequence[Sequence[int]], stage: StageSpec, tied: bool,
                      dtype: str, keep_quantized: bool = True) -> list[np.ndarray]:
    """Read, fuse, check and cast (or quantize) every parameter of one stage, in the
    module's order. Quantized parameters are kept on disk (quantized_cache.py) and read
    back from there next time, unless ``keep_quantized`` is False."""
    checkpoint = SafetensorsCheckpoint(folder)
    fmt, float_dtype = weight_format(dtype), activation_dtype(dtype)
    keep_quantized = keep_quantized and fmt is not None
    if keep_quantized:
        entry = quantized_cache.entry_folder(
            list(checkpoint.files.values()), param_names, param_shapes,
            (stage.layer_begin, stage.layer_end), tied, dtype)
        cached = quantized_cache.load(entry, len(param_names))
        if cached is not None and all(tuple(p.shape) == tuple(s)
                                      for p, s in zip(cached, param_shapes)):
            return cached
    quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # layer -> (weights, scales)
    params = []
    for name, shape in zip(param_names, param_shapes):
        layer, _, kind = name.rpartition(".")
        if fmt is not None and name.endswith(_QUANTIZED):
            if layer not in quantized:
                dense = _read_fused(checkpoint, name, stage, tied)
                try:
                    quantized[layer] = quantize(dense, fmt)
                except ValueError as e:
                    raise CheckpointError(f"cannot quantize {layer}: {e}") from e
            tensor = quantized[layer][0 if kind == "q_weight" else 1]
        else:
            tensor = _read_fused(checkpoint, name, stage, tied).astype(float_dtype, copy=False)
        if tuple(tensor.shape) != tuple(shape):
            sources = " + ".join(hf_sources(name, stage, tied))
            raise CheckpointError(
                f"tensor {sources} has shape {list(tensor.shape)}, but the config implies "
                f"{list(shape)} for {name}; does config.json match the weights?"
            )
        params.append(np.ascontiguousarray(tensor))
    if keep_quantized:
        quantized_cache.store(entry, params)
    return params


def _read_fused(checkpoint: SafetensorsCheckpoint, name: str, stage: StageSpec,
                tied: bool) -> np.ndarray:
    parts = [checkpoint.read(source) for source in hf_sources(name, stage, tied)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _read_bfloat16(path: Path, name: str) -> np.ndarray:
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    entry = header[name]
    begin, end = entry["data_offsets"]
    data = np.frombuffer(raw, dtype=ml_dtypes.bfloat16, count=(end - begin) // 2,
                         offset=8 + header_len + begin)
    return data.reshape(entry["shape"]).astype(np.float32)
