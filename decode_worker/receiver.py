"""One decode stage's KV receiver: pieces assembled, verified, and kept until installed.

A request's K/V reaches a stage in pieces: each push carries a range of layers (the
prefill instance's stages need not line up with ours) and a range of the reserved
tokens (a prefill worker sends each chunk's K/V while it computes the next). Every piece
is written straight into the request's assembly, one buffer the shape of all its K/V on
this stage, and counts only once its push has been verified whole. The request is ready
when verified pieces cover every layer and token exactly once (of a sliding-window layer,
the positions it reads again: ``kept_from``) and, on the stage that owns the LM head, the
last hidden state has come. Nothing of a push that fails any check
counts. A piece from a later try of the prefill leg starts the assembly over; one from an
earlier try is refused. Once the request is complete, a piece of any later try is
acknowledged and dropped (``AlreadyComplete``): the engine may be installing what is
there, and a prompt's K/V is the same whichever try computed it.

The receiver is a ``PieceSink`` (kv_transfer/transport.py): transports ``claim`` a piece
from its header, write it, and ``commit`` or ``release`` it; it never sees their wire.
``receive`` takes a gRPC push's chunks (inline or shared memory), ``receive_piece`` plain
arrays (the loopback transport of unit tests).
"""

from __future__ import annotations

import dataclasses
import hmac
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import grpc
import numpy as np

from kv_transfer.buffers import Buffer, BufferPool
from kv_transfer.codec import check_hidden, receive_push
from kv_transfer.shared_memory import host_identity
from kv_transfer.transport import (
    Accepts,
    AlreadyComplete,
    KVPiece,
    PieceHeader,
    Received,
    Transport,
    deliver,
)
from olmo_model.kv_pages import KVSnapshot
from olmo_model.stages import StageSpec
from protos import worker_pb2
from protos.clock import MONOTONIC, Clock
from protos.errors import ServingError


@dataclasses.dataclass
class Assembly:
    """Where one try's pieces of a request land: keys and values shaped [stage layers,
    reserved tokens, kv_heads, head_dim] in ``buffer``, which pieces still being written
    (``writers``) keep from reuse."""

    buffer: Buffer
    keys: np.ndarray
    values: np.ndarray
    filled: np.ndarray   # bool [layers, tokens]: verified
    claimed: np.ndarray  # bool [layers, tokens]: a push is writing there
    needed_from: tuple[int, ...]  # per layer, the first of the tokens it reads again
    writers: int = 0
    retired: bool = False  # no longer wanted: the buffer goes back once no one writes


@dataclasses.dataclass
class PendingKV:
    """A request's K/V as it arrives at this stage."""

    prompt_tokens: int      # the tokens pushes carry: the prompt's from token_begin on
    token_begin: int = 0    # the prompt's first tokens before it are in the cache already
    push_token: bytes = b""  # what its pushes carry: the reservation's (PushGrant.token)
    attempt: int = 0        # the prefill leg's try that the assembly holds
    assembly: Assembly | None = None
    hidden: np.ndarray | None = None
    arrived_at: float = 0.0  # perf_counter time its latest piece counted


@dataclasses.dataclass
class Piece:
    """The part of a request's assembly one push writes (a transport's ``Claim``): local
    layers and tokens, and views of them to write into."""

    request_id: str
    assembly: Assembly | None  # None once it counts
    layers: slice
    tokens: slice
    keys: np.ndarray
    values: np.ndarray


