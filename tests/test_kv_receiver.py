"""The decode stage's KV receiver as a state machine, driven by plain pieces.

No model, no gRPC: pieces go through the fake transport (kv_transfer/fake.py) or are
held between their claim and commit (``write_piece``) to stand for pushes still being
written while others arrive. Time comes from a fake clock. The receiver keeps no lease
or deadline of its own (the reservation's lease is the scheduler's; a stalled push is
cut off by the servicer's per-call bound), so the clock only times the handling.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from fake_clock import FakeClock

from decode_worker.receiver import KVReceiver
from kv_transfer.codec import encode_push
from kv_transfer.fake import FakeKVSender
from kv_transfer.grpc_transport import Peers
from kv_transfer.transport import (
    Accepts,
    KVPiece,
    PushGrant,
    TransferState,
    Transport,
    choose_transport,
    write_piece,
)
from olmo_model.kv_pages import KVSnapshot
from olmo_model.stages import StageSpec
from protos import worker_pb2
from protos.errors import ServingError

LAYERS, PROMPT, HEADS, DIM, HIDDEN = 4, 32, 2, 8, 16
LAYOUT = worker_pb2.ModelLayout(model_fingerprint="f", dtype="float32", page_size=16,
                                num_layers=LAYERS, layer_begin=0, layer_end=LAYERS,
                                num_kv_heads=HEADS, head_dim=DIM, hidden_size=HIDDEN,
                                context_window=256, vocab_size=320)
ADDRESS = "decode-0"


def token(request_id: str) -> bytes:
    """The push token each test reservation is expected with."""
    return f"token-of-{request_id}".encode()


def grant(request_id: str = "r", attempt: int = 0) -> PushGrant:
    return PushGrant(request_id, attempt, token(request_id))


def snapshot(layers: range, begin: int, end: int, seed: int = 0) -> KVSnapshot:
    rng = np.random.default_rng(seed + begin + 100 * layers.start)
    shape = (len(layers), end - begin, HEADS, DIM)
    return KVSnapshot(layers.start, layers.stop, rng.random(shape, np.float32),
                      rng.random(shape, np.float32), begin)


def piece(layers: range, begin: int, end: int, attempt: int = 0, hidden: bool = False,
          request_id: str = "r", seed: int = 0) -> KVPiece:
    state = np.full(HIDDEN, 0.5, np.float32) if hidden else None
    return KVPiece.of(grant(request_id, attempt), snapshot(layers, begin, end, seed), state)


WHOLE = [(range(0, 2), 0, 16), (range(0, 2), 16, PROMPT), (range(2, 4), 0, PROMPT)]


def send_whole(receiver: KVReceiver, attempt: int = 0, seed: int = 0) -> None:
    for i, (layers, begin, end) in enumerate(WHOLE):
        receiver.receive_piece(piece(layers, begin, end, attempt, hidden=i == len(WHOLE) - 1,
                                     seed=seed))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def receiver(clock):
    receiver = KVReceiver(LAYOUT, StageSpec.full(LAYERS), clock=clock)
    receiver.expect("r", PROMPT, 0, token("r"))
    return receiver


def refused(code: grpc.StatusCode, words: str, call, *args) -> ServingError:
    with pytest.raises(ServingError) as err:
        call(*args)
    assert err.value.code == code and words in str(err.value), str(err.value)
    return err.value


# --- assembly -------------------------------------------------------------------------------

def test_pieces_of_layers_and_tokens_assemble_into_what_was_sent(receiver):
    sent = [piece(*part, hidden=i == 2) for i, part in enumerate(WHOLE)]
    for p in sent[:2]:
        receiver.receive_piece(p)
        assert receiver.ready(["r"]) == []
    receiver.receive_piece(sent[2])
    assert receiver.ready(["r"]) == ["r"]
    pending = receiver.take("r")
    installed = receiver.snapshot(pending)
    np.testing.assert_array_equal(installed.keys[0:2, 0:16], sent[0].keys)
    np.testing.assert_array_equal(installed.values[0:2, 16:], sent[1].values)
    np.testing.assert_array_equal(installed.keys[2:], sent[2].keys)
    np.testing.assert_array_equal(pending.hidden, sent[2].hidden)
    receiver.recycle(pending)
    assert receiver.buffers.lent == 0 and receiver.waiting() == 0
    assert receiver.pushes == 3 and receiver.pushes_refused == 0


def test_the_grpc_chunks_and_a_plain_piece_land_alike():
    """The assembly does not depend on the wire: the same piece off gRPC chunks (inline
    blocks, verified by checksum) and as plain arrays gives the same K/V."""
    got = []
    for deliver in ("chunks", "piece"):
        receiver = KVReceiver(LAYOUT, StageSpec.full(LAYERS))
        receiver.expect("r", PROMPT, 0, token("r"))
        sent = piece(range(0, LAYERS), 0, PROMPT, hidden=True)
        if deliver == "chunks":
            snap = KVSnapshot(0, LAYERS, sent.keys, sent.values)
            receiver.receive(encode_push(grant(), LAYOUT, snap, sent.hidden))
        else:
            receiver.receive_piece(sent)
        pending = receiver.take("r")
        got.append((receiver.snapshot(pending).keys.copy(), pending.hidden))
        assert receiver.bytes_received == sent.keys.nbytes + sent.values.nbytes
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])


def test_the_clock_times_the_pushes_taken_and_only_those(receiver, clock):
    claim = receiver.claim

    def slow_claim(header):
        clock.advance(0.25)  # as if writing the piece took this long
        return claim(header)

    receiver.claim = slow_claim
    receiver.receive_piece(piece(range(0, 2), 0, 16))
    with pytest.raises(ServingError):
        receiver.receive_piece(piece(range(0, 2), 0, 16))  # twice: refused
    assert receiver.assemble_seconds == pytest.approx(0.25)
    assert receiver.pushes == 1 and receiver.pushes_refused == 1


# --- retries ---------------------------------------------------------------------------------

def test_a_newer_try_starts_the_assembly_over(receiver):
    for layers, begin, end in WHOLE[:2]:  # try 0 sent some of it
        receiver.receive_piece(piece(layers, begin, end, attempt=0))
    # The prefill leg is retried: what try 0 sent no longer counts.
    receiver.receive_piece(piece(range(0, 2), 0, 16, attempt=1, seed=7))
    assert receiver.ready(["r"]) == []
    assert receiver.buffers.lent == 1  # try 0's assembly went back; try 1 has its own
    for layers, begin, end in WHOLE[1:]:
        receiver.receive_piece(piece(layers, begin, end, attempt=1, hidden=layers.start == 2,
                                     seed=7))
    installed = receiver.snapshot(receiver.take("r"))
    np.testing.assert_array_equal(installed.keys[0:2, 0:16],
                                  piece(range(0, 2), 0, 16, seed=7).keys)


def test_a_straggler_from_an_older_try_is_refused_and_counts_nothing(receiver):
    receiver.receive_piece(piece(range(0, 2), 0, 16, attempt=1))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "replaced", receiver.receive_piece,
            piece(range(0, 2), 16, PROMPT, attempt=0))
    assert receiver.pushes_refused == 1 and receiver.pushes == 1
    for layers, begin, end in WHOLE[1:]:
        receiver.receive_piece(piece(layers, begin, end, attempt=1, hidden=layers.start == 2))
    assert receiver.ready(["r"]) == ["r"]


def test_a_retry_while_a_piece_of_the_old_try_is_written_voids_that_piece(receiver):
    commit_old = write_piece(piece(range(0, 2), 0, 16, attempt=0), receiver)
    receiver.receive_piece(piece(range(0, 2), 0, 16, attempt=1))
    assert receiver.buffers.lent == 2  # the old try's buffer: still written into
    refused(grpc.StatusCode.FAILED_PRECONDITION, "retried during its push", commit_old)
    assert receiver.buffers.lent == 1


# --- overlaps --------------------------------------------------------------------------------

def test_a_piece_overlapping_a_verified_one_is_refused(receiver):
    receiver.receive_piece(piece(range(0, 2), 0, 16))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "arrived twice", receiver.receive_piece,
            piece(range(1, 3), 8, 24))
    assert receiver.pushes_refused == 1


def test_a_piece_overlapping_one_still_written_is_refused(receiver):
    commit = write_piece(piece(range(0, 4), 0, 16), receiver)
    refused(grpc.StatusCode.FAILED_PRECONDITION, "arrived twice", receiver.receive_piece,
            piece(range(3, 4), 15, 17))
    receiver.receive_piece(piece(range(0, 4), 16, PROMPT, hidden=True))  # beside it: fine
    assert receiver.ready(["r"]) == []
    commit()
    assert receiver.ready(["r"]) == ["r"]


def test_a_failed_piece_leaves_its_part_free_to_come_again(receiver):
    wrong = piece(range(0, 2), 0, 16)
    wrong.keys = wrong.keys[:, :8]  # fewer tokens than its header announces
    refused(grpc.StatusCode.INVALID_ARGUMENT, "header announces", receiver.receive_piece, wrong)
    send_whole(receiver)
    assert receiver.ready(["r"]) == ["r"]


def test_a_release_after_the_commit_changes_nothing(receiver):
    claim = receiver.claim(piece(range(0, 2), 0, 16).header)
    receiver.commit(claim, None)
    receiver.release(claim)
    receiver.release(claim)
    refused(grpc.StatusCode.FAILED_PRECONDITION, "arrived twice", receiver.receive_piece,
            piece(range(0, 2), 0, 16))


# --- a buffer retired while pieces still write -----------------------------------------------

def test_a_request_dropped_while_pieces_write_keeps_its_buffer_until_the_last_ends(receiver):
    commits = [write_piece(piece(layers, begin, end), receiver) for layers, begin, end in WHOLE]
    receiver.drop(["r"])
    assert receiver.waiting() == 0
    assert receiver.buffers.lent == 1  # three pieces still write into it
    for commit in commits[:2]:
        refused(grpc.StatusCode.FAILED_PRECONDITION, "released", commit)
        assert receiver.buffers.lent == 1
    refused(grpc.StatusCode.FAILED_PRECONDITION, "released", commits[2])
    assert receiver.buffers.lent == 0 and receiver.buffers.idle_bytes() > 0


def test_once_complete_a_request_acknowledges_later_pieces_and_keeps_its_own(receiver):
    """A later try's piece arriving between ``ready`` and ``take`` (the engine about to
    install) would void what is verified whole: it is acknowledged (the sender's try
    succeeds) and dropped."""
    send_whole(receiver)
    assert receiver.ready(["r"]) == ["r"]
    pushes = receiver.pushes
    for attempt in (0, 1):
        assert receiver.receive_piece(piece(range(0, 2), 0, 16, attempt=attempt, seed=9)) == 0
    chunks = iter(encode_push(grant(attempt=1), LAYOUT, snapshot(range(0, LAYERS), 0, PROMPT),
                              np.zeros(HIDDEN, np.float32)))
    assert receiver.receive(chunks).bytes == 0  # off the wire: answered at the header,
    assert next(chunks).WhichOneof("part") == "block"  # the rest left unread
    assert receiver.pushes == pushes + 3 and receiver.pushes_refused == 0
    assert receiver.ready(["r"]) == ["r"]
    pending = receiver.take("r")
    np.testing.assert_array_equal(receiver.snapshot(pending).keys[0:2, 0:16],
                                  piece(range(0, 2), 0, 16).keys)
    receiver.recycle(pending)
    assert receiver.buffers.lent == 0


def test_a_request_expected_again_while_a_piece_writes_gets_a_fresh_assembly(receiver):
    commit = write_piece(piece(range(0, 2), 0, 16), receiver)
    receiver.expect("r", PROMPT, 0, token("r"))  # reserved again (a new prefill leg)
    send_whole(receiver, seed=3)
    refused(grpc.StatusCode.FAILED_PRECONDITION, "released or retried", commit)
    pending = receiver.take("r")
    np.testing.assert_array_equal(receiver.snapshot(pending).keys[0:2, 0:16],
                                  piece(range(0, 2), 0, 16, seed=3).keys)
    receiver.recycle(pending)
    assert receiver.buffers.lent == 0


def test_a_recycled_buffer_serves_the_next_request(receiver):
    send_whole(receiver)
    receiver.recycle(receiver.take("r"))
    assert receiver.buffers.lent == 0 and receiver.buffers.idle_bytes() > 0
    receiver.expect("s", PROMPT, 0, token("s"))
    receiver.receive_piece(piece(range(0, 2), 0, 16, request_id="s"))
    assert receiver.buffers.lent == 1 and receiver.buffers.idle_bytes() == 0


# --- what a piece may carry ------------------------------------------------------------------

def test_pieces_outside_the_reservation_or_the_stage_are_refused(receiver):
    refused(grpc.StatusCode.UNAUTHENTICATED, "no open reservation",
            receiver.receive_piece, piece(range(0, 2), 0, 16, request_id="unknown"))
    forged = piece(range(0, 2), 0, 16)
    for wrong in (b"", token("s"), token("r")[:-1]):
        forged.header = dataclasses.replace(forged.header, push_token=wrong)
        refused(grpc.StatusCode.UNAUTHENTICATED, "not its push token", receiver.receive_piece,
                forged)
    with pytest.raises(ValueError):  # a reservation open to pushes that carry no token
        receiver.expect("s", PROMPT, 0, b"")
    refused(grpc.StatusCode.INVALID_ARGUMENT, "were reserved", receiver.receive_piece,
            piece(range(0, 2), 16, PROMPT + 1))
    stage = KVReceiver(LAYOUT, StageSpec.of(LAYERS, 2, 0))
    stage.expect("r", PROMPT, 0, token("r"))
    refused(grpc.StatusCode.INVALID_ARGUMENT, "this worker owns [0, 2)", stage.receive_piece,
            piece(range(1, 3), 0, PROMPT))
    assert stage.buffers.lent == 0


def test_a_hidden_state_is_refused_where_unusable(receiver):
    first_stage = KVReceiver(LAYOUT, StageSpec.of(LAYERS, 2, 0))
    first_stage.expect("r", PROMPT, 0, token("r"))
    refused(grpc.StatusCode.INVALID_ARGUMENT, "does not own the LM head",
            first_stage.receive_piece, piece(range(0, 2), 0, PROMPT, hidden=True))
    bad = piece(range(0, 2), 0, 16, hidden=True)
    bad.hidden[3] = np.nan
    refused(grpc.StatusCode.INVALID_ARGUMENT, "non-finite", receiver.receive_piece, bad)
    receiver.receive_piece(piece(range(0, 2), 0, 16, hidden=True))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "arrived twice", receiver.receive_piece,
            piece(range(2, 4), 0, 16, hidden=True))
    assert receiver.pushes == 1 and receiver.pushes_refused == 2


# --- the sending side: a transfer's states -----------------------------------------------------

def test_a_transfer_finishes_after_its_pieces(receiver):
    sender = FakeKVSender({ADDRESS: receiver})
    transfer = sender.open(ADDRESS, grant())
    for i, (layers, begin, end) in enumerate(WHOLE):
        state = np.zeros(HIDDEN, np.float32) if i == 2 else None
        transfer.push(snapshot(layers, begin, end), state)
    assert transfer.finish() == sender.bytes_sent == receiver.bytes_received
    assert transfer.state is TransferState.FINISHED and receiver.ready(["r"]) == ["r"]
    refused(grpc.StatusCode.FAILED_PRECONDITION, "is finished", transfer.push,
            snapshot(range(0, 1), 0, 1))


def test_a_refused_piece_fails_the_transfer_for_the_pieces_after_it(receiver):
    sender = FakeKVSender({ADDRESS: receiver})
    transfer = sender.open(ADDRESS, grant())
    transfer.push(snapshot(range(0, 2), 0, 16))
    error = refused(grpc.StatusCode.FAILED_PRECONDITION, "arrived twice", transfer.push,
                    snapshot(range(0, 2), 0, 16))
    assert transfer.state is TransferState.FAILED
    with pytest.raises(ServingError) as again:
        transfer.push(snapshot(range(2, 4), 0, PROMPT))
    assert again.value is error and sender.pushes == 1


def test_an_aborted_transfer_sends_nothing_more(receiver):
    sender = FakeKVSender({ADDRESS: receiver})
    transfer = sender.open(ADDRESS, grant())
    transfer.abort("the request was cancelled")
    refused(grpc.StatusCode.CANCELLED, "cancelled", transfer.push, snapshot(range(0, 2), 0, 16))
    assert transfer.state is TransferState.ABORTED and sender.pushes == 0
    assert receiver.buffers.lent == 0


def test_a_receiver_that_is_not_there_is_unavailable():
    transfer = FakeKVSender().open("nowhere", grant())
    refused(grpc.StatusCode.UNAVAILABLE, "no receiver", transfer.push,
            snapshot(range(0, 1), 0, 1))
    assert transfer.state is TransferState.FAILED


# --- negotiation -----------------------------------------------------------------------------

def test_the_fastest_transport_both_ends_list_is_chosen():
    assert choose_transport([Transport.SHARED_MEMORY, Transport.INLINE],
                            [Transport.SHARED_MEMORY, Transport.INLINE]) is Transport.SHARED_MEMORY
    assert choose_transport([Transport.SHARED_MEMORY, Transport.INLINE],
                            [Transport.INLINE]) is Transport.INLINE
    assert choose_transport(["grpc"], ["shm", "grpc"]) is Transport.INLINE
    assert choose_transport([], []) is Transport.INLINE  # every receiver takes inline


def test_a_receiver_offers_shared_memory_to_its_own_host_only():
    receiver = KVReceiver(LAYOUT, StageSpec.full(LAYERS))
    host = receiver.accepts().shared_memory_host
    assert receiver.accepts().transports(host) == (Transport.SHARED_MEMORY, Transport.INLINE)
    assert receiver.accepts().transports("another host") == (Transport.INLINE,)
    assert receiver.accepts().transports("") == (Transport.INLINE,)
    receiver.accepts_shared = False
    assert receiver.accepts() == Accepts("")


def test_a_sender_uses_what_the_last_answer_accepted_less_what_failed():
    peers = Peers("here")
    assert peers.accepts(ADDRESS) == (Transport.INLINE,)  # not heard from yet
    peers.learn(ADDRESS, Accepts("here"))
    assert peers.accepts(ADDRESS) == (Transport.SHARED_MEMORY, Transport.INLINE)
    peers.fail(ADDRESS, Transport.SHARED_MEMORY)  # it advertised what it could not read
    peers.learn(ADDRESS, Accepts("here"))
    assert peers.accepts(ADDRESS) == (Transport.INLINE,)
    assert Peers("").accepts(ADDRESS) == (Transport.INLINE,)
