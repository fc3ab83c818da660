"""The KV transport seam: how one request's K/V pieces leave a prefill stage and land on a
decode stage, whatever carries them.

Sending side (``PushSender``): ``open`` a ``KVTransfer`` per request and decode stage,
``push`` its pieces through it one at a time (each push waits for the receiver's verdict),
then ``finish`` it, or ``abort`` it when the request is gone. Every state a transfer can be
in is ``TransferState``:

    OPEN --push ok--> OPEN --finish--> FINISHED
      |--push refused or unreachable--> FAILED (later pushes raise that error again)
      `--abort--> ABORTED (later pushes raise CANCELLED)

Receiving side (``PieceSink``, the decode stage's receiver): a transport **receives** a
piece by ``claim``-ing it from its header (the sink checks it against the request's
reservation and says where its K/V goes), writes the K/V there, **verifies** it (the
transport's own checks: checksum, completeness), and ``commit``s it, or ``release``s the
claim when anything failed, so that nothing of a bad push counts. The receiver then
**installs** a request once its verified pieces cover it.

Which ``Transport`` carries a push is negotiated per receiver, before the push: each
answer advertises what the receiver ``Accepts`` (inline always; shared memory from
senders on its host), and ``choose_transport`` takes the sender's first offer that the
receiver accepts. A receiver not heard from yet is sent inline.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
import numpy as np

from olmo_model.kv_pages import KVSnapshot
from protos.clock import MONOTONIC, Clock
from protos.errors import ServingError

from .buffers import Buffer, BufferPool


class Transport(enum.StrEnum):
    """How a push's K/V travels; the values are the names workers list in their stats."""

    INLINE = "grpc"         # K/V blocks in the gRPC stream (kv_transfer/grpc_transport.py)
    SHARED_MEMORY = "shm"   # the stream names a buffer of the sender's memory: one host
    # Declared, not implemented: the binding (kv_transfer/nccl.py) is all there is; no
    # sender offers it and no receiver accepts it, so no push uses it.
    NCCL = "nccl"
    LOOPBACK = "loopback"   # in one process, for unit tests (kv_transfer/fake.py)


# The order a sender prefers them in, fastest first.
PREFERENCE = (Transport.NCCL, Transport.SHARED_MEMORY, Transport.INLINE)


def choose_transport(offers: Sequence[str], accepts: Sequence[str]) -> Transport:
    """The fastest transport both ends list (``offers``: the sender's, ``accepts``: the
    receiver's); inline gRPC, which every worker takes, when they share no other."""
    for transport in PREFERENCE:
        if transport in offers and transport in accepts:
            return transport
    return Transport.INLINE


@dataclasses.dataclass(frozen=True)
class Accepts:
    """What a receiver takes, as it says in every answer (``PushResponse``; the field is
    as old as shared-memory pushes, so senders of any version read it): inline pushes
    always, shared-memory pushes from senders on ``shared_memory_host`` (empty: none)."""

    shared_memory_host: str = ""

    def transports(self, sender_host: str) -> tuple[Transport, ...]:
        """What this receiver takes from a sender on ``sender_host``."""
        if sender_host and self.shared_memory_host == sender_host:
            return (Transport.SHARED_MEMORY, Transport.INLINE)
        return (Transport.INLINE,)


class TransferState(enum.Enum):
    OPEN = "open"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class PushGrant:
    """The reservation a request's pushes fill and what lets them in: the request, the
    prefill leg's try, and the push token the decode worker's Reserve answered with.
    Pushes carry the token instead of the cluster secret: a receiver takes a piece only
    for the reservation that token was made for, and a sender never hands the secret to
    whatever address a Prefill names."""

    request_id: str
    attempt: int = 0
    token: bytes = b""
    traceparent: str = ""  # the request's trace context: each push is a span under it


@dataclasses.dataclass(frozen=True)
class PieceHeader:
    """What a piece is, before any of its K/V: a request's layers [layer_begin,
    layer_end) (global ids) of its tokens [token_begin, token_begin + num_tokens)."""

    request_id: str
    attempt: int       # the prefill leg's try
    layer_begin: int
    layer_end: int
    token_begin: int
    num_tokens: int
    push_token: bytes = b""  # the reservation's (PushGrant.token)


@dataclasses.dataclass
class KVPiece:
    """One piece as plain arrays, for transports that need no wire (``fake.py``)."""

    header: PieceHeader
    keys: np.ndarray   # [layers, tokens, kv_heads, head_dim]
    values: np.ndarray
    hidden: np.ndarray | None = None  # the prompt's last hidden state, with its last piece

    @classmethod
    def of(cls, grant: PushGrant, snapshot: KVSnapshot, hidden: np.ndarray | None = None
           ) -> KVPiece:
        header = PieceHeader(grant.request_id, grant.attempt, snapshot.layer_begin,
                             snapshot.layer_end, snapshot.token_begin, snapshot.num_tokens,
                             grant.token)
        return cls(header, snapshot.keys, snapshot.values, hidden)


@dataclasses.dataclass(frozen=True)
class Received:
    """One push as its receiver took it."""

    bytes: int
    transport: Transport
    seconds: float  # handling it (not waiting for its bytes to arrive)


class Claim(Protocol):
    """Where a claimed piece's K/V goes: views shaped like the piece's."""

    keys: np.ndarray
    values: np.ndarray


