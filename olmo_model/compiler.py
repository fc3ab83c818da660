"""Compile an OLMo stage module with ``tvm.compile`` into the on-disk cache (artifact.py).

A restart with the same key (see ``artifact.artifact_folder``) loads the ``.so`` instead
of recompiling.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from .artifact import (
    CompiledModel,
    artifact,
    artifact_folder,
    load_cached,
    schedule_set,
    target_description,
)
from .config import OLMoConfig
from .cpu_schedules import cpu_pipeline
from .model import OLMoForCausalLM
from .quantization import MODEL_DTYPES, activation_dtype, weight_format
from .quantized_kernels import integer_dot_isa
from .quantized_layers import Quantization
from .stages import StageSpec
from .threads import use_every_cpu


def resolve_target(target: str | dict[str, Any] = "llvm") -> tvm.target.Target:
    """The TVM Target for ``target`` (see ``artifact.target_description``)."""
    return tvm.target.Target(target_description(target))


def host_llvm_cpu() -> str:
    """LLVM's name for this CPU, downgraded where the hypervisor hides features.

    Virtual machines often report a CPU model (say znver4) whose AVX-512 the guest may not
    use; code built for it dies with SIGILL. Trust /proc/cpuinfo over the model name.
    """
    codegen = tvm.target.codegen
    cpu = codegen.llvm_get_system_cpu()
    flags = _cpu_flags()
    if not flags:
        return cpu
    model = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    for feature, flag in _KERNEL_FEATURES:
        if codegen.llvm_cpu_has_features(feature, model) and flag not in flags:
            if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
                return "x86-64-v4"
            return "x86-64-v3" if {"avx2", "fma", "f16c"} <= flags else "x86-64-v2"
    return cpu


# The LLVM features our kernels are chosen by, and their names in /proc/cpuinfo.
_KERNEL_FEATURES = (("avx512vnni", "avx512_vnni"), ("avx512f", "avx512f"), ("avx2", "avx2"),
                    ("fma", "fma"), ("f16c", "f16c"))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compile_model(
    config: OLMoConfig,
    stage: StageSpec | None = None,
    dtype: str = "float32",
    target: str | dict[str, Any] = "llvm",
    cache_dir: Path | None = None,
    log: Any = None,
) -> CompiledModel:
    """Compile (or load from the disk cache) one stage of the model."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {MODEL_DTYPES}")
    stage = stage or StageSpec.full(config.num_hidden_layers)
    description = target_description(target)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    use_every_cpu()  # compiling may run kernels (constant folding): size the pool first
    folder = artifact_folder(config, stage, dtype, description, cache_dir)
    cached = load_cached(folder, config, stage, dtype)
    if cached is not None:
        return cached
    with _compiling(folder):
        # Another process may have compiled it while this one waited for the lock.
        return (load_cached(folder, config, stage, dtype)
                or _compile(config, stage, dtype, description, folder, log))


def _compile(config: OLMoConfig, stage: StageSpec, dtype: str, description: dict[str, Any],
             folder: Path, log: Any) -> CompiledModel:
    tvm_target = tvm.target.Target(description)
    lib_path, meta_path = folder / "model.so", folder / "meta.json"
    log(f"compiling OLMo layers [{stage.layer_begin}, {stage.layer_end}) for "
        f"{tvm_target.kind.name} ({dtype}) ...")
    start = time.perf_counter()
    fmt = weight_format(dtype)
    quant = Quantization(fmt, integer_dot_isa(tvm_target)) if fmt else None
    model = OLMoForCausalLM(config, stage, quant)
    model.to(activation_dtype(dtype))
    model.target = tvm_target
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    recipe = kv_cache_recipe(mod["create_paged_kv_cache"])
    log(f"  exported Relax module in {time.perf_counter() - start:.1f}s; building ...")
    with tvm_target:
        executable = tvm.compile(mod, tvm_target,
                                 relax_pipeline=_relax_pipeline(tvm_target, config))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"model.{os.getpid()}.so"
    executable.export_library(str(tmp))
    tmp.replace(lib_path)  # atomic, so a concurrent reader never loads half a library
    seconds = time.perf_counter() - start
    meta = {
        "target": str(tvm_target),
        "target_kind": tvm_target.kind.name,
        "param_names": [name for name, _ in named_params],
        "param_shapes": [[int(d) for d in p.shape] for _, p in named_params],
        "kv_cache_recipe": recipe,
        "compile_seconds": seconds,
        "schedule_set": schedule_set(description),
    }
    # Written last and atomically: a reader that sees meta.json finds a whole library.
    tmp_meta = folder / f"meta.{os.getpid()}.json"
    tmp_meta.write_text(json.dumps(meta))
    tmp_meta.replace(meta_path)
    log(f"  compiled in {seconds:.1f}s -> {lib_path}")
    return artifact(lib_path, config, stage, dtype, meta, from_cache=False)


