"""The CPU schedules compute what the unscheduled kernels compute, for every row count."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from olmo_model import artifact
from olmo_model.compiler import resolve_target
from olmo_model.cpu_attention import (
    paged_decode_attention,
    paged_prefill_attention,
    prefill_ragged_attention,
)
from olmo_model.cpu_rope import rope_kernel
from olmo_model.cpu_schedules import (
    AVX2_TILES,
    AVX512_TILES,
    ONE_ROW_TILES,
    HalfMatmulAccumulateInFloat32,
    cpu_pipeline,
    matmul_rule,
    matmul_tiles,
)
from olmo_model.runtime import ModelRunner

TARGET = resolve_target("llvm")
# The host's own tiles, and where the host runs AVX-512, AVX2's as well: the tiles of a CPU
# without it (16 registers) are checked here too.
AVX2_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3",
                                 "num-cores": TARGET.attrs.get("num-cores", 1)})
TARGETS = [TARGET] + ([AVX2_TARGET] if matmul_tiles(TARGET) != AVX2_TILES else [])
TARGET_IDS = [str(matmul_tiles(t).rows) + "x" + str(matmul_tiles(t).cols) for t in TARGETS]


def _linear_module(k: int, n: int, dtype: str, residual: bool,
                   rows: int | None = None, decode: bool = False) -> tvm.IRModule:
    """``x @ W.T (+ r)`` as nn.Linear and the residual emit it; symbolic rows by default.

    Rows are tokens of one sequence (``[1, m, k]``, prefill) or one token of each of m
    sequences (``[m, 1, k]``, decode), which the matmul rule schedules differently.
    """
    m = tirx.Var("m", "int64") if rows is None else rows
    lead = (m, 1) if decode else (1, m)
    x = relax.Var("x", relax.TensorType((*lead, k), dtype))
    w = relax.Var("w", relax.TensorType((n, k), dtype))
    r = relax.Var("r", relax.TensorType((*lead, n), dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, r]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
            out = bb.emit_output(relax.op.add(y, r) if residual else y)
        bb.emit_func_output(out)
    return bb.get()


def _compiled(mod: tvm.IRModule, target: tvm.target.Target = TARGET):
    """The module's ``main``, built once (its symbolic shapes then run any size)."""
    with target:
        executable = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
    main = relax.VirtualMachine(executable, tvm.cpu())["main"]
    return lambda *arrays: main(*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def _run(mod: tvm.IRModule, *arrays: np.ndarray, target: tvm.target.Target = TARGET
         ) -> np.ndarray:
    return _compiled(mod, target)(*arrays)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize(("k", "n", "residual"), [(64, 96, True), (96, 320, False),
                                                   (4096, 8, True), (6144, 48, False),
                                                   (128, 40, True)])
def test_matmul_matches_numpy_for_any_row_count(k, n, residual, decode, target):
    # Rows 1..9 cover decode, the tiles (3 or 4 rows) exactly and the padding; from
    # pack_min_rows on a prefill takes the outer-product kernel, whose tile is 6 rows (so
    # one past it pads); k = 4096 is a long reduction with N smaller than one block,
    # k = 6144 one that is not a power of two; N = 8 and 40 are not whole panels of 16.
    rng = np.random.default_rng(0)
    linear = _compiled(_linear_module(k, n, "float32", residual, decode=decode), target)
    w = rng.standard_normal((n, k), dtype=np.float32)
    pack_min_rows = matmul_tiles(target).pack_min_rows[4]
    for m in (*range(1, 10), pack_min_rows - 1, pack_min_rows, pack_min_rows + 1):
        shape = (m, 1) if decode else (1, m)
        x = rng.standard_normal((*shape, k), dtype=np.float32)
        r = rng.standard_normal((*shape, n), dtype=np.float32)
        expected = x @ w.T + (r if residual else 0)
        ours = linear(x, w, r)
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("rows", [1, 6, 7])
def test_matmul_with_a_static_row_count(rows):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, rows, 64), dtype=np.float32)
    w = rng.standard_normal((96, 64), dtype=np.float32)
    r = rng.standard_normal((1, rows, 96), dtype=np.float32)
    ours = _run(_linear_module(64, 96, "float32", True, rows), x, w, r)
    np.testing.assert_allclose(ours, x @ w.T + r, rtol=1e-4, atol=1e-3)


