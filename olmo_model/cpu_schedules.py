"""Schedules that make the compiled model fast on x86 CPUs (the ``llvm`` target).

TVM's default CPU lowering leaves every kernel as the naive loop nest it was legalized
into: scalar, single-threaded, re-reading the input vector for every output element.
These rules rewrite the model's kernels with TVM's own scheduling primitives
(``tvm.s_tir.Schedule``), applied per PrimFunc by dlight's ``ApplyDefaultSchedule``:

* ``matmul_rule``: every ``x @ W.T`` (``NT_matmul``, after ``FuseTransposeMatmul``) with its
  elementwise epilogue (residual add, casts), with the row count symbolic. Decode-shaped
  calls (one row per running sequence: batch_decode's layers, the LM head) take a
  register-tiled dot-product kernel that walks W once with software prefetches ahead of
  it (smaller tiles for one or two rows: a branch on the row count); prefill-shaped
  ones (one row per token) branch on the row count between that kernel and an
  outer-product kernel over repacked panels of W, which runs near the FMA peak once
  there are enough rows to pay for the repacking.
* ``elementwise_rule``: the model's fused injective kernels (gate split + activation +
  multiply, reshapes, casts): parallel outside, vectorized inside.
* ``row_reduction_rule``: LayerNorm (and any other row-wise reductions with elementwise
  work around them): rows in parallel, each sum as 8-lane partial sums.

Three Relax-level passes run first: float16 matmuls accumulate in float32
(``HalfMatmulAccumulateInFloat32``), SiLU and sigmoid take an exponential that vectorizes
(``cpu_activations.VectorizedActivations``), and the paged KV cache's single-threaded reference
CPU kernels for prefill and decode attention are swapped for parallel ones with the same
contract (``cpu_attention.ParallelAttention``). Its RoPE kernel is swapped for ours
(``cpu_rope.ParallelRope``) when the model's config is given, else gets a small schedule
(``rope_rule``); its other kernels (page copies) are used as TVM ships them.
"""

from __future__ import annotations

import dataclasses
import typing

import tvm
import tvm.script
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

from .config import OLMoConfig
from .cpu_activations import VectorizedActivations
from .cpu_attention import VECTOR_LANES, ParallelAttention, static_extent
from .cpu_rope import ParallelRope

# This file's version is artifact.CPU_SCHEDULE_SET (in the cache key and every artifact's
# meta): bump it there on any schedule change.


@dataclasses.dataclass(frozen=True)
class MatmulTiles:
    """The dot-product kernel's register tile, and from how many rows a prefill-shaped
    matmul takes the outer-product kernel instead, for one register file."""

    rows: int  # rows of x per tile
    cols: int  # rows of W per tile: rows x cols accumulators of VECTOR_LANES partial sums
    pack_min_rows: dict[int, int]  # by bytes per weight (4: float32, 2: float16)


# AVX2's 16 ymm registers: 3 x 4 = 12 accumulators, fed by 3 + 4 loads per 12 FMAs, so
# the loop is FMA-bound rather than load-bound. On OLMo-1B shapes (a Zen 2-class EPYC)
# the two kernels cost the same at 32 to 64 rows; at 7 rows the repacking made a forward
# 150 ms slower, at 512 the outer products 1.6 s faster.
AVX2_TILES = MatmulTiles(rows=3, cols=4, pack_min_rows={4: 48, 2: 48})
# AVX-512 (the same ymm code, encoded to reach 32 registers): 4 x 4 = 16 accumulators, so
# a batch of 8 needs no padded ninth row. Measured on a Zen 4 EPYC, OLMo-1B shapes, two
# threads: a batch-8 float16 step 13-17% faster than 3 x 4; at 128 rows 205-211 GFLOP/s,
# against 197-203 for 3 x 4 and 178 for the outer products (whose repacking of W the
# rows no longer pay for), which win again only at 512 rows in float16 (205 against 194
# on the 2048 x 8192 down projection) and from about 128 in float32.
AVX512_TILES = MatmulTiles(rows=4, cols=4, pack_min_rows={4: 128, 2: 384})


