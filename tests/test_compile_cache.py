"""Compiled libraries are cached on disk so that a restart does not recompile."""

from __future__ import annotations

import time

from olmo_model.compiler import compile_model
from olmo_model.config import OLMoConfig
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

    # A different stage, dtype or config is a different library.
    stage = compile_model(config, StageSpec.of(2, 2, 1), cache_dir=tmp_path, log=messages.append)
    assert stage.library_path != first.library_path
    assert "model.embed_tokens.weight" not in stage.param_names