class AlreadyComplete(Exception):
    """Raised by ``PieceSink.claim``: the request has all its K/V, verified (a later try
    of its prefill leg sends it again, say). The piece is acknowledged, not written: a
    prompt's K/V is the same whichever try computed it, and what is there may be being
    installed already."""


class PieceSink(Protocol):
    """The receiving end every transport delivers into (decode_worker/receiver.py)."""

    def claim(self, header: PieceHeader) -> Claim:
        """Check the piece against its request; where to write it. Raises ServingError,
        or AlreadyComplete."""

    def commit(self, claim: Claim, hidden: np.ndarray | None) -> None:
        """The piece arrived whole and verified: it counts. Raises ServingError when its
        request no longer wants it."""

    def release(self, claim: Claim) -> None:
        """The piece failed: nothing of it counts, its part may come again."""


def deliver(piece: KVPiece, sink: PieceSink, clock: Clock = MONOTONIC) -> Received:
    """Write a plain piece into ``sink`` as a transport does: claim, copy, commit; on any
    failure the claim is released and nothing counts (a piece of a request that has all
    its K/V is acknowledged, as 0 bytes). Raises ServingError."""
    start = clock.now()
    try:
        write_piece(piece, sink)()
    except AlreadyComplete:
        return Received(0, Transport.LOOPBACK, clock.now() - start)
    return Received(piece.keys.nbytes + piece.values.nbytes, Transport.LOOPBACK,
                    clock.now() - start)


def write_piece(piece: KVPiece, sink: PieceSink) -> Callable[[], None]:
    """Claim ``piece`` in ``sink`` and write its K/V; returns its commit, which releases
    the claim (and raises) if the sink refuses it then. Until the commit, the piece is a
    push still being written. Raises ServingError, the claim released."""
    claim = sink.claim(piece.header)
    try:
        for got, into in ((piece.keys, claim.keys), (piece.values, claim.values)):
            if got.shape != into.shape or got.dtype != into.dtype:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"piece of {piece.header.request_id!r} holds {got.dtype} "
                                   f"{got.shape}; its header announces {into.dtype} "
                                   f"{into.shape}")
            np.copyto(into, got)
    except BaseException:
        sink.release(claim)
        raise
    # A copy, as off a wire: the sender may reuse its array once answered.
    hidden = None if piece.hidden is None else piece.hidden.copy()

    def commit() -> None:
        try:
            sink.commit(claim, hidden)
        except BaseException:
            sink.release(claim)
            raise

    return commit


class PushSender(Protocol):
    """The sending side a prefill stage pushes through (grpc_transport.KVSender, or
    fake.FakeKVSender in unit tests)."""

    buffers: BufferPool  # where snapshots are exported to (a transport may send from them)

    def push(self, address: str, grant: PushGrant, snapshot: KVSnapshot,
             hidden: np.ndarray | None, buffer: Buffer | None = None,
             exported: tuple[float, float] | None = None) -> int:
        """Send one piece and wait for the verdict; its bytes. Raises ServingError.
        ``exported``: when reading the piece out of the pages began and ended
        (perf_counter), for its trace."""

    def open(self, address: str, grant: PushGrant) -> KVTransfer:
        """A transfer of one request's pieces to the receiver at ``address``."""


class KVTransfer:
    """The sending side of one request's K/V to one decode stage, over any ``PushSender``.

    Pieces go one at a time (a prefill stage orders them); ``abort`` may come from another
    thread, and stops the pushes not yet begun.
    """

    def __init__(self, sender: PushSender, address: str, grant: PushGrant):
        self.sender = sender
        self.address = address
        self.grant = grant
        self.request_id = grant.request_id
        self.state = TransferState.OPEN
        self.error: ServingError | None = None  # why it failed or was aborted
        self.bytes = 0
        self.pushes = 0

    def push(self, snapshot: KVSnapshot, hidden: np.ndarray | None = None,
             buffer: Buffer | None = None, exported: tuple[float, float] | None = None) -> int:
        """Send one piece (from ``buffer``, when the snapshot lives in one of the sender's
        buffers) and wait for its verdict; its bytes. Raises ServingError, and the
        transfer fails with it."""
        if self.state is not TransferState.OPEN:
            raise self.failure_exception()
        try:
            sent = self.sender.push(self.address, self.grant, snapshot, hidden, buffer, exported)
        except ServingError as exc:
            self.state, self.error = TransferState.FAILED, exc
            raise
        self.bytes += sent
        self.pushes += 1
        return sent

    def finish(self) -> int:
        """Every piece is answered: the transfer is done; its bytes."""
        if self.state is TransferState.OPEN:
            self.state = TransferState.FINISHED
        return self.bytes

    def abort(self, reason: str) -> None:
        """No more pieces go (one already on its way still ends by itself)."""
        if self.state is TransferState.OPEN:
            self.error = ServingError(grpc.StatusCode.CANCELLED,
                                      f"KV transfer of {self.request_id} to {self.address} "
                                      f"was aborted: {reason}")
            self.state = TransferState.ABORTED

    def failure_exception(self) -> ServingError:
        """Why no more pieces may go."""
        if self.error is not None:
            return self.error
        return ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"KV transfer of {self.request_id} to {self.address} is "
                            f"{self.state.value}")
