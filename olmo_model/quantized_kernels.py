"""Kernels over group-quantized weights (quantization.py's layouts).

* ``quantized_matmul``: ``y = x @ W.T`` for any number of rows of x (decode: a row
  per running sequence; prefill: a row per token), in TIR with x86's integer dot
  products. Each row of x is first quantized to int8 in groups of 32 (its own scale per
  group, as llama.cpp does for its dot products); then 32 weight bytes meet 32
  activation bytes per instruction, and one conversion and FMA per group apply weight
  scale x activation scale. The 8 vector lanes are the 8 rows of a tile, so nothing is
  summed across lanes and a group's 8 scales are one vector; rows of x come in blocks
  (``ROW_BLOCK``) that share each unpacked vector of weights. Two instruction sets:

  - AVX-512 VNNI (where the CPU shows avx512_vnni): ``vpdpbusd`` multiplies 4 unsigned
    weight bytes by 4 signed activation bytes and adds all four into an int32 lane, in
    one instruction; on 256-bit registers (AVX-512VL), which Zen 4 runs at the same
    bytes per cycle as 512-bit ones with the weight layout unchanged. AVX-512's 32
    registers hold 8-bit blocks of 8 rows (AVX2: 4).
  - AVX2: ``vpmaddubsw`` multiplies and adds neighbouring pairs into int16, a
    ``vpmaddwd`` per group widens them to int32.

  Measured on a 16384 x 2048 4-bit matrix, one row, two threads (AVX2): unpacking
  weights to floats and FMA-ing them (4 to 5 instructions per 8 weights) took 7.1 ms,
  slower than float16's 2.5; integer dots with lanes along the inputs and a stream per
  row, 3.0 ms; with a tile's rows read as one stream, 1.2; with the rows in the lanes
  (this kernel), 0.86, about what the machine's memory gave a plain read that day. A
  prefill runs the same kernel: unpacking W to float16 for the dense prefill matmul
  instead made a 128-token OLMo-1B prefill slower than float16's, not faster.
* ``dequantize`` (targets without AVX2: CUDA): W unpacked to a dense matrix, for TVM's
  own schedules to multiply by.
* ``embedding``: rows of the quantized embedding table, gathered and dequantized.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from .kernel_memo import built_once
from .quantization import TILE_ROWS, WeightFormat

# Parallel tasks get this many tiles each at most (64 rows of W: 64 KB of OLMo-1B's q4 W).
TILES_PER_TASK = 8
# ... and a kernel has at least this many tasks, so threads share the work evenly.
MIN_TASKS = 8

# The instruction sets quantized_matmul is written for.
AVX512_VNNI = "avx512-vnni"
AVX2 = "avx2"
INSTRUCTION_SETS = (AVX512_VNNI, AVX2)

# Rows of x that share each vector of unpacked weights (prefill, batched decode), by
# instruction set and weight bits. AVX2 (16 registers), OLMo-1B's layer matmuls over 128
# rows, in 4-bit: 2.19 / 1.31 / 1.36 / 1.15 / 1.27 s with 1 / 2 / 4 / 6 / 8 rows; in
# 8-bit (more registers per row): 2.68 / 1.61 / 2.94 s with 2 / 4 / 6. VNNI (Zen 4, 8 to
# 512 rows): 6 the best of 4 to 12 in 4-bit; in 8-bit 8 the best at 8 rows (a whole
# batch), 6 and 8 alike at 512.
ROW_BLOCK = {(AVX2, 4): 6, (AVX2, 8): 4, (AVX512_VNNI, 4): 6, (AVX512_VNNI, 8): 8}
assert all(rows % 2 == 0 for rows in ROW_BLOCK.values()), "rows left over go in pairs"


def integer_dot_isa(target: tvm.target.Target | None) -> str | None:
    """The instruction set ``quantized_matmul`` uses on ``target``, best first; None where
    it has neither (not x86, or an x86 CPU without AVX2)."""
    if target is None or target.kind.name != "llvm":
        return None

    def has(feature: str) -> bool:
        return bool(tvm.target.codegen.llvm_cpu_has_features(feature, target))

    if has("avx512vnni") and has("avx512vl"):
        return AVX512_VNNI
    return AVX2 if has("avx2") else None


def tiles_per_task(tiles: int) -> int:
    """The most tiles per parallel task, up to TILES_PER_TASK, leaving MIN_TASKS tasks."""
    for candidate in range(TILES_PER_TASK, 0, -1):
        if tiles % candidate == 0 and tiles // candidate >= MIN_TASKS:
            return candidate
    return 1


def _broadcast_lane_bytes(xq: tirx.Buffer, row: tirx.PrimExpr, col: tirx.PrimExpr
                          ) -> tirx.PrimExpr:
    """``xq[row, col:col + 4]`` repeated in every 4-byte lane of a 32-byte vector."""
    word = T.reinterpret("int32", xq.vload([row, col], "int8x4"))
    return T.reinterpret("int8x32", T.broadcast(word, TILE_ROWS))


def _weight_vector(weight: tirx.Buffer, tile, group, j) -> tirx.PrimExpr:
    """The j-th 32 bytes of a tile's group: 4 bytes of each of its rows."""
    return weight.vload([tile, group, j, 0, 0], f"{weight.dtype}x32")


