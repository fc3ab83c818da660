"""The router's view of its workers as a state machine, on a fake clock and no network.

Each worker is judged by when it last answered the poll: picked while it answers within
``SLOW_SECONDS``, merely slow (kept, not picked) after that, gone (its streams cut) only
after ``gone_seconds``. Picks read the polled stats and never call a worker, and charge
the picked one for what it was sent until its next answer. A worker back from gone, or
added anew, starts afresh. (test_liveness stops real worker processes.)
"""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

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


def test_a_burst_is_spread_before_the_next_poll(scheduler):
    """Between polls the stats are old news: each pick charges its worker a request's
    load, so a burst alternates instead of piling on the one that looked emptiest."""
    firsts = [scheduler.pick_decode()[0].address for _ in range(6)]
    assert sorted(firsts) == ["a", "a", "a", "b", "b", "b"]
    a = worker(scheduler, "a")
    assert a.unpolled_load == 3 * Scheduler.SEQUENCE_LOAD_TOKENS
    scheduler.heard_from(a, stats(running=3))  # its answer now shows them
    assert a.unpolled_load == 0


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


def test_prefill_picks_charge_the_prompt_tokens(clock):
    scheduler = Scheduler(None, kv_weight=0.0, clock=clock, poll=False)
    for address in ("p", "q"):
        scheduler.adopt(Worker(address, Role.PREFILL, Unreachable()), stats(role=Role.PREFILL))
    long, short = list(range(500)), list(range(10))
    first = scheduler.pick_prefill(tokens=long)
    assert first.unpolled_load == 500
    assert scheduler.pick_prefill(tokens=short) is not first  # 500 tokens queued there
