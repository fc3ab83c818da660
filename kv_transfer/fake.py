"""A fake KV transport for unit tests: pieces handed to receivers in this process.

``FakeKVSender`` is a ``PushSender`` whose pushes go to the ``PieceSink``-with-
``receive_piece`` registered for an address (a decode stage's ``KVReceiver``) as plain
arrays, with no gRPC, encoding or checksum: the receiver's own checks are all that run.
A test may hold a piece between its claim and its commit (``transport.write_piece``) to
interleave it with retries, releases and other pieces, as concurrent pushes would.
"""

from __future__ import annotations

import threading
from typing import Protocol

import grpc
import numpy as np

from olmo_model.kv_pages import KVSnapshot
from protos.errors import ServingError

from .buffers import Buffer, BufferPool
from .transport import KVPiece, KVTransfer, PushGrant


class PieceReceiver(Protocol):
    def receive_piece(self, piece: KVPiece) -> int: ...


class FakeKVSender:
    """Pushes straight into in-process receivers, by address; counts what it sent."""

    def __init__(self, receivers: dict[str, PieceReceiver] | None = None):
        self.receivers = dict(receivers or {})
        self.buffers = BufferPool()
        self.sent: list[KVPiece] = []  # every piece a receiver took, in order
        self.pushes = 0
        self.bytes_sent = 0
        self._lock = threading.Lock()

    def open(self, address: str, grant: PushGrant) -> KVTransfer:
        return KVTransfer(self, address, grant)

    def push(self, address: str, grant: PushGrant, snapshot: KVSnapshot,
             hidden: np.ndarray | None, buffer: Buffer | None = None,
             exported: tuple[float, float] | None = None) -> int:
        receiver = self.receivers.get(address)
        if receiver is None:  # as the gRPC sender reports an unreachable receiver
            raise ServingError(grpc.StatusCode.UNAVAILABLE, f"KV push for "
                               f"{grant.request_id} to {address}: no receiver there")
        piece = KVPiece.of(grant, snapshot, hidden)
        sent = receiver.receive_piece(piece)
        with self._lock:
            self.sent.append(piece)
            self.pushes += 1
            self.bytes_sent += sent
        return sent

    def close(self) -> None:
        self.buffers.close()