def _scheduled_linear(k: int, n: int, decode: bool, dtype: str = "float32",
                      target: tvm.target.Target = TARGET) -> str:
    mod = relax.transform.LegalizeOps()(relax.transform.FuseTransposeMatmul()(
        _linear_module(k, n, dtype, False, decode=decode)))
    kernels = [f for g, f in mod.functions_items() if g.name_hint.startswith("NT_matmul")]
    assert len(kernels) == 1
    schedule = matmul_rule.apply(kernels[0], target, False)
    assert schedule is not None
    return schedule.mod.script()


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_each_matmul_shape_gets_its_kernel(dtype, target):
    decode = _scheduled_linear(64, 96, True, dtype, target)
    prefill = _scheduled_linear(64, 96, False, dtype, target)
    unpanelled = _scheduled_linear(64, 40, False, dtype, target)  # not whole panels
    # Decode: the dot-product kernel with prefetches, as many lines per step of k as it
    # reads (a tile of 4 rows of W, 8 lanes: one line in float16, two in float32; of 2
    # rows, on ONE_ROW_TILES for one or two rows of x, one line); W is never repacked.
    assert "w_global" not in decode
    assert f"if m <= T.int64({ONE_ROW_TILES.rows})" in decode
    lines = [tiles.cols * 8 * np.dtype(dtype).itemsize // 64
             for tiles in (ONE_ROW_TILES, matmul_tiles(target))]
    assert decode.count("T.prefetch(") == sum(max(1, n) for n in lines)
    # Prefill: W repacked into panels (w_global) for the outer products from
    # pack_min_rows rows on (by weight dtype), the dot-product kernel below.
    pack_min_rows = matmul_tiles(target).pack_min_rows[np.dtype(dtype).itemsize]
    assert f"if m >= T.int64({pack_min_rows})" in prefill and "w_global" in prefill
    assert "prefetch" not in prefill
    assert "w_global" not in unpanelled and "if m >=" not in unpanelled


def test_targets_with_avx512_get_the_larger_register_tile():
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    assert matmul_tiles(avx512) == AVX512_TILES and matmul_tiles(AVX2_TARGET) == AVX2_TILES
    # Accumulators, the tile's x vectors and a W vector fit the register file.
    for tiles, registers in ((AVX512_TILES, 32), (AVX2_TILES, 16)):
        assert tiles.rows * tiles.cols + tiles.rows + 1 <= registers


@pytest.mark.parametrize("kernel", ["dot product", "outer product"])
def test_float16_matmul_accumulates_in_float32(kernel):
    # A float16 running sum of 4096 products would be off by far more than 1e-3.
    rng = np.random.default_rng(1)
    k, n = 4096, 16
    m = 3 if kernel == "dot product" else matmul_tiles(TARGET).pack_min_rows[2] + 1
    x = rng.uniform(0.5, 1.0, (1, m, k)).astype(np.float16)
    w = rng.uniform(0.5, 1.0, (n, k)).astype(np.float16)
    mod = _linear_module(k, n, "float16", False)
    widened = HalfMatmulAccumulateInFloat32()(mod)
    assert "float32" in widened.script()
    expected = x.astype(np.float32) @ w.astype(np.float32).T
    ours = _run(mod, x, w, np.zeros((1, m, n), np.float16)).astype(np.float32)
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-3


