"""Which waiting prompts go into the next prefill: FIFO under a token budget."""

from __future__ import annotations

import collections
import dataclasses
import threading
from concurrent.futures import Future, InvalidStateError

import grpc

from pipeline.ops import StageAddress
from protos.clock import MONOTONIC, Clock
from protos.errors import ServingError


@dataclasses.dataclass
class PrefillJob:
    """One prompt to prefill; its waiter holds ``result`` (seconds taken, or the error).

    The result is settled exactly once, whichever comes first: the prefill finishing or
    failing, or the job being cancelled, so a waiter is always answered.
    """

    request_id: str
    token_ids: list[int]
    kv_targets: tuple[StageAddress, ...]  # the stages of the decode instance holding its pages
    skip_tokens: int = 0    # the decode instance holds these already: push the rest
    attempt: int = 0        # the router's try of this prefill leg; its pushes carry it
    push_token: bytes = b""  # the decode reservation's; its pushes carry it
    cache_salt: bytes = b""  # its prefix cache namespace: looked up and cached under it
    traceparent: str = ""   # its Prefill call's span (protos/tracing.py), if traced
    queued_at: float = 0.0  # perf_counter time it was submitted
    result: Future = dataclasses.field(default_factory=Future)
    cancelled: bool = False
    cached_tokens: int = 0  # found in this instance's prefix cache

    def finish(self, seconds: float) -> None:
        self._settle(lambda: self.result.set_result(seconds))

    def fail(self, error: BaseException) -> None:
        self._settle(lambda: self.result.set_exception(error))

    def cancel(self, reason: str = "cancelled") -> None:
        self.cancelled = True
        self.fail(ServingError(grpc.StatusCode.CANCELLED, f"prefill {reason}"))

    def _settle(self, settle) -> None:
        try:
            settle()
        except InvalidStateError:  # settled already: the first outcome stands
            pass


class PromptBatcher:
    """A FIFO of jobs; ``next_batch`` takes as many as fit the token and sequence budgets.

    A prompt longer than the budget still goes, alone: the runner splits it into chunks.
    """

    def __init__(self, token_budget: int, max_batch: int, clock: Clock = MONOTONIC):
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.clock = clock
        self._jobs: collections.deque[PrefillJob] = collections.deque()
        self._ready = threading.Condition()

    def put(self, job: PrefillJob) -> None:
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()

    def cancel(self, request_id: str) -> bool:
        with self._ready:
            for job in self._jobs:
                if job.request_id == request_id:
                    self._jobs.remove(job)
                    return True
        return False

    def next_batch(self, timeout: float) -> list[PrefillJob]:
        """The next batch, waiting up to ``timeout`` for a first job; [] if none came."""
        with self._ready:
            if not self._jobs:
                self.clock.wait(self._ready, timeout)
            batch: list[PrefillJob] = []
            tokens = 0
            while self._jobs and len(batch) < self.max_batch:
                size = len(self._jobs[0].token_ids)
                if batch and tokens + size > self.token_budget:
                    break
                batch.append(self._jobs.popleft())
                tokens += size
            return batch

    def queued(self) -> tuple[int, int]:
        """(requests, tokens) waiting."""
        with self._ready:
            return len(self._jobs), sum(len(j.token_ids) for j in self._jobs)
