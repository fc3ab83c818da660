"""Same-host KV pushes: the K/V waits in the sender's shared memory, not in the stream.

On one host (a local cluster, Ray actors on one node) gRPC's loopback moves a push at a
few hundred MiB/s, while a memory copy runs at gigabytes per second. So a prefill worker
exports K/V into buffers of its own shared memory (memfds), and a push to a receiver on
the same host names the buffer (pid, fd, offsets) in a ``SharedKV`` chunk instead of
carrying blocks. The receiver opens it as ``/proc/<pid>/fd/<fd>``, copies the K/V out
into its own arrays, checks the trailer's checksum over what it copied, and only then
answers; the sender reuses the buffer after the answer. The receiver thus never works on
memory another process can still change, and it verifies exactly as for inline blocks.

Which peers share a host: every PushResponse carries the receiver's host identity; a
sender sends shared pushes to an address once that identity equals its own, and goes
back to inline blocks for good when the receiver refuses a shared push.

Buffers are pooled and stay mapped (kv_transfer/buffers.py says why).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

import numpy as np

from .buffers import Buffer

NAME = "olmo-kv"  # every buffer's memfd name; a receiver opens nothing else


def host_identity() -> str:
    """Equal for two processes when one can open the other's memfds through /proc (same
    kernel boot, same pid namespace) and they share a network namespace: peers in two
    network namespaces are two hosts to the cluster (pods, or the namespaces a
    multi-node test makes), whose K/V travels on the network between them. Empty where
    memfds do not exist."""
    if not hasattr(os, "memfd_create"):
        return ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
        net_ns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return ""
    return f"{boot}/{pid_ns}/{net_ns}"


class SharedBuffer(Buffer):
    """A memfd and a writable mapping of all of it."""

    def __init__(self, nbytes: int):
        self.fd = os.memfd_create(NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, nbytes)
            self._map = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError:
            os.close(self.fd)
            raise
        self.pid = os.getpid()
        super().__init__(np.frombuffer(self._map, np.uint8))

    def close(self) -> None:
        super().close()
        try:
            self._map.close()
        except BufferError:  # a view is still alive: the mapping goes with it
            pass
        os.close(self.fd)


def read_shared(pid: int, fd: int, parts: Sequence[tuple[int, np.ndarray]]) -> None:
    """Copy each ``(offset, out)`` of another process's shared buffer: ``out.nbytes`` bytes
    from ``offset`` into ``out`` (C-contiguous), through one mapping. Raises ValueError
    when the descriptor is not such a buffer or is too small, OSError when it cannot be
    opened."""
    path = f"/proc/{pid}/fd/{fd}"
    if not os.readlink(path).startswith(f"/memfd:{NAME} "):
        raise ValueError(f"{path} is not a KV buffer")
    handle = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(handle).st_size
        for offset, out in parts:
            if offset < 0 or offset + out.nbytes > size:
                raise ValueError(f"bytes [{offset}, {offset + out.nbytes}) lie outside the "
                                 f"{size}-byte buffer")
        end = max(offset + out.nbytes for offset, out in parts)
        mapping = mmap.mmap(handle, end, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                            prot=mmap.PROT_READ)
    finally:
        os.close(handle)
    try:
        for offset, out in parts:
            source = np.frombuffer(mapping, np.uint8, out.nbytes, offset)
            out.reshape(-1).view(np.uint8)[:] = source
            del source
    finally:
        mapping.close()
