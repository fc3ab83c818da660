"""Schedules that make the compiled model fast on x86 CPUs (the ``llvm`` target).

TVM's default CPU lowering leaves every kernel as the naive loop nest it was legalized
into: scalar, single-threaded, re-reading the input vector for every output element.
These rules rewrite the model's kernels with TVM's own scheduling primitives
(``tvm.s_tir.Schedule``), applied per PrimFunc by dlight's ``ApplyDefaultSchedule``:

* ``matmul_rule``: every ``x @ W.T`` (``NT_matmul``, after ``FuseTransposeMatmul``) with its
  elementwise epilogue (residual add, casts). One register-tiled "dot product" kernel
  serves decode (1 to 8 rows), the LM head and prefill (hundreds of rows), because the
  row count is symbolic (``batch_size``, ``seq_len``) and the decode LM head runs through
  the same ``seq_len`` function as prefill logits.
* ``elementwise_rule``: the model's fused injective kernels (gate split + activation +
  multiply, reshapes, casts): parallel outside, vectorized inside.
* dlight's shipped ``cpu.Reduction`` for LayerNorm (parallel rows, vectorized normalize).

Two Relax-level passes run first: float16 matmuls accumulate in float32
(``HalfMatmulAccumulateInFloat32``), and the paged KV cache's single-threaded reference
CPU kernel for prefill attention is swapped for a parallel one with the same contract
(``ParallelPrefillAttention``). Its RoPE kernel gets a small schedule (``rope_rule``);
its other kernels (decode attention, page copies) are used as TVM ships them.
"""

from __future__ import annotations

import dataclasses
import math
import os

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.script import tirx as T
from tvm.target import Target

# Recorded in the compile cache key and the artifact meta: bump on any schedule change.
SCHEDULE_SET = "olmo-cpu-v1"

# AVX2 registers hold 8 float32 lanes; AVX-512 is deliberately not assumed.
VECTOR_LANES = 8
# Register tile of the matmul kernel: TILE_ROWS rows of x times TILE_COLS rows of W,
# each accumulating VECTOR_LANES partial sums: 3 x 4 = 12 of the 16 ymm registers,
# fed by 3 + 4 loads per 12 FMAs, so the loop is FMA-bound rather than load-bound.
TILE_ROWS = 3
TILE_COLS = 4
# Weight rows one thread works through for all x rows before moving on: sized so the
# block of W (rows x K) stays in the per-core L2 (1 MiB on this EPYC, 512 KiB on Zen 3)
# while every tile of x streams past.
WEIGHT_BLOCK_BYTES = 256 * 1024


def follow_the_machine() -> None:
    """Let TVM's CPU thread pool use every CPU this process may run on.

    TVM takes its thread count from TVM_NUM_THREADS or OMP_NUM_THREADS (Ray sets the
    latter to an actor's CPU share) and otherwise from half the logical CPUs on x86, on
    the assumption of two hyper-threads per core: one thread on a 2-vCPU machine, which
    halves every parallel kernel, and with one thread TVM also pins the main thread to
    one CPU, so that torch threads started later share it. The pool is sized once, when
    the first kernel runs, so this must happen before that: it runs when this module is
    imported (olmo_model.compiler imports it). An explicit setting wins.
    """
    if os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    os.environ["TVM_NUM_THREADS"] = str(len(cpus) if cpus else os.cpu_count() or 1)


follow_the_machine()


def cpu_pipeline(target: Target) -> tvm.transform.Pass:
    """TVM's CPU pipeline with our schedules applied between fusion and lowering."""
    return tvm.transform.Sequential(
        [
            HalfMatmulAccumulateInFloat32(),
            ParallelPrefillAttention(),
            # nn.Linear transposes its weight on every call unless this pass folds the
            # transpose into the matmul (8x on decode, measured on the CPU).
            relax.transform.FuseTransposeMatmul(),
            *cpu_generic.library_dispatch_passes(target),
            *cpu_generic.legalize_passes(target),
            dl.ApplyDefaultSchedule(*schedule_rules()),
            *cpu_generic.dataflow_lower_passes(target),
            *cpu_generic.finalize_passes(target),
        ]
    )


