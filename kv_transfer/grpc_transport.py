"""The KV push over gRPC: a client stream to the decode worker's PushKV, one per sequence part.

Toward a receiver on this host the stream names a shared buffer instead of carrying the
K/V (kv_transfer/shared_memory.py); everything else about the push stays the same.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from olmo_model.kv_pages import KVSnapshot
from protos import worker_pb2
from protos.errors import ServingError
from protos.grpc_server import shared_channel

from .buffers import Buffer, BufferPool, HostBuffer
from .codec import encode_push
from .shared_memory import SharedBuffer, host_identity
from .wire_blocks import serialize_chunk

PUSH_METHOD = "/olmo.worker.v1.DecodeWorker/PushKV"

# Statuses that say the receiver could not be reached in time; anything else it sent
# back is a refusal of this push, which another prefill attempt may not repeat.
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
TOTALS_KEPT = 4096


class KVSender:
    """Pushes K/V to decode workers and keeps the totals a prefill worker reports."""

    def __init__(self, layout: worker_pb2.ModelLayout, secret: str | None = None,
                 timeout: float = 60.0, share_memory: bool = True):
        self.layout = layout
        self.secret = secret  # the cluster's: decode workers refuse pushes without it
        self.timeout = timeout
        self.host = host_identity() if share_memory else ""
        # Where snapshots are exported to: shared memory, so that a same-host push can
        # name them, where this host has it.
        self.buffers = BufferPool(SharedBuffer if self.host else HostBuffer)
        self._lock = threading.Lock()
        self._peer_hosts: dict[str, str] = {}  # address -> host its last answer named
        self._inline_only: set[str] = set()    # addresses that refused a shared push
        self.bytes_sent = 0
        self.pushes = 0
        self.transfer_seconds = 0.0
        self.encode_seconds = 0.0  # of which making the chunks (copies, checksum)
        self.shared_pushes = 0     # of the pushes, those that named a shared buffer
        self.shared_bytes = 0
        self.shared_seconds = 0.0
        # (bytes, seconds) by request, until its caller takes them; bounded, since a
        # cancelled request's pushes may finish after its caller has gone.
        self._by_request: collections.OrderedDict[str, tuple[int, float]] = (
            collections.OrderedDict())

    def shares_memory_with(self, address: str) -> bool:
        with self._lock:
            return (bool(self.host) and self._peer_hosts.get(address) == self.host
                    and address not in self._inline_only)

    def push(self, address: str, request_id: str, snapshot: KVSnapshot,
             hidden: np.ndarray | None, buffer: Buffer | None = None, attempt: int = 0) -> int:
        """Send one push and wait for the receiver's verdict; returns the bytes it took.

        ``buffer``: the one of ``self.buffers`` that ``snapshot`` lives in, if any; a
        receiver on this host then reads it from there. ``attempt``: the prefill leg's try.

        Raises ServingError: UNAVAILABLE or DEADLINE_EXCEEDED when the receiver could not
        be reached in time, FAILED_PRECONDITION when it refused the push (its reason kept).
        """
        start = time.perf_counter()
        encoding = [0.0]
        shared = (buffer if isinstance(buffer, SharedBuffer) and self.shares_memory_with(address)
                  else None)
        try:
            reply = self._send(address, request_id, snapshot, hidden, shared, attempt, encoding)
        except grpc.RpcError as exc:
            if shared is None or exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise self._push_error(exc, request_id, address) from exc
            with self._lock:  # it cannot read our memory: inline from now on
                self._inline_only.add(address)
            shared = None
            try:
                reply = self._send(address, request_id, snapshot, hidden, None, attempt,
                                   encoding)
            except grpc.RpcError as exc2:
                raise self._push_error(exc2, request_id, address) from exc2
        seconds = time.perf_counter() - start
        with self._lock:
            self._peer_hosts[address] = reply.shared_memory_host
            self.bytes_sent += reply.bytes
            self.pushes += 1
            self.transfer_seconds += seconds
            self.encode_seconds += encoding[0]
            if shared is not None:
                self.shared_pushes += 1
                self.shared_bytes += reply.bytes
                self.shared_seconds += seconds
            sent, took = self._by_request.pop(request_id, (0, 0.0))
            self._by_request[request_id] = (sent + reply.bytes, took + seconds)
            while len(self._by_request) > TOTALS_KEPT:
                self._by_request.popitem(last=False)
        return reply.bytes

    def take_totals(self, request_id: str) -> tuple[int, float]:
        """(bytes, seconds) of this request's pushes so far, forgotten once taken."""
        with self._lock:
            return self._by_request.pop(request_id, (0, 0.0))

    def close(self) -> None:
        self.buffers.close()

    def _send(self, address: str, request_id: str, snapshot: KVSnapshot,
              hidden: np.ndarray | None, shared: SharedBuffer | None, attempt: int,
              encoding: list[float]) -> worker_pb2.PushResponse:
        chunks = _timed(encode_push(request_id, self.layout, snapshot, hidden, shared, attempt,
                                    block_views=True), encoding)
        # Not the generated stub: its serializer takes messages only, not BlockChunks.
        push = shared_channel(address, self.secret).stream_unary(
            PUSH_METHOD, request_serializer=serialize_chunk,
            response_deserializer=worker_pb2.PushResponse.FromString)
        return push(chunks, timeout=self.timeout)

    @staticmethod
    def _push_error(exc: grpc.RpcError, request_id: str, address: str) -> ServingError:
        error = ServingError.from_rpc(exc, f"KV push for {request_id} to {address}")
        if error.code not in _UNREACHABLE:
            error.code = grpc.StatusCode.FAILED_PRECONDITION
        return error


def _timed(chunks: Iterator[worker_pb2.KVChunk], seconds: list[float]
           ) -> Iterator[worker_pb2.KVChunk]:
    """``chunks``, adding the time spent making each to ``seconds[0]`` (gRPC pulls them
    as it sends, so encoding and sending interleave)."""
    while True:
        start = time.perf_counter()
        chunk = next(chunks, None)
        seconds[0] += time.perf_counter() - start
        if chunk is None:
            return
        yield chunk
