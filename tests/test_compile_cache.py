"""Compiled libraries are cached on disk so that a restart does not recompile."""

from __future__ import annotations

import dataclasses
import time

from olmo_model.artifact import (
    artifact_folder,
    compile_stages,
    load_cached,
    target_description,
)
from olmo_model.compiler import compile_model
from olmo_model.config import OLMoConfig
from olmo_model.demo import DEMO_MODEL_DIR
from olmo_model.stages import StageSpec


def test_second_compile_loads_the_cached_library(tmp_path, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    config = OLMoConfig.from_file(folder)
    messages: list[str] = []
    first = compile_model(config, cache_dir=tmp_path, log=messages.append)
    assert not first.from_cache and first.library_path.is_file()
    assert any("compiled in" in m for m in messages)

    start = time.perf_counter()
    again = compile_model(config, cache_dir=tmp_path, log=messages.append)
    assert again.from_cache and again.library_path == first.library_path
    assert time.perf_counter() - start < 1.0

    # A different stage, dtype, config or target is a different library (folders named
    # without compiling: test_stages_and_kv_transfer compiles and runs stages).
    def folder(stage=None, dtype="float32", cfg=config, target="llvm"):
        return artifact_folder(cfg, stage or StageSpec.full(2), dtype,
                               target_description(target), tmp_path)

    assert folder() == first.library_path.parent
    others = [folder(stage=StageSpec.of(2, 2, 1)), folder(dtype="float16"),
              folder(cfg=dataclasses.replace(config, clip_qkv=8.0)), folder(target="cuda")]
    assert len({folder(), *others}) == 5


def test_an_instances_stages_compile_side_by_side_each_once(capfd):
    """Two stages of the demo model (the Ray tests' split: in the shared cache, so they
    are compiled once per session whoever comes first): one compiles in this process,
    the other in a process of its own, at the same time; a stage asked for twice is
    compiled once."""
    config = OLMoConfig.from_file(DEMO_MODEL_DIR)
    stages = [StageSpec.of(config.num_hidden_layers, 2, s) for s in range(2)]
    description = target_description("llvm")

    def cached() -> list[bool]:
        return [load_cached(artifact_folder(config, stage, "float32", description),
                            config, stage, "float32") is not None for stage in stages]

    missing = cached().count(False)
    compile_stages(config, [*stages, *stages])
    assert all(cached())
    assert capfd.readouterr().err.count("compiled in") == missing  # children's too
