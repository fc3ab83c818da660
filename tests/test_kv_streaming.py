"""Streamed KV handoff: a prompt prefilled in chunks sends each chunk's K/V as a piece,
and within a pass each group of layers' K/V goes as its own piece.

The output is transformers' whether the K/V streams or goes in one push, in every stage
layout. At the wire, a decode worker takes pieces of any layer and token range of a
reservation, verifies each as strictly as a whole push, and decodes only once verified
pieces cover it all: a stream cut after a few pieces, a corrupt piece in the middle,
overlapping or stale pieces leave it undecoded, and nothing stays reserved or used once
the request is gone. A receiver that goes away mid-stream fails the request and leaves
the prefill worker holding nothing.
"""

from __future__ import annotations

import threading
import time
from itertools import pairwise

import grpc
import numpy as np
import pytest
from conftest import (
    decode_worker_stub,
    hf_greedy,
    kv_push_stub,
    leader_stats,
    local_cluster,
    wait_until_cluster_idle,
)

from cluster.cluster_config import RoleConfig
from kv_transfer.codec import encode_push
from kv_transfer.transport import PushGrant
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from olmo_model.kv_pages import KVSnapshot
from olmo_model.stages import layer_partition
from pipeline.options import WorkerOptions
from protos import worker_pb2
from protos.vocabulary import FinishReason, Mode
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

CHUNK = 16
LIMITS = CacheLimits(max_sequences=8, max_total_tokens=4096, prefill_chunk_tokens=CHUNK)
PROMPTS = [list(range(3, 60)), list(range(100, 400, 3)), [7] * 40]  # 4, 7 and 3 chunks
DISAGGREGATED = RouterOptions(local_prefill_below_tokens=0)


@pytest.fixture(scope="module")
def expected(demo_reference):
    return [hf_greedy(demo_reference, p, 8) for p in PROMPTS]


def served(cluster, prompts) -> list[list[int]]:
    client = GenerationClient(cluster.router_address)
    try:
        return [client.complete(generate_request(p, max_tokens=8, ignore_eos=True),
                                timeout=60)[0] for p in prompts]
    finally:
        client.close()


@pytest.mark.parametrize("prefill_stages, decode_stages, streaming, layer_groups",
                         [(1, 1, True, 4), (2, 3, True, 2), (1, 1, False, 1)])
def test_streamed_pieces_give_transformers_output(expected, prefill_stages, decode_stages,
                                                  streaming, layer_groups):
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, router=DISAGGREGATED,
                            worker=WorkerOptions(prefix_cache=False, kv_streaming=streaming,
                                                 kv_layer_groups=layer_groups),
                            prefill=RoleConfig(stages=prefill_stages),
                            decode=RoleConfig(stages=decode_stages))
    try:
        assert served(cluster, PROMPTS) == expected
        # A pass pushes each group of a prefill stage's layers to the decode stages it
        # overlaps: every chunk's pass streaming, the last one otherwise.
        passes = sum(-(-len(p) // CHUNK) for p in PROMPTS) if streaming else len(PROMPTS)
        scheduler = cluster.router.scheduler
        groups = [range(p.layer_begin + a, p.layer_begin + b)
                  for p in scheduler.workers("prefill")[0].stages
                  for a, b in pairwise(layer_partition(p.layer_end - p.layer_begin,
                                                       layer_groups))]
        overlaps = sum(g.start < d.layer_end and d.layer_begin < g.stop
                       for g in groups for d in scheduler.workers("decode")[0].stages)
        received = sum(s.pushes for s in leader_stats(cluster.decode))
        assert received == passes * overlaps
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()


def test_streamed_output_equals_aggregated(expected):
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, mode=Mode.AGGREGATED)
    try:
        assert served(cluster, PROMPTS) == expected
    finally:
        cluster.stop()


# --- pieces at the wire ---------------------------------------------------------------------

TOKENS = 40  # reserved per request: three pieces of 16, 16 and 8 tokens


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, router=DISAGGREGATED)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stub(cluster):
    return decode_worker_stub(cluster)


_push_tokens: dict[str, bytes] = {}  # each reservation's, as its Reserve answered