# A lone sequence's decode step (one row of x, padded to two; or two rows): 2 x 2 tiles,
# two streams of W at a time. OLMo-1B builds side by side in one process (Zen 4, batch
# 1): float32 0.93-0.97x and float16 0.94-0.95x the time on the 4 x 4 tiles; 2 x 4 tiles
# 1.01x, 4 x 2 1.3x. Measured on Zen 4 only; AVX2 targets take them too.
ONE_ROW_TILES = MatmulTiles(rows=2, cols=2, pack_min_rows={})


def matmul_tiles(target: Target) -> MatmulTiles:
    """The tiles for ``target``'s register file (32 vector registers with AVX-512)."""
    has_avx512 = tvm.target.codegen.llvm_cpu_has_features("avx512f", target)
    return AVX512_TILES if has_avx512 else AVX2_TILES


# Weight rows one thread works through for all x rows before moving on: sized so the
# block of W (rows x K) stays in the per-core L2 (1 MiB on this EPYC, 512 KiB on Zen 3)
# while every tile of x streams past.
WEIGHT_BLOCK_BYTES = 256 * 1024
# Outer-product kernel (prefill): PACKED_ROWS rows of x times PACKED_COLS columns of W^T,
# 6 x 2 vectors = 12 accumulators, fed per step of k by 6 broadcasts and 2 loads of W.
PACKED_ROWS = 6
PACKED_COLS = 2 * 8
# Decode-shaped matmuls prefetch W this many tiles (of MatmulTiles.cols rows) ahead; 1 to
# 3 measured alike on OLMo-1B shapes, 4 and more worse (prefetched lines evicted first).
PREFETCH_TILES_AHEAD = 2
# A static row count up to this is decode-shaped (see _MatmulShape.few_rows).
FEW_ROWS = 16
# Elements per parallel task of an elementwise kernel whose rows divide into them: a
# decode step's 8192-wide activation is 8 tasks.
ELEMENTWISE_CHUNK = 1024
# Bytes per cache line: a prefetch brings in one.
CACHE_LINE_BYTES = 64