def schedule_rules() -> list[dl.ScheduleRule]:
    """First match wins, per PrimFunc; a PrimFunc no rule matches keeps TVM's default."""
    return [matmul_rule, dl.cpu.Reduction(), elementwise_rule, rope_rule]


# --- float16: accumulate in float32 ------------------------------------------------------


@relax.expr_functor.mutator
class _HalfMatmulMutator(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return call
        x, weight = call.args
        if str(x.ty.dtype) != "float16":
            return call
        declared = call.attrs.out_dtype
        out_dtype = "float16" if declared is None else str(declared)
        wide = relax.op.matmul(relax.op.astype(x, "float32"), weight, out_dtype="float32")
        return wide if out_dtype == "float32" else relax.op.astype(wide, out_dtype)


@tvm.transform.module_pass(opt_level=0, name="HalfMatmulAccumulateInFloat32")
class HalfMatmulAccumulateInFloat32:
    """Run float16 matmuls in float32: widen x once, widen W as it is loaded, round once.

    x86 has no float16 arithmetic: a float16 sum is converted to float32 and back on
    every add, which is both slower and less accurate than one float32 sum. Widening x
    up front (a few KB per token) leaves one conversion per weight vector in the inner
    loop, where the F16C conversion is the price of reading half the bytes.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        mutator = _HalfMatmulMutator(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.get()


# --- x @ W.T with an elementwise epilogue ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _MatmulShape:
    """What the matmul rule needs to know about one ``C[m.., n] += A[m.., k] * W[n, k]``."""

    lead_extents: tuple[tirx.PrimExpr, ...]  # the row dimensions of A and C
    n: int  # rows of W (output features)
    k: int  # the reduction length
    weight_bytes: int  # bytes per weight element


def _static(extent: tirx.PrimExpr) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _is_var_index(region: tvm.ir.Range, var: tirx.Var) -> bool:
    return region.min.same_as(var) and _static(region.extent) == 1


def _match_nt_matmul(block: s_tir.SBlock) -> _MatmulShape | None:
    """Recognize ``C[lead.., n] += A[lead.., k] * W[n, k]`` with static n and k.

    Only the access pattern is checked (W indexed by exactly [n, k], A by the leading
    iterators then k): whatever casts sit around the product are kept as they are.
    """
    iters = block.iter_vars
    if len(iters) < 3 or len(block.reads) != 2 or len(block.writes) != 1:
        return None
    *lead, n_iter, k_iter = iters
    if any(it.iter_type != tirx.IterVar.DataPar for it in [*lead, n_iter]):
        return None
    if k_iter.iter_type != tirx.IterVar.CommReduce:
        return None
    n, k = _static(n_iter.dom.extent), _static(k_iter.dom.extent)
    if n is None or k is None:
        return None
    lead_vars = [it.var for it in lead]
    weight = activation = None
    for read in block.reads:
        region = read.region
        if len(region) == 2 and _is_var_index(region[0], n_iter.var) and _is_var_index(
                region[1], k_iter.var):
            weight = read
        elif len(region) == len(lead) + 1 and all(
                _is_var_index(r, v) for r, v in zip(region, [*lead_vars, k_iter.var])):
            activation = read
    out = block.writes[0].region
    if weight is None or activation is None or len(out) != len(lead) + 1:
        return None
    if not all(_is_var_index(r, v) for r, v in zip(out, [*lead_vars, n_iter.var])):
        return None
    return _MatmulShape(
        lead_extents=tuple(it.dom.extent for it in lead),
        n=n,
        k=k,
        weight_bytes=tvm.DataType(weight.source.dtype).bits // 8,
    )


def _largest_divisor(n: int, step: int, limit: int) -> int:
    """The largest multiple of ``step`` that divides ``n`` and is at most ``limit``."""
    best = step
    for candidate in range(step, max(step, limit) + 1, step):
        if n % candidate == 0:
            best = candidate
    return best


@dl.ScheduleRule.from_callable("olmo.cpu.Matmul")
def matmul_rule(func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
    """Register-tiled ``x @ W.T`` for any number of rows of x, W streamed once.

    The reduction is split into VECTOR_LANES-wide partial sums (``rfactor`` onto the last
    axis, so W and x are both read contiguously along k), and TILE_ROWS rows of x by
    TILE_COLS rows of W are computed together, so every W vector loaded serves several
    rows of x and every x vector several rows of W. Threads split W's rows; each thread
    runs all rows of x past its block of W while the block sits in its L2. The row count
    of x is padded up to a multiple of TILE_ROWS (a copy of x, small next to W) so the
    tile needs no bounds checks; the epilogue (residual add, cast) is computed in the
    same parallel iteration while the results are still in registers.
    """
    if target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    matmuls = [b for b in blocks if _match_nt_matmul(sch.get(b)) is not None]
    if len(matmuls) != 1:
        return None
    matmul = matmuls[0]
    shape = _match_nt_matmul(sch.get(matmul))
    epilogues = _epilogue_chain(sch, blocks, matmul)
    if epilogues is None or shape.k % VECTOR_LANES != 0:
        return None

    tile_rows, padded = _pad_rows(sch, matmul, shape)
    if padded and epilogues:
        # The pad's write-back copy feeds the epilogue: fold it in so the epilogue
        # reads the padded result directly.
        sch.compute_inline(sch.get_consumers(matmul)[0])
    elif padded:
        epilogues = [sch.get_consumers(matmul)[0]]  # the write-back copy
    # A chain such as add -> cast becomes one block, computed once per output tile.
    for block in epilogues[:-1]:
        sch.compute_inline(block)
    epilogue = epilogues[-1] if epilogues else None

    tile_cols = _largest_divisor(shape.n, 1, TILE_COLS)
    block_cols = _largest_divisor(shape.n, tile_cols, _block_cols_limit(shape, target))
    _schedule_padded_copies(sch, matmul)

    *lead, _, k = sch.get_loops(matmul)
    _, lanes = sch.split(k, [None, VECTOR_LANES])
    partial = sch.rfactor(lanes, factor_axis=len(lead) + 1)
    *lead, n, k_outer, lanes = sch.get_loops(partial)
    m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    m_outer, m_inner = sch.split(m, [None, tile_rows])
    n_block, n_tile, n_inner = sch.split(n, [None, block_cols // tile_cols, tile_cols])
    # W's rows outside x's rows in the tile: one W vector and the tile's three x vectors
    # are live at a time, which with the 12 accumulators is exactly the 16 ymm registers.
    sch.reorder(n_block, m_outer, n_tile, k_outer, n_inner, m_inner, lanes)
    sch.parallel(n_block)
    sch.unroll(m_inner)
    sch.unroll(n_inner)
    sch.vectorize(lanes)
    # The tile's 12 accumulators have constant indices after unrolling, so LLVM keeps
    # them in registers for the whole of k; then sum the lanes and run the epilogue
    # while the tile is hot. (Walking k in chunks with the block's partial sums carried
    # over would keep long rows of x in L1, but the carried sums are indexed by the tile
    # loop and, in the full module build, LLVM stored them to memory on every FMA.)
    sch.reverse_compute_at(sch.get_consumers(partial)[0], n_tile)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, n_tile)
    sch.decompose_reduction(partial, k_outer)
    return sch


def _block_cols_limit(shape: _MatmulShape, target: Target) -> int:
    """Rows of W per parallel task: what fits WEIGHT_BLOCK_BYTES, yet 4+ tasks per core."""
    cores = int(target.attrs.get("num-cores", 1) or 1)
    fits = WEIGHT_BLOCK_BYTES // (shape.k * shape.weight_bytes)
    return max(TILE_COLS, min(fits, shape.n // (4 * cores)))


def _epilogue_chain(sch: s_tir.Schedule, blocks: list, matmul: s_tir.schedule.SBlockRV
                    ) -> list | None:
    """The spatial blocks after the matmul, each consuming the previous; None otherwise."""
    chain, current = [], matmul
    for block in blocks:
        if _same(sch, block, matmul):
            continue
        stmt = sch.get(block)
        if any(it.iter_type != tirx.IterVar.DataPar for it in stmt.iter_vars):
            return None
        producers = sch.get_producers(block)
        if not any(_same(sch, p, current) for p in producers):
            return None
        chain.append(block)
        current = block
    return chain


def _same(sch: s_tir.Schedule, a: s_tir.schedule.SBlockRV, b: s_tir.schedule.SBlockRV) -> bool:
    return sch.get(a).same_as(sch.get(b))


def _pad_rows(sch: s_tir.Schedule, matmul: s_tir.schedule.SBlockRV, shape: _MatmulShape
              ) -> tuple[int, bool]:
    """Pad the one non-unit row dimension to a multiple of TILE_ROWS if needed.

    Returns the row tile and whether a pad was inserted. A single row, or an unusual
    layout with several row dimensions, is not tiled over rows (tile 1).
    """
    rows = [i for i, e in enumerate(shape.lead_extents) if _static(e) != 1]
    if len(rows) != 1:
        return 1, False
    extent = _static(shape.lead_extents[rows[0]])
    if extent is not None and extent % TILE_ROWS == 0:
        return TILE_ROWS, False
    padding = [1] * (len(shape.lead_extents) + 2)
    padding[rows[0]] = TILE_ROWS
    sch.pad_einsum(matmul, padding)
    return TILE_ROWS, True


def _schedule_padded_copies(sch: s_tir.Schedule, matmul: s_tir.schedule.SBlockRV) -> None:
    """The padded copy of x (if any) runs in parallel and vectorized: it is M x K."""
    for producer in sch.get_producers(matmul):
        loops = sch.get_loops(producer)
        if len(loops) < 2:
            continue
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(outer)
        _, inner = sch.split(loops[-1], [None, VECTOR_LANES])
        sch.vectorize(inner)


# --- elementwise kernels -----------------------------------------------------------------


@dl.ScheduleRule.from_callable("olmo.cpu.Elementwise")
def elementwise_rule(func: tirx.PrimFunc, target: Target, _tunable: bool
                     ) -> s_tir.Schedule | None:
    """Injective kernels: everything inlined into the output, parallel outside, vector inside.

    Only the model's own fused kernels (private PrimFuncs): the paged KV cache's named
    kernels (page append, debug read, RoPE) are called through the cache and kept as TVM
    wrote them.
    """
    if target.kind.name != "llvm" or "global_symbol" in func.attrs:
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or any(not info.is_injective() for info in infos):
        return None
    # Inline every intermediate (split, sigmoid, ...) into what consumes it.
    for info in infos[:-1]:
        try:
            sch.compute_inline(info.block_rv)
        except s_tir.schedule.ScheduleError:
            return None
    block = infos[-1].block_rv
    loops = sch.get_loops(block)
    inner_extent = _static(sch.get(loops[-1]).extent)
    if len(loops) > 1:
        outer = sch.fuse(*loops[:-1])
        sch.parallel(outer)
    if inner_extent is not None and inner_extent % VECTOR_LANES == 0:
        _, vec = sch.split(loops[-1], [None, VECTOR_LANES])
        sch.vectorize(vec)
    return sch

@dl.ScheduleRule.from_callable("olmo.cpu.RoPE")
def rope_rule(func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
    """The paged KV cache's RoPE kernel: tokens in parallel, heads innermost.

    TVM's kernel computes the rotation angle (a pow, a cos and a sin) for every
    (token, head, dim) element. With the head loop innermost the angle no longer depends
    on the loop, so LLVM computes it once per (token, dim) instead of once per head;
    tokens run in parallel. Outputs are bit-identical (2.5x faster at 512 tokens).
    """
    if target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    try:
        block = sch.get_sblock(_ROPE_BLOCK)
    except (s_tir.schedule.ScheduleError, tvm.error.InternalError, ValueError):
        return None
    loops = sch.get_loops(block)
    if len(loops) != 3 or any(it.iter_type != tirx.IterVar.DataPar
                              for it in sch.get(block).iter_vars):
        return None
    token, head, dim = loops
    sch.reorder(token, dim, head)
    sch.parallel(token)
    return sch


# The block TVM's llama_rope_with_position_map writes q, k and v in.
_ROPE_BLOCK = "llama_fused_rope"


# --- prefill attention -------------------------------------------------------------------

# TVM's CPU kernel for attention over the new tokens of a prefill, and its arguments.
_RAGGED_PREFILL = "batch_prefill_ragged_kv"
_RAGGED_PREFILL_PARAMS = ("q", "q_indptr", "k", "v", "kv_indptr", "q_rope_position",
                          "k_rope_pos_offset", "output", "lse", "causal", "rotary_mode",
                          "rope_scale", "rope_theta", "sm_scale")


@tvm.transform.module_pass(opt_level=0, name="ParallelPrefillAttention")
class ParallelPrefillAttention:
    """Swap the paged KV cache's CPU prefill attention for a parallel, vectorized one.

    TVM ships a reference CPU kernel that walks one query at a time on one thread with
    a scalar dot product per key (about 0.5 s per layer for 512 tokens at OLMo-1B's
    16 x 128 heads, more than all the layer's matmuls). Its loops live inside one opaque
    block, out of reach of schedule primitives, so this pass replaces the PrimFunc with
    one of the same signature and results (output, and lse in base 2) written with
    parallel and vectorized loops. Anything it does not recognize is left alone.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        for gvar, func in mod.functions_items():
            if gvar.name_hint != _RAGGED_PREFILL or not isinstance(func, tirx.PrimFunc):
                continue
            replacement = _ragged_prefill_replacement(func)
            if replacement is not None:
                mod[gvar] = replacement
        return mod


def _ragged_prefill_replacement(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    if tuple(p.name for p in func.params) != _RAGGED_PREFILL_PARAMS:
        return None
    q, k, v = (func.params[i].ty for i in (0, 2, 3))
    h_q, d_qk = _static(q.shape[1]), _static(q.shape[2])
    h_kv, d_v = _static(k.shape[1]), _static(v.shape[2])
    if None in (h_q, h_kv, d_qk) or d_qk != d_v or d_qk % VECTOR_LANES or h_q % h_kv:
        return None
    kernel = prefill_ragged_attention(h_kv, h_q, d_qk, str(q.dtype))
    return kernel.with_attr("global_symbol", func.attrs["global_symbol"])


# 2**f = sum (f ln 2)**i / i! on |f| <= 1/2: eight terms leave a relative error under
# 1e-8, below float32 rounding.
_EXP2_TERMS = [math.log(2) ** i / math.factorial(i) for i in range(8)]


def _exp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``2**x`` for x <= 0 from +, *, round and an exponent-field shift, so that LLVM
    vectorizes it (its exp2 is a scalar libm call per lane). Below 2**-126 (a softmax
    weight of zero in float32) the result is clamped to 2**-126.
    """
    x = T.max(x, T.float32(-126.0))
    whole = T.round(x)
    f = x - whole
    poly = T.float32(_EXP2_TERMS[-1])
    for term in reversed(_EXP2_TERMS[:-1]):
        poly = poly * f + T.float32(term)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", whole) + 127, 23))
    return poly * scale


def prefill_ragged_attention(h_kv: int, h_q: int, d: int, dtype: str) -> tirx.PrimFunc:
    """Causal (or full) attention of each new token over its sequence's new tokens.

    Same arguments and results as TVM's ``_attention_prefill_ragged_cpu``: ``output`` and
    the base-2 log-sum-exp ``lse`` that the cache merges with attention over older pages.
    One parallel task per (head, query): heads outermost, so with the causal triangle's
    uneven rows each thread still gets whole heads. Scores are dot products of 8-lane
    partial sums, four keys at a time (independent FMA chains); the weighted sum of V is
    vectorized along the head dimension. RoPE must already be applied (RopeMode.NORMAL,
    as model.py uses); other modes stop with an error rather than compute wrong numbers.
    """
    group = h_q // h_kv
    lanes = VECTOR_LANES
    chunks = d // lanes
    keys = 4
    log2e = math.log2(math.e)
    masked = -5e4  # TVM's kernel starts its running max here; kept for an identical lse

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
        var_kv_indptr: T.handle, var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_rope_position_offset = T.int32()
        k_rope_pos_offset_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32",
                                  elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32",
                                   elem_offset=kv_indptr_offset)
        T.match_buffer(var_q_rope_position, (qo_len,), "int32",
                       elem_offset=q_rope_position_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                       elem_offset=k_rope_pos_offset_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        assert rotary_mode == 0, "CPU prefill attention needs RoPE applied beforehand"

        for b in T.serial(batch_size):
            for h in T.parallel(h_q):
                with T.sblock("attn"):
                    T.reads(q_indptr[b:b + 2], kv_indptr[b:b + 2], q[0:qo_len, 0:h_q, 0:d],
                            k[0:kv_len, 0:h_kv, 0:d], v[0:kv_len, 0:h_kv, 0:d])
                    T.writes(output[0:qo_len, 0:h_q, 0:d], lse[0:qo_len, 0:h_q])
                    scores = T.sblock_alloc_buffer((kv_len,), "float32")
                    query = T.sblock_alloc_buffer((d,), "float32")
                    partial = T.sblock_alloc_buffer((keys, lanes), "float32")
                    acc = T.sblock_alloc_buffer((d,), "float32")
                    stats = T.sblock_alloc_buffer((2,), "float32")  # running max, sum
                    rows: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    cols: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    hk: T.let[T.int32] = h // group
                    k0: T.let[T.int32] = kv_indptr[b]
                    for row in T.serial(rows):
                        t: T.let[T.int32] = q_indptr[b] + row
                        visible: T.let[T.int32] = T.if_then_else(
                            causal > 0, T.max(T.min(cols - rows + row + 1, cols), 0), cols)
                        # The query, pre-scaled so that scores come out in log2 units.
                        for c in T.serial(d):
                            query[c] = T.Cast("float32", q[t, h, c]) * (sm_scale * log2e)
                        for jo in T.serial(visible // keys):
                            for u in T.unroll(keys):
                                for lane in T.vectorized(lanes):
                                    partial[u, lane] = T.float32(0)
                            for c in T.serial(chunks):
                                for u in T.unroll(keys):
                                    for lane in T.vectorized(lanes):
                                        partial[u, lane] = partial[u, lane] + query[
                                            c * lanes + lane] * T.Cast(
                                            "float32", k[k0 + jo * keys + u, hk, c * lanes + lane])
                            for u in T.unroll(keys):
                                scores[jo * keys + u] = T.float32(0)
                                for lane in T.unroll(lanes):
                                    scores[jo * keys + u] = scores[jo * keys + u] + partial[u, lane]
                        for j in T.serial(visible // keys * keys, visible):
                            for lane in T.vectorized(lanes):
                                partial[0, lane] = T.float32(0)
                            for c in T.serial(chunks):
                                for lane in T.vectorized(lanes):
                                    partial[0, lane] = partial[0, lane] + query[
                                        c * lanes + lane] * T.Cast(
                                        "float32", k[k0 + j, hk, c * lanes + lane])
                            scores[j] = T.float32(0)
                            for lane in T.unroll(lanes):
                                scores[j] = scores[j] + partial[0, lane]
                        # Softmax in base 2, as TVM's kernel (the cache merges lse in base 2),
                        # in 8-lane partial max and sum with a vectorizable exp2.
                        for lane in T.vectorized(lanes):
                            partial[0, lane] = T.float32(masked)
                        for jo in T.serial(visible // lanes):
                            for lane in T.vectorized(lanes):
                                partial[0, lane] = T.max(partial[0, lane],
                                                         scores[jo * lanes + lane])
                        stats[0] = T.float32(masked)
                        for lane in T.unroll(lanes):
                            stats[0] = T.max(stats[0], partial[0, lane])
                        for j in T.serial(visible // lanes * lanes, visible):
                            stats[0] = T.max(stats[0], scores[j])
                        for lane in T.vectorized(lanes):
                            partial[1, lane] = T.float32(0)
                        for jo in T.serial(visible // lanes):
                            for lane in T.vectorized(lanes):
                                scores[jo * lanes + lane] = _exp2(
                                    scores[jo * lanes + lane] - stats[0])
                                partial[1, lane] = partial[1, lane] + scores[jo * lanes + lane]
                        stats[1] = T.exp2(T.float32(masked) - stats[0])
                        for lane in T.unroll(lanes):
                            stats[1] = stats[1] + partial[1, lane]
                        for j in T.serial(visible // lanes * lanes, visible):
                            scores[j] = _exp2(scores[j] - stats[0])
                            stats[1] = stats[1] + scores[j]
                        for c in T.vectorized(d):
                            acc[c] = T.float32(0)
                        for j in T.serial(visible):
                            for c in T.vectorized(d):
                                acc[c] = acc[c] + T.Cast("float32", v[k0 + j, hk, c]) * scores[j]
                        for c in T.vectorized(d):
                            output[t, h, c] = T.Cast(dtype, acc[c] / stats[1])
                        lse[t, h] = stats[0] + T.log2(stats[1])

    return batch_prefill_ragged_kv
