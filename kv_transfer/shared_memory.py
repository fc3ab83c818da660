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

The receiver trusts nothing it is pointed at: a buffer is sealed against resizing from
birth, and the receiver opens the named descriptor without blocking, then checks what it
opened (a memfd of that name, sealed, large enough) before it reads a byte. It reads
with ``pread`` rather than a mapping, so that nothing the sender does meanwhile can fault
the receiver (a mapping of a file that shrinks raises SIGBUS) or make it allocate memory
(reading a hole of a sparse memfd gives zeros without backing it).

Buffers are pooled and stay mapped (kv_transfer/buffers.py says why).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from collections.abc import Sequence

import numpy as np

from .buffers import Buffer

NAME = "olmo-kv"  # every buffer's memfd name; a receiver opens nothing else
_LINK = f"/memfd:{NAME} "  # how /proc shows a descriptor of one ("... (deleted)")
# A buffer's size is fixed from birth, and so are its seals: a reader's size check holds.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


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
        self.fd = os.memfd_create(NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, nbytes)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
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
    from ``offset`` into ``out`` (C-contiguous). Raises ValueError when the descriptor is
    not such a buffer or too small for the parts, OSError when it cannot be opened."""
    path = f"/proc/{pid}/fd/{fd}"
    if not os.readlink(path).startswith(_LINK):  # the cheap refusal, before any open
        raise ValueError(f"{path} is not a KV buffer")
    handle = _open(path)
    try:
        size = _verified_size(handle, path)
        for offset, out in parts:
            if not out.flags.c_contiguous:
                raise ValueError("a shared K/V part must be read into contiguous memory")
            if offset < 0 or offset + out.nbytes > size:
                raise ValueError(f"bytes [{offset}, {offset + out.nbytes}) lie outside the "
                                 f"{size}-byte buffer")
        for offset, out in parts:
            _read_exactly(handle, out.reshape(-1).view(np.uint8), offset)
    finally:
        os.close(handle)


def _open(path: str) -> int:
    # Not blocking: the descriptor may have been swapped for a FIFO since it was looked
    # at, and opening a FIFO to read waits for a writer.
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def _verified_size(handle: int, path: str) -> int:
    """The size of an opened KV buffer, after checking that it is one: what was opened,
    not what the path named before, is a regular memfd of our name, sealed against
    resizing."""
    status = os.fstat(handle)
    if (not stat.S_ISREG(status.st_mode)
            or not os.readlink(f"/proc/self/fd/{handle}").startswith(_LINK)):
        raise ValueError(f"{path} is not a KV buffer")
    try:
        seals = fcntl.fcntl(handle, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & SEALS != SEALS:
        raise ValueError(f"{path} is not sealed against resizing")
    return status.st_size


def _read_exactly(handle: int, out: np.ndarray, offset: int) -> None:
    done = 0
    while done < out.nbytes:  # a read returns at most 2 GiB less a page
        got = os.preadv(handle, [out[done:]], offset + done)
        if not got:
            raise ValueError(f"the buffer ended at byte {offset + done}")
        done += got
