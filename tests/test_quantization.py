"""Group-quantized weights (q4f16, q8f16): the format, the kernels, the model, serving."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from conftest import greedy_outputs, local_cluster, reference_logits
from safetensors.numpy import load_file, save_file

from olmo_model import loader
from olmo_model.cache_limits import CacheLimits
from olmo_model.compiler import resolve_target
from olmo_model.demo import DEMO_MODEL_DIR
from olmo_model.loader import load_stage_params
from olmo_model.quantization import FORMATS, MODEL_DTYPES, TILE_ROWS, dequantize, quantize
from olmo_model.quantized_kernels import (
    AVX2,
    AVX512_VNNI,
    INSTRUCTION_SETS,
    integer_dot_isa,
    quantized_matmul,
)
from olmo_model.runtime import ModelRunner
from olmo_model.stages import StageSpec
from protos import worker_pb2
from protos.vocabulary import Mode
from router.options import RouterOptions

FORMAT_NAMES = list(FORMATS)
# Logits against transformers on the same (dequantized) weights, relative to the largest:
# float16 activations (float16 weights alone give 1e-3 here), and on x86 every matmul
# quantizes its rows of activations to int8 per group of 32, as llama.cpp's dot products
# do: 1.5-5.2% over a q8 prompt and 16 decode steps on this small random model (where
# float16 gives 0.1-0.4% and float32 agrees to 1e-4), moving by a point or so with any
# change in how the float parts round.
LOGIT_RTOL = 7e-2


# --- the format, against a reference written group by group -----------------------------


def reference_quantize(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain ``[out, in]`` codes and ``[out, in / 32]`` float16 scales, one group at a time."""
    out_features, in_features = weight.shape
    codes = np.zeros(weight.shape, np.int32)
    scales = np.zeros((out_features, in_features // 32), np.float16)
    for row in range(out_features):
        for g in range(in_features // 32):
            group = weight[row, g * 32:(g + 1) * 32].astype(np.float32)
            if bits == 4:
                extreme = group[np.argmax(np.abs(group))]
                scale = np.float16(extreme / -8.0)
                inv = 1.0 / np.float32(scale) if scale != 0 else 0.0
                codes[row, g * 32:(g + 1) * 32] = np.clip(np.round(group * inv) + 8, 0, 15)
            else:
                scale = np.float16(np.abs(group).max() / 127.0)
                inv = 1.0 / np.float32(scale) if scale != 0 else 0.0
                codes[row, g * 32:(g + 1) * 32] = np.clip(np.round(group * inv), -127, 127)
            scales[row, g] = scale
    return codes, scales


def reference_dequantize(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    values = codes.astype(np.float32) - (8 if bits == 4 else 0)
    return values * np.repeat(scales.astype(np.float32), 32, axis=1)


def awkward_weight(out_features: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Random weights with the groups that go wrong first: a zero group, a group whose
    largest weight is positive (a negative q4 scale), one whose largest is negative, and
    a largest value at a group's last position."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    w[0, :32] = 0.0
    w[1, 32:64] = np.linspace(-1, 3, 32)  # positive extreme, at the group's end
    w[2, :32] = np.linspace(-5, 1, 32)  # negative extreme, at the group's start
    return w


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_quantize_matches_a_group_by_group_reference(name):
    fmt = FORMATS[name]
    w = awkward_weight(2 * TILE_ROWS, 96)  # two tiles of rows, three groups
    stored, scale = quantize(w, fmt)
    assert stored.shape == fmt.weight_shape(*w.shape) and stored.dtype == np.dtype(fmt.storage)
    assert scale.shape == fmt.scale_shape(*w.shape) and scale.dtype == np.float16
    codes, scales = reference_quantize(w, fmt.bits)
    expected = reference_dequantize(codes, scales, fmt.bits)
    np.testing.assert_array_equal(dequantize(stored, scale, fmt), expected)
    if fmt.bits == 4:
        assert np.float16(scales[1, 1]) < 0 < np.float16(scales[2, 0])
        # The largest-magnitude weight of a group comes back exactly (as float16 allows).
        assert expected[2, 0] == pytest.approx(-5.0, rel=1e-3)
    assert not expected[0, :32].any()
    # Rounding error of at most half a step per weight; in 4-bit, a weight near minus
    # the group's extreme is clipped to 7 steps (q4 spans -8..7), a step away at most.
    steps = np.repeat(np.abs(scales.astype(np.float32)), 32, axis=1)
    bound = (1.0 if fmt.bits == 4 else 0.5) * steps + 1e-3 * np.abs(w)
    assert (np.abs(expected - w) <= bound).all()


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_quantizing_dequantized_weights_is_exact(name):
    # What lets the model tests use transformers on dequantized weights as the reference.
    fmt = FORMATS[name]
    stored, scale = quantize(awkward_weight(TILE_ROWS, 128, seed=1), fmt)
    again = quantize(dequantize(stored, scale, fmt), fmt)
    np.testing.assert_array_equal(again[0], stored)
    np.testing.assert_array_equal(again[1], scale)


@pytest.mark.parametrize("shape", [(TILE_ROWS - 2, 64), (TILE_ROWS, 48)])
def test_shapes_the_layout_cannot_hold_are_refused(shape):
    with pytest.raises(ValueError, match="multiple of"):
        quantize(np.zeros(shape, np.float32), FORMATS["q4f16"])


def test_quantized_weights_are_kept_for_the_next_load(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("OLMO_CACHE_DIR", str(tmp_path))
    folder, _ = tiny_checkpoint  # 2 layers, hidden 64, intermediate 96
    fmt = FORMATS["q8f16"]
    names = ["model.layers.0.mlp.down_proj.q_weight", "model.layers.0.mlp.down_proj.q_scale"]
    shapes = [fmt.weight_shape(64, 96), fmt.scale_shape(64, 96)]
    first = load_stage_params(folder, names, shapes, StageSpec.full(2), False, "q8f16")

    def no_quantizing(*_):
        raise AssertionError("quantized again")

    monkeypatch.setattr(loader, "quantize", no_quantizing)
    again = load_stage_params(folder, names, shapes, StageSpec.full(2), False, "q8f16")
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # The second stage names its layer 1 "layers.0" too: it has an entry of its own.
    with pytest.raises(AssertionError, match="quantized again"):
        load_stage_params(folder, names, shapes, StageSpec.of(2, 2, 1), False, "q8f16")


# --- the integer-dot kernel, against numpy doing the same integer arithmetic ----------


def emulate_quantized_matmul(x: np.ndarray, stored: np.ndarray, scale: np.ndarray,
                             bits: int) -> np.ndarray:
    """What ``quantized_matmul`` computes: x to int8 per group of 32, exact integer dots
    per group, then weight scale x activation scale in float32."""
    m, k = x.shape
    groups = x.astype(np.float32).reshape(m, k // 32, 32)
    peak = np.abs(groups).max(axis=-1)
    x_scale = (peak / np.float32(127)).astype(np.float32)
    inv = np.where(peak > 0, np.float32(127) / np.where(peak > 0, peak, 1), 0).astype(np.float32)
    xq = np.rint(groups * inv[..., None]).astype(np.int64)
    fmt = FORMATS["q4f16" if bits == 4 else "q8f16"]
    codes = np.rint(dequantize(stored, np.ones_like(scale), fmt)).astype(np.int64)
    w_scale = np.swapaxes(scale, 1, 2).reshape(-1, k // 32).astype(np.float32)
    n = codes.shape[0]
    dots = np.einsum("mgi,ngi->mng", xq, codes.reshape(n, k // 32, 32))
    return (dots * w_scale[None] * x_scale[:, None, :]).sum(axis=-1)


def host_runs(isa: str) -> bool:
    """Whether this machine's CPU runs ``quantized_matmul`` built for ``isa``."""
    best = integer_dot_isa(resolve_target("llvm"))
    return best is not None and INSTRUCTION_SETS.index(best) <= INSTRUCTION_SETS.index(isa)


@pytest.mark.parametrize("isa", INSTRUCTION_SETS)
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_quantized_matmul_kernel_equals_its_integer_arithmetic(name, isa):
    # Both instruction sets wherever the CPU runs them (an AVX-512 VNNI CPU runs the
    # AVX2 kernel too), so the one a CPU without VNNI takes is checked here as well.
    if not host_runs(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernel (see the test that builds it)")
    fmt = FORMATS[name]
    n, k = TILE_ROWS * 9, 256
    rng = np.random.default_rng(2)
    stored, scale = quantize(awkward_weight(n, k, seed=3), fmt)
    lib = tvm.compile(tvm.IRModule({"main": quantized_matmul(fmt, n, k, "float16", "float32", isa)
                                    .with_attr("global_symbol", "main")}),
                      target=resolve_target("llvm"))
    dev = tvm.cpu()
    for m in (1, 9, 15):  # one row; blocks of ROW_BLOCK rows with pairs and singles left
        x = rng.standard_normal((m, k)).astype(np.float16)
        x[0, :32] = 0  # an all-zero activation group
        x[-1, 32:64] = -x[-1, 32:64].max()  # a group whose peak is negative: int8 -127
        out = tvm.runtime.empty((m, n), "float32", dev)
        lib(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(stored, dev),
            tvm.runtime.tensor(scale, dev), out)
        expected = emulate_quantized_matmul(x, stored, scale, fmt.bits)
        # Same integers, so only the float32 order of additions differs.
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_each_instruction_set_builds_for_a_cpu_that_has_it(name):
    # A CPU without AVX-512 cannot run the VNNI kernel, but it can still build it: the
    # instructions each kernel is made of are there, whatever this machine runs.
    fmt = FORMATS[name]
    for isa, mcpu, instruction in ((AVX512_VNNI, "znver4", "vpdpbusd"),
                                   (AVX2, "haswell", "vpmaddubsw")):
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        assert integer_dot_isa(target) == isa
        lib = tvm.compile(tvm.IRModule({"main": quantized_matmul(fmt, 64, 128, "float16",
                                                                 "float16", isa)
                                        .with_attr("global_symbol", "main")}), target=target)
        assert instruction in lib.mod.inspect_source("asm")


# --- the compiled model, against transformers on the same weights ----------------------

@pytest.fixture(scope="module", params=FORMAT_NAMES)
def quantized(request, tiny_checkpoint, tmp_path_factory):
    """(runner in the format, transformers on the dequantized weights): q4 on the demo
    model (tied embeddings; the serving test below compiles the same library), q8 on the
    tiny checkpoint (an untied LM head)."""
    fmt = FORMATS[request.param]
    folder = DEMO_MODEL_DIR if request.param == "q4f16" else tiny_checkpoint[0]
    dequantized = tmp_path_factory.mktemp(f"dequantized-{request.param}")
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (dequantized / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({name: (dequantize(*quantize(t, fmt), fmt) if t.ndim == 2 else t)
               for name, t in tensors.items()}, str(dequantized / "model.safetensors"))
    import transformers

    reference = transformers.OlmoForCausalLM.from_pretrained(dequantized).eval()
    return ModelRunner.from_checkpoint(dequantized, dtype=request.param), reference


def test_quantized_embedding_rows_are_the_dequantized_table(quantized):
    # With tied embeddings (the demo model, in q4) this table is also the LM head.
    runner, reference = quantized
    ids = np.array([0, 1, 7, 8, 319])
    table = reference.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(runner.embed(ids).numpy(), table[ids].astype(np.float16))


def test_quantized_prefill_and_decode_follow_the_reference(quantized):
    runner, reference = quantized
    assert runner.dtype == "float16" and runner.artifact.dtype in FORMATS
    prompt = list(range(20, 80))  # past the row count where prefill matmuls switch kernels
    free = runner.available_pages()
    runner.add_sequence(0)
    try:
        hidden = runner.forward([0], [len(prompt)], runner.embed(np.array(prompt)))
        logits = runner.logits(hidden)
        ref = reference_logits(reference, prompt)
        assert np.abs(logits - ref).max() / np.abs(ref).max() < LOGIT_RTOL
        tokens, generated = list(prompt), []
        token = int(np.argmax(logits[-1]))
        for _ in range(16):
            generated.append(token)
            step = runner.decode([0], [token])[0]
            ref = reference_logits(reference, tokens + generated)[-1]
            assert np.abs(step - ref).max() / np.abs(ref).max() < LOGIT_RTOL
            token = int(np.argmax(step))
            # Greedy agrees with the reference but for near-ties within that tolerance.
            assert ref[token] >= ref.max() - 2 * LOGIT_RTOL * np.abs(ref).max()
    finally:
        runner.remove_sequence(0)
    assert runner.available_pages() == free


def test_weight_format_is_part_of_the_fingerprint(quantized):
    # Prefill and decode workers exchange KV only between equal fingerprints: a q4 and a
    # float16 instance of one checkpoint (both with float16 KV) must never pair.
    runner, _ = quantized
    others = {dataclasses.replace(runner.artifact, dtype=d).fingerprint
              for d in MODEL_DTYPES if d != runner.artifact.dtype}
    assert runner.artifact.fingerprint not in others and len(others) == len(MODEL_DTYPES) - 1


# --- serving in q4: disaggregated equals aggregated -------------------------------------

LIMITS = CacheLimits(max_sequences=8, max_total_tokens=2048, prefill_chunk_tokens=512)
PROMPTS = ["The Python interpreter", "Once upon a time", "def main():\n    return"]


def test_q4_disaggregated_greedy_equals_aggregated():
    # Every prompt takes the prefill worker and a KV push (no local prefill).
    disaggregated = local_cluster(DEMO_MODEL_DIR, dtype="q4f16", cache=LIMITS,
                                  router=RouterOptions(local_prefill_below_tokens=0))
    try:
        split = greedy_outputs(disaggregated, PROMPTS, 24)
        decode = disaggregated.router.scheduler.workers("decode")[0]
        pushes = decode.stub.Stats(worker_pb2.StatsRequest(), timeout=5).pushes
    finally:
        disaggregated.stop()
    aggregated = local_cluster(DEMO_MODEL_DIR, dtype="q4f16", mode=Mode.AGGREGATED, cache=LIMITS)
    try:
        together = greedy_outputs(aggregated, PROMPTS, 24)
    finally:
        aggregated.stop()
    assert all(len(ids) == 24 for ids in split)
    assert split == together
    assert pushes >= len(PROMPTS)

