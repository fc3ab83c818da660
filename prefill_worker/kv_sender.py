"""Ships one prefilled sequence (KV snapshot plus last hidden state) to a decode worker."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from olmo_model.kv_pages import KVSnapshot
from protos import worker_pb2, worker_pb2_grpc
from protos.grpc_server import channel
from protos.kv_stream import encode_push


class KVSender:
    """Client-streaming pushes over one cached channel per decode worker."""

    def __init__(self, layout: worker_pb2.ModelLayout, timeout: float = 60.0):
        self.layout = layout
        self.timeout = timeout
        self._stubs: dict[str, worker_pb2_grpc.DecodeWorkerStub] = {}
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.pushes = 0
        self.transfer_seconds = 0.0

    def push(self, address: str, request_id: str, snapshot: KVSnapshot,
             hidden: np.ndarray | None) -> tuple[int, float]:
        """Send and wait for the receiver's verdict; returns (bytes, seconds).

        Raises grpc.RpcError carrying the receiver's reason when it refuses the push.
        """
        start = time.perf_counter()
        chunks = encode_push(request_id, self.layout, snapshot, hidden)
        reply = self._stub(address).PushKV(chunks, timeout=self.timeout)
        seconds = time.perf_counter() - start
        with self._lock:
            self.bytes_sent += reply.bytes
            self.pushes += 1
            self.transfer_seconds += seconds
        return reply.bytes, seconds

    def _stub(self, address: str) -> worker_pb2_grpc.DecodeWorkerStub:
        with self._lock:
            if address not in self._stubs:
                self._stubs[address] = worker_pb2_grpc.DecodeWorkerStub(channel(address))
            return self._stubs[address]


def push_failure(exc: grpc.RpcError) -> str:
    """``CODE: details``; a refusal (anything but unreachable/timeout) is FAILED_PRECONDITION."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        code = grpc.StatusCode.FAILED_PRECONDITION
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name}: {details}"
