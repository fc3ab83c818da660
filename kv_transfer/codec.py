"""The KV push codec: a sequence's K/V and last hidden state as a verified chunk stream.

Sender side: ``encode_push`` turns a ``KVSnapshot`` (a range of layers and of tokens: a
request's K/V may go as several such pieces) and, with the prompt's last piece, the hidden
state into a header, K/V blocks each under the size budget (or, on one host, a reference
to the shared buffer the snapshot lives in), the hidden state and a CRC32 trailer.
Receiver side: ``KVAssembler`` checks each chunk as it arrives, writing the K/V where the
receiver's ``admit`` says, and is complete only when the stream was whole, in order and
intact; anything else raises ``PushRefused``. ``receive_push`` drives it over one push's
chunks into a ``PieceSink`` (kv_transfer/transport.py), which sees plain pieces only.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable, Iterable, Iterator

import grpc
import numpy as np

from olmo_model.kv_pages import KVSnapshot
from olmo_model.runtime import ModelRunner
from protos import worker_pb2
from protos.clock import MONOTONIC, Clock
from protos.errors import ServingError
from protos.layout import layout_mismatch

from .shared_memory import SharedBuffer, read_shared
from .transport import (
    AlreadyComplete,
    Claim,
    PieceHeader,
    PieceSink,
    PushGrant,
    Received,
    Transport,
)
from .wire_blocks import BlockChunk

BLOCK_BYTES = 2 * 2**20  # per block, keys and values together


def model_layout(runner: ModelRunner) -> worker_pb2.ModelLayout:
    """What a worker's runner holds, as its peers and the router see it."""
    config, stage = runner.config, runner.stage
    return worker_pb2.ModelLayout(
        model_fingerprint=runner.artifact.fingerprint, dtype=runner.dtype,
        page_size=runner.limits.page_size, num_layers=config.num_hidden_layers,
        layer_begin=stage.layer_begin, layer_end=stage.layer_end,
        num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
        hidden_size=config.hidden_size, context_window=config.context_window_size,
        vocab_size=config.vocab_size, eos_token_ids=list(config.eos_token_id))


class PushRefused(ServingError):
    """A KV push the receiver will not install; the message says which check failed."""

    def __init__(self, reason: str):
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, f"KV push refused: {reason}")


class SharedUnreadable(ServingError):
    """The receiver cannot read the sender's shared buffer (another pid namespace, say,
    or it takes no shared pushes): UNIMPLEMENTED, so the sender sends inline instead."""

    def __init__(self, reason: str):
        super().__init__(grpc.StatusCode.UNIMPLEMENTED, f"shared K/V unreadable here: {reason}")


