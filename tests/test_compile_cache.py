"""Compiled libraries are cached on disk so that a restart does not recompile."""

from __future__ import annotations

import dataclasses
import time

import pytest

from olmo_model.artifact import (
    Library,
    artifact_folder,
    compile_side_by_side,
    target_description,
)
from olmo_model.compiler import compile_model
from olmo_model.config import OLMoConfig
from olmo_model.stages import StageSpec


def test_stages_compile_side_by_side_once_and_a_second_compile_loads_them(tmp_path, capfd,
                                                                          tiny_checkpoint):
    """The two stages of a split compile at the same time (one in this process, one in a
    process of its own), a stage asked for twice once; compiling again loads the cached
    library."""
    folder, _ = tiny_checkpoint
    config = OLMoConfig.from_file(folder)
    stages = [StageSpec.of(config.num_hidden_layers, 2, s) for s in range(2)]
    compile_side_by_side([Library(config, stage) for stage in [*stages, *stages]],
                         cache_dir=tmp_path)
    assert capfd.readouterr().err.count("compiled in") == 2  # the other process's too

    start = time.perf_counter()
    again = compile_model(config, stages[1], cache_dir=tmp_path, log=pytest.fail)
    assert again.from_cache and again.library_path.is_file()
    assert time.perf_counter() - start < 1.0

    # A different stage, dtype, config or target is a different library (folders named
    # without compiling: test_stages_and_kv_transfer compiles and runs stages); the same
    # layers in another split are the same library.
    def folder(stage=stages[1], dtype="float32", cfg=config, target="llvm"):
        return artifact_folder(cfg, stage, dtype, target_description(target), tmp_path)

    assert folder() == again.library_path.parent
    others = [folder(stage=StageSpec.full(2)), folder(dtype="float16"),
              folder(cfg=dataclasses.replace(config, clip_qkv=8.0)), folder(target="cuda")]
    assert len({folder(), *others}) == 5
    assert folder(stage=StageSpec(1, 3, 1, 2, 2)) == folder()
