"""A thin ctypes binding over NCCL (``libnccl.so.2`` from the ``nvidia-nccl-cu12`` wheel).

Only a binding, not a transport: no ``PushSender`` sends over it and no receiver accepts
it (``Transport.NCCL`` is declared in kv_transfer/transport.py so that
``choose_transport`` and the workers' stats can name it). What it holds is what moving KV
pages between two GPUs needs: a unique id, a communicator, grouped send/receive of device
buffers, checked on a GPU by bench/gpu_check.py's round trip. Loading never touches a GPU;
``unique_id`` and ``communicator`` do, and raise ``NcclUnavailable`` with NCCL's own
reason where there is none.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

NCCL_UNIQUE_ID_BYTES = 128
DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
          "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}


class NcclUnavailable(RuntimeError):
    """NCCL cannot be used here; the message says why (no library, no GPU, ...)."""


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]


def library_path() -> Path | None:
    """libnccl.so.2 from the nvidia-nccl wheel (cu12 or cu13), or None."""
    override = os.environ.get("OLMO_NCCL_LIBRARY")
    if override:
        return Path(override)
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except ModuleNotFoundError:
        spec = None
    for root in (spec.submodule_search_locations if spec else []) or []:
        candidate = Path(root) / "lib" / "libnccl.so.2"
        if candidate.is_file():
            return candidate
    return None


class Nccl:
    def __init__(self, path: Path | None = None):
        path = path or library_path()
        if path is None:
            raise NcclUnavailable("libnccl.so.2 not found: pip install -e '.[gpu]' "
                                  "(nvidia-nccl-cu12) or set OLMO_NCCL_LIBRARY")
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NcclUnavailable(f"cannot load {path}: {exc}") from exc
        self.path = path
        self.lib.ncclGetErrorString.restype = ctypes.c_char_p

    def version(self) -> str:
        code = ctypes.c_int()
        self._check(self.lib.ncclGetVersion(ctypes.byref(code)), "ncclGetVersion")
        major, rest = divmod(code.value, 10000)
        minor, patch = divmod(rest, 100)
        return f"{major}.{minor}.{patch}"

    def unique_id(self) -> bytes:
        """A new communicator id; the receiver makes it and sends it over gRPC."""
        uid = _UniqueId()
        self._check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return bytes(uid)  # the whole struct: the id may contain NUL bytes

    def communicator(self, unique_id: bytes, nranks: int, rank: int) -> Communicator:
        """Join a communicator (blocks until every rank has joined)."""
        if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes")
        uid = _UniqueId()
        ctypes.memmove(uid.internal, unique_id, NCCL_UNIQUE_ID_BYTES)
        comm = ctypes.c_void_p()
        self._check(self.lib.ncclCommInitRank(ctypes.byref(comm), nranks, uid, rank),
                    "ncclCommInitRank")
        return Communicator(self, comm)

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            reason = self.lib.ncclGetErrorString(result).decode()
            raise NcclUnavailable(f"{what} failed ({result}): {reason}; NCCL needs a CUDA GPU "
                                  "and driver")


class Communicator:
    """Grouped point-to-point transfers of device buffers on one CUDA stream."""

    def __init__(self, nccl: Nccl, handle: ctypes.c_void_p):
        self.nccl = nccl
        self.handle = handle

    def transfer(self, sends: list[tuple[int, int, str, int]],
                 receives: list[tuple[int, int, str, int]], stream: int = 0) -> None:
        """Each item is (device pointer, element count, dtype, peer rank); one NCCL group."""
        lib = self.nccl.lib
        self.nccl._check(lib.ncclGroupStart(), "ncclGroupStart")
        try:
            for pointer, count, dtype, peer in sends:
                self.nccl._check(lib.ncclSend(ctypes.c_void_p(pointer), ctypes.c_size_t(count),
                                              DTYPES[dtype], peer, self.handle,
                                              ctypes.c_void_p(stream)), "ncclSend")
            for pointer, count, dtype, peer in receives:
                self.nccl._check(lib.ncclRecv(ctypes.c_void_p(pointer), ctypes.c_size_t(count),
                                              DTYPES[dtype], peer, self.handle,
                                              ctypes.c_void_p(stream)), "ncclRecv")
        finally:
            self.nccl._check(lib.ncclGroupEnd(), "ncclGroupEnd")

    def close(self) -> None:
        if self.handle:
            self.nccl.lib.ncclCommDestroy(self.handle)
            self.handle = ctypes.c_void_p()


def cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0 where there is no driver); touches no device memory."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def nccl_status() -> tuple[bool, str]:
    """(usable, reason): whether KV pages could move over NCCL from this process."""
    if cuda_device_count() == 0:
        return False, "no CUDA GPU is visible (no driver, or no device)"
    try:
        nccl = Nccl()
        version = nccl.version()
    except NcclUnavailable as exc:
        return False, str(exc)
    return True, f"NCCL {version} from {nccl.path}"
