"""The router's waiting line (router/admission.py), on a fake clock: every way a wait ends."""

from __future__ import annotations

import threading

import grpc
import pytest
from fake_clock import FakeClock

from protos.errors import ServingError
from router.admission import POLL_SECONDS, AdmissionQueue
from router.tenants import Priority


class YieldingClock(FakeClock):
    """A fake clock whose wait lets other threads take the lock, as a real wait does
    (FakeClock's keeps it: a second thread in the line would never get in)."""

    def wait(self, condition: threading.Condition, timeout: float | None) -> bool:
        condition.wait(0.001)
        return super().wait(condition, timeout)


def wanted() -> bool:
    return True


def answers(*results):
    """A ``try_once`` that answers ``results`` in turn, counting its calls."""
    pending = list(results)

    def try_once():
        try_once.calls += 1
        return pending.pop(0)
    try_once.calls = 0
    return try_once


def refusal(queue: AdmissionQueue, try_once, deadline=None, still_wanted=wanted) -> ServingError:
    with pytest.raises(ServingError) as caught:
        queue.admit(try_once, deadline, still_wanted)
    return caught.value


def test_a_request_that_fits_at_once_is_admitted_without_waiting():
    clock = FakeClock()
    queue = AdmissionQueue(max_waiting_requests=4, max_queue_wait_s=10, clock=clock)
    assert queue.admit(answers("worker"), None, wanted) == "worker"
    assert clock.waits == [] and queue.waiting() == 0


def test_the_head_tries_again_after_each_poll_until_capacity_frees():
    clock = FakeClock()
    queue = AdmissionQueue(max_waiting_requests=4, max_queue_wait_s=10, clock=clock)
    try_once = answers(None, None, "worker")
    assert queue.admit(try_once, None, wanted) == "worker"
    assert try_once.calls == 3 and clock.waits == [POLL_SECONDS, POLL_SECONDS]


def test_a_request_finding_the_line_full_is_refused_at_once():
    clock = FakeClock()
    queue = AdmissionQueue(max_waiting_requests=0, max_queue_wait_s=10, clock=clock)
    inner: list[ServingError] = []

    def head_try():  # while the head holds the line, a second request arrives
        inner.append(refusal(queue, answers("never")))
        return "head"
    assert queue.admit(head_try, None, wanted) == "head"
    assert inner[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "waiting line is full (0 requests)" in inner[0].message
    assert clock.waits == []


def test_only_the_head_asks_so_requests_are_served_in_arrival_order():
    clock = YieldingClock()
    queue = AdmissionQueue(max_waiting_requests=4, max_queue_wait_s=1e9, clock=clock)
    order: list[str] = []
    second: dict = {}

    def second_request():
        second["result"] = queue.admit(lambda: order.append("second") or "second", None,
                                       wanted)

    def head_try():
        order.append("head")
        thread = threading.Thread(target=second_request)
        thread.start()
        while queue.waiting() < 1:  # the second request is in line behind this one
            threading.Event().wait(0.001)
        second["thread"] = thread
        return "head"
    assert queue.admit(head_try, None, wanted) == "head"
    second["thread"].join(timeout=5)
    assert order == ["head", "second"] and second["result"] == "second"
    assert queue.waiting() == 0


def test_a_request_gives_up_after_max_wait():
    clock = FakeClock()
    start = clock.now()
    queue = AdmissionQueue(max_waiting_requests=4, max_queue_wait_s=1.0, clock=clock)
    error = refusal(queue, lambda: None)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no decode capacity freed up within 1 s" in error.message
    assert 1.0 <= clock.now() - start < 1.0 + 2 * POLL_SECONDS
    assert queue.waiting() == 0


def test_a_request_gives_up_at_its_deadline():
    clock = FakeClock()
    queue = AdmissionQueue(max_waiting_requests=4, max_queue_wait_s=10, clock=clock)
    deadline = clock.now() + 0.3
    error = refusal(queue, lambda: None, deadline=deadline)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert deadline <= clock.now() < deadline + 2 * POLL_SECONDS


def test_a_request_whose_client_left_stops_waiting():
    clock = FakeClock()
    queue = AdmissionQueue(max_waiting_requests=4, max_queue_wait_s=10, clock=clock)
    asked = []

    def still_wanted():
        asked.append(clock.now())
        return len(asked) < 3
    error = refusal(queue, lambda: None, still_wanted=still_wanted)
    assert error.code == grpc.StatusCode.CANCELLED and len(asked) == 3


def test_whatever_try_once_raises_ends_the_wait_and_frees_the_line():
    clock = FakeClock()
    queue = AdmissionQueue(max_waiting_requests=0, max_queue_wait_s=10, clock=clock)

    def broken():
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")
    assert refusal(queue, broken).code == grpc.StatusCode.INVALID_ARGUMENT
    assert queue.waiting() == 0
    assert queue.admit(answers("worker"), None, wanted) == "worker"  # the line is free


class FrozenClock(FakeClock):
    """Time moves only when the test moves it; a wait yields to the other threads."""

    def wait(self, condition: threading.Condition, timeout: float | None) -> bool:
        condition.wait(0.001)
        return False


def test_the_line_goes_by_priority_class_and_a_long_wait_outranks_it():
    clock = FrozenClock(start=0.0)
    queue = AdmissionQueue(max_waiting_requests=8, max_queue_wait_s=1e9, clock=clock,
                           aging_s=10.0)
    order: list[str] = []
    threads: list[threading.Thread] = []

    def arrive(name: str, priority: Priority, at: float) -> None:
        clock.advance(at - clock.now())
        thread = threading.Thread(target=lambda: queue.admit(
            lambda: order.append(name) or name, None, wanted, priority, tenant=name))
        thread.start()
        threads.append(thread)
        while queue.waiting() < len(threads):  # in line behind the head
            threading.Event().wait(0.001)

    def head_try():  # the others arrive while the head holds the line
        arrive("batch", Priority.BATCH, 0.0)
        arrive("standard", Priority.STANDARD, 1.0)
        arrive("interactive", Priority.INTERACTIVE, 2.0)
        arrive("late interactive", Priority.INTERACTIVE, 25.0)  # batch has waited 25 s
        return "head"

    assert queue.admit(head_try, None, wanted) == "head"
    for thread in threads:
        thread.join(timeout=5)
    assert order == ["interactive", "standard", "batch", "late interactive"]
    assert queue.waiting() == 0


def test_within_a_class_tenants_take_turns_and_each_keeps_its_order():
    clock = FrozenClock(start=0.0)
    queue = AdmissionQueue(max_waiting_requests=8, max_queue_wait_s=1e9, clock=clock)
    order: list[str] = []
    threads: list[threading.Thread] = []

    def arrive(tenant: str, name: str, at: float) -> None:
        clock.advance(at - clock.now())
        thread = threading.Thread(target=lambda: queue.admit(
            lambda: order.append(name) or name, None, wanted, tenant=tenant))
        thread.start()
        threads.append(thread)
        while queue.waiting() < len(threads):
            threading.Event().wait(0.001)

    def head_try():  # a burst of a's, then one of b's, while the head holds the line
        for i in range(4):
            arrive("a", f"a{i}", 0.0)
        arrive("b", "b0", 0.5)
        return "head"

    assert queue.admit(head_try, None, wanted, tenant="head") == "head"
    for thread in threads:
        thread.join(timeout=5)
    assert order == ["a0", "b0", "a1", "a2", "a3"]
    assert queue._in_line == {} and queue._last_rank == {}  # nothing kept past the line
