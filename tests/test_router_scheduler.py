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