def cpu_pipeline(target: Target, config: OLMoConfig | None = None) -> tvm.transform.Pass:
    """TVM's CPU pipeline with our schedules applied between fusion and lowering; with
    the model's ``config``, the KV cache's RoPE kernel is swapped for ours too."""
    return tvm.transform.Sequential(
        [
            HalfMatmulAccumulateInFloat32(),
            VectorizedActivations(),
            ParallelAttention(config.sliding_window if config is not None else 0),
            *([ParallelRope(config)] if config is not None else []),
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
    return [_Remembered(rule) for rule in (matmul_rule, row_reduction_rule,
                                           dl.cpu.Reduction(), elementwise_rule, rope_rule)]


class _Remembered(dl.ScheduleRule):
    """A rule that schedules each distinct PrimFunc once per process.

    Scheduling is a pure function of the PrimFunc and the target, and its slowest step is
    Python (schedule primitives, and parsing TVMScript in ``_branch_on``). A process that
    compiles several libraries of one model (a local cluster's workers, one per stage; a
    test session) meets the same kernels again under other buffer names: a function
    structurally equal to one seen before gets that one's schedule.
    """

    _seen: dict[tuple[str, int, str], list[tuple[tirx.PrimFunc, tirx.PrimFunc | None]]] = {}
    _MAX_KEYS = 1024  # a model has a few dozen kernels

    def __init__(self, rule: dl.ScheduleRule):
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool
              ) -> s_tir.Schedule | None:
        key = (type(self.rule).__name__,  # the rule's name (from_callable sets it)
               tvm_ffi.structural_hash(func, map_free_vars=True), str(target))
        seen = self._seen.setdefault(key, [])
        for before, scheduled in seen:
            if tvm_ffi.structural_equal(func, before, map_free_vars=True):
                return None if scheduled is None else s_tir.Schedule(scheduled)
        sch = self.rule.apply(func, target, tunable)
        if isinstance(sch, list):  # tunable rules give several; ours give one
            return sch
        if len(self._seen) > self._MAX_KEYS:
            self._seen.clear()
        seen.append((func, None if sch is None else sch.mod["main"]))
        return sch


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
    weight: tirx.Buffer  # W

    @property
    def row_axes(self) -> list[int]:
        """The positions in ``lead_extents`` of x's row dimensions (those not fixed at 1)."""
        return [i for i, e in enumerate(self.lead_extents) if static_extent(e) != 1]

    @property
    def row_extent(self) -> tirx.PrimExpr:
        """The number of rows of x (1 when there is no row dimension to tile)."""
        rows = self.row_axes
        return self.lead_extents[rows[0]] if len(rows) == 1 else tirx.const(1, "int64")

    @property
    def few_rows(self) -> bool:
        """Decode-shaped: rows on the batch axis (``[batch, 1, k]``, ``[batch, k]``), which
        holds one row per running sequence, or a small static count. Prefill's rows are the
        tokens of ``[1, seq_len, k]``."""
        rows = self.row_axes
        if not rows:
            return True
        extent = static_extent(self.lead_extents[rows[0]])
        return extent <= FEW_ROWS if extent is not None else rows[0] == 0


def _is_var_index(region: tvm.ir.Range, var: tirx.Var) -> bool:
    return region.min.same_as(var) and static_extent(region.extent) == 1


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
    n, k = static_extent(n_iter.dom.extent), static_extent(k_iter.dom.extent)
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
        weight=weight.source,
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
    """``x @ W.T`` with its epilogue, by one of two register-tiled kernels.

    Decode-shaped calls (a row per running sequence) take the dot-product kernel with
    software prefetch: W is read once, from memory, and that is the cost. Prefill-shaped
    calls (a row per token) are compute-bound once there are enough rows: at
    ``matmul_tiles(target).pack_min_rows`` rows or more (by weight dtype) they take the
    outer-product kernel, which repacks each block of W first and then runs near the
    FMA peak; below that the repacking costs more than it saves, and they take the
    dot-product kernel too (as do matmuls whose W does not split into whole panels). The
    row count is symbolic, so that choice is a branch inside the kernel.
    """
    if target.kind.name != "llvm":
        return None
    found = _the_matmul(s_tir.Schedule(func))
    if found is None:
        return None
    _, shape, _ = found
    if shape.few_rows:
        return _decode_kernel(func, target, shape)
    if shape.n % PACKED_COLS:
        return _dot_product_kernel(func, target, prefetch=False)
    small = _dot_product_kernel(func, target, prefetch=False)
    large = _outer_product_kernel(func, target)
    rows = shape.row_extent
    pack_min_rows = matmul_tiles(target).pack_min_rows[shape.weight_bytes]
    if static_extent(rows) is not None:
        return large if static_extent(rows) >= pack_min_rows else small
    return _branch_on(func, rows >= tirx.const(pack_min_rows, str(rows.ty)), large, small)


def _the_matmul(sch: s_tir.Schedule) -> tuple | None:
    """The one ``x @ W.T`` block of a kernel followed only by elementwise blocks.

    Returns (matmul block, its shape, the epilogue chain), or None for other kernels.
    """
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    shapes = [(b, _match_nt_matmul(sch.get(b))) for b in blocks]
    matmuls = [(b, shape) for b, shape in shapes if shape is not None]
    if len(matmuls) != 1:
        return None
    matmul, shape = matmuls[0]
    epilogues = _epilogue_chain(sch, blocks, matmul)
    if epilogues is None or shape.k % VECTOR_LANES != 0:
        return None
    return matmul, shape, epilogues


def _prepare(func: tirx.PrimFunc, tile_rows: int) -> tuple:
    """A schedule with rows padded to ``tile_rows`` and the epilogue chain in one block.

    Returns (schedule, matmul block, its shape, the epilogue block or None, row tile).
    """
    sch = s_tir.Schedule(func)
    matmul, shape, epilogues = _the_matmul(sch)
    tile_rows, padded = _pad_rows(sch, matmul, shape, tile_rows)
    if padded and epilogues:
        # The pad's write-back copy feeds the epilogue: fold it in so the epilogue
        # reads the padded result directly.
        sch.compute_inline(sch.get_consumers(matmul)[0])
    elif padded:
        epilogues = [sch.get_consumers(matmul)[0]]  # the write-back copy
    # A chain such as add -> cast becomes one block, computed once per output tile.
    for block in epilogues[:-1]:
        sch.compute_inline(block)
    _schedule_padded_copies(sch, matmul)
    return sch, matmul, shape, (epilogues[-1] if epilogues else None), tile_rows


def _decode_kernel(func: tirx.PrimFunc, target: Target, shape: _MatmulShape
                   ) -> s_tir.Schedule:
    """The dot-product kernel with prefetches, on ONE_ROW_TILES for one or two rows of x
    (a lone sequence's decode step) and on the target's tiles for more."""
    rows = shape.row_extent
    if static_extent(rows) is not None:
        few = static_extent(rows) <= ONE_ROW_TILES.rows
        return _dot_product_kernel(func, target, True, ONE_ROW_TILES if few else None)
    return _branch_on(func, rows <= tirx.const(ONE_ROW_TILES.rows, str(rows.ty)),
                      _dot_product_kernel(func, target, True, ONE_ROW_TILES),
                      _dot_product_kernel(func, target, True))


def _dot_product_kernel(func: tirx.PrimFunc, target: Target, prefetch: bool,
                        tiles: MatmulTiles | None = None) -> s_tir.Schedule:
    """A tile of rows of x times rows of W (``matmul_tiles``), each a dot product along k.

    The reduction is split into VECTOR_LANES-wide partial sums (``rfactor`` onto the last
    axis, so W and x are both read contiguously along k, as they lie in memory), summed
    across lanes when the tile is done. Every W vector loaded serves several rows of x
    and every x vector several rows of W. Threads split W's rows into blocks. The row
    count of x is padded up to a multiple of the tile's rows (a copy of x, small next to
    W) so the tile needs no bounds checks; the epilogue (residual add, cast) runs in the same
    parallel iteration while the results are still in registers.
    """
    tiles = tiles or matmul_tiles(target)
    sch, matmul, shape, epilogue, tile_rows = _prepare(func, tiles.rows)
    tile_cols = _largest_divisor(shape.n, 1, tiles.cols)
    block_cols = _largest_divisor(shape.n, tile_cols, _block_cols_limit(shape, target))
    *lead, _, k = sch.get_loops(matmul)
    _, lanes = sch.split(k, [None, VECTOR_LANES])
    partial = sch.rfactor(lanes, factor_axis=len(lead) + 1)
    *lead, n, k_outer, lanes = sch.get_loops(partial)
    m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    m_outer, m_inner = sch.split(m, [None, tile_rows])
    n_block, n_tile, n_inner = sch.split(n, [None, block_cols // tile_cols, tile_cols])
    # Inside a tile, W's rows are outside x's rows: one W vector and the tile's x vectors
    # are live at a time besides the accumulators (3 + 1 + 12: AVX2's 16 ymm registers).
    if shape.few_rows:
        # Decode: every tile of x's rows meets a tile of W's rows while it is in L1, so W
        # is read from memory once and at an even pace.
        sch.reorder(n_block, n_tile, m_outer, k_outer, n_inner, m_inner, lanes)
        output_tile = m_outer
    else:
        # A short prefill: each thread's block of W sits in L2 while x streams past.
        sch.reorder(n_block, m_outer, n_tile, k_outer, n_inner, m_inner, lanes)
        output_tile = n_tile
    sch.parallel(n_block)
    sch.unroll(m_inner)
    sch.unroll(n_inner)
    sch.vectorize(lanes)
    # The tile's 12 accumulators have constant indices after unrolling, so LLVM keeps
    # them in registers for the whole of k. (Walking k in chunks with partial sums
    # carried over kept them in memory, stored on every FMA.)
    sch.reverse_compute_at(sch.get_consumers(partial)[0], output_tile)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, output_tile)
    sch.decompose_reduction(partial, k_outer)
    if not prefetch:
        return sch
    loop_vars = [sch.get(loop).loop_var for loop in (n_block, n_tile, m_outer, k_outer)]
    return _prefetch_weight_tiles(sch, shape, loop_vars, block_cols, tile_cols)


def _outer_product_kernel(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule:
    """PACKED_ROWS rows of x times PACKED_COLS columns of W^T, as outer products over k.

    Each thread first copies its block of W into a panel layout ``[n / PACKED_COLS, k,
    PACKED_COLS]``, so that for one step of k the tile's columns of W^T are two
    contiguous vectors; each step then broadcasts one element of each of the 6 rows of
    x and does 12 FMAs into 12 accumulators that span the tile's outputs directly: no
    sums across lanes, and one stream of W per tile. OLMo-1B's prefill matmuls run at
    about 158 GFLOP/s on two cores against 105-139 for the dot-product kernel.
    """
    sch, matmul, shape, epilogue, tile_rows = _prepare(func, PACKED_ROWS)
    block_cols = _largest_divisor(shape.n, PACKED_COLS, max(
        PACKED_COLS, _block_cols_limit(shape, target)))
    reads = sch.get(matmul).reads
    weight_index = next(i for i, r in enumerate(reads) if r.source.same_as(shape.weight))
    panels = sch.cache_read(matmul, weight_index, "global")
    sch.transform_layout(panels, ("write", 0),
                         lambda n, k: (n // PACKED_COLS, k, n % PACKED_COLS))
    accumulators = sch.cache_write(matmul, 0, "global")
    *lead, n, k = sch.get_loops(matmul)
    m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    m_outer, m_inner = sch.split(m, [None, tile_rows])
    n_block, n_tile, n_vector, lanes = sch.split(
        n, [None, block_cols // PACKED_COLS, PACKED_COLS // VECTOR_LANES, VECTOR_LANES])
    sch.reorder(n_block, m_outer, n_tile, k, m_inner, n_vector, lanes)
    sch.parallel(n_block)
    sch.unroll(m_inner)
    sch.unroll(n_vector)
    sch.vectorize(lanes)
    _schedule_panel_copy(sch, panels, n_block)
    sch.reverse_compute_at(accumulators, n_tile)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, n_tile)
    sch.decompose_reduction(matmul, k)
    return sch


def _schedule_panel_copy(sch: s_tir.Schedule, panels: s_tir.schedule.SBlockRV,
                         n_block: s_tir.schedule.LoopRV) -> None:
    """Copy the thread's block of W into panels: a transpose of VECTOR_LANES-long pieces.

    Reading W along k and writing a panel's PACKED_COLS rows for VECTOR_LANES steps of k,
    fully unrolled, keeps the writes inside a few cache lines: the fastest of the four
    orders tried (a 1-token OLMo-1B forward through this kernel took 305 ms with it, 639
    with the naive order; a forward that only reads the weights takes about 135).
    """
    sch.compute_at(panels, n_block)
    rows, ks = sch.get_loops(panels)[-2:]
    panel, row = sch.split(rows, [None, PACKED_COLS])
    k_outer, k_inner = sch.split(ks, [None, VECTOR_LANES])
    sch.reorder(panel, k_outer, row, k_inner)
    sch.unroll(row)
    sch.unroll(k_inner)


class _TIRScriptWithPrefetch:
    """TVMScript's ``T``, plus the ``T.prefetch`` its printer writes for the prefetch
    intrinsic but its parser does not define (TVM 0.27)."""

    def __getattr__(self, name: str):
        return getattr(tvm.script.tirx, name)

    @staticmethod
    def prefetch(address, rw, locality, cache_type) -> tirx.PrimExpr:
        return tirx.call_intrin("", "tirx.prefetch", address, rw, locality, cache_type)


# The names a printed PrimFunc refers to, for parsing it back (see _branch_on).
_SCRIPT_NAMES = {"T": _TIRScriptWithPrefetch(), "I": tvm.script.ir, "tvm": tvm,
                 "TypeVar": typing.TypeVar}


def _branch_on(func: tirx.PrimFunc, condition: tirx.PrimExpr, then: s_tir.Schedule,
               otherwise: s_tir.Schedule) -> s_tir.Schedule:
    """One kernel running ``then``'s schedule of ``func`` if ``condition``, else ``otherwise``'s.

    Both are schedules of the same function, so both branches define the same loop and
    block variables, and a function may define each only once (``renew_defs`` refuses
    such a function too). Printing the joined function as TVMScript and parsing it back
    gives every definition its own variable; each branch keeps its own scratch buffers.
    """
    body = tirx.IfThenElse(condition, then.mod["main"].body, otherwise.mod["main"].body)
    root = s_tir.SBlock([], [], [], "root", body)
    joined = func.with_body(s_tir.SBlockRealize([], True, root))
    parsed = tvm.script.from_source(joined.script(show_meta=True), extra_vars=_SCRIPT_NAMES)
    if isinstance(parsed, tvm.IRModule):
        (parsed,) = parsed.functions.values()
    return s_tir.Schedule(parsed)


def _prefetch_weight_tiles(sch: s_tir.Schedule, shape: _MatmulShape, loop_vars: list,
                           block_cols: int, tile_cols: int) -> s_tir.Schedule:
    """Every step of k also prefetches W's lines, from PREFETCH_TILES_AHEAD tiles on.

    With a few rows of x, each W tile is computed on for only a few microseconds, and the
    hardware prefetcher does not run far enough ahead to keep memory busy through them:
    a batch-8 decode step took 1.6x a batch-1 step although its arithmetic fits in the
    time memory takes. Prefetches walk W's rows ahead of the tile being computed, as
    many lines per step as the step reads (one in float16, two in float32), so one pass
    over x's rows covers the tile ahead and reads stay in flight while the FMAs run.
    Later passes (a batch past one tile of rows) go on to the tiles after it in float16;
    in float32 they go over the same lines again: reaching further made a batch-8 step
    10% slower, while the second line per step made a batch-1 float32 step 10-18%
    faster (OLMo-1B on a Zen 4 EPYC, builds side by side in one process; a lone matmul
    cycling through copies of its weights showed neither). The prefetch is
    unconditional: guarding it with a branch made LLVM spill an accumulator in the
    float16 kernel. No schedule primitive emits a prefetch, so the statements are put
    at the top of the k loop's body in the scheduled function.
    """
    nb, nt, mo, ko = loop_vars
    index = str(nb.ty)

    def const(value: int) -> tirx.PrimExpr:
        return tirx.const(value, index)

    line_elems = CACHE_LINE_BYTES // shape.weight_bytes
    lines_per_row = max(1, shape.k // line_elems)
    per_step = max(1, tile_cols * VECTOR_LANES * shape.weight_bytes // CACHE_LINE_BYTES)
    step = mo * const(shape.k // VECTOR_LANES) + ko  # counts lines from the tile ahead
    prefetches = []
    for i in range(per_step):
        line = step * const(per_step) + const(i)
        if per_step > 1:
            line = tirx.floormod(line, const(tile_cols * lines_per_row))
        row = tirx.min(nb * const(block_cols)
                       + (nt + const(PREFETCH_TILES_AHEAD)) * const(tile_cols)
                       + tirx.floordiv(line, const(lines_per_row)), const(shape.n - 1))
        column = tirx.floormod(line, const(lines_per_row)) * const(line_elems)
        # llvm.prefetch(address, read, locality 2 (L2 and out), data cache)
        prefetches.append(tirx.Evaluate(tirx.call_intrin(
            "", "tirx.prefetch", tirx.address_of(shape.weight[row, column]), 0, 2, 1)))
    func = sch.mod["main"]
    body = _prepend_to_loop(func.body, ko, tirx.SeqStmt(prefetches) if per_step > 1
                            else prefetches[0])
    return s_tir.Schedule(func.with_body(body))


def _prepend_to_loop(stmt: tirx.Stmt, loop_var: tirx.Var, first: tirx.Stmt) -> tirx.Stmt:
    """``stmt`` with ``first`` run at the start of every iteration of the loop over ``loop_var``.

    Rebuilds only the loops, sequences and blocks on the way to that loop.
    """
    if isinstance(stmt, tirx.For):
        if stmt.loop_var.same_as(loop_var):
            body = tirx.SeqStmt([first, stmt.body])
        else:
            body = _prepend_to_loop(stmt.body, loop_var, first)
            if body.same_as(stmt.body):
                return stmt
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body,
                        stmt.thread_binding, stmt.annotations)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_prepend_to_loop(s, loop_var, first) for s in stmt.seq]
        if all(new.same_as(old) for new, old in zip(seq, stmt.seq)):
            return stmt
        return tirx.SeqStmt(seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        block = _prepend_to_loop(stmt.block, loop_var, first)
        if block.same_as(stmt.block):
            return stmt
        return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
    if isinstance(stmt, s_tir.SBlock):
        body = _prepend_to_loop(stmt.body, loop_var, first)
        if body.same_as(stmt.body):
            return stmt
        return s_tir.SBlock(stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body,
                            stmt.init, stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
    return stmt


def _block_cols_limit(shape: _MatmulShape, target: Target) -> int:
    """Rows of W per parallel task: what fits WEIGHT_BLOCK_BYTES, yet 4+ tasks per core."""
    cores = int(target.attrs.get("num-cores", 1) or 1)
    fits = WEIGHT_BLOCK_BYTES // (shape.k * shape.weight_bytes)
    return max(matmul_tiles(target).cols, min(fits, shape.n // (4 * cores)))


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


def _pad_rows(sch: s_tir.Schedule, matmul: s_tir.schedule.SBlockRV, shape: _MatmulShape,
              tile_rows: int) -> tuple[int, bool]:
    """Pad the one non-unit row dimension to a multiple of ``tile_rows`` if needed.

    Returns the row tile and whether a pad was inserted. A single row, or an unusual
    layout with several row dimensions, is not tiled over rows (tile 1).
    """
    rows = shape.row_axes
    if len(rows) != 1:
        return 1, False
    extent = static_extent(shape.lead_extents[rows[0]])
    if extent is not None and extent % tile_rows == 0:
        return tile_rows, False
    padding = [1] * (len(shape.lead_extents) + 2)
    padding[rows[0]] = tile_rows
    sch.pad_einsum(matmul, padding)
    return tile_rows, True


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


@dl.ScheduleRule.from_callable("olmo.cpu.RowReduction")
def row_reduction_rule(func: tirx.PrimFunc, target: Target, _tunable: bool
                       ) -> s_tir.Schedule | None:
    """Reductions along each row with elementwise work around them (LayerNorm: the sum,
    the mean, the sum of squares, the normalize and its casts), rows in parallel.

    dlight's ``cpu.Reduction`` leaves each row's sums as one scalar chain, an add or FMA
    per element waiting on the last: 4 us a row for OLMo-1B's LayerNorm. Here each
    reduction is first split into VECTOR_LANES interleaved partial sums (``rfactor``
    before anything moves, which the primitive needs), summed across lanes once per row:
    a 512-row float32 LayerNorm 1.3 ms -> 0.24 ms, a decode row 7 -> 3.5 us (Zen 4).
    """
    if target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if (not infos or len(infos) < 2 or not infos[-1].is_injective()
            or all(info.is_injective() for info in infos)):
        return None
    lead = len(infos[-1].dom_kind()) - 1  # the row dimensions, then the row
    if lead < 1:
        return None  # one reduction over everything: no rows to run in parallel
    for info in infos:
        # Per row: maps over the row or of its scalars (the mean), one reduction along it.
        kinds = info.dom_kind()
        allowed = ("S" * lead, "S" * (lead + 1)) if info.is_injective() else ("S" * lead + "R",)
        if kinds not in allowed:
            return None
    injective = [info.block_rv for info in infos if info.is_injective()]
    partials = []
    for info in infos:
        if info.is_injective():
            continue
        k = sch.get_loops(info.block_rv)[-1]
        extent = static_extent(sch.get(k).extent)
        if extent is None or extent % VECTOR_LANES:
            return None
        _, lanes = sch.split(k, [None, VECTOR_LANES])
        partials.append(sch.rfactor(lanes, factor_axis=lead + 1))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    loops = sch.get_loops(blocks[-1])
    row = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
    sch.parallel(row)
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, row, preserve_unit_loops=False)
    for block in blocks:
        if any(_same(sch, block, partial) for partial in partials):
            lanes, k_outer = sch.get_loops(block)[-2:]
            sch.reorder(k_outer, lanes)  # a vector of partial sums per step along the row
            sch.vectorize(lanes)
        elif any(_same(sch, block, other) for other in injective):
            inner = sch.get_loops(block)[-1]
            extent = static_extent(sch.get(inner).extent)
            if extent is not None and extent > VECTOR_LANES and extent % VECTOR_LANES == 0:
                _, vector = sch.split(inner, [None, VECTOR_LANES])
                sch.vectorize(vector)
    return sch


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
    inner_extent = static_extent(sch.get(loops[-1]).extent)
    if inner_extent is not None and inner_extent % ELEMENTWISE_CHUNK == 0:
        # Chunks of rows in parallel, so that a decode step's few rows use every thread.
        chunks, _, lanes = sch.split(loops[-1], [None, ELEMENTWISE_CHUNK // VECTOR_LANES,
                                                 VECTOR_LANES])
        sch.parallel(sch.fuse(*loops[:-1], chunks))
        sch.vectorize(lanes)
        return sch
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
