"""The router's waiting line: requests that no decode worker can take yet wait here for
capacity to free up, in order of priority class, then of arrival, tenants taking turns.

Only the request at the head asks the decode workers, so a burst drains in order and a
large request is not starved by small ones behind it. A request ranks by its arrival
time plus ``aging_s`` per class below the first: an interactive request goes ahead of
batch requests that came less than two ``aging_s`` before it, and behind those that have
waited longer, so no class is starved. Within a class, each request a tenant sends while
its earlier ones still wait ranks ``TENANT_STEP_S`` behind the one before (virtual time,
as fair queueing keeps it): a tenant's burst takes turns with the others' requests
instead of going ahead of them all, and its own requests keep their order. The line is
bounded in length (a request that finds it full is refused at once) and in time (a
request gives up after ``max_queue_wait_s`` seconds, its deadline, or its client
leaving).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
from collections.abc import Callable
from typing import TypeVar

import grpc

from protos.clock import MONOTONIC, Clock
from protos.errors import ServingError

from .tenants import Priority

T = TypeVar("T")
POLL_SECONDS = 0.05  # capacity can also free up where this router cannot see it
TENANT_STEP_S = 1.0


class AdmissionQueue:
    def __init__(self, max_waiting_requests: int, max_queue_wait_s: float,
                 clock: Clock = MONOTONIC, aging_s: float = 10.0):
        self.max_waiting_requests = max_waiting_requests
        self.max_queue_wait_s = max_queue_wait_s
        self.aging_s = aging_s
        self.clock = clock  # ``deadline``s given to ``admit`` are on its scale
        self._line: list[tuple[float, int]] = []  # (rank, arrival number): one per request
        self._arrivals = itertools.count()
        self._asking: tuple[float, int] | None = None  # the place of the one asking
        # Tenants with requests in line: how many, and the rank of the latest.
        self._in_line: collections.Counter[str] = collections.Counter()
        self._last_rank: dict[str, float] = {}
        self._changed = threading.Condition()

    def admit(self, try_once: Callable[[], T | None], deadline: float | None,
              still_wanted: Callable[[], bool], priority: Priority = Priority.STANDARD,
              tenant: str = "") -> T:
        """``try_once()`` when this request (of ``tenant``, in ``priority``'s class) comes
        to the head of the line, again each time capacity may have freed, until it
        returns something other than None.

        Raises ServingError: RESOURCE_EXHAUSTED when the line is full or the wait too
        long, DEADLINE_EXCEEDED at the deadline, CANCELLED when no longer wanted;
        whatever ``try_once`` raises ends the wait too.
        """
        now = self.clock.now()
        with self._changed:
            if len(self._line) >= self.max_waiting_requests + 1:  # the head is not waiting yet
                raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   "the router's waiting line is full "
                                   f"({self.max_waiting_requests} requests); retry later")
            if self._in_line[tenant]:  # behind its own that still wait
                rank = max(now, self._last_rank[tenant] + TENANT_STEP_S)
            else:
                rank = now
            self._last_rank[tenant] = rank
            self._in_line[tenant] += 1
            place = (rank + priority.rank * self.aging_s, next(self._arrivals))
            bisect.insort(self._line, place)
        give_up = now + self.max_queue_wait_s
        try:
            while True:
                with self._changed:
                    # One asks at a time: one that comes in ahead waits for its answer.
                    while self._line[0] is not place or self._asking not in (None, place):
                        self._wait(give_up, deadline, still_wanted)
                    self._asking = place
                try:
                    result = try_once()
                finally:
                    with self._changed:
                        self._asking = None
                        self._changed.notify_all()
                if result is not None:
                    return result
                with self._changed:
                    self._wait(give_up, deadline, still_wanted)
        finally:
            with self._changed:
                self._line.remove(place)
                self._in_line[tenant] -= 1
                if not self._in_line[tenant]:
                    del self._in_line[tenant], self._last_rank[tenant]
                self._changed.notify_all()

    def capacity_freed(self) -> None:
        """A request ended: the head may try again now."""
        with self._changed:
            self._changed.notify_all()

    def waiting(self) -> int:
        with self._changed:
            return max(0, len(self._line) - 1)

    def _wait(self, give_up: float, deadline: float | None,
              still_wanted: Callable[[], bool]) -> None:
        now = self.clock.now()
        if deadline is not None and now >= deadline:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "the deadline passed while waiting for decode capacity")
        if now >= give_up:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"no decode capacity freed up within {self.max_queue_wait_s:.0f} s; "
                               "retry later")
        if not still_wanted():
            raise ServingError(grpc.StatusCode.CANCELLED, "the client left while waiting")
        self.clock.wait(self._changed, POLL_SECONDS)
