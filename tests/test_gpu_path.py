"""The GPU path as far as a machine without a GPU can check it: the NCCL binding loads
and explains why it cannot run, and KV transport selection falls back to gRPC."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import local_cluster

from kv_transfer.nccl import Nccl, NcclUnavailable, cuda_device_count, library_path, nccl_status
from kv_transfer.transports import GRPC, NCCL, SHM, choose_transport, worker_transports
from protos import worker_pb2

needs_nccl = pytest.mark.skipif(library_path() is None,
                                reason="nvidia-nccl-cu12 is not installed (pip install .[gpu])")
no_gpu = pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a GPU")


@needs_nccl
def test_nccl_loads_from_the_wheel_and_reports_its_version():
    nccl = Nccl()
    assert "nvidia" in str(nccl.path)
    major = int(nccl.version().split(".")[0])
    assert major >= 2
    assert len(nccl.unique_id()) == 128


@needs_nccl
@no_gpu
def test_without_a_gpu_nccl_says_why():
    usable, reason = nccl_status()
    assert not usable and "no CUDA GPU" in reason
    # A failed ncclCommInitRank leaves NCCL threads that crash at interpreter exit, so
    # the attempt runs in its own process, which leaves without tearing down.
    probe = (
        "import os\n"
        "from kv_transfer.nccl import Nccl, NcclUnavailable\n"
        "nccl = Nccl()\n"
        "try:\n"
        "    nccl.communicator(nccl.unique_id(), 1, 0)\n"
        "except NcclUnavailable as exc:\n"
        "    print('refused:', exc, flush=True)\n"
        "os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert "refused:" in done.stdout and "needs a CUDA GPU" in done.stdout, done.stderr


def test_missing_library_is_a_clear_error(tmp_path):
    with pytest.raises(NcclUnavailable, match="cannot load"):
        Nccl(tmp_path / "libnccl.so.2")


def test_transport_selection_falls_back_to_grpc():
    assert choose_transport([GRPC, NCCL], [GRPC, NCCL]) == NCCL
    assert choose_transport([GRPC, NCCL], [GRPC]) == GRPC
    assert choose_transport([GRPC], [GRPC, NCCL]) == GRPC
    transports, note = worker_transports("llvm")
    assert transports == [GRPC] and "CPU" in note


def test_workers_report_their_transport_in_stats(tiny_checkpoint):

    folder, _ = tiny_checkpoint
    cluster = local_cluster(folder)
    try:
        for servicer in [*cluster.prefill, *cluster.decode]:
            stats = servicer.Stats(worker_pb2.StatsRequest(), None)
            assert stats.transport == GRPC and list(stats.transports) == [GRPC, SHM]
            assert stats.transport_note
    finally:
        cluster.stop()


def test_a_cached_library_runs_on_tvms_runtime_alone(tiny_checkpoint, tmp_path):
    """What the GPU bundle relies on: with TVM_USE_RUNTIME_LIB=1 (no compiler), a library
    compiled elsewhere is found in the cache and runs, and nothing loads the compiler."""
    from conftest import reference_logits

    from olmo_model.compiler import compile_model
    from olmo_model.config import OLMoConfig

    folder, reference = tiny_checkpoint
    target = {"kind": "llvm", "mcpu": "x86-64-v3"}
    compile_model(OLMoConfig.from_file(folder), target=target, cache_dir=tmp_path / "compiled")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    np.save(tmp_path / "reference.npy", reference_logits(reference, prompt))
    probe = (
        "import sys, numpy as np\n"
        "from olmo_model.runtime import ModelRunner\n"
        f"runner = ModelRunner.from_checkpoint({str(folder)!r}, target={target!r})\n"
        "runner.add_sequence(0)\n"
        f"prompt = {prompt!r}\n"
        "hidden = runner.forward([0], [len(prompt)], runner.embed(np.array(prompt)))\n"
        "logits = runner.logits(hidden)\n"
        f"ref = np.load({str(tmp_path / 'reference.npy')!r})\n"
        "assert np.abs(logits - ref).max() / np.abs(ref).max() < 1e-4\n"
        "assert not [m for m in sys.modules if m.startswith(('tvm.relax', 'tvm.s_tir'))]\n"
        "print('ran from the cache, runtime only')\n")
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "OLMO_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, timeout=300)
    assert "runtime only" in done.stdout, done.stderr[-3000:]
