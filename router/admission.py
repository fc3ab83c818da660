"""The router's waiting line: requests that no decode worker can take yet wait here, in
order of arrival, for capacity to free up.

Only the request at the head asks the decode workers, so a burst drains in order and a
large request is not starved by small ones behind it. The line is bounded in length
(a request that finds it full is refused at once) and in time (a request gives up after
``max_wait`` seconds, its deadline, or its client leaving).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from protos.errors import ServingError

T = TypeVar("T")
POLL_SECONDS = 0.05  # capacity can also free up where this router cannot see it


class AdmissionQueue:
    def __init__(self, max_waiting: int, max_wait: float):
        self.max_waiting = max_waiting
        self.max_wait = max_wait
        self._line: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    def admit(self, try_once: Callable[[], T | None], deadline: float | None,
              still_wanted: Callable[[], bool]) -> T:
        """``try_once()`` when this request's turn comes, again each time capacity may have
        freed, until it returns something other than None.

        Raises ServingError: RESOURCE_EXHAUSTED when the line is full or the wait too
        long, DEADLINE_EXCEEDED at the deadline, CANCELLED when no longer wanted;
        whatever ``try_once`` raises ends the wait too.
        """
        ticket = object()
        with self._changed:
            if len(self._line) >= self.max_waiting + 1:  # the head is not waiting yet
                raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the router's waiting line is full ({self.max_waiting} "
                                   "requests); retry later")
            self._line.append(ticket)
        give_up = time.monotonic() + self.max_wait
        try:
            while True:
                with self._changed:
                    while self._line[0] is not ticket:
                        self._wait(give_up, deadline, still_wanted)
                result = try_once()
                if result is not None:
                    return result
                with self._changed:
                    self._wait(give_up, deadline, still_wanted)
        finally:
            with self._changed:
                self._line.remove(ticket)
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
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "the deadline passed while waiting for decode capacity")
        if now >= give_up:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"no decode capacity freed up within {self.max_wait:.0f} s; "
                               "retry later")
        if not still_wanted():
            raise ServingError(grpc.StatusCode.CANCELLED, "the client left while waiting")
        self._changed.wait(POLL_SECONDS)