class KVReceiver:
    def __init__(self, layout: worker_pb2.ModelLayout, spec: StageSpec,
                 on_arrival: Callable[[], None] = lambda: None, accepts_shared: bool = True,
                 kept_from: Callable[[int, int], int] = lambda layer, prompt_tokens: 0,
                 clock: Clock = MONOTONIC):
        """``kept_from(layer, prompt_tokens)``: the first position of a prompt that a
        layer needs (``OLMoConfig.kv_kept_from``); pushes need not carry the others.
        ``clock``: what handling a push is timed by."""
        self.layout = layout
        self.spec = spec
        self.kept_from = kept_from
        self.on_arrival = on_arrival  # wakes the engine's step loop
        self.accepts_shared = accepts_shared  # pushes naming a same-host sender's buffer
        self.clock = clock
        self._host = host_identity()
        self._pending: dict[str, PendingKV] = {}
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.pushes_refused = 0
        self.pushes = 0  # taken (verified and kept)
        self.assemble_seconds = 0.0  # handling chunks as they arrive (not waiting for them)
        self.shared_pushes = 0  # of the pushes taken, those read from shared memory
        self.shared_bytes = 0
        self.buffers = BufferPool()  # assemblies, until installed

    def expect(self, request_id: str, prompt_tokens: int, token_begin: int,
               push_token: bytes) -> None:
        """Take pushes for ``request_id`` that carry ``push_token`` (which must not be
        empty: that would let in pushes that carry none)."""
        if not push_token:
            raise ValueError(f"no push token for {request_id!r}")
        with self._lock:
            self._retire(self._pending.pop(request_id, None))
            self._pending[request_id] = PendingKV(prompt_tokens, token_begin, push_token)

    def accepts(self) -> Accepts:
        """What this receiver takes, as its every answer says (the senders' negotiation)."""
        return Accepts(self._host if self.accepts_shared else "")

    def receive(self, chunks: Iterable[worker_pb2.KVChunk]) -> Received:
        """Take one push off a gRPC stream: assemble and verify it into its request;
        returns its bytes and the time taking it.

        Raises ServingError (and counts nothing of it) when any check fails; the
        reservation stays open until its lease ends, so that the prefill leg can be
        retried.
        """
        return self._take(lambda: receive_push(chunks, self, self.layout, self.accepts_shared,
                                               self.clock))

    def receive_piece(self, piece: KVPiece) -> int:
        """Take one push of plain arrays (the loopback transport), as ``receive`` does;
        its bytes."""
        return self._take(lambda: deliver(piece, self, self.clock)).bytes

    def _take(self, receive: Callable[[], Received]) -> Received:
        try:
            received = receive()
        except ServingError:
            with self._lock:
                self.pushes_refused += 1
            raise
        with self._lock:
            self.pushes += 1
            self.assemble_seconds += received.seconds
            self.bytes_received += received.bytes
            if received.transport is Transport.SHARED_MEMORY:
                self.shared_pushes += 1
                self.shared_bytes += received.bytes
        self.on_arrival()
        return received

    def ready(self, request_ids: Sequence[str]) -> list[str]:
        with self._lock:
            return [r for r in request_ids if r in self._pending and self._complete(r)]

    def arrived_at(self, request_id: str) -> float | None:
        """When the request's latest piece counted (None: none has, or it left)."""
        with self._lock:
            pending = self._pending.get(request_id)
            return pending.arrived_at or None if pending is not None else None

    def take(self, request_id: str) -> PendingKV:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or not self._complete(request_id):
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"the K/V of request {request_id!r} is not all here")
            return self._pending.pop(request_id)

    def snapshot(self, pending: PendingKV) -> KVSnapshot:
        """A complete request's K/V (see ``take``): all of the stage's layers."""
        return KVSnapshot(self.spec.layer_begin, self.spec.layer_end, pending.assembly.keys,
                          pending.assembly.values, pending.token_begin,
                          tuple(pending.token_begin + n for n in pending.assembly.needed_from))

    def recycle(self, pending: PendingKV) -> None:
        """Its K/V is installed (or no longer wanted): its buffer serves the next pushes."""
        with self._lock:
            self._retire(pending)

    def drop(self, request_ids: Iterable[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._retire(self._pending.pop(request_id, None))

    def clear(self) -> None:
        with self._lock:
            for pending in self._pending.values():
                self._retire(pending)
            self._pending = {}

    def waiting(self) -> int:
        with self._lock:
            return len(self._pending)

    # --- pieces (the PieceSink a transport delivers into) ------------------------------

    def claim(self, header: PieceHeader) -> Piece:
        """Check a push's header against its request; the part of the assembly it may
        write (allocated with the request's first piece). Raises ServingError: first of
        all UNAUTHENTICATED, telling nothing more, unless the header carries the push
        token of an open reservation of the request it names."""
        request_id = header.request_id
        begin, count = header.token_begin, header.num_tokens
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or not hmac.compare_digest(header.push_token,
                                                          pending.push_token):
                raise ServingError(grpc.StatusCode.UNAUTHENTICATED,
                                   "no open reservation takes this push (unknown request, "
                                   "or not its push token)")
            if not self.spec.layer_begin <= header.layer_begin < header.layer_end \
                    <= self.spec.layer_end:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"push carries layers [{header.layer_begin}, "
                                   f"{header.layer_end}) but this worker owns "
                                   f"[{self.spec.layer_begin}, {self.spec.layer_end})")
            reserved_end = pending.token_begin + pending.prompt_tokens
            if not pending.token_begin <= begin < begin + count <= reserved_end:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"push carries {count} tokens from position {begin} but "
                                   f"{pending.prompt_tokens} from {pending.token_begin} were "
                                   "reserved")
            if header.attempt < pending.attempt:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"push for {request_id!r} is from prefill try "
                                   f"{header.attempt}; try {pending.attempt} replaced it")
            if self._complete(request_id):
                # Verified whole, so ready to install (perhaps between ready and take): a
                # later try's push must not void it under the installer's feet.
                raise AlreadyComplete(request_id)
            if header.attempt > pending.attempt:  # a retry: what the last try sent is void
                self._retire(pending)
                pending.attempt, pending.hidden = header.attempt, None
            if pending.assembly is None:
                pending.assembly = self._assemble(pending)
            assembly = pending.assembly
            layers = slice(header.layer_begin - self.spec.layer_begin,
                           header.layer_end - self.spec.layer_begin)
            tokens = slice(begin - pending.token_begin, begin - pending.token_begin + count)
            region = (layers, tokens)
            if assembly.filled[region].any() or assembly.claimed[region].any():
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"layers [{header.layer_begin}, {header.layer_end}) of "
                                   f"tokens [{begin}, {begin + count}) of {request_id!r} "
                                   "arrived twice")
            assembly.claimed[region] = True
            assembly.writers += 1
            return Piece(request_id, assembly, layers, tokens, assembly.keys[region],
                         assembly.values[region])

    def commit(self, piece: Piece, hidden: np.ndarray | None) -> None:
        """A verified piece counts (if its request and try still want it). Raises
        ServingError, and the piece stays claimed for ``release``."""
        if hidden is not None:
            check_hidden(hidden, self.layout, accepts_hidden=self.spec.is_last)
        with self._lock:
            pending = self._pending.get(piece.request_id)
            if pending is None or pending.assembly is not piece.assembly:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"request {piece.request_id!r} was released or retried "
                                   "during its push")
            if hidden is not None and pending.hidden is not None:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"the hidden state of {piece.request_id!r} arrived twice")
            region = (piece.layers, piece.tokens)
            piece.assembly.filled[region] = True
            piece.assembly.claimed[region] = False
            piece.assembly.writers -= 1
            if hidden is not None:
                pending.hidden = hidden
            pending.arrived_at = time.perf_counter()
            piece.assembly = None  # done with it: nothing for release to undo

    def release(self, piece: Piece) -> None:
        """A push that failed: its part of the assembly is free again (or, the assembly
        retired meanwhile, the buffer goes back once no push writes into it)."""
        with self._lock:
            assembly, piece.assembly = piece.assembly, None
            if assembly is None:  # committed or released already
                return
            assembly.claimed[piece.layers, piece.tokens] = False
            assembly.writers -= 1
            if assembly.retired and not assembly.writers:
                self.buffers.give(assembly.buffer)

    def _assemble(self, pending: PendingKV) -> Assembly:
        layers = self.spec.num_local_layers
        shape = (layers, pending.prompt_tokens, self.layout.num_kv_heads, self.layout.head_dim)
        buffer = self.buffers.take(Buffer.bytes_for(shape, self.layout.dtype))
        keys, values = buffer.arrays(shape, self.layout.dtype)
        end = pending.token_begin + pending.prompt_tokens
        needed_from = tuple(max(0, self.kept_from(layer, end) - pending.token_begin)
                            for layer in self.spec.layers)
        return Assembly(buffer, keys, values,
                        filled=np.zeros((layers, pending.prompt_tokens), bool),
                        claimed=np.zeros((layers, pending.prompt_tokens), bool),
                        needed_from=needed_from)

    def _retire(self, pending: PendingKV | None) -> None:
        """Let go of the request's assembly (with the lock held): its buffer is reused
        at once, or when the last push still writing into it ends."""
        if pending is None or pending.assembly is None:
            return
        assembly, pending.assembly = pending.assembly, None
        assembly.retired = True
        if not assembly.writers:
            self.buffers.give(assembly.buffer)

    def _complete(self, request_id: str) -> bool:
        pending = self._pending[request_id]
        assembly = pending.assembly
        if assembly is None or not all(assembly.filled[layer, first:].all()
                                       for layer, first in enumerate(assembly.needed_from)):
            return False
        return pending.hidden is not None or not self.spec.is_last