def _reference_attention(q, k, v, q_indptr, kv_indptr, causal):
    h_q, h_kv, d = q.shape[1], k.shape[1], q.shape[2]
    out = np.zeros(q.shape, np.float32)
    lse = np.zeros(q.shape[:2], np.float32)
    for b in range(len(q_indptr) - 1):
        qs, qe, ks, ke = q_indptr[b], q_indptr[b + 1], kv_indptr[b], kv_indptr[b + 1]
        rows, cols = qe - qs, ke - ks
        for h in range(h_q):
            scores = q[qs:qe, h] @ k[ks:ke, h // (h_q // h_kv)].T * d**-0.5 * np.log2(np.e)
            if causal:
                visible = np.arange(cols)[None, :] < cols - rows + np.arange(rows)[:, None] + 1
                scores = np.where(visible, scores, -np.inf)
            top = scores.max(axis=1, keepdims=True)
            p = np.exp2(scores - top)
            total = p.sum(axis=1, keepdims=True)
            out[qs:qe, h] = p / total @ v[ks:ke, h // (h_q // h_kv)]
            lse[qs:qe, h] = (top + np.log2(total))[:, 0]
    return out, lse


@pytest.mark.parametrize("causal", [1, 0])
@pytest.mark.parametrize(("h_q", "h_kv", "d"), [(4, 4, 32), (8, 2, 32), (4, 2, 24)])
def test_prefill_attention_matches_reference(causal, h_q, h_kv, d):
    # Three sequences, two with cached tokens before their new ones (kv longer than q);
    # token counts that leave 5 and 1 rows past the kernel's blocks of 6, and a head size
    # of an odd number of vectors.
    new, cached = [5, 37, 1], [0, 4, 9]
    rng = np.random.default_rng(2)
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(np.add(new, cached))]).astype(np.int32)
    q = rng.standard_normal((q_indptr[-1], h_q, d), dtype=np.float32)
    k = rng.standard_normal((kv_indptr[-1], h_kv, d), dtype=np.float32)
    v = rng.standard_normal((kv_indptr[-1], h_kv, d), dtype=np.float32)
    kernel = tvm.compile(tvm.IRModule({"main": prefill_ragged_attention(h_kv, h_q, d,
                                                                          "float32")}), TARGET)
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    positions = tvm.runtime.tensor(np.zeros(q.shape[0], np.int32))
    offsets = tvm.runtime.tensor(np.zeros(len(new), np.int32))
    args = [tvm.runtime.tensor(a) for a in (q, q_indptr, k, v, kv_indptr)]
    kernel["main"](*args, positions, offsets, out, lse, causal, 0, 1.0, 1e4, d**-0.5)
    expected_out, expected_lse = _reference_attention(q, k, v, q_indptr, kv_indptr, causal)
    np.testing.assert_allclose(out.numpy(), expected_out, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), expected_lse, atol=1e-5)
    with pytest.raises(Exception, match="RoPE"):
        kernel["main"](*args, positions, offsets, out, lse, causal, 1, 1.0, 1e4, d**-0.5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("width", [2048, 40, 36])
def test_layer_norm_matches_numpy(dtype, decode, width):
    # Rows of 2048 and 40 take row_reduction_rule's 8-lane partial sums; 36 (not a
    # multiple of 8) is left to dlight's rule. Rows as prefill ([1, m, k]) or decode.
    from tvm.relax.frontend import nn

    from olmo_model.model import _layer_norm

    class Norm(nn.Module):
        def forward(self, x):
            return _layer_norm(x)

    shape = ["m", 1, width] if decode else [1, "m", width]
    mod, _ = Norm().export_tvm(spec={"forward": {"x": nn.spec.Tensor(shape, dtype)}})
    with TARGET:
        executable = tvm.compile(mod, TARGET, relax_pipeline=cpu_pipeline(TARGET))
    norm = relax.VirtualMachine(executable, tvm.cpu())["forward"]
    for rows in (1, 3, 8):
        x = (np.random.default_rng(rows).standard_normal(
            [rows if d == "m" else d for d in shape]) * 3 + 1).astype(dtype)
        wide = x.astype(np.float64)
        want = (wide - wide.mean(-1, keepdims=True)) / np.sqrt(wide.var(-1, keepdims=True) + 1e-5)
        got = norm(tvm.runtime.tensor(x)).numpy().astype(np.float64)
        np.testing.assert_allclose(got, want, atol=2e-6 if dtype == "float32" else 4e-3)


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("scaling", "scale"), [({}, 1.0), ({}, 0.25), (_LLAMA3, 1.0)],
                         ids=["plain", "linear", "llama3"])