# How long a process waits for another that is compiling the same library (a big model's
# CUDA build takes minutes) before it compiles the library itself.
COMPILE_LOCK_WAIT_S = 1800.0


@contextlib.contextmanager
def _compiling(folder: Path) -> Iterator[None]:
    """Held while ``folder``'s library compiles: workers started together on one machine
    (Ray actors, ``artifact.compile_side_by_side``' processes) compile each library once. The kernel
    frees the lock of a process that dies."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "a") as lock:
        deadline = time.monotonic() + COMPILE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        yield


def _relax_pipeline(target: tvm.target.Target, config: OLMoConfig) -> tvm.transform.Pass:
    if target.kind.name == "llvm":
        # TVM's default CPU code is scalar and single-threaded; see cpu_schedules.py.
        return cpu_pipeline(target, config)
    # nn.Linear transposes its weight on every call unless this pass folds the transpose
    # into the matmul (8x on decode, measured on the CPU).
    return tvm.transform.Sequential(
        [relax.transform.FuseTransposeMatmul(), _cuda_pipeline(target)]
    )


def _cuda_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CUDA pipeline, with matmuls scheduled for CUDA cores, not tensor cores.

    TVM 0.27's tensor-core matmul schedule crashes the process (a segfault in
    ``Tensorize`` while it reports a mismatch) on OLMo-1B's fp16 matmuls, for sm_80 and
    sm_90 alike; its tiny-model matmuls never reach it. dlight skips the tensor-core path
    for functions marked ``dlight.do_not_tensorize``.
    """
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    class MatmulOnCudaCores(dl.gpu.Matmul):
        def apply(self, func, target, tunable):
            if isinstance(func, tvm.tirx.PrimFunc):
                func = func.with_attr("dlight.do_not_tensorize", True)
            return super().apply(func, target, tunable)

    legalize = cuda.legalize_passes(target)[:-1]  # TVM's, less its dlight schedule
    schedule = dl.ApplyDefaultSchedule(MatmulOnCudaCores(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                cuda.library_dispatch_passes(target) + legalize + [schedule]
                + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))(mod)

    return pipeline


def kv_cache_recipe(create_fn: relax.Function) -> list[Any]:
    """Describe the arguments the compiled create_paged_kv_cache passes to the runtime.

    Kernels become ``{"kernel": symbol}``, symbolic sizes ``{"var": name}``; the runtime
    replays this list to build the same cache from Python with one kernel wrapped.
    """
    bindings = {b.var: b.value for block in create_fn.body.blocks for b in block.bindings}
    for value in bindings.values():
        if (isinstance(value, relax.Call) and value.args
                and isinstance(value.args[0], relax.ExternFunc)
                and value.args[0].global_symbol == "vm.builtin.paged_attention_kv_cache_create"):
            return [_describe(arg, bindings) for arg in value.args[1:]]
    raise RuntimeError("create_paged_kv_cache does not call "
                       "vm.builtin.paged_attention_kv_cache_create")


def _describe(expr: Any, bindings: dict[Any, Any]) -> Any:
    if isinstance(expr, relax.Var) and expr in bindings:
        return _describe(bindings[expr], bindings)
    if isinstance(expr, tvm.ir.GlobalVar):
        return {"kernel": expr.name_hint}
    if isinstance(expr, relax.ShapeExpr):
        return {"shape": [_describe_dim(d) for d in expr.values]}
    if isinstance(expr, relax.Tuple):
        return {"tuple": [_describe(f, bindings) for f in expr.fields]}
    if isinstance(expr, tvm.ir.StringImm):
        return {"str": expr.value}
    if isinstance(expr, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        return {"prim": expr.value, "dtype": str(expr.ty)}
    if isinstance(expr, relax.Call) and expr.op.name == "relax.zeros":
        return {"zeros": str(expr.attrs.dtype)}
    raise TypeError(f"unexpected argument in create_paged_kv_cache: {expr}")


def _describe_dim(dim: Any) -> Any:
    return {"var": dim.name} if isinstance(dim, tvm.tirx.Var) else int(dim)
