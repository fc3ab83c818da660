"""The decode request state machine (decode_worker/scheduler.py), under a fake clock.

No model and no server: the scheduler alone, driven the way the gRPC handlers and the
step loop drive it. Every named transition, each illegal one, leases, unclaimed events,
aborts and the limits on sequences and pages.
"""

from __future__ import annotations

import grpc
import pytest
from fake_clock import FakeClock

from decode_worker.scheduler import (
    LATE,
    LEASE_EXPIRED,
    RULES,
    UNCLAIMED_SECONDS,
    DecodeScheduler,
    IllegalTransition,
    Request,
    RequestState,
)
from pipeline.ops import SamplingConfig
from pipeline.pages import PagesExhausted
from pipeline.prefix_cache import MISS, Hit
from protos.errors import ServingError
from protos.vocabulary import FinishReason

S = RequestState
PAGE = 16
EOS = 0
IDLE = 0.02
PROMPT = [5, 6, 7, 8]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def scheduler(clock):
    # 11 pages in the cache: 10 to promise, one spare.
    return DecodeScheduler(total_pages=11, max_sequences=3, page_size=PAGE,
                           context_window=64, vocab_size=100, eos_ids=[EOS], clock=clock)


def reserve(scheduler: DecodeScheduler, request_id: str = "r", local: bool = False,
            max_tokens: int = 8, lease: float = 5.0, cached: Hit = MISS,
            prompt: list[int] = PROMPT, **sampling) -> Request:
    return scheduler.reserve(request_id, len(prompt), list(prompt),
                             SamplingConfig(max_tokens=max_tokens, **sampling), lease, local,
                             cached)


def in_state(scheduler: DecodeScheduler, state: RequestState) -> Request:
    """A request brought to ``state`` by the calls that lead there."""
    request = reserve(scheduler, local=state is S.PREFILLING)
    if state is S.RESERVED:
        return request
    scheduler.announce(request)
    if state is S.PREFILLING:
        scheduler.prefill_chunk(request, 1)
    elif state is S.RUNNING:
        scheduler.append([(request, 42)])
    elif state is S.ABORTING:
        scheduler.abort(request.request_id, "client left")
    elif state is S.FINISHED:
        scheduler.finish(request.request_id)
    assert request.state is state
    return request


# --- every named transition -----------------------------------------------------------

def test_reserve_holds_pages_and_starts_the_lease(scheduler, clock):
    request = reserve(scheduler, max_tokens=28)  # 4 + 28 tokens: 2 pages
    assert request.state is S.RESERVED
    assert request.reserved_pages == 2 and scheduler.free_pages() == 8
    assert request.lease_deadline == clock.now() + 5.0


def test_announce_lets_the_step_loop_see_a_request(scheduler):
    request = reserve(scheduler)
    assert scheduler.next_work(IDLE).waiting == []
    scheduler.announce(request)
    assert request.state is S.WAITING
    assert scheduler.next_work(IDLE).waiting == [request]


def test_withdraw_frees_a_refused_reservation_without_an_event(scheduler):
    request = reserve(scheduler)
    scheduler.withdraw(request)
    assert request.state is S.FINISHED
    assert scheduler.request_ids() == [] and scheduler.free_pages() == 10
    with pytest.raises(ServingError) as gone:
        scheduler.events("r")
    assert gone.value.code is grpc.StatusCode.NOT_FOUND


def test_a_pushed_request_runs_on_its_first_token_and_steps_after(scheduler):
    request = reserve(scheduler)
    scheduler.announce(request)
    assert scheduler.append([(request, 42)]) == [FinishReason.NONE]
    assert request.state is S.RUNNING and scheduler.running() == [request]
    assert scheduler.append([(request, 43)]) == [FinishReason.NONE]
    assert request.state is S.RUNNING and request.generated == [42, 43]


def test_a_local_request_prefills_chunk_by_chunk_then_runs(scheduler):
    request = reserve(scheduler, local=True)
    scheduler.announce(request)
    scheduler.prefill_chunk(request, 0)  # a pass without room for it changes nothing
    assert request.state is S.WAITING
    scheduler.prefill_chunk(request, 3)
    assert request.state is S.PREFILLING and request.prefilled == 3
    scheduler.prefill_chunk(request, 1)
    assert scheduler.next_work(IDLE).waiting == [request]  # a local prefill is work
    scheduler.append([(request, 42)])
    assert request.state is S.RUNNING


def test_a_local_request_prefills_only_what_its_cached_prefix_lacks(scheduler):
    request = reserve(scheduler, local=True, prompt=list(range(1, 41)),
                      cached=Hit(seq_id=7, tokens=32, shared_pages=2))
    scheduler.announce(request)
    scheduler.prefill_chunk(request, 8)
    scheduler.append([(request, 42)])
    assert request.state is S.RUNNING