def reserve(stub, request_id: str) -> None:
    _push_tokens[request_id] = stub.Reserve(worker_pb2.ReserveRequest(
        request_id=request_id, prompt_tokens=TOKENS, lease_ms=60_000,
        sampling=worker_pb2.Sampling(max_tokens=4, ignore_eos=True)), timeout=5).push_token


def piece(cluster, request_id: str, begin: int, end: int, attempt: int = 0
          ) -> list[worker_pb2.KVChunk]:
    """Hand-made K/V of tokens [begin, end), all layers; the last piece has the hidden state."""
    layout = cluster.decode[0].layout
    shape = (layout.num_layers, end - begin, layout.num_kv_heads, layout.head_dim)
    rng = np.random.default_rng(begin)
    snapshot = KVSnapshot(0, layout.num_layers, rng.standard_normal(shape, np.float32),
                          rng.standard_normal(shape, np.float32), token_begin=begin)
    hidden = np.full(layout.hidden_size, 0.1, np.float32) if end == TOKENS else None
    grant = PushGrant(request_id, attempt, _push_tokens[request_id])
    return list(encode_push(grant, layout, snapshot, hidden))


def push(cluster, chunks) -> worker_pb2.PushResponse:
    return kv_push_stub(cluster).PushKV(iter(chunks), timeout=10)


def refused(cluster, chunks) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        push(cluster, chunks)
    return err.value


def running(cluster) -> int:
    return leader_stats(cluster.decode)[0].running_sequences


def finish(cluster, stub, request_id: str) -> None:
    """End the request as the router does when its prefill leg fails; then nothing is left."""
    stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=5)
    wait_until_cluster_idle(cluster)
    stats = leader_stats(cluster.decode)[0]
    assert stats.used_pages == 0 and stats.free_pages + stats.cached_pages == stats.total_pages


def test_pieces_in_any_order_decode_once_all_are_here(cluster, stub):
    reserve(stub, "pieces")
    for begin, end in [(16, 32), (32, TOKENS)]:
        push(cluster, piece(cluster, "pieces", begin, end))
    assert running(cluster) == 0  # tokens [0, 16) are missing: nothing is decoded
    push(cluster, piece(cluster, "pieces", 0, 16))
    events = list(stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id="pieces"),
                                    timeout=30))
    assert sum(e.has_token for e in events) == 4 and events[-1].finish_reason == FinishReason.LENGTH
    wait_until_cluster_idle(cluster)


def test_a_stream_cut_after_some_pieces_leaves_nothing_behind(cluster, stub):
    reserve(stub, "cut")
    push(cluster, piece(cluster, "cut", 0, 16))

    def sender_dies(chunks):  # a header and one block, then the sender is gone
        yield from chunks[:2]
        raise RuntimeError("the prefill worker died")

    with pytest.raises(grpc.RpcError):
        push(cluster, sender_dies(piece(cluster, "cut", 16, 32)))
    push(cluster, piece(cluster, "cut", 32, TOKENS))
    assert running(cluster) == 0
    # What the broken push wrote does not count: its tokens can come again, whole.
    push(cluster, piece(cluster, "cut", 16, 32))
    assert list(stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id="cut"),
                                  timeout=30))[-1].finish_reason == FinishReason.LENGTH
    wait_until_cluster_idle(cluster)
    reserve(stub, "cut-for-good")
    push(cluster, piece(cluster, "cut-for-good", 0, 16))
    finish(cluster, stub, "cut-for-good")


def test_a_corrupt_piece_in_the_middle_is_refused_and_nothing_decoded(cluster, stub):
    reserve(stub, "corrupt")
    push(cluster, piece(cluster, "corrupt", 0, 16))
    bad = piece(cluster, "corrupt", 16, 32)
    bad[-1].trailer.crc32 ^= 1
    error = refused(cluster, bad)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checksum mismatch" in error.details()
    push(cluster, piece(cluster, "corrupt", 32, TOKENS))
    assert running(cluster) == 0
    finish(cluster, stub, "corrupt")


