"""Parallel, vectorized CPU attention kernels for TVM's paged KV cache.

TVM ships reference CPU kernels for the cache's attention that walk one query and one
head at a time on one thread, with a scalar dot product per key: about 0.5 s per layer
for a 512-token prefill at OLMo-1B's 16 x 128 heads (more than all the layer's matmuls),
and a batch-8 decode step's attention cost six times a batch-1 step's. Its kernel for
new tokens over a sequence's cached pages (a prefill chunk after the first, a prompt
forked from a cached prefix) also walks every slot of the whole page pool per query:
48 tokens after a 1024-token cached prefix took longer than prefilling all 1072. Their loops live
inside one opaque block, out of reach of schedule primitives, so ``ParallelAttention``
replaces those PrimFuncs with ones of the same signature and results (output, and the
log-sum-exp in base 2 that the cache merges partial attentions with), written with
parallel and vectorized loops. RoPE must already be applied (RopeMode.NORMAL, as
model.py uses); other modes stop with an error rather than compute wrong numbers.
"""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .kernel_memo import built_once
from .vector_math import exp2

# AVX2 registers hold 8 float32 lanes; AVX-512 is deliberately not assumed.
VECTOR_LANES = 8
# TVM's kernels start the running max here (and the running sum at 1): kept, so that the
# log-sum-exp the cache merges with is the same.
_MASKED = -5e4


def static_extent(extent: tirx.PrimExpr) -> int | None:
    """The value of a loop extent or shape dimension when it is a constant."""
    return int(extent) if isinstance(extent, tirx.IntImm) else None


# TVM's CPU kernels for attention over a prefill's new tokens and over a decode step's
# pages, with the parameter names that identify their contract.
_RAGGED_PREFILL = "batch_prefill_ragged_kv"
_RAGGED_PREFILL_PARAMS = ("q", "q_indptr", "k", "v", "kv_indptr", "q_rope_position",
                          "k_rope_pos_offset", "output", "lse", "causal", "rotary_mode",
                          "rope_scale", "rope_theta", "sm_scale")
_PAGED_PREFILL = "batch_prefill_paged_kv_cpu"
# The kernels TVM's cache calls for ``mha_sliding`` layers carry this suffix.
_SLIDING = "_sliding_window"
_PAGED_PREFILL_PARAMS = ("q", "q_indptr", "pages", "page_indptr", "page_values",
                         "length_info", "k_rope_pos_offset", "q_rope_position", "output",
                         "lse", "causal", "rotary_mode", "rope_scale", "rope_theta", "sm_scale")
_PAGED_DECODE = "batch_decode_paged_kv_cpu"
_PAGED_DECODE_PARAMS = ("Q", "pages", "page_table_indptr", "page_table_values", "length_info",
                        "k_rope_pos_offset", "q_rope_position", "output", "lse", "rotary_mode",
                        "rope_scale", "rope_theta", "sm_scale")


@tvm.transform.module_pass(opt_level=0, name="ParallelAttention")
class ParallelAttention:
    """Swap the paged KV cache's CPU prefill (new tokens, and new tokens over cached
    pages) and decode attention for ours (see above), the sliding-window layers' kernels
    too (``sliding_window``: the model's window, 0 for none).

    Anything it does not recognize (another signature, head sizes that are not a
    multiple of the vector width) is left as TVM wrote it.
    """

    def __init__(self, sliding_window: int = 0):
        self.window = sliding_window

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            name = gvar.name_hint
            window = self.window if name.endswith(_SLIDING) else 0
            name = name.removesuffix(_SLIDING)
            if window == 0 and name != gvar.name_hint:
                continue  # a sliding kernel of a model without sliding layers: never called
            if name == _RAGGED_PREFILL and not window:
                replacement = _ragged_prefill_replacement(func)
            elif name == _PAGED_PREFILL:
                replacement = _paged_prefill_replacement(func, window)
            elif name == _PAGED_DECODE:
                replacement = _paged_decode_replacement(func, window)
            else:
                continue
            if replacement is not None:
                mod[gvar] = replacement.with_attr("global_symbol", func.attrs["global_symbol"])
        return mod