def test_abort_marks_a_request_for_the_loop_to_finish(scheduler):
    request = in_state(scheduler, S.RUNNING)
    assert scheduler.abort("r", "client left")
    assert scheduler.abort("r", "again")  # the first reason stays
    assert request.state is S.ABORTING and request.abort_reason == "client left"
    assert scheduler.running() == []  # not stepped again
    work = scheduler.next_work(IDLE)
    assert work.aborts == [request] and work.waiting == []
    assert scheduler.finish("r") is request and request.state is S.FINISHED


def test_expire_aborts_a_reservation_whose_kv_never_came(scheduler, clock):
    request = reserve(scheduler, lease=5.0)
    scheduler.announce(request)
    clock.advance(4.9)
    assert scheduler.next_work(IDLE).aborts == []
    clock.advance(0.2)
    work = scheduler.next_work(IDLE)
    assert work.aborts == [request] and work.waiting == []
    assert request.state is S.ABORTING and request.abort_reason == LEASE_EXPIRED


def test_an_unannounced_reservation_expires_too(scheduler, clock):
    request = reserve(scheduler, lease=1.0)
    clock.advance(2.0)
    assert scheduler.next_work(IDLE).aborts == [request]


def test_finish_frees_the_pages_and_keeps_the_events_of_an_unopened_stream(scheduler):
    request = in_state(scheduler, S.RUNNING)
    assert scheduler.free_pages() == 9
    assert scheduler.finish("r") is request
    assert request.state is S.FINISHED and scheduler.free_pages() == 10
    assert scheduler.finish("r") is None  # already gone
    assert scheduler.events("r") is request.events


# --- the lease and the stream ----------------------------------------------------------

@pytest.mark.parametrize("state", [S.PREFILLING, S.RUNNING])
def test_work_under_way_outlives_the_lease(scheduler, clock, state):
    request = in_state(scheduler, state)
    clock.advance(60.0)
    assert scheduler.next_work(IDLE).aborts == [] and request.state is state


def test_unclaimed_events_are_dropped_after_a_while(scheduler, clock):
    in_state(scheduler, S.FINISHED)
    clock.advance(UNCLAIMED_SECONDS + 1)
    scheduler.next_work(IDLE)
    with pytest.raises(ServingError) as gone:
        scheduler.events("r")
    assert gone.value.code is grpc.StatusCode.NOT_FOUND


def test_an_opened_stream_leaves_nothing_unclaimed(scheduler):
    request = in_state(scheduler, S.RUNNING)
    assert scheduler.events("r") is request.events and request.stream_attached
    scheduler.finish("r")
    with pytest.raises(ServingError):
        scheduler.events("r")


# --- the step loop's wait ---------------------------------------------------------------

def test_an_idle_loop_waits_once_for_at_most_idle_wait(scheduler, clock):
    work = scheduler.next_work(IDLE)
    assert (work.aborts, work.waiting, clock.waits) == ([], [], [IDLE])


def test_a_loop_with_work_does_not_wait(scheduler, clock):
    in_state(scheduler, S.RUNNING)
    scheduler.next_work(IDLE)
    scheduler.kv_arrived()
    scheduler.next_work(IDLE)
    assert clock.waits == []


def test_a_stopped_scheduler_gives_no_more_work(scheduler):
    scheduler.stop()
    assert scheduler.next_work(IDLE) is None


# --- aborts and late results --------------------------------------------------------------

def test_abort_of_an_unknown_request_finds_nothing(scheduler):
    assert not scheduler.abort("nobody", "why")
    in_state(scheduler, S.FINISHED)
    assert not scheduler.abort("r", "too late")


def test_an_abort_during_reservation_outlives_the_announcement(scheduler):
    request = reserve(scheduler)
    scheduler.abort("r", "router gave up")
    scheduler.announce(request)  # the handler finishes telling the stages
    assert request.state is S.ABORTING
    assert scheduler.next_work(IDLE).aborts == [request]


def test_a_refused_reservation_that_was_aborted_is_still_withdrawn(scheduler):
    request = reserve(scheduler)
    scheduler.abort("r", "router gave up")
    scheduler.withdraw(request)
    assert request.state is S.FINISHED and scheduler.free_pages() == 10


def test_a_token_sampled_before_an_abort_is_recorded_and_the_abort_stands(scheduler):
    request = in_state(scheduler, S.RUNNING)
    scheduler.abort("r", "client left")
    assert scheduler.append([(request, 43)]) == [FinishReason.NONE]
    assert request.generated == [42, 43] and request.state is S.ABORTING


# --- finish reasons ------------------------------------------------------------------------

@pytest.mark.parametrize("sampling, tokens, reasons", [
    ({}, [EOS], [FinishReason.STOP]),
    ({"ignore_eos": True}, [EOS], [FinishReason.NONE]),
    ({"stop_token_ids": (9,)}, [3, 9], [FinishReason.NONE, FinishReason.STOP]),
    ({"max_tokens": 2}, [3, 4], [FinishReason.NONE, FinishReason.LENGTH]),
])
def test_why_a_request_finishes(scheduler, sampling, tokens, reasons):
    request = reserve(scheduler, **{"max_tokens": 8, **sampling})
    scheduler.announce(request)
    assert [scheduler.append([(request, t)])[0] for t in tokens] == reasons


