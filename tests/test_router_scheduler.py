"""The router's view of its workers as a state machine, on a fake clock and no network.

Each worker is judged by when it last answered the poll: picked while it answers within
``SLOW_SECONDS``, merely slow (kept, not picked) after that, gone (its streams cut) only
after ``gone_seconds``. Picks never call a worker: they weigh the router's own count of
what each one serves (exact, where polls lag), then the polled room. A worker back from
gone, or added anew, starts afresh. (test_liveness stops real worker processes.)
"""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from pipeline import kv_events
from pipeline.kv_events import KVEventLog
from pipeline.prefix_cache import PrefixCache
from protos import worker_pb2
from protos.vocabulary import Role
from router.scheduler import NoWorker, Scheduler, Worker

LAYOUT = worker_pb2.ModelLayout(model_fingerprint="f", dtype="float32", page_size=16,
                                num_layers=2, layer_begin=0, layer_end=2, num_kv_heads=2,
                                head_dim=8, hidden_size=16, context_window=256,
                                vocab_size=320)
GONE = 10.0


class Unreachable:
    """A stub that must not be called: picks go by polled stats."""

    def __getattr__(self, name):
        raise AssertionError(f"a pick called the worker ({name})")


def stats(running: int = 0, role: Role = Role.DECODE) -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(
        role=role, layout=LAYOUT, running_sequences=running, total_pages=64, free_pages=64,
        stages=[worker_pb2.StageInfo(address="x", layer_begin=0, layer_end=2)])


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def scheduler(clock):
    scheduler = Scheduler(None, kv_weight=4.0, gone_seconds=GONE, clock=clock, poll=False)
    for address in ("a", "b"):
        scheduler.adopt(Worker(address, Role.DECODE, Unreachable()), stats())
    return scheduler


def worker(scheduler, address: str) -> Worker:
    return next(w for w in scheduler.workers(Role.DECODE) if w.address == address)


def test_a_silent_worker_is_slow_then_gone(scheduler, clock):
    clock.advance(Scheduler.SLOW_SECONDS + 0.1)
    scheduler.heard_from(worker(scheduler, "b"), stats())
    assert not scheduler.pickable("a") and scheduler.alive("a")  # slow: its streams go on
    assert [w.address for w in scheduler.pick_decode()] == ["b"]
    clock.advance(GONE - Scheduler.SLOW_SECONDS)
    assert not scheduler.alive("a")  # gone: the router resumes its streams elsewhere
    assert not scheduler.alive("nowhere")


def test_a_worker_whose_engine_is_stuck_is_slow_then_gone_though_it_answers(scheduler,
                                                                             clock):
    """Its stats are answered beside the engine loop: the loop's age counts as silence."""
    a, b = worker(scheduler, "a"), worker(scheduler, "b")
    for age in (0.5, Scheduler.SLOW_SECONDS + 0.5, GONE + 0.5):
        scheduler.heard_from(a, worker_pb2.WorkerStats(step_loop_age_ms=1000 * age))
        scheduler.heard_from(b, stats())
        assert scheduler.pickable("a") == (age <= Scheduler.SLOW_SECONDS)
        assert scheduler.alive("a") == (age <= GONE)


def test_with_every_worker_slow_a_request_may_wait_for_one(scheduler, clock):
    clock.advance(Scheduler.SLOW_SECONDS + 0.1)
    with pytest.raises(NoWorker) as slow:
        scheduler.pick_decode()
    assert slow.value.for_now  # known workers: wait in line for one to answer
    with pytest.raises(NoWorker) as none:
        scheduler.pick_decode(exclude={"a", "b"})
    assert not none.value.for_now  # none to wait for
    scheduler.heard_from(worker(scheduler, "a"), stats())
    assert scheduler.pick_decode()[0].address == "a"
    clock.advance(GONE + 1)
    with pytest.raises(NoWorker) as gone:
        scheduler.pick_decode()
    assert not gone.value.for_now  # gone, not slow: fail now rather than wait


def test_load_is_what_the_router_sent_not_what_the_last_poll_said(scheduler):
    """A burst between polls spreads (each request charges its worker at once), and a
    chat's next turn, sent as the last one ends, finds its worker free again although
    the last poll still showed the turn running there."""
    served = []
    for _ in range(6):
        picked = scheduler.pick_decode()[0]
        scheduler.charge(picked, Scheduler.SEQUENCE_LOAD_TOKENS)
        served.append(picked)
    assert sorted(w.address for w in served) == ["a", "a", "a", "b", "b", "b"]
    for picked in served:
        scheduler.discharge(picked, Scheduler.SEQUENCE_LOAD_TOKENS)
    a = worker(scheduler, "a")
    scheduler.heard_from(a, stats(running=3))  # a poll from before they ended
    scheduler.remember("a", "turn-1", list(range(64)))
    assert scheduler.pick_decode(tokens=list(range(70)))[0] is a


def test_a_worker_back_from_gone_starts_afresh(scheduler, clock):
    for _ in range(10):
        scheduler.pick_decode()
    scheduler.remember("a", "req", list(range(64)))
    clock.advance(GONE + 1)
    scheduler.heard_from(worker(scheduler, "b"), stats())
    scheduler.heard_from(worker(scheduler, "a"), stats())  # it restarted, say
    # No tie-break debt from before and no prefixes it lost with its cache: with equal
    # load it is picked as soon as the other.
    assert scheduler.cache_map.hits(["a"], list(range(64))) == {"a": 0}
    assert scheduler._picks["a"] == scheduler._picks["b"]


