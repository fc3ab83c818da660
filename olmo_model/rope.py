"""RoPE applied inside the model (OLMo-2/3): transformers' frequencies, tables once per pass.

OLMo-2 and OLMo-3 norm q and k before RoPE, and OLMo-3 gives its sliding and full layers
different RoPE (YaRN on full layers of the long-context checkpoints), while TVM's paged
KV cache rotates every layer alike and knows no YaRN attention factor. So these models
run the cache without RoPE (RopeMode.NONE) and rotate q and k here.

``rope_frequencies`` computes the inverse frequencies and the attention factor as
transformers' ``modeling_rope_utils`` does (tests compare them). Per forward pass, each
distinct RoPE of the model gets one cos/sin table over the pass's query positions
(positions from the KV cache), so that a layer's rotation is elementwise work with no
transcendental function in it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op


def rope_frequencies(theta: float, scaling: dict[str, Any] | None, head_dim: int,
                     max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies ``[head_dim // 2]`` float32, attention factor) of one RoPE."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    base_freqs = np.float32(theta) ** exponents  # transformers computes these in float32
    inv_freq = (1.0 / base_freqs).astype(np.float32)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling, factor), 1.0
    if kind == "yarn":
        return _yarn(base_freqs, theta, scaling, factor, head_dim, max_position_embeddings)
    raise ValueError(f"unknown rope_type {kind!r}")


def _llama3(inv_freq: np.ndarray, scaling: dict[str, Any], factor: float) -> np.ndarray:
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(base_freqs: np.ndarray, theta: float, scaling: dict[str, Any], factor: float,
          head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    old_context = scaling.get("original_max_position_embeddings") or max_position_embeddings
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        turns = old_context / (rotations * 2 * math.pi)
        return (head_dim * math.log(turns)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extrapolated = (1.0 / base_freqs).astype(np.float32)
    inv_interpolated = (1.0 / (np.float32(factor) * base_freqs)).astype(np.float32)
    inv_freq = inv_interpolated * (1 - extrapolation) + inv_extrapolated * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RopeTable(nn.Module):
    """One RoPE's cos and sin over a pass's positions, ``[tokens, head_dim // 2]`` each
    (float32, the attention factor folded in)."""

    def __init__(self, theta: float, scaling: dict[str, Any] | None, head_dim: int,
                 max_position_embeddings: int):
        inv_freq, self.attention_factor = rope_frequencies(theta, scaling, head_dim,
                                                           max_position_embeddings)
        self.inv_freq = inv_freq

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.attention_factor
        inv_freq = Tensor.from_const(self.inv_freq)

        def table(pos: te.Tensor, freq: te.Tensor, fn) -> te.Tensor:
            return te.compute(
                (pos.shape[0], freq.shape[0]),
                lambda t, i: fn(pos[t].astype("float32") * freq[i]) * factor,
                name="rope_table")

        # Opaque to operator fusion: fused into each layer's rotation, the table would be
        # recomputed there, a cosine and a sine for every element of q and k.
        opaque = {"op_pattern": 8}
        cos = op.tensor_expr_op(lambda p, f: table(p, f, te.cos), "rope_cos",
                                args=[positions, inv_freq], attrs=opaque)
        sin = op.tensor_expr_op(lambda p, f: table(p, f, te.sin), "rope_sin",
                                args=[positions, inv_freq], attrs=opaque)
        return cos, sin


def rotate(x: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """Rotate the first ``heads`` heads of ``x`` (``[tokens, all heads, head_dim]``, q
    then k then v) by the table, rotate-half style; the other heads pass through."""

    def compute(x: te.Tensor, cos: te.Tensor, sin: te.Tensor) -> te.Tensor:
        half = x.shape[2] // 2

        def element(t, h, i):
            j = te.if_then_else(i < half, i, i - half)
            value = x[t, h, i].astype("float32")
            partner = te.if_then_else(i < half, -x[t, h, i + half].astype("float32"),
                                      x[t, h, i - half].astype("float32"))
            rotated = value * cos[t, j] + partner * sin[t, j]
            return te.if_then_else(h < heads, rotated.astype(x.dtype), x[t, h, i])

        return te.compute(x.shape, element, name="rope_rotate")

    return op.tensor_expr_op(compute, "rope_rotate", args=[x, cos, sin])