def test_rope_kernel_matches_tvms(dtype, scaling, scale):
    # Same outputs as the kernel it replaces, to a rounding (FMA contraction may differ),
    # for scattered positions, with and without the rotation applied.
    h_q, h_kv, d, n = 8, 2, 32, 37
    ours = tvm.compile(tvm.IRModule({"main": rope_kernel(h_q, h_kv, d, dtype, 5e5, scale,
                                                         scaling)}), TARGET)["main"]
    tvms = tvm.compile(tvm.IRModule({"main": llama_rope_with_position_map(
        5e5, scale, d, h_q, h_kv, dtype, scaling)}), TARGET)["main"]
    rng = np.random.default_rng(0)
    qkv = tvm.runtime.tensor(rng.standard_normal((n, h_q + 2 * h_kv, d)).astype(dtype))
    positions = tvm.runtime.tensor(rng.integers(0, 5000, n).astype(np.int32))
    for apply_rope in (1, 0):
        outputs = []
        for kernel in (ours, tvms):
            q, k, v = (tvm.runtime.tensor(np.zeros((n, h, d), dtype)) for h in (h_q, h_kv, h_kv))
            kernel(qkv, positions, q, k, v, apply_rope)
            outputs.append([q.numpy(), k.numpy(), v.numpy()])
        for got, want in zip(*outputs):
            np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == "float32" else 1e-3,
                                       atol=1e-6)


def _gated_activation_module(width: int, dtype: str, activation: str) -> tvm.IRModule:
    """``act(gate) * up`` over ``[m, 1, 2 x width]`` split in halves, as the FFN emits it."""
    m = tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, 1, 2 * width), dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            halves = bb.emit(relax.op.split(x, 2, axis=-1))
            gate = bb.emit(relax.TupleGetItem(halves, 0))
            up = bb.emit(relax.TupleGetItem(halves, 1))
            act = relax.op.nn.silu(gate) if activation == "silu" else relax.op.sigmoid(gate)
            out = bb.emit_output(relax.op.multiply(bb.emit(act), up))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("rows", "width"), [(1, 2048), (3, 2048), (2, 40)])
def test_gated_activation_matches_numpy(activation, dtype, rows, width):
    # Widths that divide into ELEMENTWISE_CHUNK run in chunks; 40 does not. The gate spans
    # the exponential's whole range and past its clamps (+-100).
    rng = np.random.default_rng(rows * width)
    x = rng.standard_normal((rows, 1, 2 * width)) * 4
    x[0, 0, :41] = np.linspace(-100, 100, 41)
    x = x.astype(dtype)
    got = _run(_gated_activation_module(width, dtype, activation), x).astype(np.float64)
    gate, up = np.split(x.astype(np.float64), 2, axis=-1)
    sigmoid = 1 / (1 + np.exp(-gate))
    want = (gate * sigmoid if activation == "silu" else sigmoid) * up
    # float32: a few roundings; float16: its own rounding of the activation and of the
    # product. Past the clamps, sigmoid is below 1e-38 instead of smaller still.
    rtol = 4e-6 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)


