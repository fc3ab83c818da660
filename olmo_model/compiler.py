"""Compile an OLMo stage module with ``tvm.compile`` and cache the library on disk.

The cache key covers everything that changes the generated code: the config, the
stage's layer range, the target, the dtype, the TVM version and this package's model
source. A restart with the same key loads the ``.so`` instead of recompiling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from .config import OLMoConfig
from .cpu_schedules import SCHEDULE_SET, cpu_pipeline
from .model import OLMoForCausalLM
from .stages import StageSpec
from .threads import use_every_cpu

SUPPORTED_DTYPES = ("float32", "float16")
_MODEL_SOURCES = ("model.py", "compiler.py", "cpu_schedules.py", "cpu_attention.py")


def default_cache_dir() -> Path:
    root = os.environ.get("OLMO_CACHE_DIR") or Path.home() / ".cache" / "olmo-serve"
    return Path(root) / "compiled"


def resolve_target(target: str | dict[str, Any] = "llvm") -> tvm.target.Target:
    """``llvm`` means this host's CPU (its exact micro-architecture); ``cuda`` means sm_90.

    A dict is passed to TVM unchanged, for full control (``{"kind": "cuda", "arch": "sm_80"}``).
    """
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if target == "llvm":
        cpu = host_llvm_cpu()
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})
    if target == "cuda" or target.startswith("cuda:sm_"):
        arch = target.split(":", 1)[1] if ":" in target else "sm_90"
        # Conservative limits every CUDA GPU since Volta meets, so that no GPU is needed to build.
        return tvm.target.Target({"kind": "cuda", "arch": arch,
                                  "max_shared_memory_per_block": 49152,
                                  "max_threads_per_block": 1024, "thread_warp_size": 32})
    raise ValueError(f"unknown target {target!r}: use 'llvm', 'cuda', 'cuda:sm_XX' or a dict")


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
    for feature in ("avx512f", "avx2", "fma", "f16c"):
        model = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
        implied = codegen.llvm_cpu_has_features(feature, model)
        if implied and feature not in flags:
            return "x86-64-v3" if {"avx2", "fma", "f16c"} <= flags else "x86-64-v2"
    return cpu


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@dataclasses.dataclass(frozen=True)
class CompiledModel:
    """A compiled stage library plus what the runtime needs to drive it."""

    library_path: Path
    config: OLMoConfig
    stage: StageSpec
    dtype: str
    target: str
    target_kind: str  # "llvm" or "cuda": which device runs the library
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    # The argument list of vm.builtin.paged_attention_kv_cache_create, as the compiled
    # create_paged_kv_cache builds it, with kernels named; see kv_pages.py for why.
    kv_cache_recipe: tuple[Any, ...]
    compile_seconds: float
    from_cache: bool
    schedule_set: str = "default"  # which CPU schedules (cpu_schedules.SCHEDULE_SET) it carries

    @property
    def fingerprint(self) -> str:
        """Identifies the model layout two workers must share to exchange KV pages."""
        return _digest({"config": self.config.fingerprint_fields(), "dtype": self.dtype})


def compile_model(
    config: OLMoConfig,
    stage: StageSpec | None = None,
    dtype: str = "float32",
    target: str | dict[str, Any] = "llvm",
    cache_dir: Path | None = None,
    log: Any = None,
) -> CompiledModel:
    """Compile (or load from the disk cache) one stage of the model."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")
    stage = stage or StageSpec.full(config.num_hidden_layers)
    tvm_target = resolve_target(target)
    schedule_set = _schedule_set(tvm_target)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    use_every_cpu()  # compiling may run kernels (constant folding): size the pool first
    key = _digest(
        {
            "config": config.fingerprint_fields(),
            "stage": dataclasses.asdict(stage),
            "dtype": dtype,
            "target": str(tvm_target),
            "tvm": tvm.__version__,
            "source": _source_digest(),
            "schedule_set": schedule_set,
        }
    )
    folder = (cache_dir or default_cache_dir()) / key
    meta_path, lib_path = folder / "meta.json", folder / "model.so"
    if meta_path.is_file() and lib_path.is_file():
        meta = json.loads(meta_path.read_text())
        return _artifact(lib_path, config, stage, dtype, meta, from_cache=True)

    log(f"compiling OLMo layers [{stage.layer_begin}, {stage.layer_end}) for "
        f"{tvm_target.kind.name} ({dtype}) ...")
    start = time.perf_counter()
    model = OLMoForCausalLM(config, stage)
    model.to(dtype)
    model.target = tvm_target
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    recipe = kv_cache_recipe(mod["create_paged_kv_cache"])
    log(f"  exported Relax module in {time.perf_counter() - start:.1f}s; building ...")
    with tvm_target:
        executable = tvm.compile(mod, tvm_target, relax_pipeline=_relax_pipeline(tvm_target))
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
        "schedule_set": schedule_set,
    }
    # Written last and atomically: a reader that sees meta.json finds a whole library.
    tmp_meta = folder / f"meta.{os.getpid()}.json"
    tmp_meta.write_text(json.dumps(meta))
    tmp_meta.replace(meta_path)
    log(f"  compiled in {seconds:.1f}s -> {lib_path}")
    return _artifact(lib_path, config, stage, dtype, meta, from_cache=False)


def _artifact(lib: Path, config: OLMoConfig, stage: StageSpec, dtype: str, meta: dict[str, Any],
              from_cache: bool) -> CompiledModel:
    return CompiledModel(
        library_path=lib,
        config=config,
        stage=stage,
        dtype=dtype,
        target=meta["target"],
        target_kind=meta["target_kind"],
        param_names=tuple(meta["param_names"]),
        param_shapes=tuple(tuple(s) for s in meta["param_shapes"]),
        kv_cache_recipe=tuple(meta["kv_cache_recipe"]),
        compile_seconds=meta["compile_seconds"],
        from_cache=from_cache,
        schedule_set=meta.get("schedule_set", "default"),
    )


def _schedule_set(target: tvm.target.Target) -> str:
    """Which hand-written schedules the library carries ("default" means TVM's own)."""
    return SCHEDULE_SET if target.kind.name == "llvm" else "default"


def _relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    if target.kind.name == "llvm":
        # TVM's default CPU code is scalar and single-threaded; see cpu_schedules.py.
        return cpu_pipeline(target)
    # nn.Linear transposes its weight on every call unless this pass folds the transpose
    # into the matmul (8x on decode, measured on the CPU).
    return tvm.transform.Sequential(
        [relax.transform.FuseTransposeMatmul(), relax.get_default_pipeline(target)]
    )


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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _source_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _MODEL_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()
