"""Bounds on silence (router/liveness.py), on a fake clock, its checks driven one by one."""

from __future__ import annotations

from fake_clock import FakeClock

from router.liveness import StallMonitor, Watch

FIRST, BETWEEN = 5.0, 1.0


class FakeCall:
    def __init__(self):
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def monitor(dead: frozenset[str] = frozenset()) -> tuple[StallMonitor, FakeClock, set[str]]:
    """A monitor without its thread, and the set of worker addresses it finds dead."""
    clock, dead = FakeClock(), set(dead)
    stalls = StallMonitor(FIRST, BETWEEN, lambda address: address not in dead, gone_after=10.0,
                          clock=clock, background=False)
    return stalls, clock, dead


def assert_cut_once_silent_for(seconds: float, stalls: StallMonitor, clock: FakeClock,
                               call: FakeCall, watch: Watch) -> None:
    """Silent for ``seconds`` the stream stands; a moment longer and it is cut."""
    clock.advance(seconds)
    stalls.check_once()
    assert not call.cancelled and watch.expired == ""
    clock.advance(0.01)
    stalls.check_once()
    assert call.cancelled and watch.expired == f"sent nothing for {seconds:g} s"


def test_a_stream_has_first_token_seconds_for_its_first_token():
    stalls, clock, _ = monitor()
    call = FakeCall()
    assert_cut_once_silent_for(FIRST, stalls, clock, call, stalls.watch(call, "decode-0"))


def test_after_a_token_the_next_is_due_within_between_tokens():
    stalls, clock, _ = monitor()
    call = FakeCall()
    watch = stalls.watch(call, "decode-0")
    clock.advance(FIRST - 0.5)
    stalls.saw_token(watch)  # from now on the shorter bound
    assert_cut_once_silent_for(BETWEEN, stalls, clock, call, watch)


def test_each_token_pushes_the_due_time_on():
    stalls, clock, _ = monitor()
    call = FakeCall()
    watch = stalls.watch(call, "decode-0")
    for _ in range(10):
        clock.advance(BETWEEN * 0.9)
        stalls.saw_token(watch)
        stalls.check_once()
    assert not call.cancelled


def test_a_stream_from_a_worker_that_stopped_answering_is_cut_before_it_is_due():
    stalls, _, dead = monitor()
    calls = {address: FakeCall() for address in ("decode-0", "decode-1")}
    watches = {address: stalls.watch(call, address) for address, call in calls.items()}
    dead.add("decode-1")
    stalls.check_once()
    assert calls["decode-1"].cancelled
    assert watches["decode-1"].expired == ("is gone: it has not answered the router's polls "
                                           "for 10 s")
    assert not calls["decode-0"].cancelled  # its neighbour's worker is alive


def test_a_cut_stream_is_cut_once():
    stalls, clock, _ = monitor()
    call = FakeCall()
    stalls.watch(call, "decode-0")
    clock.advance(FIRST + 1)
    stalls.check_once()
    call.cancelled = False
    stalls.check_once()
    assert not call.cancelled


def test_an_unwatched_stream_is_never_cut():
    stalls, clock, dead = monitor()
    call = FakeCall()
    stalls.unwatch(stalls.watch(call, "decode-0"))
    clock.advance(FIRST * 10)
    dead.add("decode-0")
    stalls.check_once()
    assert not call.cancelled
