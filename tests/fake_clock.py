"""A clock for unit tests of the serving state machines: it moves only when told to.

``wait`` does not block: it advances the clock by the timeout it was given (nothing
notified the waiter in the meantime), so a loop that waits for a lease or a deadline
reaches it at once and deterministically.
"""

from __future__ import annotations

import threading


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self._now = start
        self.waits: list[float | None] = []  # every timeout asked for, in order

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def wait(self, condition: threading.Condition, timeout: float | None) -> bool:
        self.waits.append(timeout)
        if timeout is None:
            raise AssertionError("an unbounded wait under a fake clock would hang the test")
        self._now += timeout
        return False
