"""A compiled stage on disk: where it lives in the cache, what it records, and loading it.

Nothing here needs TVM's compiler: a process that only runs models (``TVM_USE_RUNTIME_LIB=1``,
the GPU machine of ``bench/gpu_bundle.py``) finds and loads libraries compiled elsewhere.
The cache key covers everything that changes the generated code: the config, the stage's
layer range, the target, the dtype, the TVM version and this package's model source.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tvm

from .config import OLMoConfig
from .quantized_cache import cache_root
from .stages import StageSpec

MODEL_SOURCES = ("model.py", "compiler.py", "cpu_schedules.py", "cpu_attention.py",
                 "cpu_activations.py", "cpu_rope.py", "vector_math.py", "quantization.py",
                 "quantized_kernels.py", "quantized_layers.py")
# Our hand-written CPU schedules (cpu_schedules.py), by version: recorded in the cache key
# and the artifact; bump on any schedule change.
CPU_SCHEDULE_SET = "olmo-cpu-v5"
# Limits every CUDA GPU since Volta meets, so that no GPU is needed to build.
CUDA_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
               "thread_warp_size": 32}


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
    schedule_set: str = "default"  # which CPU schedules (CPU_SCHEDULE_SET) it carries

    @property
    def fingerprint(self) -> str:
        """Identifies the model layout two workers must share to exchange KV pages."""
        return digest({"config": self.config.fingerprint_fields(), "dtype": self.dtype})


def default_cache_dir() -> Path:
    return cache_root() / "compiled"


def target_description(target: str | dict[str, Any] = "llvm") -> dict[str, Any]:
    """The TVM target as plain data. ``llvm`` means this host's CPU (its exact
    micro-architecture: finding it needs TVM's compiler); ``cuda`` means sm_90,
    ``cuda:sm_XX`` another architecture; a dict is taken as it is, for full control."""
    if isinstance(target, dict):
        return dict(target)
    if target == "llvm":
        from .compiler import host_llvm_cpu

        return {"kind": "llvm", "mcpu": host_llvm_cpu(), "num-cores": os.cpu_count() or 1}
    if target == "cuda" or target.startswith("cuda:sm_"):
        arch = target.split(":", 1)[1] if ":" in target else "sm_90"
        return {"kind": "cuda", "arch": arch, **CUDA_LIMITS}
    raise ValueError(f"unknown target {target!r}: use 'llvm', 'cuda', 'cuda:sm_XX' or a dict")


def schedule_set(description: dict[str, Any]) -> str:
    """Which hand-written schedules a library for this target carries ("default": TVM's)."""
    return CPU_SCHEDULE_SET if description["kind"] == "llvm" else "default"


def artifact_folder(config: OLMoConfig, stage: StageSpec, dtype: str,
                    description: dict[str, Any], cache_dir: Path | None = None) -> Path:
    key = digest({
        "config": config.fingerprint_fields(),
        # A library is its layer range: the same range in other layouts loads it too.
        "layers": [stage.layer_begin, stage.layer_end, stage.num_layers],
        "dtype": dtype,
        "target": description,
        "tvm": tvm.__version__,
        "source": source_digest(),
        "schedule_set": schedule_set(description),
    })
    return (cache_dir or default_cache_dir()) / key


def load_cached(folder: Path, config: OLMoConfig, stage: StageSpec, dtype: str
                ) -> CompiledModel | None:
    """The artifact in ``folder``, or None if it holds no whole one (meta.json is written
    last, so a folder with it holds a whole library)."""
    meta_path, lib_path = folder / "meta.json", folder / "model.so"
    if not (meta_path.is_file() and lib_path.is_file()):
        return None
    return artifact(lib_path, config, stage, dtype, json.loads(meta_path.read_text()),
                    from_cache=True)


def load_or_compile(config: OLMoConfig, stage: StageSpec | None = None, dtype: str = "float32",
                    target: str | dict[str, Any] = "llvm", cache_dir: Path | None = None,
                    **compile_kwargs) -> CompiledModel:
    """The cached library if there is one (only TVM's runtime needed), else compile it."""
    stage = stage or StageSpec.full(config.num_hidden_layers)
    folder = artifact_folder(config, stage, dtype, target_description(target), cache_dir)
    cached = load_cached(folder, config, stage, dtype)
    if cached is not None:
        return cached
    from .compiler import compile_model

    return compile_model(config, stage, dtype, target, cache_dir, **compile_kwargs)


@dataclasses.dataclass(frozen=True)
class Library:
    """One library to compile: a model's layer range, in a weight format."""

    config: OLMoConfig
    stage: StageSpec
    dtype: str = "float32"


def compile_stages(config: OLMoConfig, stages: Sequence[StageSpec], dtype: str = "float32",
                   target: str | dict[str, Any] = "llvm", cache_dir: Path | None = None
                   ) -> None:
    """The libraries of ``stages`` in the cache (``compile_side_by_side``): an instance of
    several stages (and instances of several stage counts) would otherwise compile one
    library after another at start."""
    compile_side_by_side([Library(config, stage, dtype) for stage in stages], target,
                         cache_dir)


def compile_side_by_side(libraries: Sequence[Library], target: str | dict[str, Any] = "llvm",
                         cache_dir: Path | None = None) -> None:
    """Put every one of ``libraries`` in the cache, compiling the missing ones side by side,
    as many at once as there are CPUs: here, and in processes of their own."""
    description = target_description(target)
    by_folder = {artifact_folder(lib.config, lib.stage, lib.dtype, description, cache_dir): lib
                 for lib in libraries}
    missing = collections.deque(
        lib for folder, lib in by_folder.items()
        if load_cached(folder, lib.config, lib.stage, lib.dtype) is None)
    if not missing:
        return
    from .compiler import compile_model

    def next_library() -> Library | None:
        try:
            return missing.popleft()
        except IndexError:
            return None

    def compile_apart() -> None:
        # Processes of their own rather than multiprocessing's, which would import the
        # caller's main module again: a script that starts a cluster need not guard it.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
            str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
        while (lib := next_library()) is not None:
            job = pickle.dumps((lib.config, lib.stage, lib.dtype, target, cache_dir))
            done = subprocess.run([sys.executable, "-c", _COMPILE_JOB], input=job, env=env,
                                  timeout=COMPILE_TIMEOUT_S, check=False)
            if done.returncode:
                raise RuntimeError(f"compiling layers [{lib.stage.layer_begin}, "
                                   f"{lib.stage.layer_end}) ({lib.dtype}) failed (exit "
                                   f"status {done.returncode}; its error is above)")

    helpers = min(len(missing), os.cpu_count() or 1) - 1
    with ThreadPoolExecutor(max(helpers, 1)) as pool:
        apart = [pool.submit(compile_apart) for _ in range(helpers)]
        # This process compiles too, where the kernels it has scheduled are remembered.
        while (lib := next_library()) is not None:
            compile_model(lib.config, lib.stage, lib.dtype, target, cache_dir)
        for result in apart:
            result.result()


# What each process of compile_side_by_side runs: compile_model on the arguments it is sent.
_COMPILE_JOB = ("import pickle, sys; from olmo_model.compiler import compile_model; "
                "compile_model(*pickle.load(sys.stdin.buffer))")
# A compile that runs longer than this has hung (a big model's CUDA build takes minutes).
COMPILE_TIMEOUT_S = 3600.0


def artifact(lib: Path, config: OLMoConfig, stage: StageSpec, dtype: str, meta: dict[str, Any],
             from_cache: bool) -> CompiledModel:
    return CompiledModel(
        library_path=lib, config=config, stage=stage, dtype=dtype, target=meta["target"],
        target_kind=meta["target_kind"], param_names=tuple(meta["param_names"]),
        param_shapes=tuple(tuple(s) for s in meta["param_shapes"]),
        kv_cache_recipe=tuple(meta["kv_cache_recipe"]),
        compile_seconds=meta["compile_seconds"], from_cache=from_cache,
        schedule_set=meta.get("schedule_set", "default"))


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def source_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in MODEL_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()
