"""Which transport moves KV pages between a prefill and a decode worker.

gRPC always works. Shared memory ("shm") carries a push's K/V between workers on one
host while its stream stays on gRPC; a sender uses it once the receiver's answer says
they share the host (kv_transfer/shared_memory.py). NCCL moves pages device to device,
and needs both workers on CUDA GPUs, NCCL loadable, and page access on the device; a
worker lists what it can do in its stats. A push may use NCCL only when both ends list
it (``choose_transport``); until the device-to-device push is wired, no push uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

GRPC, NCCL, SHM = "grpc", "nccl", "shm"


def worker_transports(target_kind: str, shared_memory: bool = False) -> tuple[list[str], str]:
    """(transports, note) for a worker whose model runs on ``target_kind``, with
    same-host shared memory usable (``shared_memory``) or not."""
    transports = [GRPC, SHM] if shared_memory else [GRPC]
    if target_kind != "cuda":
        return transports, "nccl: the model runs on the CPU"
    from olmo_model.nccl import nccl_status

    usable, reason = nccl_status()
    if not usable:
        return transports, f"nccl: {reason}"
    # Pages can be read and installed on the GPU, but the NCCL send/receive of page
    # blocks (olmo_model/nccl.py has the binding) is not wired into the push yet.
    return transports, "nccl: the device-to-device KV push is not implemented yet"


def choose_transport(prefill: Sequence[str], decode: Sequence[str]) -> str:
    """NCCL when both ends can use it, else gRPC."""
    return NCCL if NCCL in prefill and NCCL in decode else GRPC
