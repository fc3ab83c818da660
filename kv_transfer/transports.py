"""Which transports a worker can use, as its stats list them.

gRPC always works. Shared memory ("shm") carries a push's K/V between workers on one
host while its stream stays on gRPC (kv_transfer/shared_memory.py); which one a push
uses is negotiated per receiver (kv_transfer/transport.py). NCCL would move pages device
to device, and needs both workers on CUDA GPUs and NCCL loadable; a worker says in its
stats why it cannot, and even where it could, only the binding exists
(kv_transfer/nccl.py): no push uses NCCL.
"""

from __future__ import annotations

from .transport import Transport, choose_transport

GRPC, NCCL, SHM = Transport.INLINE, Transport.NCCL, Transport.SHARED_MEMORY

__all__ = ["GRPC", "NCCL", "SHM", "choose_transport", "worker_transports"]


def worker_transports(target_kind: str, shared_memory: bool = False
                      ) -> tuple[list[Transport], str]:
    """(transports, note) for a worker whose model runs on ``target_kind``, with
    same-host shared memory usable (``shared_memory``) or not."""
    transports = [GRPC, SHM] if shared_memory else [GRPC]
    if target_kind != "cuda":
        return transports, "nccl: the model runs on the CPU"
    from .nccl import nccl_status

    usable, reason = nccl_status()
    if not usable:
        return transports, f"nccl: {reason}"
    # Pages can be read and installed on the GPU, but the NCCL send/receive of page
    # blocks (kv_transfer/nccl.py has the binding) is not wired into the push.
    return transports, "nccl: the device-to-device KV push is not implemented"