def _head_shapes(q: tirx.Buffer, kv_heads: tirx.PrimExpr, head_dim: tirx.PrimExpr
                 ) -> tuple[int, int, int] | None:
    """(kv heads, query heads, head dim) when our kernels can take them, else None."""
    h_q, d = static_extent(q.shape[1]), static_extent(q.shape[2])
    h_kv, d_kv = static_extent(kv_heads), static_extent(head_dim)
    if None in (h_q, h_kv, d) or d != d_kv or d % VECTOR_LANES or h_q % h_kv:
        return None
    return h_kv, h_q, d


def _ragged_prefill_replacement(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    if tuple(p.name for p in func.params) != _RAGGED_PREFILL_PARAMS:
        return None
    q, k, v = (func.params[i].ty for i in (0, 2, 3))
    if static_extent(v.shape[2]) != static_extent(k.shape[2]):
        return None
    shapes = _head_shapes(q, k.shape[1], k.shape[2])
    return None if shapes is None else prefill_ragged_attention(*shapes, str(q.dtype))


def _paged_prefill_replacement(func: tirx.PrimFunc, window: int) -> tirx.PrimFunc | None:
    if tuple(p.name for p in func.params) != _PAGED_PREFILL_PARAMS:
        return None
    q, pages = func.params[0].ty, func.params[2].ty
    if len(pages.shape) != 5 or static_extent(pages.shape[3]) is None:
        return None
    shapes = _head_shapes(q, pages.shape[2], pages.shape[4])
    if shapes is None:
        return None
    return paged_prefill_attention(*shapes, static_extent(pages.shape[3]), str(q.dtype),
                                   window=window)


def _paged_decode_replacement(func: tirx.PrimFunc, window: int) -> tirx.PrimFunc | None:
    if tuple(p.name for p in func.params) != _PAGED_DECODE_PARAMS:
        return None
    q, pages = func.params[0].ty, func.params[1].ty
    if len(pages.shape) != 5 or static_extent(pages.shape[3]) is None:
        return None
    shapes = _head_shapes(q, pages.shape[2], pages.shape[4])
    if shapes is None:
        return None
    return paged_decode_attention(*shapes, static_extent(pages.shape[3]), str(q.dtype),
                                  sliding=window > 0)


@built_once
def prefill_ragged_attention(h_kv: int, h_q: int, d: int, dtype: str,
                             rows_per_block: int = 6) -> tirx.PrimFunc:
    """Causal (or full) attention of each new token over its sequence's new tokens.

    Same arguments and results as TVM's ``_attention_prefill_ragged_cpu``: ``output`` and
    the base-2 log-sum-exp ``lse`` that the cache merges with attention over older pages.
    One parallel task per head (each head has the same causal triangle, so threads get
    equal work), its tokens in blocks of ``rows_per_block`` that share every vector of K
    and V they load and widen: a block's scores are rows x 2 dot products of 8-lane partial
    sums per step, its weighted sums of V rows x 2 vectors of the head dimension, so 6
    rows' accumulators fit AVX2's 16 registers. Keys a token does not see weigh 0 in the
    block's weighted sum. Token by token, each load fed one FMA: on a Zen 4, OLMo-1B's
    heads over 512 tokens took 13-19 ms a layer that way, 9-10 ms in blocks of 6 (AVX2
    code or AVX-512 alike; 4 rows were slower, 8 no faster on AVX2).
    """
    group = h_q // h_kv
    lanes = VECTOR_LANES
    chunks = d // lanes
    keys = 2  # keys per step of the score loop
    dim_vectors = 2 if chunks % 2 == 0 else 1  # head-dim vectors per step of the sum of V
    block = rows_per_block
    log2e = math.log2(math.e)
    masked = _MASKED

    @T.macro
    def attend(tensors, scratch, first, row0, rows, cols, k0, hk, h, causal, sm_scale, count):
        """Tokens first..first + count (``count`` a Python int), rows row0.. of their
        sequence's ``rows`` new tokens over its ``cols`` keys from k0."""
        q, k, v, output, lse = tensors
        query, partial, half, scores, acc, stats, seen = scratch
        for r in T.unroll(count):
            seen[r] = T.if_then_else(causal > 0,
                                     T.max(T.min(cols - rows + row0 + r + 1, cols), 0), cols)
            # The query, pre-scaled so that scores come out in log2 units.
            for c in T.vectorized(d):
                query[r, c] = T.Cast("float32", q[first + r, h, c]) * (sm_scale * log2e)
        most: T.let[T.int32] = seen[count - 1]  # (seen grows with the row)
        for jo in T.serial((most + keys - 1) // keys):
            for r in T.unroll(count):
                for u in T.unroll(keys):
                    for lane in T.vectorized(lanes):
                        partial[r, u, lane] = T.float32(0)
            # The last step's second key may lie past ``most``: its row of K is clamped
            # to a real one and its score never read.
            for c in T.serial(chunks):
                for r in T.unroll(count):
                    for u in T.unroll(keys):
                        for lane in T.vectorized(lanes):
                            partial[r, u, lane] = partial[r, u, lane] + query[
                                r, c * lanes + lane] * T.Cast("float32", k[
                                    k0 + T.min(jo * keys + u, most - 1), hk, c * lanes + lane])
            for r in T.unroll(count):
                for u in T.unroll(keys):
                    for lane in T.vectorized(4):
                        half[lane] = partial[r, u, lane] + partial[r, u, lane + 4]
                    scores[r, jo * keys + u] = (half[0] + half[2]) + (half[1] + half[3])
        # Softmax in base 2, as TVM's kernel (the cache merges lse in base 2), in 8-lane
        # partial max and sum with a vectorizable exp2; per token over the keys it sees.
        for r in T.unroll(count):
            for lane in T.vectorized(lanes):
                partial[r, 0, lane] = T.float32(masked)
            for jo in T.serial(seen[r] // lanes):
                for lane in T.vectorized(lanes):
                    partial[r, 0, lane] = T.max(partial[r, 0, lane],
                                                scores[r, jo * lanes + lane])
            stats[r, 0] = T.float32(masked)
            for lane in T.unroll(lanes):
                stats[r, 0] = T.max(stats[r, 0], partial[r, 0, lane])
            for j in T.serial(seen[r] // lanes * lanes, seen[r]):
                stats[r, 0] = T.max(stats[r, 0], scores[r, j])
            for lane in T.vectorized(lanes):
                partial[r, 1, lane] = T.float32(0)
            for jo in T.serial(seen[r] // lanes):
                for lane in T.vectorized(lanes):
                    scores[r, jo * lanes + lane] = exp2(scores[r, jo * lanes + lane]
                                                        - stats[r, 0])
                    partial[r, 1, lane] = partial[r, 1, lane] + scores[r, jo * lanes + lane]
            stats[r, 1] = T.exp2(T.float32(masked) - stats[r, 0])
            for lane in T.unroll(lanes):
                stats[r, 1] = stats[r, 1] + partial[r, 1, lane]
            for j in T.serial(seen[r] // lanes * lanes, seen[r]):
                scores[r, j] = exp2(scores[r, j] - stats[r, 0])
                stats[r, 1] = stats[r, 1] + scores[r, j]
            for j in T.serial(seen[r], most):
                scores[r, j] = T.float32(0)
        for cb in T.serial(chunks // dim_vectors):
            for r in T.unroll(count):
                for u in T.unroll(dim_vectors):
                    for lane in T.vectorized(lanes):
                        acc[r, u, lane] = T.float32(0)
            for j in T.serial(most):
                for r in T.unroll(count):
                    for u in T.unroll(dim_vectors):
                        for lane in T.vectorized(lanes):
                            acc[r, u, lane] = acc[r, u, lane] + scores[r, j] * T.Cast(
                                "float32", v[k0 + j, hk, (cb * dim_vectors + u) * lanes + lane])
            for r in T.unroll(count):
                for u in T.unroll(dim_vectors):
                    for lane in T.vectorized(lanes):
                        output[first + r, h, (cb * dim_vectors + u) * lanes + lane] = T.Cast(
                            dtype, acc[r, u, lane] / stats[r, 1])
        for r in T.unroll(count):
            lse[first + r, h] = stats[r, 0] + T.log2(stats[r, 1])

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
                    query = T.sblock_alloc_buffer((block, d), "float32")
                    partial = T.sblock_alloc_buffer((block, keys, lanes), "float32")
                    half = T.sblock_alloc_buffer((4,), "float32")
                    scores = T.sblock_alloc_buffer((block, kv_len + keys), "float32")
                    acc = T.sblock_alloc_buffer((block, dim_vectors, lanes), "float32")
                    stats = T.sblock_alloc_buffer((block, 2), "float32")  # max, sum
                    seen = T.sblock_alloc_buffer((block,), "int32")  # keys each token sees
                    rows: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    cols: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    tensors = (q, k, v, output, lse)
                    scratch = (query, partial, half, scores, acc, stats, seen)
                    for blk in T.serial(rows // block):
                        attend(tensors, scratch, q_indptr[b] + blk * block, blk * block, rows,
                               cols, kv_indptr[b], h // group, h, causal, sm_scale, block)
                    for row in T.serial(rows // block * block, rows):
                        attend(tensors, scratch, q_indptr[b] + row, row, rows, cols,
                               kv_indptr[b], h // group, h, causal, sm_scale, 1)

    return batch_prefill_ragged_kv


@built_once
def paged_prefill_attention(h_kv: int, h_q: int, d: int, page_size: int, dtype: str,
                            rows_per_task: int = 8, window: int = 0) -> tirx.PrimFunc:
    """New tokens attending over their sequences' pages: TVM's ``batch_prefill_paged_kv_cpu``,
    for a prefill whose sequence already holds K/V.

    With a ``window``, TVM's ``..._sliding_window`` variant for ``mha_sliding`` layers:
    the cache hands over only the pages that hold the last ``window`` keys, the first of
    them ``length_info[1, b]`` slots into the first page (no attention sink), and token
    ``row`` sees only the last ``window - row - 1`` of those keys (itself and the tokens
    before it in the pass make up the rest of its window).

    One parallel task per (query head, block of ``rows_per_task`` new tokens) of each
    sequence, walking only the sequence's own pages (TVM's walks the whole pool). Each
    page of K and V is read once for the whole block, not once per token: a cached
    prefix is long, and re-reading it per token made the kernel memory-bound. Scores are
    8-lane dot products; an online softmax in base 2 per token rescales its running sum
    and weighted V once per page. Causal bound as TVM's: token ``row`` of ``rows`` sees
    the first ``kv_len - rows + row + 1`` keys.
    """
    group = h_q // h_kv
    sliding = window > 0
    lanes = VECTOR_LANES
    chunks = d // lanes
    block = rows_per_task
    log2e = math.log2(math.e)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
        var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle, var_output: T.handle,
        var_lse: T.handle, causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
        rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        max_num_pages = T.int32()
        nnz_pages = T.int32()
        q_indptr_offset = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        length_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32",
                                  elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32",
                                     elem_offset=values_offset)
        length_info = T.match_buffer(var_length_info, (3, batch_size) if sliding else
                                     (batch_size,), "int32", elem_offset=length_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        assert rotary_mode == 0, "CPU prefill attention needs RoPE applied beforehand"

        for b in T.serial(batch_size):
            for task in T.parallel(h_q * ((q_indptr[b + 1] - q_indptr[b] + block - 1) // block)):
                with T.sblock("attn"):
                    T.reads(q_indptr[b:b + 2], page_indptr[b:b + 2], page_values[0:nnz_pages],
                            length_info[b] if not sliding else length_info[0:3, b],
                            q[0:total_len, 0:h_q, 0:d],
                            pages[0:max_num_pages, 0:2, 0:h_kv, 0:page_size, 0:d])
                    T.writes(output[0:total_len, 0:h_q, 0:d], lse[0:total_len, 0:h_q])
                    query = T.sblock_alloc_buffer((block, d), "float32")
                    partial = T.sblock_alloc_buffer((page_size, lanes), "float32")
                    scores = T.sblock_alloc_buffer((block, page_size), "float32")
                    acc = T.sblock_alloc_buffer((block, d), "float32")
                    # per token: running max, running sum, new max, and the slots it sees
                    # (from, to) counted from the start of its first page
                    stats = T.sblock_alloc_buffer((block, 5), "float32")
                    rows: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    blocks: T.let[T.int32] = (rows + block - 1) // block
                    h: T.let[T.int32] = task // blocks
                    row0: T.let[T.int32] = task % blocks * block
                    count: T.let[T.int32] = T.min(block, rows - row0)
                    hk: T.let[T.int32] = h // group
                    first: T.let[T.int32] = page_indptr[b]
                    num_pages: T.let[T.int32] = page_indptr[b + 1] - first
                    # The first key's slot in the first page, and the keys there are.
                    skip: T.let[T.int32] = length_info[1, b] if sliding else 0
                    kv_len: T.let[T.int32] = T.if_then_else(
                        num_pages > 0, (num_pages - 1) * page_size - skip
                        + (length_info[0, b] if sliding else length_info[b]), 0)
                    for r in T.serial(count):
                        for c in T.serial(d):
                            query[r, c] = T.Cast("float32", q[q_indptr[b] + row0 + r, h, c]) * (
                                sm_scale * log2e)
                        for c in T.vectorized(d):
                            acc[r, c] = T.float32(0)
                        stats[r, 0] = T.float32(_MASKED)
                        stats[r, 1] = T.float32(1)
                        if sliding:
                            stats[r, 3] = T.Cast("float32", skip + T.if_then_else(
                                causal > 0,
                                T.max(kv_len - T.max(window - row0 - r - 1, 0), 0), 0))
                            stats[r, 4] = T.Cast("float32", skip + kv_len)
                        else:
                            stats[r, 3] = T.float32(0)
                            stats[r, 4] = T.Cast("float32", T.if_then_else(
                                causal > 0,
                                T.max(T.min(kv_len - rows + row0 + r + 1, kv_len), 0), kv_len))
                    # The block's last token sees up to the furthest slot.
                    seen: T.let[T.int32] = T.Cast("int32", stats[count - 1, 4])
                    for p in T.serial((seen + page_size - 1) // page_size):
                        page: T.let[T.int32] = page_values[first + p]
                        for r in T.serial(count):
                            start: T.let[T.int32] = T.max(T.min(
                                T.Cast("int32", stats[r, 3]) - p * page_size, page_size), 0)
                            used: T.let[T.int32] = T.max(T.min(
                                T.Cast("int32", stats[r, 4]) - p * page_size, page_size), 0)
                            for j in T.unroll(page_size):
                                for lane in T.vectorized(lanes):
                                    partial[j, lane] = T.float32(0)
                            for ch in T.serial(chunks):
                                for j in T.unroll(page_size):
                                    for lane in T.vectorized(lanes):
                                        partial[j, lane] = partial[j, lane] + query[
                                            r, ch * lanes + lane] * T.Cast(
                                            "float32", pages[page, 0, hk, j, ch * lanes + lane])
                            # Keys past ``used`` get weight 0; the page's exponentials
                            # are one vectorized polynomial, not a libm call per key.
                            stats[r, 2] = stats[r, 0]
                            for j in T.unroll(page_size):
                                scores[r, j] = T.float32(_MASKED)
                                if start <= j and j < used:
                                    scores[r, j] = T.float32(0)
                                    for lane in T.unroll(lanes):
                                        scores[r, j] = scores[r, j] + partial[j, lane]
                                stats[r, 2] = T.max(stats[r, 2], scores[r, j])
                            stats[r, 1] = stats[r, 1] * T.exp2(stats[r, 0] - stats[r, 2])
                            for c in T.vectorized(d):
                                acc[r, c] = acc[r, c] * T.exp2(stats[r, 0] - stats[r, 2])
                            stats[r, 0] = stats[r, 2]
                            for j in T.vectorized(page_size):
                                scores[r, j] = T.if_then_else(
                                    start <= j and j < used, exp2(scores[r, j] - stats[r, 0]),
                                    T.float32(0))
                            for j in T.unroll(page_size):
                                stats[r, 1] = stats[r, 1] + scores[r, j]
                            for j in T.serial(used):
                                for c in T.vectorized(d):
                                    acc[r, c] = acc[r, c] + T.Cast(
                                        "float32", pages[page, 1, hk, j, c]) * scores[r, j]
                    for r in T.serial(count):
                        t: T.let[T.int32] = q_indptr[b] + row0 + r
                        for c in T.vectorized(d):
                            output[t, h, c] = T.Cast(dtype, acc[r, c] / stats[r, 1])
                        lse[t, h] = stats[r, 0] + T.log2(stats[r, 1])

    return batch_prefill_paged_kv_cpu


@built_once
def paged_decode_attention(h_kv: int, h_q: int, d: int, page_size: int, dtype: str,
                           sliding: bool = False) -> tirx.PrimFunc:
    """One new token per sequence attending over its pages: TVM's ``batch_decode_paged_kv_cpu``.

    ``sliding``: its ``..._sliding_window`` variant, whose pages hold the token's window,
    the first key ``length_info[1, b]`` slots into the first page (no attention sink).

    One parallel task per (sequence, query head). Keys are taken a page at a time (a
    page holds ``page_size`` consecutive keys of one head, contiguous in memory): their
    scores are 8-lane dot products, then an online softmax in base 2 rescales the running
    sum and the vectorized weighted sum of V once per page instead of once per key.
    """
    group = h_q // h_kv
    lanes = VECTOR_LANES
    chunks = d // lanes
    log2e = math.log2(math.e)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_cpu(
        var_q: T.handle, var_pages: T.handle, var_page_table_indptr: T.handle,
        var_page_table_values: T.handle, var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle, var_output: T.handle,
        var_lse: T.handle, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        max_num_pages = T.int32()
        nnz_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        length_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_table_indptr, (batch_size + 1,), "int32",
                                     elem_offset=indptr_offset)
        page_values = T.match_buffer(var_page_table_values, (nnz_pages,), "int32",
                                     elem_offset=values_offset)
        length_info = T.match_buffer(var_length_info, (3, batch_size) if sliding else
                                     (batch_size,), "int32", elem_offset=length_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(var_q_rope_position, (batch_size,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (batch_size, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, h_q), "float32")
        assert rotary_mode == 0, "CPU decode attention needs RoPE applied beforehand"

        for bh in T.parallel(batch_size * h_q):
            with T.sblock("attn"):
                T.reads(page_indptr[0:batch_size + 1], page_values[0:nnz_pages],
                        length_info[0:3, 0:batch_size] if sliding else length_info[0:batch_size],
                        q[0:batch_size, 0:h_q, 0:d],
                        pages[0:max_num_pages, 0:2, 0:h_kv, 0:page_size, 0:d])
                T.writes(output[0:batch_size, 0:h_q, 0:d], lse[0:batch_size, 0:h_q])
                query = T.sblock_alloc_buffer((d,), "float32")
                partial = T.sblock_alloc_buffer((page_size, lanes), "float32")
                scores = T.sblock_alloc_buffer((page_size,), "float32")
                acc = T.sblock_alloc_buffer((d,), "float32")
                stats = T.sblock_alloc_buffer((3,), "float32")  # running max, sum, new max
                b: T.let[T.int32] = bh // h_q
                h: T.let[T.int32] = bh % h_q
                hk: T.let[T.int32] = h // group
                first: T.let[T.int32] = page_indptr[b]
                num_pages: T.let[T.int32] = page_indptr[b + 1] - first
                for c in T.serial(d):
                    query[c] = T.Cast("float32", q[b, h, c]) * (sm_scale * log2e)
                for c in T.vectorized(d):
                    acc[c] = T.float32(0)
                stats[0] = T.float32(_MASKED)
                stats[1] = T.float32(1)
                for p in T.serial(num_pages):
                    page: T.let[T.int32] = page_values[first + p]
                    used: T.let[T.int32] = T.if_then_else(
                        p == num_pages - 1, length_info[0, b] if sliding else length_info[b],
                        page_size)
                    start: T.let[T.int32] = T.if_then_else(
                        p == 0, length_info[1, b] if sliding else 0, 0)
                    for j in T.unroll(page_size):
                        for lane in T.vectorized(lanes):
                            partial[j, lane] = T.float32(0)
                    for ch in T.serial(chunks):
                        for j in T.unroll(page_size):
                            for lane in T.vectorized(lanes):
                                partial[j, lane] = partial[j, lane] + query[
                                    ch * lanes + lane] * T.Cast(
                                    "float32", pages[page, 0, hk, j, ch * lanes + lane])
                    stats[2] = stats[0]
                    for j in T.serial(start, used):
                        scores[j] = T.float32(0)
                        for lane in T.unroll(lanes):
                            scores[j] = scores[j] + partial[j, lane]
                        stats[2] = T.max(stats[2], scores[j])
                    # Rescale what was summed under the old max, then add this page.
                    stats[1] = stats[1] * T.exp2(stats[0] - stats[2])
                    for c in T.vectorized(d):
                        acc[c] = acc[c] * T.exp2(stats[0] - stats[2])
                    stats[0] = stats[2]
                    for j in T.serial(start, used):
                        scores[j] = T.exp2(scores[j] - stats[0])
                        stats[1] = stats[1] + scores[j]
                        for c in T.vectorized(d):
                            acc[c] = acc[c] + T.Cast(
                                "float32", pages[page, 1, hk, j, c]) * scores[j]
                for c in T.vectorized(d):
                    output[b, h, c] = T.Cast(dtype, acc[c] / stats[1])
                lse[b, h] = stats[0] + T.log2(stats[1])

    return batch_decode_paged_kv_cpu
