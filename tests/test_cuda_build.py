"""The CUDA library builds on a machine without a GPU (running it needs one)."""

from __future__ import annotations

import shutil

import pytest
from conftest import OLMO3_TINY

from olmo_model.compiler import compile_model
from olmo_model.config import OLMoConfig


@pytest.mark.skipif(shutil.which("nvcc") is None,
                    reason="nvcc (the CUDA toolkit) is not installed, so CUDA code cannot be built")
@pytest.mark.parametrize("family, dtype", [("olmo", "float32"), ("olmo", "q4f16"),
                                           ("olmo3", "float16")])
def test_cuda_sm90_library_builds(tmp_path, checkpoint_factory, family, dtype):
    # q4f16 on CUDA: TVM's own schedules over the dequantize + matmul (no AVX2 kernels).
    # OLMo-3: RoPE tables and rotation in the model, TVM's GPU sliding-window kernels.
    folder, _ = checkpoint_factory(**(OLMO3_TINY if family == "olmo3" else {}))
    artifact = compile_model(OLMoConfig.from_file(folder), dtype=dtype, target="cuda",
                             cache_dir=tmp_path)
    assert artifact.library_path.stat().st_size > 0
    assert artifact.target_kind == "cuda"
    kernels = {item["kernel"] for item in artifact.kv_cache_recipe
               if isinstance(item, dict) and "kernel" in item}
    assert "tir_kv_cache_debug_get_kv" in kernels
