"""K/V blocks encoded and parsed without protobuf's copies read as protobuf's own bytes.

The sender's ``BlockChunk`` must be exactly what protobuf would write, and the receiver's
``parse_chunk`` must read any bytes as protobuf reads them: the same fields where it
takes the fast path, protobuf itself (and its refusals) everywhere else.
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from kv_transfer.wire_blocks import BlockChunk, parse_chunk
from protos import worker_pb2

FIELDS = ("layer", "token_begin", "num_tokens", "keys", "values")


def arrays(tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((tokens, 2, 8), np.float32),
            rng.standard_normal((tokens, 2, 8), np.float32))


def protobuf_block(layer: int, begin: int, keys: np.ndarray, values: np.ndarray
                   ) -> worker_pb2.KVChunk:
    return worker_pb2.KVChunk(block=worker_pb2.KVBlock(
        layer=layer, token_begin=begin, num_tokens=keys.shape[0], keys=keys.tobytes(),
        values=values.tobytes()))


def same_block(ours, theirs: worker_pb2.KVBlock) -> bool:
    return all(bytes(getattr(ours, f)) == getattr(theirs, f) if f in ("keys", "values")
               else getattr(ours, f) == getattr(theirs, f) for f in FIELDS)


@pytest.mark.parametrize("layer, begin, tokens", [(0, 0, 1), (3, 16, 40), (200, 70000, 300)])
def test_a_block_chunk_is_byte_for_byte_protobufs(layer, begin, tokens):
    keys, values = arrays(tokens)
    ours = BlockChunk.of_arrays(layer, begin, keys, values).SerializeToString()
    assert ours == protobuf_block(layer, begin, keys, values).SerializeToString()
    parsed = parse_chunk(ours)
    assert isinstance(parsed, BlockChunk) and parsed.WhichOneof("part") == "block"
    assert same_block(parsed.block, worker_pb2.KVChunk.FromString(ours).block)


def as_block_chunk(block: bytes) -> bytes:
    """A KVChunk around an encoded KVBlock: field 2, its length as a varint, the block."""
    size, length = len(block), bytearray()
    while size > 0x7F:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    return b"\x12" + bytes(length) + bytes([size]) + block


def test_other_chunks_and_unusual_encodings_go_through_protobuf():
    trailer = worker_pb2.KVChunk(trailer=worker_pb2.KVTrailer(crc32=7)).SerializeToString()
    assert parse_chunk(trailer).trailer.crc32 == 7
    keys, values = arrays(4)
    block = protobuf_block(1, 2, keys, values).block.SerializeToString()
    # An unknown field (protobuf keeps it aside) and a repeated one (the last wins).
    for extra in (b"\x30\x05", b"\x08\x09"):
        data = as_block_chunk(block + extra)
        parsed = parse_chunk(data)
        assert isinstance(parsed, worker_pb2.KVChunk)
        assert same_block(parsed.block, worker_pb2.KVChunk.FromString(data).block)


def test_any_bytes_parse_as_protobuf_parses_them():
    keys, values = arrays(6)
    good = BlockChunk.of_arrays(5, 32, keys, values).SerializeToString()
    rng = np.random.default_rng(1)
    for _ in range(400):  # bounded: flipped, cut and grown copies of a good block
        data = bytearray(good)
        kind = rng.integers(3)
        if kind == 0:
            for at in rng.integers(0, len(data), rng.integers(1, 4)):
                data[at] = rng.integers(256)
        elif kind == 1:
            data = data[:rng.integers(len(data))]
        else:
            data += bytes(rng.integers(0, 256, rng.integers(1, 8)).tolist())
        data = bytes(data)
        try:
            expected = worker_pb2.KVChunk.FromString(data)
        except DecodeError:
            with pytest.raises(DecodeError):
                parse_chunk(data)
            continue
        parsed = parse_chunk(data)
        if isinstance(parsed, BlockChunk):
            assert expected.WhichOneof("part") == "block" and same_block(parsed, expected.block)
        else:
            assert parsed == expected
