"""Which waiting prompts go into the next prefill (prefill_worker/batcher.py), on a fake
clock: FIFO under a token budget and a batch size, cancels and an empty wait."""

from __future__ import annotations

import grpc
import pytest
from fake_clock import FakeClock

from prefill_worker.batcher import PrefillJob, PromptBatcher
from protos.errors import ServingError

BUDGET, MAX_BATCH = 100, 3


def job(request_id: str, tokens: int) -> PrefillJob:
    return PrefillJob(request_id, list(range(tokens)), kv_targets=())


def batcher(*jobs: PrefillJob) -> tuple[PromptBatcher, FakeClock]:
    clock = FakeClock()
    prompts = PromptBatcher(BUDGET, MAX_BATCH, clock=clock)
    for queued in jobs:
        prompts.put(queued)
    return prompts, clock


def ids(batch: list[PrefillJob]) -> list[str]:
    return [queued.request_id for queued in batch]


def test_jobs_go_in_arrival_order_while_they_fit_the_token_budget():
    prompts, clock = batcher(job("a", 40), job("b", 50), job("c", 20), job("d", 5))
    assert ids(prompts.next_batch(timeout=1)) == ["a", "b"]  # c would pass 100 tokens
    assert ids(prompts.next_batch(timeout=1)) == ["c", "d"]
    assert clock.waits == []  # work was waiting: no wait


def test_a_small_job_does_not_jump_a_large_one_that_does_not_fit():
    prompts, _ = batcher(job("a", 60), job("big", 60), job("small", 10))
    assert ids(prompts.next_batch(timeout=1)) == ["a"]
    assert ids(prompts.next_batch(timeout=1)) == ["big", "small"]


def test_a_batch_holds_at_most_max_batch_jobs():
    prompts, _ = batcher(*(job(f"r{i}", 1) for i in range(5)))
    assert ids(prompts.next_batch(timeout=1)) == ["r0", "r1", "r2"]
    assert prompts.queued() == (2, 2)


def test_a_prompt_over_the_budget_goes_alone():
    prompts, _ = batcher(job("huge", 3 * BUDGET), job("next", 1))
    assert ids(prompts.next_batch(timeout=1)) == ["huge"]
    assert ids(prompts.next_batch(timeout=1)) == ["next"]


def test_queued_counts_requests_and_their_tokens():
    prompts, _ = batcher(job("a", 7), job("b", 11))
    assert prompts.queued() == (2, 18)


def test_a_cancelled_job_leaves_the_queue():
    prompts, _ = batcher(job("a", 10), job("b", 10), job("c", 10))
    assert prompts.cancel("b") and not prompts.cancel("b") and not prompts.cancel("zzz")
    assert ids(prompts.next_batch(timeout=1)) == ["a", "c"]


def test_an_empty_queue_waits_the_timeout_and_returns_nothing():
    prompts, clock = batcher()
    start = clock.now()
    assert prompts.next_batch(timeout=0.1) == []
    assert clock.waits == [0.1] and clock.now() == pytest.approx(start + 0.1)


def test_a_job_is_answered_once_whichever_outcome_comes_first():
    cancelled, finished = job("a", 1), job("b", 1)
    cancelled.cancel("timed out")
    cancelled.finish(0.5)  # too late: the cancel stands
    with pytest.raises(ServingError) as caught:
        cancelled.result.result(timeout=0)
    assert caught.value.code == grpc.StatusCode.CANCELLED and cancelled.cancelled
    finished.finish(0.5)
    finished.cancel()
    assert finished.result.result(timeout=0) == 0.5