def _low_nibbles(weights: tirx.PrimExpr) -> tirx.PrimExpr:
    return T.bitwise_and(weights, T.broadcast(T.uint8(15), 32))


def _high_nibbles(weights: tirx.PrimExpr) -> tirx.PrimExpr:
    return T.shift_right(weights, T.broadcast(T.uint8(4), 32))


def _byte_dots(weights: tirx.PrimExpr, activations: tirx.PrimExpr) -> tirx.PrimExpr:
    """AVX2: 16 int16 sums of 2 products each, unsigned bytes times signed bytes."""
    return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", weights,
                                   activations)


def _lane_sums(pairs: tirx.PrimExpr) -> tirx.PrimExpr:
    """AVX2: neighbouring int16 pairs added into 8 int32 lanes, one per row of the tile."""
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs,
                                   T.broadcast(T.int16(1), 16))


def _sign(value: tirx.PrimExpr, sign_of: tirx.PrimExpr) -> tirx.PrimExpr:
    return T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", value, sign_of)


def _dot_add(sums: tirx.PrimExpr, weights: tirx.PrimExpr, activations: tirx.PrimExpr
             ) -> tirx.PrimExpr:
    """AVX-512 VNNI: ``sums`` plus, in each int32 lane, the 4 products of unsigned weight
    bytes and signed activation bytes (exact: nothing saturates)."""
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", sums, weights,
                                   activations)


def _unsigned(weights: tirx.PrimExpr) -> tirx.PrimExpr:
    """Signed bytes w as the unsigned w + 128 (flipping the top bit), as vpdpbusd wants."""
    return T.bitwise_xor(T.reinterpret("uint8x32", weights), T.broadcast(T.uint8(128), 32))


def zero_point(fmt: WeightFormat, isa: str) -> int:
    """What the unsigned weight codes the kernel multiplies are offset by: 4-bit codes are
    stored as q + 8; VNNI reads 8-bit ones as q + 128; AVX2 multiplies them signed."""
    if fmt.bits == 4:
        return 8
    return 128 if isa == AVX512_VNNI else 0


