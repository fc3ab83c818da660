"""The KV push over gRPC: a client stream to the decode worker's PushKV, one per piece.

A push is let in by its header's push token, the one the decode worker's Reserve gave for
the request (``PushGrant``), not by the cluster secret: the channels carry no secret, so
a push address named by a Prefill learns nothing it could call the cluster with.

Two transports share the stream and differ in how the K/V rides it: ``InlineChannel``
carries it as blocks, which every receiver takes; ``SharedMemoryChannel`` names the
sender's shared buffer instead (kv_transfer/shared_memory.py), which only a receiver on
this host can read. ``KVSender`` picks one per push by negotiation: every answer says
what its receiver ``Accepts``, ``Peers`` remembers it per address, and a receiver not
heard from yet gets inline pushes. Should a receiver that advertised shared memory still
fail to read it (UNIMPLEMENTED: ptrace rules can close another process's
/proc/<pid>/fd), that push goes again inline and the peer is not offered shared memory
again.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from olmo_model.kv_pages import KVSnapshot
from protos import tracing, worker_pb2
from protos.errors import ServingError
from protos.grpc_server import shared_channel

from .buffers import Buffer, BufferPool, HostBuffer
from .codec import encode_push
from .shared_memory import SharedBuffer, host_identity
from .transport import Accepts, KVTransfer, PushGrant, Received, Transport, choose_transport
from .wire_blocks import serialize_chunk

PUSH_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["KVPush"].full_name
PUSH_METHOD = f"/{PUSH_SERVICE}/PushKV"

# Statuses that say the receiver could not be reached in time; anything else it sent
# back is a refusal of this push, which another prefill attempt may not repeat.
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
TOTALS_KEPT = 4096


def push_response(received: Received, accepts: Accepts) -> worker_pb2.PushResponse:
    """A receiver's answer: the push's bytes, its time taking them, and what it takes
    from now on."""
    return worker_pb2.PushResponse(bytes=received.bytes,
                                   shared_memory_host=accepts.shared_memory_host,
                                   handled_us=int(1e6 * received.seconds))


class InlineChannel:
    """K/V as blocks in the stream."""

    transport = Transport.INLINE

    def __init__(self, timeout: float):
        self.timeout = timeout

    def send(self, address: str, grant: PushGrant, layout: worker_pb2.ModelLayout,
             snapshot: KVSnapshot, hidden: np.ndarray | None, buffer: Buffer | None,
             encoding: list[float]) -> worker_pb2.PushResponse:
        """One push; the time spent making its chunks is added to ``encoding[0]``.
        Raises grpc.RpcError."""
        chunks = _timed(encode_push(grant, layout, snapshot, hidden, self._shared(buffer),
                                    block_views=True), encoding)
        # Not the generated stub: its serializer takes messages only, not BlockChunks.
        push = shared_channel(address).stream_unary(
            PUSH_METHOD, request_serializer=serialize_chunk,
            response_deserializer=worker_pb2.PushResponse.FromString)
        return push(chunks, timeout=self.timeout)

    def _shared(self, buffer: Buffer | None) -> SharedBuffer | None:
        return None


class SharedMemoryChannel(InlineChannel):
    """The stream names the shared buffer the snapshot lives in; the sender keeps the
    buffer untouched until the answer."""

    transport = Transport.SHARED_MEMORY

    def _shared(self, buffer: Buffer | None) -> SharedBuffer | None:
        return buffer


class Peers:
    """What each receiver said it accepts in its last answer, less the transports that
    failed it since (for good: the answer of a receiver that cannot read our memory
    still names our host)."""

    def __init__(self, host: str):
        self.host = host  # this sender's (empty: it offers no shared memory)
        self._lock = threading.Lock()
        self._accepts: dict[str, tuple[Transport, ...]] = {}
        self._failed: set[tuple[str, Transport]] = set()

    def accepts(self, address: str) -> tuple[Transport, ...]:
        with self._lock:
            return self._accepts.get(address, (Transport.INLINE,))

    def learn(self, address: str, accepts: Accepts) -> None:
        with self._lock:
            self._accepts[address] = tuple(t for t in accepts.transports(self.host)
                                           if (address, t) not in self._failed)

    def fail(self, address: str, transport: Transport) -> None:
        with self._lock:
            self._failed.add((address, transport))
            self._accepts[address] = tuple(t for t in self._accepts.get(address, ())
                                           if t is not transport) or (Transport.INLINE,)


class KVSender:
    """Pushes K/V to decode workers and keeps the totals a prefill worker reports."""

    def __init__(self, layout: worker_pb2.ModelLayout, timeout: float = 60.0,
                 share_memory: bool = True):
        self.layout = layout
        self.timeout = timeout
        self.host = host_identity() if share_memory else ""
        # Where snapshots are exported to: shared memory, so that a same-host push can
        # name them, where this host has it.
        self.buffers = BufferPool(SharedBuffer if self.host else HostBuffer)
        self.peers = Peers(self.host)
        self.channels = {c.transport: c for c in (InlineChannel(timeout),
                                                  SharedMemoryChannel(timeout))}
        self._lock = threading.Lock()
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

    def open(self, address: str, grant: PushGrant) -> KVTransfer:
        return KVTransfer(self, address, grant)

    def shares_memory_with(self, address: str) -> bool:
        return Transport.SHARED_MEMORY in self.peers.accepts(address)

    def push(self, address: str, grant: PushGrant, snapshot: KVSnapshot,
             hidden: np.ndarray | None, buffer: Buffer | None = None,
             exported: tuple[float, float] | None = None) -> int:
        """Send one push into ``grant``'s reservation and wait for the receiver's verdict;
        returns the bytes it took.

        ``buffer``: the one of ``self.buffers`` that ``snapshot`` lives in, if any; a
        receiver on this host then reads it from there. ``exported``: when reading the
        piece out of the pages began and ended; its trace span starts there.

        Raises ServingError: UNAVAILABLE or DEADLINE_EXCEEDED when the receiver could not
        be reached in time, FAILED_PRECONDITION when it refused the push (its reason kept).
        """
        start = time.perf_counter()
        span = tracing.NOT_TRACED if not grant.traceparent else tracing.start(
            "kv.push", grant.traceparent, tracing.SpanKind.CLIENT, {
                "olmo.target": address, "olmo.layer_begin": snapshot.layer_begin,
                "olmo.layer_end": snapshot.layer_end, "olmo.token_begin": snapshot.token_begin,
                "olmo.tokens": snapshot.num_tokens, "olmo.hidden": hidden is not None,
                **({"olmo.export_ms": 1000 * (exported[1] - exported[0]),
                    "olmo.queued_ms": 1000 * (start - exported[1])} if exported else {})},
            start_s=exported[0] if exported else None)
        try:
            reply, transport, encoding = self._send(address, grant, snapshot, hidden, buffer)
        except ServingError as exc:
            tracing.end(span, error=exc)
            raise
        seconds = time.perf_counter() - start
        tracing.end(span, attributes={"olmo.bytes": reply.bytes,
                                      "olmo.transport": transport.value,
                                      "olmo.encode_ms": 1000 * encoding,
                                      "olmo.receive_ms": reply.handled_us / 1000})
        self._count(grant.request_id, transport, reply.bytes, seconds, encoding)
        return reply.bytes

    def _send(self, address: str, grant: PushGrant, snapshot: KVSnapshot,
              hidden: np.ndarray | None, buffer: Buffer | None
              ) -> tuple[worker_pb2.PushResponse, Transport, float]:
        """One push by the best transport both ends take (inline if the receiver cannot
        read what it advertised): its answer, transport and seconds spent encoding."""
        encoding = [0.0]
        offers = ((Transport.SHARED_MEMORY, Transport.INLINE)
                  if isinstance(buffer, SharedBuffer) else (Transport.INLINE,))
        transport = choose_transport(offers, self.peers.accepts(address))
        args = (address, grant, self.layout, snapshot, hidden, buffer, encoding)
        try:
            reply = self.channels[transport].send(*args)
        except grpc.RpcError as exc:
            if transport is Transport.INLINE or exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise self._push_error(exc, grant.request_id, address) from exc
            self.peers.fail(address, transport)  # it advertised what it cannot read
            transport = Transport.INLINE
            try:
                reply = self.channels[transport].send(*args)
            except grpc.RpcError as exc2:
                raise self._push_error(exc2, grant.request_id, address) from exc2
        self.peers.learn(address, Accepts(reply.shared_memory_host))
        return reply, transport, encoding[0]

    def take_totals(self, request_id: str) -> tuple[int, float]:
        """(bytes, seconds) of this request's pushes so far, forgotten once taken."""
        with self._lock:
            return self._by_request.pop(request_id, (0, 0.0))

    def close(self) -> None:
        self.buffers.close()

    def _count(self, request_id: str, transport: Transport, sent: int, seconds: float,
               encoding: float) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.pushes += 1
            self.transfer_seconds += seconds
            self.encode_seconds += encoding
            if transport is Transport.SHARED_MEMORY:
                self.shared_pushes += 1
                self.shared_bytes += sent
                self.shared_seconds += seconds
            so_far, took = self._by_request.pop(request_id, (0, 0.0))
            self._by_request[request_id] = (so_far + sent, took + seconds)
            while len(self._by_request) > TOTALS_KEPT:
                self._by_request.popitem(last=False)

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
