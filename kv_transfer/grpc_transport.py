"""The KV push over gRPC: a client stream to the decode worker's PushKV, one per sequence part."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from olmo_model.kv_pages import KVSnapshot
from protos import worker_pb2, worker_pb2_grpc
from protos.errors import ServingError
from protos.grpc_server import shared_channel

from .codec import encode_push

# Statuses that say the receiver could not be reached in time; anything else it sent
# back is a refusal of this push, which another prefill attempt may not repeat.
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
TOTALS_KEPT = 4096


class KVSender:
    """Pushes K/V to decode workers and keeps the totals a prefill worker reports."""

    def __init__(self, layout: worker_pb2.ModelLayout, secret: str | None = None,
                 timeout: float = 60.0):
        self.layout = layout
        self.secret = secret  # the cluster's: decode workers refuse pushes without it
        self.timeout = timeout
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.pushes = 0
        self.transfer_seconds = 0.0
        self.encode_seconds = 0.0  # of which making the chunks (copies, checksum)
        # (bytes, seconds) by request, until its caller takes them; bounded, since a
        # cancelled request's pushes may finish after its caller has gone.
        self._by_request: collections.OrderedDict[str, tuple[int, float]] = (
            collections.OrderedDict())

    def push(self, address: str, request_id: str, snapshot: KVSnapshot,
             hidden: np.ndarray | None) -> int:
        """Send one push and wait for the receiver's verdict; returns the bytes it took.

        Raises ServingError: UNAVAILABLE or DEADLINE_EXCEEDED when the receiver could not
        be reached in time, FAILED_PRECONDITION when it refused the push (its reason kept).
        """
        start = time.perf_counter()
        encoding = [0.0]
        chunks = _timed(encode_push(request_id, self.layout, snapshot, hidden), encoding)
        stub = worker_pb2_grpc.DecodeWorkerStub(shared_channel(address, self.secret))
        try:
            reply = stub.PushKV(chunks, timeout=self.timeout)
        except grpc.RpcError as exc:
            error = ServingError.from_rpc(exc, f"KV push for {request_id} to {address}")
            if error.code not in _UNREACHABLE:
                error.code = grpc.StatusCode.FAILED_PRECONDITION
            raise error from exc
        seconds = time.perf_counter() - start
        with self._lock:
            self.bytes_sent += reply.bytes
            self.pushes += 1
            self.transfer_seconds += seconds
            self.encode_seconds += encoding[0]
            sent, took = self._by_request.pop(request_id, (0, 0.0))
            self._by_request[request_id] = (sent + reply.bytes, took + seconds)
            while len(self._by_request) > TOTALS_KEPT:
                self._by_request.popitem(last=False)
        return reply.bytes

    def take_totals(self, request_id: str) -> tuple[int, float]:
        """(bytes, seconds) of this request's pushes so far, forgotten once taken."""
        with self._lock:
            return self._by_request.pop(request_id, (0, 0.0))


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