def test_a_worker_added_again_starts_afresh(scheduler):
    for _ in range(7):
        scheduler.pick_decode()
    scheduler.remember("b", "req", list(range(64)))
    scheduler.adopt(Worker("b", Role.DECODE, Unreachable()), stats())
    assert scheduler._picks["b"] == scheduler._picks["a"]
    assert scheduler.cache_map.hits(["b"], list(range(64))) == {"b": 0}


def test_prefill_load_is_the_prompt_tokens_sent(clock):
    scheduler = Scheduler(None, kv_weight=0.0, clock=clock, poll=False)
    for address in ("p", "q"):
        scheduler.adopt(Worker(address, Role.PREFILL, Unreachable()), stats(role=Role.PREFILL))
    first = scheduler.pick_prefill(tokens=list(range(500)))
    scheduler.charge(first, 500)
    assert scheduler.pick_prefill(tokens=list(range(10))) is not first  # 500 tokens there
    scheduler.discharge(first, 500)
    assert first.in_flight == 0


# --- KV events: what workers tell of their caches ---------------------------------------

PROMPT = list(range(64))  # four whole pages


def told(worker_cache: PrefixCache, scheduler: Scheduler, address: str) -> None:
    """A poll's answer from a worker whose prefix cache is ``worker_cache``."""
    w = worker(scheduler, address)
    asked = scheduler._stats_request(w)
    assert asked.kv_events
    answer = stats()
    answer.kv_events.CopyFrom(worker_cache.kv_events(asked.kv_epoch, asked.kv_after))
    scheduler.heard_from(w, answer)


def test_a_workers_events_make_its_cache_exact_evictions_included(scheduler, clock):
    cache = PrefixCache(page_size=16)
    cache.start(7)
    cache.finish(7, PROMPT)  # cached on worker "a", which the router never sent it
    told(cache, scheduler, "a")
    assert scheduler.cache_map.hits(["a", "b"], PROMPT) == {"a": 64, "b": 0}
    assert scheduler.pick_decode(tokens=PROMPT)[0].address == "a"
    scheduler.remember("a", "req", PROMPT + [1] * 16)  # the router sent it more
    assert scheduler.cache_map.hits(["a"], PROMPT + [1] * 16) == {"a": 80}
    clock.advance(1.0)
    assert cache.evict_oldest() == 7  # the worker evicts it; the next poll says so
    told(cache, scheduler, "a")
    assert scheduler.cache_map.hits(["a"], PROMPT + [1] * 16) == {"a": 0}


def test_a_new_router_learns_a_whole_cache_and_a_restarted_worker_is_learnt_anew(clock):
    cache = PrefixCache(page_size=16)
    for seq_id in range(3):
        cache.start(seq_id)
        cache.finish(seq_id, [seq_id] + PROMPT)
    scheduler = Scheduler(None, kv_weight=4.0, gone_seconds=GONE, clock=clock, poll=False)
    scheduler.adopt(Worker("a", Role.DECODE, Unreachable()), stats())
    told(cache, scheduler, "a")  # a snapshot: the journal is new to this router
    assert all(scheduler.cache_map.hits(["a"], [s] + PROMPT)["a"] == 64 for s in range(3))
    restarted = PrefixCache(page_size=16)  # another journal, empty
    told(restarted, scheduler, "a")
    assert scheduler.cache_map.hits(["a"], [0] + PROMPT) == {"a": 0}
    clock.advance(GONE + 1)  # silent past gone: its events are asked for afresh
    restarted.start(9)
    restarted.finish(9, [9] + PROMPT)
    told(restarted, scheduler, "a")  # answers what it was asked: since the last poll
    assert worker(scheduler, "a").kv_epoch == b""
    told(restarted, scheduler, "a")  # ... and now all of it
    assert scheduler.cache_map.hits(["a"], [9] + PROMPT) == {"a": 64}


def test_a_journal_answers_what_a_poller_missed_or_the_whole_cache():
    log = KVEventLog(max_events=4)
    snapshot = [(1, (b"p1",))]
    assert log.answer(b"", 0, snapshot).snapshot
    log.stored(1, [b"p1"])
    log.stored(2, [b"p2"])
    log.removed(1)
    answer = log.answer(log.epoch, 1, snapshot)
    assert not answer.snapshot and answer.last == 3
    assert [p.key for p in answer.stored] == [2] and list(answer.removed) == [1]
    assert log.answer(log.epoch, 3, snapshot).last == 3  # nothing new
    for key in range(3, 8):
        log.stored(key, [b"x"])
    assert log.answer(log.epoch, 3, snapshot).snapshot  # events it needs are gone
    assert log.answer(b"another", 8, snapshot).snapshot


def test_a_journal_answer_is_bounded_and_the_rest_comes_next(monkeypatch):
    monkeypatch.setattr(kv_events, "PAGES_PER_ANSWER", 2)
    log = KVEventLog()
    for key in range(3):
        log.stored(key, [bytes([key])])
    newest_first = [(2, (b"\x02",)), (1, (b"\x01",)), (0, (b"\x00",))]
    assert [p.key for p in log.answer(b"", 0, newest_first).stored] == [2, 1]
    first = log.answer(log.epoch, 0, newest_first)
    assert [p.key for p in first.stored] == [0, 1] and first.last == 2
    rest = log.answer(log.epoch, first.last, newest_first)
    assert [p.key for p in rest.stored] == [2] and rest.last == 3