@built_once
def quantized_matmul(fmt: WeightFormat, n: int, k: int, in_dtype: str, out_dtype: str,
                     isa: str = AVX2) -> tirx.PrimFunc:
    """``y[m, n] = sum_k x[m, k] * W[n, k]`` for any number of rows m (see module doc).

    Each vector lane is one output row of a tile, so a group's partial sums need no
    reduction across lanes and its scale is one vector of the tile's scales. Per 32-byte
    vector of weights the inner loop is, with VNNI, a nibble unpack (4-bit) or a flip
    of the top bit (8-bit) and one or two vpdpbusd per row; with AVX2, an unpack and one or two
    vpmaddubsw and an add per row. Per group and row: (AVX2: one vpmaddwd,) a
    conversion and an FMA.
    """
    if isa not in INSTRUCTION_SETS:
        raise ValueError(f"unknown instruction set {isa!r}; use one of {INSTRUCTION_SETS}")
    fmt.check_shape(n, k, "a quantized matmul")
    groups, tiles, lanes = k // fmt.group_size, n // TILE_ROWS, TILE_ROWS
    vectors = fmt.vectors_per_group
    per_task = tiles_per_task(tiles)
    four_bit, vnni = fmt.bits == 4, isa == AVX512_VNNI
    offset = zero_point(fmt, isa)
    block_rows = ROW_BLOCK[isa, fmt.bits]
    weight_shape = fmt.weight_shape(n, k)

    @T.macro
    def dot_rows(x8, y, weight, scale, acc, pairs, sums, first, count, tile):
        """Rows first..first + count of y over one tile: count (a Python int) rows of x
        share each vector of unpacked weights. x8: (xq, xs, excess)."""
        xq, xs, excess = x8
        for r in T.unroll(count):
            acc[r, T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
        for g in T.serial(groups):
            if vnni:
                for r in T.unroll(count):
                    sums[r, T.ramp(0, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                for j in T.unroll(vectors):
                    for r in T.unroll(count):
                        if four_bit:
                            sums[r, T.ramp(0, 1, lanes)] = _dot_add(
                                _dot_add(sums[r, T.ramp(0, 1, lanes)],
                                         _low_nibbles(_weight_vector(weight, tile, g, j)),
                                         _broadcast_lane_bytes(xq, first + r, g * 32 + j * 8)),
                                _high_nibbles(_weight_vector(weight, tile, g, j)),
                                _broadcast_lane_bytes(xq, first + r, g * 32 + j * 8 + 4))
                        else:
                            sums[r, T.ramp(0, 1, lanes)] = _dot_add(
                                sums[r, T.ramp(0, 1, lanes)],
                                _unsigned(_weight_vector(weight, tile, g, j)),
                                _broadcast_lane_bytes(xq, first + r, g * 32 + j * 4))
            elif four_bit:
                # 4 vectors of 64 weights: int16 sums stay below 4 x 2 x (15 x 127 x 2)
                # = 30480, so they cannot overflow.
                for r in T.unroll(count):
                    pairs[r, T.ramp(0, 1, 16)] = T.broadcast(T.int16(0), 16)
                for j in T.unroll(vectors):
                    for r in T.unroll(count):
                        pairs[r, T.ramp(0, 1, 16)] = (
                            pairs[r, T.ramp(0, 1, 16)]
                            + _byte_dots(_low_nibbles(_weight_vector(weight, tile, g, j)),
                                         _broadcast_lane_bytes(xq, first + r, g * 32 + j * 8))
                            + _byte_dots(_high_nibbles(_weight_vector(weight, tile, g, j)),
                                         _broadcast_lane_bytes(xq, first + r,
                                                               g * 32 + j * 8 + 4)))
                for r in T.unroll(count):
                    sums[r, T.ramp(0, 1, lanes)] = _lane_sums(pairs[r, T.ramp(0, 1, 16)])
            else:
                # |w| x (x with w's sign): vpmaddubsw wants one unsigned operand
                # (llama.cpp's trick); a pair reaches 32258, so each vector is widened
                # to int32 at once.
                for r in T.unroll(count):
                    sums[r, T.ramp(0, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                for j in T.unroll(vectors):
                    for r in T.unroll(count):
                        sums[r, T.ramp(0, 1, lanes)] = sums[r, T.ramp(0, 1, lanes)] + _lane_sums(
                            _byte_dots(
                                _sign(_weight_vector(weight, tile, g, j),
                                      _weight_vector(weight, tile, g, j)),
                                _sign(_broadcast_lane_bytes(xq, first + r, g * 32 + j * 4),
                                      _weight_vector(weight, tile, g, j))))
            # (sums - excess) x weight scales x activation scale: the difference is an
            # exact integer in float32, so only the scaling and the running sum round.
            for r in T.unroll(count):
                acc[r, T.ramp(0, 1, lanes)] = acc[r, T.ramp(0, 1, lanes)] + (
                    T.Cast("float32x8", sums[r, T.ramp(0, 1, lanes)])
                    - T.broadcast(excess[first + r, g], lanes)
                ) * T.Cast("float32x8", scale[tile, g, T.ramp(0, 1, lanes)]) * T.broadcast(
                    xs[first + r, g], lanes)
        for r in T.unroll(count):
            y[first + r, T.ramp(tile * lanes, 1, lanes)] = T.Cast(
                f"{out_dtype}x8", acc[r, T.ramp(0, 1, lanes)])

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, weight: T.Buffer(weight_shape, fmt.storage),
               scale: T.Buffer(fmt.scale_shape(n, k), "float16"), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), in_dtype)
        y = T.match_buffer(var_y, (m, n), out_dtype)
        xq = T.alloc_buffer((m, k), "int8")
        xs = T.alloc_buffer((m, groups), "float32")
        # The weight codes multiplied are q + offset (zero_point): a group's sums carry
        # offset x (the sum of its activations) per unit of scale too much.
        excess = T.alloc_buffer((m, groups), "float32")
        # Activations to int8, one scale per group of 32. (In a parallel loop, even for
        # one row: a serial prologue before the parallel part cost whole milliseconds.)
        for row in T.parallel(m):
            with T.sblock("quantize_activations"):
                T.reads(x[row, 0:k])
                T.writes(xq[row, 0:k], xs[row, 0:groups], excess[row, 0:groups])
                peak = T.sblock_alloc_buffer((8,), "float32")
                total = T.sblock_alloc_buffer((1,), "int32")
                for g in T.serial(groups):
                    for lane in T.vectorized(8):
                        peak[lane] = T.float32(0)
                    for c in T.serial(4):
                        for lane in T.vectorized(8):
                            peak[lane] = T.max(peak[lane], T.fabs(
                                T.Cast("float32", x[row, g * 32 + c * 8 + lane])))
                    for lane in T.serial(1, 8):
                        peak[0] = T.max(peak[0], peak[lane])
                    xs[row, g] = peak[0] / T.float32(127)
                    peak[1] = T.if_then_else(peak[0] > T.float32(0),
                                             T.float32(127) / peak[0], T.float32(0))
                    for c in T.serial(4):
                        for lane in T.vectorized(8):
                            xq[row, g * 32 + c * 8 + lane] = T.Cast("int8", T.nearbyint(
                                T.Cast("float32", x[row, g * 32 + c * 8 + lane]) * peak[1]))
                    total[0] = 0
                    for c in T.serial(32):
                        total[0] = total[0] + T.Cast("int32", xq[row, g * 32 + c])
                    excess[row, g] = T.float32(offset) * T.Cast("float32", total[0])
        for task in T.parallel(tiles // per_task):
            with T.sblock("dot"):
                T.reads(xq[0:m, 0:k], xs[0:m, 0:groups], excess[0:m, 0:groups],
                        weight[task * per_task:(task + 1) * per_task, 0:groups, 0:vectors,
                               0:lanes, 0:4],
                        scale[task * per_task:(task + 1) * per_task, 0:groups, 0:lanes])
                T.writes(y[0:m, task * per_task * lanes:(task + 1) * per_task * lanes])
                acc = T.sblock_alloc_buffer((block_rows, lanes), "float32")
                pairs = T.sblock_alloc_buffer((block_rows, 16), "int16")
                sums = T.sblock_alloc_buffer((block_rows, lanes), "int32")
                # Rows of x in blocks, each block against all of the task's tiles: the
                # task's weights stay in L2 and a block of x in L1 while they meet. What
                # is left over goes in pairs, then alone.
                for block in T.serial(m // block_rows):
                    for t in T.serial(per_task):
                        dot_rows((xq, xs, excess), y, weight, scale, acc, pairs, sums,
                                 block * block_rows, block_rows, task * per_task + t)
                for pair in T.serial(m % block_rows // 2):
                    for t in T.serial(per_task):
                        dot_rows((xq, xs, excess), y, weight, scale, acc, pairs, sums,
                                 m // block_rows * block_rows + pair * 2, 2, task * per_task + t)
                for row in T.serial(m - m % 2, m):  # (block_rows is even)
                    for t in T.serial(per_task):
                        dot_rows((xq, xs, excess), y, weight, scale, acc, pairs, sums, row, 1,
                                 task * per_task + t)

    return kernel


def _weight_value(fmt: WeightFormat, weight: te.Tensor, scale: te.Tensor, row, col,
                  dtype: str) -> tirx.PrimExpr:
    """W[row, col] from the stored layout (quantization.py), as ``dtype``."""
    tile, lane = row // TILE_ROWS, row % TILE_ROWS
    group, within = col // fmt.group_size, col % fmt.group_size
    group_scale = scale[tile, group, lane].astype("float32")
    if fmt.bits == 4:
        byte = weight[tile, group, within // 8, lane, within % 4]
        shift = (within % 8 // 4 * 4).astype("uint8")
        q = tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, "uint8"))
        value = q.astype("float32") - tirx.const(8.0, "float32")
    else:
        value = weight[tile, group, within // 4, lane, within % 4].astype("float32")
    return (value * group_scale).astype(dtype)


def dequantize(fmt: WeightFormat, n: int, k: int, dtype: str):
    """A te function: (stored weights, scales) to the dense ``[n, k]`` W in ``dtype``."""

    def compute(weight: te.Tensor, scale: te.Tensor) -> te.Tensor:
        return te.compute((n, k), lambda i, j: _weight_value(fmt, weight, scale, i, j, dtype),
                          name="dequantize")

    return compute


def embedding(fmt: WeightFormat, hidden: int, dtype: str):
    """A te function: (stored table, scales, token ids) to ``[len(ids), hidden]`` rows."""

    def compute(weight: te.Tensor, scale: te.Tensor, ids: te.Tensor) -> te.Tensor:
        return te.compute(
            (ids.shape[0], hidden),
            lambda i, j: _weight_value(fmt, weight, scale, ids[i], j, dtype),
            name="dequantize_take")

    return compute
