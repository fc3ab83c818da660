"""The paged KV cache's RoPE kernel for CPUs: angles once per token, rotation vectorized.

TVM's ``fused_rope`` (which splits the fused q/k/v projection and rotates q and k)
computes every output element on its own: a power, a cosine and a sine per element,
scalar, with the head's branch inside. On OLMo-1B it took 12 ms of each layer of a
512-token prefill (8% of a 4-bit prefill), and 19 us per layer per decode step, even
with its head loop made innermost so that LLVM hoisted the angle out of it.

``ParallelRope`` swaps it for ``rope_kernel``, with the same arguments and results:
tokens in parallel; per token, the cosines and sines of its half-dimension angles once,
from TVM's own frequency functions (so llama3 scaling and linear position scaling mean
what they mean in TVM); then, per head, the rotation of both halves as vector FMAs.
Only the "normal" (rotate-half) style with the whole head rotated, which is what
model.py builds: dimension i and i + d/2 share an angle there.
"""

from __future__ import annotations

import json
from typing import Any

import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
from tvm.script import tirx as T

from .config import OLMoConfig
from .cpu_attention import VECTOR_LANES, static_extent
from .kernel_memo import built_once

# The name and parameters of TVM's kernel in the KV cache's module.
_FUSED_ROPE = "fused_rope"
_FUSED_ROPE_PARAMS = ("qkv", "position_map", "q", "k", "v", "apply_rope")
# The RoPE scalings rope_kernel reproduces (TVM's spelling; {} is plain RoPE).
_ANGLE_SHARING_SCALINGS = (None, "llama3")


def rope_kernel(h_q: int, h_kv: int, d: int, dtype: str, theta: float, scale: float,
                rope_scaling: dict[str, Any]) -> tirx.PrimFunc:
    """TVM's ``fused_rope`` for these shapes and RoPE settings (see module doc)."""
    return _rope_kernel(h_q, h_kv, d, dtype, theta, scale,
                        json.dumps(rope_scaling, sort_keys=True))


@built_once
def _rope_kernel(h_q: int, h_kv: int, d: int, dtype: str, theta: float, scale: float,
                 scaling: str) -> tirx.PrimFunc:
    rope_scaling = json.loads(scaling)
    if rope_scaling.get("rope_type") not in _ANGLE_SHARING_SCALINGS:
        raise ValueError(f"rope_kernel does not do rope_type {rope_scaling['rope_type']!r}")
    fused_heads, half = h_q + 2 * h_kv, d // 2
    frequencies = switch_rope_freq_func(rope_scaling)

    def cos_sin(position: tirx.PrimExpr, i: tirx.PrimExpr) -> tuple[tirx.PrimExpr, ...]:
        """cos and sin of dimension i's angle at ``position``, as TVM's kernel has them."""
        cos, sin, shared = frequencies(position.astype("float32") * tirx.const(scale, "float32"),
                                       i, d, theta, "float32")
        for var, value in shared.items():  # in TVM's order: later ones bind earlier ones
            cos, sin = tirx.Let(var, value, cos), tirx.Let(var, value, sin)
        return cos, sin

    @T.macro
    def rotate(qkv, out, s, head, out_head, cos, sin, apply_rope):
        """out[s, out_head] = qkv[s, head] rotated by the token's angles (or copied)."""
        if apply_rope > 0:
            for i in T.vectorized(half):
                out[s, out_head, i] = T.Cast(dtype, cos[i] * T.Cast("float32", qkv[s, head, i])
                                         - sin[i] * T.Cast("float32", qkv[s, head, i + half]))
                out[s, out_head, i + half] = T.Cast(
                    dtype, cos[i] * T.Cast("float32", qkv[s, head, i + half])
                    + sin[i] * T.Cast("float32", qkv[s, head, i]))
        else:
            for i in T.vectorized(d):
                out[s, out_head, i] = qkv[s, head, i]

    @T.prim_func(s_tir=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle,
                   var_k: T.handle, var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True, "tirx.noalias": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused_heads, d), dtype)
        q = T.match_buffer(var_q, (seq_len, h_q, d), dtype)
        k = T.match_buffer(var_k, (seq_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (seq_len, h_kv, d), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32",
                                      elem_offset=position_map_elem_offset)
        for s in T.parallel(seq_len):
            with T.sblock("rope"):
                T.reads(qkv[s, 0:fused_heads, 0:d], position_map[s])
                T.writes(q[s, 0:h_q, 0:d], k[s, 0:h_kv, 0:d], v[s, 0:h_kv, 0:d])
                cos = T.sblock_alloc_buffer((half,), "float32")
                sin = T.sblock_alloc_buffer((half,), "float32")
                for i in T.serial(half):
                    cos[i] = cos_sin(position_map[s], i)[0]
                    sin[i] = cos_sin(position_map[s], i)[1]
                for h in T.serial(h_q):
                    rotate(qkv, q, s, h, h, cos, sin, apply_rope)
                for h in T.serial(h_kv):
                    rotate(qkv, k, s, h_q + h, h, cos, sin, apply_rope)
                for h in T.serial(h_kv):
                    for i in T.vectorized(d):
                        v[s, h, i] = qkv[s, h_q + h_kv + h, i]

    return fused_rope


@tvm.transform.module_pass(opt_level=0, name="ParallelRope")
class ParallelRope:
    """Swap the KV cache's ``fused_rope`` for ``rope_kernel`` with ``config``'s RoPE.

    A kernel of another signature or shape (a head size that is not a multiple of two
    vector widths) is left as TVM wrote it.
    """

    def __init__(self, config: OLMoConfig):
        self.theta, self.scale = config.rope_theta, config.rope_scale
        self.rope_scaling = config.tvm_rope_scaling

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        for gvar, func in mod.functions_items():
            if (gvar.name_hint != _FUSED_ROPE or not isinstance(func, tirx.PrimFunc)
                    or tuple(p.name for p in func.params) != _FUSED_ROPE_PARAMS):
                continue
            qkv, q, k = (func.params[i].ty for i in (0, 2, 3))
            fused, d = static_extent(qkv.shape[1]), static_extent(qkv.shape[2])
            h_q, h_kv = static_extent(q.shape[1]), static_extent(k.shape[1])
            if (None in (fused, d, h_q, h_kv) or fused != h_q + 2 * h_kv
                    or d % (2 * VECTOR_LANES)):
                continue
            kernel = rope_kernel(h_q, h_kv, d, str(qkv.dtype), self.theta, self.scale,
                                 self.rope_scaling)
            mod[gvar] = kernel.with_attr("global_symbol", func.attrs["global_symbol"])
        return mod
