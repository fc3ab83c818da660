"""Reusable K/V buffers: flat memory handed out as key and value arrays, kept for reuse.

A fresh 16 MiB array costs more to first-touch on the machines we measure (10-40 ms of
page faults) than a loopback gRPC push takes to move it, so both ends of a push keep
their buffers: the sender's exports, the receiver's assembled pushes until installed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

ALIGN = 64        # TVM takes tensors no less aligned
GRANULE = 2**20   # sizes are rounded up to this, so that pushes of similar size share


class Buffer:
    """Flat memory (``array``: uint8) holding a snapshot's keys, then its values."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.nbytes = array.nbytes
        self.address = array.ctypes.data

    def arrays(self, shape: tuple[int, ...], dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """Two C-contiguous arrays of ``shape``, keys from the start and values after them,
        each 64-byte aligned."""
        count, itemsize = int(np.prod(shape)), np.dtype(dtype).itemsize
        second = _aligned(count * itemsize)
        keys = self.array[:count * itemsize].view(dtype).reshape(shape)
        values = self.array[second:second + count * itemsize].view(dtype).reshape(shape)
        return keys, values

    @staticmethod
    def bytes_for(shape: tuple[int, ...], dtype: str) -> int:
        """The size ``arrays`` needs for this shape."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return _aligned(nbytes) + nbytes

    def offset_of(self, view: np.ndarray) -> int:
        """Where a C-contiguous view of this buffer begins in it."""
        offset = view.ctypes.data - self.address
        if not (view.flags.c_contiguous and 0 <= offset <= self.nbytes - view.nbytes):
            raise ValueError("not a contiguous view of this buffer")
        return offset

    def close(self) -> None:
        self.array = None


class HostBuffer(Buffer):
    """Private memory of this process."""

    def __init__(self, nbytes: int):
        raw = np.empty(nbytes + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        super().__init__(raw[start:start + nbytes])


class BufferPool:
    """Buffers lent out one at a time and kept for the next: at most ``keep`` idle ones of
    at most ``keep_bytes`` together (the largest kept, since a push fits any larger one)."""

    def __init__(self, make: Callable[[int], Buffer] = HostBuffer, keep: int = 4,
                 keep_bytes: int = 512 * 2**20):
        self.make = make
        self.keep = keep
        self.keep_bytes = keep_bytes
        self._free: list[Buffer] = []
        self._lock = threading.Lock()
        self.lent = 0  # taken and not given back: a leak check's figure

    def take(self, nbytes: int) -> Buffer:
        with self._lock:
            self.lent += 1
            fits = [b for b in self._free if b.nbytes >= nbytes]
            if fits:
                buffer = min(fits, key=lambda b: b.nbytes)
                self._free.remove(buffer)
                return buffer
        return self.make(max(GRANULE, -(-nbytes // GRANULE) * GRANULE))

    def give(self, buffer: Buffer) -> None:
        with self._lock:
            self.lent -= 1
        if buffer.nbytes > self.keep_bytes:
            buffer.close()
            return
        dropped = []
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda b: b.nbytes)
            while self._free and (len(self._free) > self.keep
                                  or sum(b.nbytes for b in self._free) > self.keep_bytes):
                dropped.append(self._free.pop(0))
        for old in dropped:
            old.close()

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._free)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for buffer in free:
            buffer.close()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN
