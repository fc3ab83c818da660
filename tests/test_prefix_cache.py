"""Prefix caching: forks of cached sequences compute (and ship) only what is new, and give
exactly what a cold prefill gives, in every layout, under eviction, and to transformers."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from conftest import (
    greedy_outputs,
    kv_push_stub,
    local_cluster,
    reference_logits,
    wait_until_cluster_idle,
)

from cluster.cluster_config import RoleConfig
from kv_transfer.codec import encode_push
from kv_transfer.transport import PushGrant
from olmo_model.cache_limits import CacheLimits
from olmo_model.kv_pages import KVSnapshot
from olmo_model.runtime import ModelRunner
from pipeline.options import WorkerOptions
from pipeline.prefix_cache import PrefixCache, PrefixCacheStats
from protos import worker_pb2, worker_pb2_grpc
from protos.grpc_server import channel
from protos.layout import kv_bytes_per_token
from protos.prefix_index import PrefixIndex
from protos.vocabulary import Mode, Role
from router.client import GenerationClient, generate_request
from router.options import RouterOptions
from router.server import static_scheduler

LIMITS = CacheLimits(max_sequences=8, max_total_tokens=2048, prefill_chunk_tokens=64)
NEW_TOKENS = 8
SYSTEM = list(range(10, 80))  # 70 tokens: four whole pages and a part
SHARED = [SYSTEM + [100 + i, 7, 100 + 2 * i, 9, 3 + i] for i in range(4)]
USER_TURNS = [[200, 201, 202, 203], [210, 211], [220, 221, 222, 223, 224, 225]]
PUSH = dict(local_prefill_below_tokens=0)  # every prompt goes through a prefill instance


@pytest.fixture(scope="module")
def model(five_layer_checkpoint):
    return five_layer_checkpoint


def hf_greedy(reference, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                 min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def chat_prompts(generate) -> list[tuple[list[int], list[int]]]:
    """A chat of len(USER_TURNS) turns, each resending the whole conversation: (prompt,
    answer) per turn, answers from ``generate(prompt)``."""
    turns, context = [], SYSTEM[:40]
    for user in USER_TURNS:
        prompt = context + user
        answer = generate(prompt)
        turns.append((prompt, answer))
        context = prompt + answer
    return turns


@pytest.fixture(scope="module")
def expected(model):
    _, reference = model
    return ({tuple(p): hf_greedy(reference, p) for p in SHARED},
            chat_prompts(lambda p: hf_greedy(reference, p)))


def serve(cluster, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    return greedy_outputs(cluster, prompts, n)


def serve_concurrently(cluster, prompts: list[list[int]], n: int = NEW_TOKENS
                       ) -> list[list[int]]:
    results: list[list[int] | None] = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = serve(cluster, [prompts[i]], n)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def leader_stats(servicers) -> list[PrefixCacheStats]:
    return [s.engine.cache.stats() for s in servicers if s.engine.chain is not None]


# --- the index and the bookkeeping --------------------------------------------------------

def test_pages_are_named_by_their_whole_prefix():
    index = PrefixIndex(page_size=4)
    a, b = index.pages([1, 2, 3, 4, 5, 6, 7, 8, 9]), index.pages([0, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2 and len(b) == 2  # whole pages only
    assert a[1] != b[1]  # same tokens in page 2, other prefixes: other names
    index.add("x", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert index.match([1, 2, 3, 4, 5, 6, 7, 0]).tokens == 4
    assert index.match([1, 2, 3, 4, 5, 6, 7, 8]).key == "x"
    assert index.match([9, 9, 9, 9]).key is None


def test_a_salt_names_every_page_apart():
    index = PrefixIndex(page_size=4)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    assert not set(index.pages(tokens)) & set(index.pages(tokens, b"tenant-a"))
    assert index.pages(tokens, b"tenant-a") != index.pages(tokens, b"tenant-b")
    index.add("a", tokens, b"tenant-a")
    assert index.match(tokens, salt=b"tenant-a").key == "a"
    assert index.match(tokens).key is None and index.match(tokens, salt=b"tenant-b").key is None
    cache = PrefixCache(page_size=4)
    cache.start(1)
    cache.finish(1, tokens, b"tenant-a")
    assert cache.lookup(tokens + [9], b"tenant-a").seq_id == 1
    assert cache.lookup(tokens + [9], b"tenant-b").seq_id is None
    assert cache.lookup(tokens + [9]).seq_id is None


def test_the_cache_keeps_what_is_new_and_evicts_the_least_recently_used():
    cache = PrefixCache(page_size=4)
    cache.start(1)
    assert cache.finish(1, list(range(10))) == []  # kept: 3 pages
    hit = cache.lookup(list(range(8)))
    assert (hit.seq_id, hit.tokens) == (1, 7)  # the last token is always computed
    # Past the whole pages the match goes on token by token, into the partial page.
    assert cache.lookup(list(range(9)) + [77]).tokens == 9
    cache.start(2, cache.lookup(list(range(10)) + [50, 51]))
    assert cache.cached_pages() == 1  # the running fork shares two of sequence 1's pages
    assert cache.held_pages() == 3
    cache.start(5, cache.lookup(list(range(9))))
    assert cache.evict(3) == [1] and cache.evict(1) == []
    # Evicting 1 frees only the page no fork shares; the shared two stay held.
    assert cache.held_pages() == 2 and cache.cached_pages() == 0
    cache.finish(5, None)
    cache.start(1)
    cache.finish(1, list(range(10)))
    # Sequence 2 holds all of sequence 1 and more: 1 is redundant.
    assert cache.finish(2, list(range(10)) + [50, 51]) == [1]
    cache.start(3)
    assert cache.finish(3, list(range(9))) == [3]  # nothing new: not kept
    cache.start(4)
    assert cache.finish(4, [7] * 9) == []
    cache.lookup([7] * 9)  # 4 becomes the most recently used
    assert cache.evict(1) == [2]
    assert cache.evict(10, keep={4}) == []
    assert cache.stats().cached_sequences == 1 and cache.clear() == [4]


def test_a_disabled_cache_keeps_nothing():
    cache = PrefixCache(page_size=4, enabled=False)
    cache.start(1)
    assert cache.finish(1, list(range(10))) == [1]
    assert cache.lookup(list(range(10))).seq_id is None


# --- forks in the paged KV cache ----------------------------------------------------------

def test_forked_sequences_never_see_each_others_later_tokens(model):
    folder, reference = model
    runner = ModelRunner.from_checkpoint(folder, limits=LIMITS)
    base = list(range(30, 70))  # two whole pages and a half

    def last_logits(seq_id: int, tokens: list[int]) -> np.ndarray:
        return runner.logits(runner.prefill([seq_id], [tokens]))[0]

    runner.add_sequence(1)
    last_logits(1, base)
    runner.fork_sequence(1, 2, 32)   # at a page boundary: two pages shared
    runner.fork_sequence(1, 3, 40)   # mid-page: the partial page is copied
    histories = {1: list(base), 2: base[:32], 3: list(base)}
    # Each sequence goes its own way; the parent keeps growing too.
    for step, extra in enumerate([[5, 6, 7], [8], [9, 10]]):
        for seq_id, tokens in ((1, [11 + step]), (2, extra), (3, [1, 2][: 1 + step % 2])):
            got = last_logits(seq_id, tokens)
            histories[seq_id] += tokens
            want = reference_logits(reference, histories[seq_id])[-1]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for seq_id in (1, 2, 3):
        runner.remove_sequence(seq_id)
    assert runner.available_pages() == runner.kv.total_pages


# --- end to end -------------------------------------------------------------------------

LAYOUTS = {
    "aggregated": dict(mode=Mode.AGGREGATED),
    "disaggregated": dict(router=RouterOptions(**PUSH)),
    "conditional": dict(router=RouterOptions(local_prefill_below_tokens=16)),
    "staged": dict(prefill=RoleConfig(stages=2), decode=RoleConfig(stages=2),
                   router=RouterOptions(**PUSH)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_output_equals_transformers_in_every_layout(model, expected, layout):
    folder, _ = model
    shared, chat = expected
    cluster = local_cluster(folder, cache=LIMITS, **LAYOUTS[layout])
    try:
        assert serve(cluster, SHARED[:1]) == [shared[tuple(SHARED[0])]]  # warms the caches
        assert serve_concurrently(cluster, SHARED) == [shared[tuple(p)] for p in SHARED]
        assert chat_prompts(lambda p: serve(cluster, [p])[0]) == chat
        decode = leader_stats(cluster.decode)[0]
        # Every SHARED prompt after the first forks from the cached SYSTEM; each chat turn
        # from the whole previous turn (all but its answer's last token).
        previous_turns = sum(len(p) + NEW_TOKENS - 1 for p, _ in chat[:-1])
        assert decode.hit_tokens >= 4 * len(SYSTEM) + previous_turns
        if not cluster.router.options.aggregated and layout != "conditional":
            assert leader_stats(cluster.prefill)[0].hit_tokens >= 4 * len(SYSTEM)
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()


def test_cache_off_gives_the_same_output_and_computes_everything(model, expected):
    folder, _ = model
    shared, chat = expected
    cluster = local_cluster(folder, cache=LIMITS, router=RouterOptions(**PUSH),
                            worker=WorkerOptions(prefix_cache=False))
    try:
        assert serve_concurrently(cluster, SHARED) == [shared[tuple(p)] for p in SHARED]
        assert chat_prompts(lambda p: serve(cluster, [p])[0]) == chat
        for stats in leader_stats(cluster.decode) + leader_stats(cluster.prefill):
            assert stats.hit_tokens == 0 and stats.cached_sequences == 0
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()


def test_salted_prompts_share_cached_prefixes_only_with_their_own_salt(model, expected):
    """A tenant's salt keeps its cached prefixes its own: another salt (or none) forks
    nothing from them, on the prefill side or the decode side, and so its time to first
    token cannot tell that they were sent. Outputs do not change."""
    folder, _ = model
    shared, _ = expected
    cluster = local_cluster(folder, cache=LIMITS, router=RouterOptions(**PUSH))
    client = GenerationClient(cluster.router_address)

    def hits():
        return sum(s.hit_tokens for s in leader_stats(cluster.decode + cluster.prefill))

    def serve_salted(prompt, salt):
        request = generate_request(prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
        request.cache_salt = salt
        return client.complete(request, timeout=60)[0]

    try:
        assert serve_salted(SHARED[0], "tenant-a") == shared[tuple(SHARED[0])]
        before = hits()
        assert serve_salted(SHARED[1], "tenant-b") == shared[tuple(SHARED[1])]
        assert serve_salted(SHARED[2], "") == shared[tuple(SHARED[2])]
        assert hits() == before  # neither found tenant a's SYSTEM prefix
        assert serve_salted(SHARED[3], "tenant-a") == shared[tuple(SHARED[3])]
        assert hits() >= before + 2 * (len(SYSTEM) // 16 * 16)  # prefill and decode did
        wait_until_cluster_idle(cluster)
    finally:
        client.close()
        cluster.stop()


def test_only_the_uncached_k_v_is_pushed(model, expected):
    folder, _ = model
    shared, _ = expected
    cluster = local_cluster(folder, cache=LIMITS, router=RouterOptions(**PUSH))
    try:
        receiver = cluster.decode[0].stage.receiver
        per_token = kv_bytes_per_token(cluster.decode[0].layout) // 2  # K and V
        sizes = []
        for prompt in SHARED[:2]:
            before = receiver.bytes_received
            assert serve(cluster, [prompt]) == [shared[tuple(prompt)]]
            sizes.append((receiver.bytes_received - before) // per_token)
        # The second prompt shares all of SYSTEM with the first, partial page included.
        assert sizes == [2 * len(SHARED[0]), 2 * (len(SHARED[1]) - len(SYSTEM))]
    finally:
        cluster.stop()


def test_a_push_that_ignores_the_cached_prefix_is_refused(model, expected):
    folder, _ = model
    shared, _ = expected
    cluster = local_cluster(folder, cache=LIMITS, router=RouterOptions(**PUSH))
    try:
        serve(cluster, SHARED[:1])
        servicer = cluster.decode[0]
        stub = worker_pb2_grpc.DecodeWorkerStub(
            channel(cluster.router.scheduler.workers("decode")[0].address, cluster.secret))
        prompt = SHARED[1]
        reserved = stub.Reserve(worker_pb2.ReserveRequest(
            request_id="whole", prompt_tokens=len(prompt), prompt_token_ids=prompt,
            lease_ms=10_000, sampling=worker_pb2.Sampling(max_tokens=4)), timeout=5)
        assert reserved.cached_tokens == len(SYSTEM) and not reserved.prefill_locally
        layout = servicer.layout
        shape = (layout.num_layers, len(prompt), layout.num_kv_heads, layout.head_dim)
        whole = KVSnapshot(0, layout.num_layers, np.ones(shape, np.float32),
                           np.ones(shape, np.float32))
        with pytest.raises(grpc.RpcError) as err:
            kv_push_stub(cluster).PushKV(iter(encode_push(
                PushGrant("whole", token=reserved.push_token), layout, whole,
                np.ones(layout.hidden_size, np.float32))), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "from position 0" in err.value.details()
        stub.Abort(worker_pb2.AbortRequest(request_id="whole"), timeout=5)
        # The cache is intact: the same prompt through the router still hits and is right.
        assert serve(cluster, [prompt]) == [shared[tuple(prompt)]]
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()


def test_eviction_under_pressure_never_corrupts_a_running_sequence(model):
    """16 pages: a long request forks from a cached prefix and reserves so much that the
    next prompt fits only once that prefix is evicted; distinct prompts then push each
    other out while the long request runs."""
    folder, reference = model
    small = CacheLimits(max_sequences=4, max_total_tokens=256, prefill_chunk_tokens=64)
    cluster = local_cluster(folder, cache=small, mode=Mode.AGGREGATED)
    try:
        base = list(range(100, 148))  # three whole pages
        long_prompt = base + [5, 6, 7, 8, 9]
        others = [[200 + i] + list(range(40 + i, 79 + i)) for i in range(4)]
        # The references come first: computed between the serves, they would give the long
        # request time to finish on a slow machine.
        expected_others = [hf_greedy(reference, p, 4) for p in others]
        expected_long = hf_greedy(reference, long_prompt, 150)
        assert serve(cluster, [base], 4) == [hf_greedy(reference, base, 4)]
        leader = cluster.decode[0].engine
        parent = leader.cache.cached_ids()
        client = GenerationClient(cluster.router_address)
        call = client.stream(generate_request(long_prompt, max_tokens=150, ignore_eos=True),
                             timeout=120)
        first = next(call)
        served = serve(cluster, others, 4)
        long_still_running = bool(leader.scheduler.running())
        assert not parent & leader.cache.cached_ids()  # the forked-from prefix was evicted
        assert long_still_running  # ... while the long request ran
        assert served == expected_others
        rest = [t for response in call for t in response.token_ids]
        assert list(first.token_ids) + rest == expected_long
        client.close()
        wait_until_cluster_idle(cluster)
        stats = leader.stats()
        assert stats.load.free_pages + stats.cache.cached_pages == stats.load.total_pages
    finally:
        cluster.stop()


def test_kv_aware_routing_keeps_a_chat_on_the_worker_that_holds_it(model, expected):
    folder, _ = model
    _, chat = expected
    hits = {}
    for weight in (0.0, 1.0):
        cluster = local_cluster(folder, cache=LIMITS,
                                router=RouterOptions(kv_weight=weight, **PUSH),
                                decode=RoleConfig(instances=2))
        try:
            assert chat_prompts(lambda p, c=cluster: serve(c, [p])[0]) == chat
            hits[weight] = sum(s.hit_tokens for s in leader_stats(cluster.decode))
        finally:
            cluster.stop()
    # Routed by load alone the turns alternate between the two workers; KV-aware, every
    # turn after the first forks from the whole turn before.
    previous_turns = sum(len(p) + NEW_TOKENS - 1 for p, _ in chat[:-1])
    assert hits[1.0] >= previous_turns > hits[0.0]


def test_workers_tell_the_router_what_they_cache_so_a_new_router_starts_warm(model):
    """KV events: the router learns a worker's cache from the worker (a router started
    again knows it at once) and learns its evictions."""
    folder, reference = model
    small = CacheLimits(max_sequences=4, max_total_tokens=256, prefill_chunk_tokens=64)
    cluster = local_cluster(folder, cache=small, mode=Mode.AGGREGATED)
    try:
        prompt = list(range(100, 148))  # three whole pages
        scheduler = cluster.router.scheduler
        address = scheduler.workers(Role.DECODE)[0].address

        def held(by) -> int:
            return by.cache_map.hits([address], prompt)[address]

        def told_within(by, seconds: float = 5.0) -> int:
            """What ``by`` holds for the prompt once a poll sent from now has answered."""
            deadline = time.monotonic() + seconds
            seen = by.workers(Role.DECODE)[0].seen
            while by.workers(Role.DECODE)[0].seen <= seen + by.POLL_SECONDS:
                assert time.monotonic() < deadline, "no poll answered"
                time.sleep(0.05)
            return held(by)

        assert serve(cluster, [prompt], 4) == [hf_greedy(reference, prompt, 4)]
        assert told_within(scheduler) >= len(prompt)
        again = static_scheduler([], [address], cluster.secret, RouterOptions())
        try:
            assert held(again) >= len(prompt)  # from its first handshake: warm
        finally:
            again.close()
        others = [[200 + i] + list(range(40 + i, 79 + i)) for i in range(6)]
        serve(cluster, others, 4)
        assert not cluster.decode[0].engine.cache.lookup(prompt).tokens  # evicted
        assert told_within(scheduler) == 0
    finally:
        cluster.stop()