def test_overlapping_or_out_of_range_pieces_are_refused(cluster, stub):
    reserve(stub, "overlap")
    push(cluster, piece(cluster, "overlap", 0, 16))
    error = refused(cluster, piece(cluster, "overlap", 8, 24))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "arrived twice" in error.details()
    layout = cluster.decode[0].layout
    shape = (layout.num_layers, 8, layout.num_kv_heads, layout.head_dim)
    beyond = KVSnapshot(0, layout.num_layers, np.zeros(shape, np.float32),
                        np.zeros(shape, np.float32), token_begin=TOKENS - 4)
    error = refused(cluster, encode_push(PushGrant("overlap", token=_push_tokens["overlap"]),
                                      layout, beyond, None))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "were reserved" in error.details()
    finish(cluster, stub, "overlap")


def test_only_a_push_with_its_reservations_token_is_let_in(cluster, stub):
    """Pushes carry no cluster secret: the token Reserve answered with is what lets one
    in, and only into that reservation. Any other is refused before a byte of K/V is
    read, saying nothing of the reservation."""
    reserve(stub, "token")
    reserve(stub, "other")
    good = piece(cluster, "token", 0, 16)
    for token in (b"", _push_tokens["other"], bytes(len(_push_tokens["token"]))):
        forged = [worker_pb2.KVChunk(), *good[1:]]
        forged[0].CopyFrom(good[0])
        forged[0].header.push_token = token
        error = refused(cluster, forged)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no open reservation takes this push" in error.details()
    unknown = piece(cluster, "token", 0, 16)
    unknown[0].header.request_id = "no-such-request"
    assert refused(cluster, unknown).code() == grpc.StatusCode.UNAUTHENTICATED
    push(cluster, good)  # the real one still counts
    stub.Abort(worker_pb2.AbortRequest(request_id="other"), timeout=5)
    finish(cluster, stub, "token")


def test_a_retry_replaces_what_the_earlier_try_sent(cluster, stub):
    reserve(stub, "retry")
    push(cluster, piece(cluster, "retry", 0, 16, attempt=0))
    push(cluster, piece(cluster, "retry", 16, 32, attempt=0))
    # The leg's second try starts over; its pieces overlap the first try's, and count.
    for begin, end in [(0, 16), (16, 32)]:
        push(cluster, piece(cluster, "retry", begin, end, attempt=1))
    error = refused(cluster, piece(cluster, "retry", 32, TOKENS, attempt=0))  # a straggler
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "replaced" in error.details()
    assert running(cluster) == 0
    push(cluster, piece(cluster, "retry", 32, TOKENS, attempt=1))
    assert list(stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id="retry"),
                                  timeout=30))[-1].finish_reason == FinishReason.LENGTH
    wait_until_cluster_idle(cluster)


# --- a receiver gone mid-stream -----------------------------------------------------------

def test_a_receiver_gone_mid_stream_fails_the_request_and_frees_the_prefill_side():
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, router=DISAGGREGATED,
                            worker=WorkerOptions(prefix_cache=False))
    try:
        receiver = cluster.decode[0].stage.receiver
        take = receiver.receive
        port = int(cluster.router.scheduler.workers("decode")[0].address.rsplit(":", 1)[1])
        server = next(s for s in cluster.servers if s.port == port)

        def first_piece_then_gone(chunks):
            # The decode worker's server stops on the second piece: the second of the
            # first pass's four layer groups, so the stream breaks while the pass runs.
            if receiver.pushes:
                threading.Thread(target=server.stop, args=(0,)).start()
                raise RuntimeError("the decode worker is gone")
            return take(chunks)

        receiver.receive = first_piece_then_gone
        client = GenerationClient(cluster.router_address)
        with pytest.raises(grpc.RpcError) as err:
            client.complete(generate_request(PROMPTS[1], max_tokens=8), timeout=60)
        client.close()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no other decode worker
        assert receiver.pushes == 1
        stage = cluster.prefill[0].stage
        deadline = time.monotonic() + 15
        while stage.sequences or stage._streams or stage.sender.buffers.lent:
            assert time.monotonic() < deadline, "the prefill worker still holds the request"
            time.sleep(0.05)
    finally:
        cluster.stop()
