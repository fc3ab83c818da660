"""Time as the serving state machines see it: a clock they are given, not one they reach for.

Schedulers, queues and monitors read ``now()`` and block through ``wait()``; production
passes ``MONOTONIC``, unit tests a fake clock that moves only when told to (tests/fake_clock.py),
so leases, deadlines and timeouts are tested without sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""

    def wait(self, condition: threading.Condition, timeout: float | None) -> bool:
        """``condition.wait(timeout)`` (its lock held): True if notified."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, timeout: float | None) -> bool:
        return condition.wait(timeout)


MONOTONIC = MonotonicClock()
