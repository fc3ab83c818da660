"""The CUDA library builds on a machine without a GPU (running it needs one)."""

from __future__ import annotations

import shutil

import pytest
from conftest import OLMO3_TINY

from olmo_model.artifact import Library, compile_side_by_side
from olmo_model.compiler import compile_model
from olmo_model.config import OLMoConfig
from olmo_model.stages import StageSpec

BUILDS = [("olmo", "float32"), ("olmo", "q4f16"), ("olmo3", "float16")]


def config_of(checkpoint_factory, family: str) -> OLMoConfig:
    return OLMoConfig.from_file(checkpoint_factory(**(OLMO3_TINY if family == "olmo3" else {}))[0])


@pytest.fixture(scope="module")
def cuda_cache(tmp_path_factory, checkpoint_factory):
    """Every build, side by side (one per CPU), in a cache of the module's own."""
    cache = tmp_path_factory.mktemp("cuda")
    configs = [(config_of(checkpoint_factory, family), dtype) for family, dtype in BUILDS]
    compile_side_by_side([Library(c, StageSpec.full(c.num_hidden_layers), dtype)
                          for c, dtype in configs], target="cuda", cache_dir=cache)
    return cache


@pytest.mark.skipif(shutil.which("nvcc") is None,
                    reason="nvcc (the CUDA toolkit) is not installed, so CUDA code cannot be built")
@pytest.mark.parametrize("family, dtype", BUILDS)
def test_cuda_sm90_library_builds(cuda_cache, checkpoint_factory, family, dtype):
    # q4f16 on CUDA: TVM's own schedules over the dequantize + matmul (no AVX2 kernels).
    # OLMo-3: RoPE tables and rotation in the model, TVM's GPU sliding-window kernels.
    artifact = compile_model(config_of(checkpoint_factory, family), dtype=dtype,
                             target="cuda", cache_dir=cuda_cache)
    assert artifact.library_path.stat().st_size > 0
    assert artifact.target_kind == "cuda"
    kernels = {item["kernel"] for item in artifact.kv_cache_recipe
               if isinstance(item, dict) and "kernel" in item}
    assert "tir_kv_cache_debug_get_kv" in kernels
