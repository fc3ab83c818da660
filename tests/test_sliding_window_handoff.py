"""What a sliding-window layer needs of a pushed prompt, unit by unit: the receiver is
ready with every layer's kept positions (and not before), and the decode side's prefix
cache forks a sequence whose pushes skipped early positions only where the fork's window
finds all it reads."""

from __future__ import annotations

import numpy as np
import pytest

from decode_worker.receiver import KVReceiver
from kv_transfer.codec import encode_push
from kv_transfer.transport import PushGrant
from olmo_model.kv_pages import KVSnapshot
from olmo_model.stages import StageSpec
from pipeline.prefix_cache import PrefixCache
from protos import worker_pb2

WINDOW = 16
SLIDING = (0, 1, 3)  # of four layers
PROMPT = 64
TOKEN = b"push-token"
LAYOUT = worker_pb2.ModelLayout(model_fingerprint="f", dtype="float32", page_size=16,
                                num_layers=4, layer_begin=0, layer_end=4, num_kv_heads=2,
                                head_dim=8, hidden_size=16, context_window=256,
                                vocab_size=320)


def kept_from(layer: int, prompt_tokens: int) -> int:
    return max(0, prompt_tokens - WINDOW) if layer in SLIDING else 0


def piece(layers: range, begin: int, end: int, hidden: bool = False):
    rng = np.random.default_rng(begin + 100 * layers.start)
    shape = (len(layers), end - begin, 2, 8)
    snapshot = KVSnapshot(layers.start, layers.stop, rng.random(shape, np.float32),
                          rng.random(shape, np.float32), begin)
    state = np.ones(16, np.float32) if hidden else None
    return snapshot, encode_push(PushGrant("r", token=TOKEN), LAYOUT, snapshot, state)


@pytest.fixture
def receiver():
    receiver = KVReceiver(LAYOUT, StageSpec.full(4), kept_from=kept_from)
    receiver.expect("r", PROMPT, 0, TOKEN)
    return receiver


def test_ready_once_full_layers_are_whole_and_sliding_layers_hold_their_window(receiver):
    sent = []
    for layers, begin in ((range(2, 3), 0), (range(0, 2), PROMPT - WINDOW)):
        snapshot, chunks = piece(layers, begin, PROMPT)
        receiver.receive(chunks)
        sent.append(snapshot)
        assert receiver.ready(["r"]) == []
    snapshot, chunks = piece(range(3, 4), PROMPT - WINDOW, PROMPT, hidden=True)
    receiver.receive(chunks)
    assert receiver.ready(["r"]) == ["r"]
    installed = receiver.snapshot(receiver.take("r"))
    assert installed.kept_from == (48, 48, 0, 48)
    np.testing.assert_array_equal(installed.keys[2], sent[0].keys[0])
    np.testing.assert_array_equal(installed.keys[0:2, 48:], sent[1].keys)
    np.testing.assert_array_equal(installed.values[3, 48:], snapshot.values[0])


def test_a_sliding_layer_short_of_its_window_is_not_ready(receiver):
    for layers, begin in ((range(2, 3), 0), (range(0, 2), PROMPT - WINDOW)):
        receiver.receive(piece(layers, begin, PROMPT)[1])
    receiver.receive(piece(range(3, 4), PROMPT - WINDOW + 1, PROMPT, hidden=True)[1])
    assert receiver.ready(["r"]) == []


def test_a_full_layer_needs_every_position(receiver):
    receiver.receive(piece(range(0, 2), PROMPT - WINDOW, PROMPT)[1])
    receiver.receive(piece(range(2, 3), PROMPT - WINDOW, PROMPT)[1])
    receiver.receive(piece(range(3, 4), PROMPT - WINDOW, PROMPT, hidden=True)[1])
    assert receiver.ready(["r"]) == []
    receiver.receive(piece(range(2, 3), 0, PROMPT - WINDOW)[1])
    assert receiver.ready(["r"]) == ["r"]


def test_a_sender_that_sends_everything_still_fits(receiver):
    receiver.receive(piece(range(0, 4), 0, PROMPT, hidden=True)[1])
    assert receiver.ready(["r"]) == ["r"]


def prefix_cache() -> PrefixCache:
    return PrefixCache(page_size=16, shares_pages=False, sliding_window=WINDOW)


def test_a_pushed_sequence_is_forked_only_where_its_window_is_held():
    cache = prefix_cache()
    prompt, answer = list(range(100, 164)), [7, 8, 9]
    cache.start(1, kept_from=len(prompt) - WINDOW)  # 64-token prompt, window of 16 pushed
    cache.finish(1, prompt + answer)
    # A next turn (the whole last turn and more) reads only the pushed window.
    assert cache.lookup(prompt + answer + [5]).seq_id == 1
    # Forking at the system prompt's end would read positions the push skipped.
    assert cache.lookup(prompt[:40] + [1, 2, 3]).seq_id is None


def test_a_fork_inherits_what_its_parent_lacks():
    cache = prefix_cache()
    first = list(range(100, 164))
    cache.start(1, kept_from=48)
    cache.finish(1, first)
    hit = cache.lookup(first + [5, 6])
    cache.start(2, hit)  # prefilled locally: nothing skipped of its own
    cache.finish(2, first + [5, 6, 7])
    assert cache.lookup(first[:40] + [9]).seq_id is None
    assert cache.lookup(first + [5, 6, 7, 8]).seq_id == 2


def test_locally_prefilled_sequences_fork_anywhere():
    cache = prefix_cache()
    tokens = list(range(100, 164))
    cache.start(1)
    cache.finish(1, tokens)
    assert cache.lookup(tokens[:20] + [1]).tokens == 20
