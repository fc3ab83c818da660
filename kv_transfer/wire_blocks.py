"""K/V blocks on the wire without protobuf's copies.

Blocks are nearly all of a push's bytes. Through protobuf, each byte is copied three
times on the sender (``tobytes``, into the message, serializing it) and once more on the
receiver (parsing) before it lands where it is assembled. ``BlockChunk`` writes the very
same encoding of a ``KVChunk`` holding a ``KVBlock`` straight from the arrays, in one
join, and ``parse_chunk`` reads one back as views of the received bytes. Any protobuf
reader sees an ordinary KVChunk; chunks of other kinds, and blocks encoded in any way
but the plain one, go through protobuf as before.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np

from protos import worker_pb2

# KVChunk.block is field 2; KVBlock's fields are layer 1, token_begin 2, num_tokens 3
# (varints), keys 4 and values 5 (bytes). A tag is (field << 3) | wire type.
_BLOCK_TAG = 2 << 3 | 2
_VARINT_TAGS = {1 << 3: "layer", 2 << 3: "token_begin", 3 << 3: "num_tokens"}
_BYTES_TAGS = {4 << 3 | 2: "keys", 5 << 3 | 2: "values"}


class BlockChunk:
    """A KVChunk holding one KVBlock, as it goes on the wire. It reads as the generated
    message does where the push codec reads one (``WhichOneof``, ``block`` and the
    block's fields; ``keys`` and ``values`` are buffers, not necessarily bytes)."""

    __slots__ = ("layer", "token_begin", "num_tokens", "keys", "values", "_encoded")

    def __init__(self, layer: int, token_begin: int, num_tokens: int, keys, values,
                 encoded: bytes | None = None):
        self.layer, self.token_begin, self.num_tokens = layer, token_begin, num_tokens
        self.keys, self.values = keys, values
        self._encoded = encoded

    @classmethod
    def of_arrays(cls, layer: int, token_begin: int, keys: np.ndarray, values: np.ndarray
                  ) -> BlockChunk:
        """The block of ``keys`` and ``values`` (C-contiguous; ``num_tokens`` is their
        first dimension), encoded at once."""
        keys_view, values_view = memoryview(keys).cast("B"), memoryview(values).cast("B")
        fields = bytearray()
        for tag, value in ((1 << 3, layer), (2 << 3, token_begin), (3 << 3, keys.shape[0])):
            if value:  # proto3 leaves zeros out
                fields += _varint(tag) + _varint(value)
        keys_head = _varint(4 << 3 | 2) + _varint(keys_view.nbytes)
        values_head = _varint(5 << 3 | 2) + _varint(values_view.nbytes)
        size = len(fields) + len(keys_head) + keys_view.nbytes + len(values_head) + \
            values_view.nbytes
        encoded = b"".join([_varint(_BLOCK_TAG), _varint(size), fields, keys_head, keys_view,
                            values_head, values_view])
        return cls(layer, token_begin, keys.shape[0], keys_view, values_view, encoded)

    def WhichOneof(self, name: str) -> str:  # noqa: N802 (the generated message's name)
        return "block"

    @property
    def block(self) -> BlockChunk:
        return self

    def SerializeToString(self) -> bytes:  # noqa: N802 (the generated message's name)
        return self._encoded


def serialize_chunk(chunk: worker_pb2.KVChunk | BlockChunk) -> bytes:
    return chunk.SerializeToString()


def parse_chunk(data: bytes) -> worker_pb2.KVChunk | BlockChunk:
    """A received KVChunk: a plainly encoded block as views of ``data``, anything else
    (and anything malformed, which protobuf then refuses) through protobuf."""
    block = _parse_block(memoryview(data))
    return block if block is not None else worker_pb2.KVChunk.FromString(data)


def _parse_block(data: memoryview) -> BlockChunk | None:
    tag, at = _read_varint(data, 0)
    if tag != _BLOCK_TAG:
        return None
    size, at = _read_varint(data, at)
    if size is None or at + size != len(data):
        return None
    fields: dict[str, object] = {"layer": 0, "token_begin": 0, "num_tokens": 0,
                                 "keys": b"", "values": b""}
    seen = set()
    while at < len(data):
        tag, at = _read_varint(data, at)
        if tag in seen:  # protobuf's rule for repeats (last wins) is not worth copying
            return None
        seen.add(tag)
        if tag in _VARINT_TAGS:
            value, at = _read_varint(data, at)
            if value is None or value >= 2**32:
                return None
            fields[_VARINT_TAGS[tag]] = value
        elif tag in _BYTES_TAGS:
            length, at = _read_varint(data, at)
            if length is None or at + length > len(data):
                return None
            fields[_BYTES_TAGS[tag]] = data[at:at + length]
            at += length
        else:
            return None
    return BlockChunk(**fields)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview, at: int) -> tuple[int | None, int]:
    """(value, next position); value None when no whole varint of at most 64 bits is there."""
    value = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    return None, at


class BlockViewsRegistration:
    """Stands in for a server to a generated ``add_*Servicer_to_server``: the handler of
    ``method`` (``/package.Service/Method``) gets its chunks through ``parse_chunk``."""

    def __init__(self, server: grpc.Server, method: str):
        self._server = server
        self._service, self._name = method.strip("/").rsplit("/", 1)
        self._method = method

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_Parsing(h, self._method) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        if service == self._service and self._name in handlers:
            handlers = {**handlers, self._name: _parsing(handlers[self._name])}
        self._server.add_registered_method_handlers(service, handlers)


class _Parsing(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, method: str):
        self._inner, self._method = inner, method

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        if handler is not None and handler_call_details.method == self._method:
            handler = _parsing(handler)
        return handler


def _parsing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserializer: Callable[[bytes], object] = parse_chunk
    return handler._replace(request_deserializer=deserializer)