def test_compiled_artifact_records_its_schedules(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    runner = ModelRunner.from_checkpoint(folder)
    assert runner.artifact.schedule_set == artifact.CPU_SCHEDULE_SET
    # Editing the schedules must invalidate the disk cache, like editing the model.
    assert "cpu_schedules.py" in artifact.MODEL_SOURCES


def test_thread_pool_follows_the_machine():
    # TVM alone would use half the CPUs on x86 (one on a 2-vCPU machine). The CPU count is
    # read first: a one-thread pool pins the main thread, which shrinks the affinity.
    # Importing the model changes nothing; compiling or building a runner sizes the pool.
    code = ("import os; cpus = len(os.sched_getaffinity(0)); "
            "import olmo_model.compiler, olmo_model.runtime; "
            "assert 'TVM_NUM_THREADS' not in os.environ, 'set at import'; "
            "from olmo_model.threads import use_every_cpu; use_every_cpu(); import tvm; "
            "assert tvm.runtime.num_threads() == cpus, (tvm.runtime.num_threads(), cpus)")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.mark.parametrize(("h_q", "h_kv"), [(4, 4), (8, 2)])
def test_paged_decode_attention_matches_reference(h_q, h_kv):
    # Three sequences over shuffled pages: a single key, exactly one full page, and
    # two full pages plus five keys on a third.
    d, page_size, lengths = 32, 16, [1, 16, 37]
    rng = np.random.default_rng(4)
    page_counts = [-(-n // page_size) for n in lengths]
    order = rng.permutation(sum(page_counts) + 2).astype(np.int32)  # two pages unused
    indptr = np.concatenate([[0], np.cumsum(page_counts)]).astype(np.int32)
    last_len = np.array([n - (c - 1) * page_size for n, c in zip(lengths, page_counts)],
                        np.int32)
    pages = rng.standard_normal((len(order), 2, h_kv, page_size, d), dtype=np.float32)
    q = rng.standard_normal((len(lengths), h_q, d), dtype=np.float32)
    kernel = tvm.compile(tvm.IRModule({"main": paged_decode_attention(h_kv, h_q, d, page_size,
                                                                        "float32")}), TARGET)
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    zeros = tvm.runtime.tensor(np.zeros(len(lengths), np.int32))
    args = [tvm.runtime.tensor(a) for a in (q, pages, indptr, order, last_len)]
    kernel["main"](*args, zeros, zeros, out, lse, 0, 1.0, 1e4, d**-0.5)
    # The same attention on each sequence's keys gathered contiguously.
    for b, n in enumerate(lengths):
        seq_pages = order[indptr[b]:indptr[b + 1]]
        k = pages[seq_pages, 0].transpose(1, 0, 2, 3).reshape(h_kv, -1, d)[:, :n]
        v = pages[seq_pages, 1].transpose(1, 0, 2, 3).reshape(h_kv, -1, d)[:, :n]
        expected_out, expected_lse = _reference_attention(
            q[b:b + 1], k.transpose(1, 0, 2), v.transpose(1, 0, 2), [0, 1], [0, n], causal=0)
        np.testing.assert_allclose(out.numpy()[b], expected_out[0], atol=1e-5)
        np.testing.assert_allclose(lse.numpy()[b], expected_lse[0], atol=1e-5)


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize(("h_q", "h_kv"), [(4, 4), (8, 2)])
def test_paged_prefill_attention_matches_reference(causal, h_q, h_kv):
    # New tokens over cached pages: one token over one key, seven over exactly two pages,
    # three over two pages and five keys, and a sequence without pages.
    d, page_size, lengths, new = 32, 16, [1, 32, 37, 0], [1, 7, 3, 2]
    rng = np.random.default_rng(5)
    page_counts = [-(-n // page_size) for n in lengths]
    order = rng.permutation(sum(page_counts) + 2).astype(np.int32)  # two pages unused
    indptr = np.concatenate([[0], np.cumsum(page_counts)]).astype(np.int32)
    last_len = np.array([n - (c - 1) * page_size if c else 0
                         for n, c in zip(lengths, page_counts)], np.int32)
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    pages = rng.standard_normal((len(order), 2, h_kv, page_size, d), dtype=np.float32)
    q = rng.standard_normal((q_indptr[-1], h_q, d), dtype=np.float32)
    kernel = tvm.compile(tvm.IRModule({"main": paged_prefill_attention(h_kv, h_q, d, page_size,
                                                                         "float32")}), TARGET)
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    args = [tvm.runtime.tensor(a) for a in (q, q_indptr, pages, indptr, order, last_len,
                                            np.zeros(len(new), np.int32),
                                            np.zeros(q.shape[0], np.int32))]
    kernel["main"](*args, out, lse, causal, 0, 1.0, 1e4, d**-0.5)
    for b, n in enumerate(lengths):
        rows = slice(q_indptr[b], q_indptr[b + 1])
        if n == 0:  # nothing to attend to: no weight in the merge with the new tokens
            assert (out.numpy()[rows] == 0).all() and (lse.numpy()[rows] < -1e4).all()
            continue
        seq_pages = order[indptr[b]:indptr[b + 1]]
        k = pages[seq_pages, 0].transpose(1, 0, 2, 3).reshape(h_kv, -1, d)[:, :n]
        v = pages[seq_pages, 1].transpose(1, 0, 2, 3).reshape(h_kv, -1, d)[:, :n]
        expected_out, expected_lse = _reference_attention(
            q[rows], k.transpose(1, 0, 2), v.transpose(1, 0, 2), [0, new[b]], [0, n], causal)
        np.testing.assert_allclose(out.numpy()[rows], expected_out, atol=1e-5)
        np.testing.assert_allclose(lse.numpy()[rows], expected_lse, atol=1e-5)