def encode_push(grant: PushGrant, layout: worker_pb2.ModelLayout, snapshot: KVSnapshot,
                hidden: np.ndarray | None, shared: SharedBuffer | None = None,
                block_views: bool = False) -> Iterator[worker_pb2.KVChunk | BlockChunk]:
    """The chunks of one push into ``grant``'s reservation. ``hidden``: the prompt's last
    hidden state, with its last piece to the stage that owns the LM head; else None.

    ``shared``: the buffer ``snapshot`` lives in, when the receiver shares this host; the
    push then names it instead of carrying blocks (the caller keeps it untouched until
    the receiver has answered). ``block_views``:
    blocks as ``BlockChunk`` (encoded from the arrays without protobuf's copies), for a
    call that serializes with ``wire_blocks.serialize_chunk``.
    """
    header_layout = worker_pb2.ModelLayout()
    header_layout.CopyFrom(layout)
    header_layout.layer_begin, header_layout.layer_end = snapshot.layer_begin, snapshot.layer_end
    if shared is not None:
        yield _header(grant, header_layout, snapshot, 1)
        yield worker_pb2.KVChunk(shared=worker_pb2.SharedKV(
            pid=shared.pid, fd=shared.fd, keys_offset=shared.offset_of(snapshot.keys),
            values_offset=shared.offset_of(snapshot.values),
            layer_stride=snapshot.keys.strides[0]))
        crc = _crc32(snapshot.values, _crc32(snapshot.keys, 0))
    else:
        tokens_per_block = max(1, BLOCK_BYTES // (2 * snapshot.keys[0, 0].nbytes))
        blocks = [(layer, begin) for layer in range(snapshot.keys.shape[0])
                  for begin in range(0, snapshot.num_tokens, tokens_per_block)]
        yield _header(grant, header_layout, snapshot, len(blocks))
        crc = 0
        for layer, begin in blocks:
            end = min(begin + tokens_per_block, snapshot.num_tokens)
            keys = np.ascontiguousarray(snapshot.keys[layer, begin:end])
            values = np.ascontiguousarray(snapshot.values[layer, begin:end])
            crc = zlib.crc32(values, zlib.crc32(keys, crc))
            if block_views:
                yield BlockChunk.of_arrays(snapshot.layer_begin + layer, begin, keys, values)
                continue
            yield worker_pb2.KVChunk(block=worker_pb2.KVBlock(
                layer=snapshot.layer_begin + layer, token_begin=begin, num_tokens=end - begin,
                keys=keys.tobytes(), values=values.tobytes()))
    if hidden is not None:
        data = np.ascontiguousarray(hidden, dtype=np.float32).tobytes()
        crc = zlib.crc32(data, crc)
        yield worker_pb2.KVChunk(hidden=worker_pb2.HiddenState(data=data))
    yield worker_pb2.KVChunk(trailer=worker_pb2.KVTrailer(crc32=crc))


def _header(grant: PushGrant, layout: worker_pb2.ModelLayout, snapshot: KVSnapshot,
            num_blocks: int) -> worker_pb2.KVChunk:
    return worker_pb2.KVChunk(header=worker_pb2.KVHeader(
        request_id=grant.request_id, layout=layout, num_tokens=snapshot.num_tokens,
        num_blocks=num_blocks, token_begin=snapshot.token_begin, attempt=grant.attempt,
        push_token=grant.token))


class PushState(enum.Enum):
    WAITING_FOR_HEADER = "waiting for header"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"


class KVAssembler:
    """Receives one push into the arrays its receiver gives, verifying as it goes.

    A push may carry any part of the receiver's layer range (pipeline stages of the two
    instances need not line up) and any range of the reserved tokens; whether the
    receiver takes that part, and a hidden state, is the receiver's to check.
    """

    def __init__(self, layout: worker_pb2.ModelLayout,
                 admit: Callable[[PieceHeader], tuple[np.ndarray, np.ndarray]],
                 accepts_shared: bool = True):
        self.layout = layout
        self.accepts_shared = accepts_shared  # K/V from a buffer of a same-host sender
        # Asked with the checked header before any K/V arrives: where to write it, as
        # keys and values shaped [layers, tokens, kv_heads, head_dim] (views of the
        # request's assembly; each layer's tokens contiguous). Raises ServingError to
        # refuse the push.
        self.admit = admit
        self.state = PushState.WAITING_FOR_HEADER
        self.request_id = ""
        self.token_begin = 0
        self.hidden: np.ndarray | None = None
        self.bytes_received = 0
        self._crc = 0
        self._blocks_seen = 0
        self._filled: np.ndarray | None = None
        self.shared = False  # the K/V came through shared memory

    def add(self, chunk: worker_pb2.KVChunk | BlockChunk) -> None:
        try:
            part = chunk.WhichOneof("part")
            if part == "header":
                self._on_header(chunk.header)
            elif self.state is not PushState.RECEIVING:
                raise PushRefused(f"{part} arrived while {self.state.value}")
            elif part == "block":
                self._on_block(chunk.block)
            elif part == "shared":
                self._on_shared(chunk.shared)
            elif part == "hidden":
                self._on_hidden(chunk.hidden)
            elif part == "trailer":
                self._on_trailer(chunk.trailer)
            else:
                raise PushRefused("empty chunk")
        except ServingError:
            self.state = PushState.FAILED
            raise

    def snapshot(self) -> KVSnapshot:
        if self.state is not PushState.COMPLETE:
            raise PushRefused(f"push for {self.request_id!r} ended while {self.state.value}")
        return KVSnapshot(self.layer_begin, self.layer_end, self._keys, self._values,
                          self.token_begin)

    def _on_header(self, header: worker_pb2.KVHeader) -> None:
        if self.state is not PushState.WAITING_FOR_HEADER:
            raise PushRefused("a second header arrived in one push")
        begin, end = header.layout.layer_begin, header.layout.layer_end
        self.layer_begin, self.layer_end = begin, end
        # Admitted first: a push without its reservation's token learns nothing else.
        self._keys, self._values = self.admit(PieceHeader(
            header.request_id, header.attempt, begin, end, header.token_begin,
            header.num_tokens, header.push_token))
        reason = layout_mismatch(self.layout, header.layout)
        if reason:
            raise PushRefused(f"incompatible peer: {reason}")
        if not 0 < header.num_tokens <= self.layout.context_window - header.token_begin:
            raise PushRefused(f"push announces {header.num_tokens} tokens from position "
                              f"{header.token_begin}; a sequence has 1 to "
                              f"{self.layout.context_window}")
        self.token_begin = header.token_begin
        self.request_id = header.request_id
        self.num_tokens = header.num_tokens
        self.num_blocks = header.num_blocks
        self._filled = np.zeros((end - begin, header.num_tokens), dtype=bool)
        self.state = PushState.RECEIVING

    def _on_block(self, block: worker_pb2.KVBlock | BlockChunk) -> None:
        layer = block.layer - self.layer_begin
        end = block.token_begin + block.num_tokens
        if not (0 <= layer < self._keys.shape[0] and block.num_tokens and end <= self.num_tokens):
            raise PushRefused(f"block for layer {block.layer}, tokens [{block.token_begin}, {end}) "
                              "is outside the announced range")
        expected = block.num_tokens * self._keys[0, 0].nbytes
        if len(block.keys) != expected or len(block.values) != expected:
            raise PushRefused(f"block for layer {block.layer} has {len(block.keys)}/"
                              f"{len(block.values)} bytes of keys/values, expected {expected}")
        if self._filled[layer, block.token_begin:end].any():
            raise PushRefused(f"block for layer {block.layer} overlaps one already received")
        shape = self._keys[layer, block.token_begin:end].shape
        self._keys[layer, block.token_begin:end] = np.frombuffer(
            block.keys, self.layout.dtype).reshape(shape)
        self._values[layer, block.token_begin:end] = np.frombuffer(
            block.values, self.layout.dtype).reshape(shape)
        self._filled[layer, block.token_begin:end] = True
        self._crc = zlib.crc32(block.values, zlib.crc32(block.keys, self._crc))
        self._blocks_seen += 1
        self.bytes_received += 2 * expected

    def _on_shared(self, shared: worker_pb2.SharedKV) -> None:
        if not self.accepts_shared:
            raise SharedUnreadable("this worker takes K/V only inline")
        if self._blocks_seen:
            raise PushRefused("shared K/V arrived after other K/V")
        # Each layer's tokens lie together on both ends; the sender's layers lie
        # ``layer_stride`` apart (some of its tokens may not be pushed).
        stride = shared.layer_stride or self._keys[0].nbytes
        if stride < self._keys[0].nbytes:
            raise PushRefused(f"shared K/V layers {stride} bytes apart hold "
                              f"{self._keys[0].nbytes} bytes each")
        parts = [(offset + layer * stride, array[layer])
                 for offset, array in ((shared.keys_offset, self._keys),
                                       (shared.values_offset, self._values))
                 for layer in range(array.shape[0])]
        try:
            read_shared(shared.pid, shared.fd, parts)
        except OSError as exc:
            raise SharedUnreadable(str(exc)) from exc
        except ValueError as exc:
            raise PushRefused(str(exc)) from exc
        self._filled[:] = True
        self._crc = _crc32(self._values, _crc32(self._keys, self._crc))
        self._blocks_seen += 1
        self.bytes_received += self._keys.nbytes + self._values.nbytes
        self.shared = True

    def _on_hidden(self, hidden: worker_pb2.HiddenState) -> None:
        # Whether this worker takes a hidden state, and this one, the receiver checks
        # (check_hidden) when the push is committed.
        if self.hidden is not None:
            raise PushRefused("a second hidden state arrived")
        if len(hidden.data) != 4 * self.layout.hidden_size:
            raise PushRefused(f"hidden state has {len(hidden.data)} bytes, expected "
                              f"{4 * self.layout.hidden_size}")
        self.hidden = np.frombuffer(hidden.data, np.float32).copy()
        self._crc = zlib.crc32(hidden.data, self._crc)

    def _on_trailer(self, trailer: worker_pb2.KVTrailer) -> None:
        if self._blocks_seen != self.num_blocks or not self._filled.all():
            raise PushRefused(f"push is incomplete: {self._blocks_seen} of {self.num_blocks} "
                              "blocks arrived")
        if trailer.crc32 != self._crc:
            # Neither checksum in the message: it would tell a pusher about memory it
            # pointed the receiver at.
            raise PushRefused("checksum mismatch: the K/V or hidden state is not what the "
                              "sender checksummed")
        self.state = PushState.COMPLETE


def receive_push(chunks: Iterable[worker_pb2.KVChunk], sink: PieceSink,
                 layout: worker_pb2.ModelLayout, accepts_shared: bool = True,
                 clock: Clock = MONOTONIC) -> Received:
    """Assemble and verify one push's chunks (a gRPC stream's) into ``sink``: claimed
    with its header, committed once whole and intact, released on any failure (a
    refusal, or the stream breaking) so that nothing of it counts. A push for a request
    that has all its K/V is acknowledged at its header, as 0 bytes, the rest unread.
    Raises ServingError when a check fails."""
    claims: list[Claim] = []

    def admit(header: PieceHeader) -> tuple[np.ndarray, np.ndarray]:
        claims.append(sink.claim(header))
        return claims[0].keys, claims[0].values

    assembler = KVAssembler(layout, admit, accepts_shared)
    busy = 0.0
    try:
        for chunk in chunks:
            start = clock.now()
            assembler.add(chunk)
            busy += clock.now() - start
        assembler.snapshot()  # raises unless the push was whole and intact
        sink.commit(claims[0], assembler.hidden)
    except AlreadyComplete:
        return Received(0, Transport.INLINE, busy)
    except BaseException:
        if claims:
            sink.release(claims[0])
        raise
    transport = Transport.SHARED_MEMORY if assembler.shared else Transport.INLINE
    return Received(assembler.bytes_received, transport, busy)


def check_hidden(hidden: np.ndarray, layout: worker_pb2.ModelLayout, accepts_hidden: bool
                 ) -> None:
    """Refuse a pushed last hidden state that the receiver cannot use. Raises PushRefused."""
    if not accepts_hidden:
        raise PushRefused("this worker does not own the LM head but received a hidden state")
    if hidden.shape != (layout.hidden_size,) or hidden.dtype != np.float32:
        raise PushRefused(f"hidden state is {hidden.dtype} {hidden.shape}, expected float32 "
                          f"({layout.hidden_size},)")
    if not np.isfinite(hidden).all():
        raise PushRefused("the hidden state holds non-finite values")


def _crc32(array: np.ndarray, crc: int) -> int:
    """The checksum of ``array``'s bytes in C order, going on from ``crc`` (a view of an
    assembly is contiguous per layer only)."""
    if array.flags.c_contiguous:
        return zlib.crc32(array, crc)
    for part in array:
        crc = _crc32(part, crc)
    return crc