def test_the_context_window_ends_a_request(scheduler):
    # 62 prompt tokens in a window of 64: the second token fills it, max_tokens or not.
    request = reserve(scheduler, prompt=list(range(1, 63)), max_tokens=8)
    scheduler.announce(request)
    assert scheduler.append([(request, 3)]) == [FinishReason.NONE]
    assert scheduler.append([(request, 4)]) == [FinishReason.LENGTH]


# --- limits ---------------------------------------------------------------------------------

def test_max_sequences_refuses_one_more_until_one_finishes(scheduler):
    for i in range(3):
        reserve(scheduler, f"r{i}")
    with pytest.raises(ServingError) as full:
        reserve(scheduler, "r3")
    assert full.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maximum of 3 sequences" in full.value.message
    scheduler.withdraw(scheduler.requests()[0])
    reserve(scheduler, "r3")


def test_a_reservation_beyond_the_free_pages_is_refused(scheduler):
    reserve(scheduler, "big", max_tokens=60)  # 64 tokens: 4 pages
    reserve(scheduler, "big2", max_tokens=60)
    with pytest.raises(PagesExhausted) as exhausted:
        reserve(scheduler, "one-too-many", max_tokens=60)
    assert (exhausted.value.needed, exhausted.value.free) == (4, 2)
    assert scheduler.request_ids() == ["big", "big2"]  # the refused one holds nothing


def test_duplicate_ids_are_refused(scheduler):
    reserve(scheduler)
    with pytest.raises(ServingError) as twice:
        reserve(scheduler)
    assert twice.value.code is grpc.StatusCode.ALREADY_EXISTS


def test_cached_pages_leave_fewer_pages_to_reserve(clock):
    cached = [6]
    scheduler = DecodeScheduler(total_pages=11, max_sequences=3, page_size=PAGE,
                                context_window=64, vocab_size=100, eos_ids=[EOS],
                                cached_pages=lambda: cached[0], clock=clock)
    assert scheduler.free_pages() == 4 and scheduler.shortfall(6) == 2
    with pytest.raises(PagesExhausted):
        reserve(scheduler, max_tokens=60, prompt=list(range(1, 41)))  # 100 tokens: 7 pages
    cached[0] = 0
    reserve(scheduler, max_tokens=60, prompt=list(range(1, 41)))


def test_a_fork_reserves_only_the_pages_it_does_not_share(scheduler):
    request = reserve(scheduler, prompt=list(range(1, 41)), max_tokens=20,
                      cached=Hit(seq_id=7, tokens=32, shared_pages=2))
    assert request.reserved_pages == 4 - 2


# --- illegal transitions ---------------------------------------------------------------------

ILLEGAL = [(state, transition) for transition, (sources, _) in RULES.items()
           for state in RequestState
           if state not in sources and not (state is S.ABORTING and transition in LATE)]


@pytest.mark.parametrize("state, transition", ILLEGAL,
                         ids=[f"{t.name}-from-{s.name}" for s, t in ILLEGAL])
def test_every_transition_the_rules_leave_out_raises(scheduler, state, transition):
    request = in_state(scheduler, state)
    with pytest.raises(IllegalTransition) as illegal:
        with scheduler._lock:
            scheduler._move(request, transition)
    assert (illegal.value.state, illegal.value.transition) == (state, transition)
    assert request.state is state  # unchanged


def test_a_request_is_announced_once(scheduler):
    request = in_state(scheduler, S.WAITING)
    with pytest.raises(IllegalTransition, match="cannot announce while waiting"):
        scheduler.announce(request)


def test_no_token_before_the_announcement(scheduler):
    request = reserve(scheduler)
    with pytest.raises(IllegalTransition, match="cannot run while reserved"):
        scheduler.append([(request, 42)])


def test_no_finish_while_its_stages_are_being_told(scheduler):
    reserve(scheduler)
    with pytest.raises(IllegalTransition, match="cannot finish while reserved"):
        scheduler.finish("r")


def test_a_pushed_request_is_never_prefilled_here(scheduler):
    request = in_state(scheduler, S.WAITING)
    with pytest.raises(IllegalTransition, match="pushed, not prefilled here"):
        scheduler.prefill_chunk(request, 1)


def test_a_local_request_runs_only_once_its_prompt_is_computed(scheduler):
    request = in_state(scheduler, S.PREFILLING)
    with pytest.raises(IllegalTransition, match="1 of its 4 tokens prefilled"):
        scheduler.append([(request, 42)])
    with pytest.raises(IllegalTransition, match="would pass its 4 to prefill"):
        scheduler.prefill_chunk(request, 4)


def test_a_finished_request_takes_no_more_tokens(scheduler):
    request = in_state(scheduler, S.RUNNING)
    scheduler.finish("r")
    with pytest.raises(IllegalTransition, match="cannot step while finished"):
        scheduler.append([(request, 43)])
