"""Which requests a decode instance holds, in which phase, and the KV pages they reserve.

A request's life: reserved (pages held, lease running; announced once every stage knows
it) -> running (its K/V installed, or prefilled here; one token per step) -> finished
(its final event sent). The scheduler is shared by the gRPC handlers and the step loop,
so every method takes its lock; the loop waits on it for work.
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import threading
import time
from collections.abc import Callable, Iterable

import grpc

from pipeline.ops import MAX_REQUEST_ID_CHARS, SamplingConfig, TokenLogprobs
from pipeline.prefix_cache import MISS, Hit
from protos.errors import ServingError

# Final events of requests that finished before their token stream was opened are kept
# this long for the stream to collect.
UNCLAIMED_SECONDS = 60.0
# A reservation holds its pages at most this long without its K/V: a longer lease
# would let one caller squat the cache.
MAX_LEASE_SECONDS = 300.0


class Phase(enum.Enum):
    RESERVED = "reserved"    # waiting for its KV (or its local prefill)
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class TokenOut:
    """One event on a request's token stream."""

    token: int | None
    finish_reason: str = ""  # "", "stop", "length", "abort", "error"
    error: str = ""
    code: grpc.StatusCode | None = None  # "abort"/"error": the status that fits
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_tokens: int
    prompt_ids: list[int]     # may be empty: then it is neither matched nor cached
    sampling: SamplingConfig
    reserved_pages: int       # beyond those it shares with the cached prefix it forks
    lease_deadline: float
    seq_id: int
    local: bool = False       # prefilled here: no push comes
    cached: Hit = MISS        # the cached prefix its sequence forks from
    phase: Phase = Phase.RESERVED
    generated: list[int] = dataclasses.field(default_factory=list)
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    stream_attached: bool = False
    announced: bool = False  # every stage knows it: admission may begin
    prefilled: int = 0       # local: prompt tokens (after the cached ones) computed so far

    @property
    def cached_tokens(self) -> int:
        return self.cached.tokens

    def kv_tokens(self) -> list[int] | None:
        """The tokens its K/V holds, once it has run (the last token generated was never
        forwarded); None if it never ran or its prompt is unknown."""
        if not self.generated or not self.prompt_ids:
            return None
        return self.prompt_ids + self.generated[:-1]


@dataclasses.dataclass
class Work:
    """What the step loop does next."""

    aborts: dict[str, str]    # request id -> reason
    waiting: list[Request]    # announced reservations: admit them if their KV is here


class DecodeScheduler:
    def __init__(self, total_pages: int, max_sequences: int, page_size: int,
                 context_window: int, vocab_size: int, eos_ids: Iterable[int],
                 cached_pages: Callable[[], int] = lambda: 0):
        self.total_pages = total_pages
        # Pages of cached prefixes, and those running forks share with them: no
        # reservation counts them.
        self.cached_pages = cached_pages
        self.max_sequences = max_sequences
        self.page_size = page_size
        self.context_window = context_window
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos_ids)
        self._lock = threading.Condition()
        self._requests: dict[str, Request] = {}
        self._aborts: dict[str, str] = {}
        self._unclaimed: dict[str, tuple[float, queue.Queue]] = {}
        self._next_seq_id = 0
        self._kv_arrived = False
        self._stopped = False

    # --- from the gRPC handlers -------------------------------------------------------

    def check(self, request_id: str, prompt_tokens: int, prompt_ids: list[int],
              sampling: SamplingConfig, lease_seconds: float, local: bool) -> None:
        """Every field of a reservation, against the model and against each other; raises
        ServingError (INVALID_ARGUMENT)."""
        problem = None
        if not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
            problem = f"a request id has 1 to {MAX_REQUEST_ID_CHARS} characters"
        elif prompt_tokens <= 0:
            problem = "a reservation needs at least one prompt token"
        elif not 0 < lease_seconds <= MAX_LEASE_SECONDS:
            problem = f"lease must be in (0, {MAX_LEASE_SECONDS:.0f}] seconds"
        elif prompt_ids and len(prompt_ids) != prompt_tokens:
            problem = (f"{len(prompt_ids)} prompt token ids sent but {prompt_tokens} prompt "
                       "tokens reserved")
        elif local and not prompt_ids:
            problem = "prefilling locally needs the prompt's token ids"
        elif prompt_ids and max(prompt_ids) >= self.vocab_size:
            problem = (f"token id {max(prompt_ids)} is outside the vocabulary of "
                       f"{self.vocab_size}")
        elif prompt_tokens + sampling.max_tokens > self.context_window:
            problem = (f"prompt ({prompt_tokens} tokens) plus max_tokens "
                       f"({sampling.max_tokens}) exceeds the context window of "
                       f"{self.context_window}")
        else:
            problem = sampling.problem(self.vocab_size)
        if problem:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, problem)

    def pages_needed(self, prompt_tokens: int, sampling: SamplingConfig, cached: Hit) -> int:
        """Pages a request may take beyond those it shares with its cached prefix."""
        return -(-(prompt_tokens + sampling.max_tokens) // self.page_size) - cached.shared_pages

    def reserve(self, request_id: str, prompt_tokens: int, prompt_ids: list[int],
                sampling: SamplingConfig, lease_seconds: float, local: bool,
                cached: Hit = MISS) -> Request:
        """Admit a checked request and hold the pages it may need; it is not scheduled
        until ``announce``. Raises ServingError when it cannot be taken now."""
        pages = self.pages_needed(prompt_tokens, sampling, cached)
        with self._lock:
            if request_id in self._requests:
                raise ServingError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"request {request_id!r} is already reserved")
            if len(self._requests) >= self.max_sequences:
                raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"decode worker holds its maximum of {self.max_sequences} "
                                   "sequences; retry later")
            free = self._free_pages_locked()
            if pages > free:
                raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"request needs {pages} KV pages but only {free} are free; "
                                   "retry later or lower max_tokens")
            self._next_seq_id += 1
            request = Request(request_id, prompt_tokens, prompt_ids, sampling, pages,
                              time.monotonic() + lease_seconds, self._next_seq_id, local,
                              cached)
            self._requests[request_id] = request
            return request

    def free_pages(self) -> int:
        """Pages neither reserved nor held by (or shared with) cached prefixes."""
        with self._lock:
            return self._free_pages_locked()

    def announce(self, request: Request) -> None:
        with self._lock:
            request.announced = True
            self._lock.notify()

    def withdraw(self, request_id: str) -> None:
        """Forget a reservation that was never announced."""
        with self._lock:
            self._requests.pop(request_id, None)

    def kv_arrived(self) -> None:
        with self._lock:
            self._kv_arrived = True
            self._lock.notify()

    def abort(self, request_id: str, reason: str) -> bool:
        with self._lock:
            if request_id not in self._requests:
                return False
            self._aborts[request_id] = reason
            self._lock.notify()
            return True

    def events(self, request_id: str) -> queue.Queue:
        """A request's token events, for its one stream."""
        with self._lock:
            if request_id in self._unclaimed:
                return self._unclaimed.pop(request_id)[1]
            request = self._requests.get(request_id)
            if request is None:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"unknown request {request_id!r}")
            request.stream_attached = True
            return request.events

    def stats(self) -> dict[str, int]:
        with self._lock:
            phases = [r.phase for r in self._requests.values()]
            return {"running_sequences": phases.count(Phase.RUNNING),
                    "reservations": phases.count(Phase.RESERVED),
                    "total_pages": self.total_pages,
                    "free_pages": self._free_pages_locked()}

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    # --- from the step loop -----------------------------------------------------------

    def next_work(self, idle_wait: float, poll_reserved: bool) -> Work | None:
        """Wait until there is something to do; None once stopped.

        ``poll_reserved``: pushes to other stages of the instance do not wake this loop,
        so while reservations wait it looks every ``idle_wait``.
        """
        with self._lock:
            while not self._stopped and not self._has_work_locked():
                self._lock.wait(timeout=idle_wait)
                self._expire_leases_locked()
                if poll_reserved and any(r.phase is Phase.RESERVED
                                         for r in self._requests.values()):
                    break
            if self._stopped:
                return None
            self._expire_leases_locked()
            self._kv_arrived = False
            aborts, self._aborts = self._aborts, {}
            # An aborted request is finished first: admitting it too would start (or, mid
            # prefill, continue) a sequence on stages that have just freed it.
            waiting = [r for r in self._requests.values()
                       if r.phase is Phase.RESERVED and r.announced and r.request_id not in aborts]
            return Work(aborts, waiting)

    def running(self) -> list[Request]:
        with self._lock:
            return [r for r in self._requests.values() if r.phase is Phase.RUNNING]

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._requests)

    def requests(self) -> list[Request]:
        """The requests held now (a copy of the list; the requests themselves are live)."""
        with self._lock:
            return list(self._requests.values())

    def append(self, request: Request, token: int) -> str:
        """Record a generated token; returns why the request finishes with it, or ""."""
        request.phase = Phase.RUNNING
        request.generated.append(token)
        s = request.sampling
        if token in s.stop_token_ids or (token in self.eos_ids and not s.ignore_eos):
            return "stop"
        if (len(request.generated) >= s.max_tokens
                or request.prompt_tokens + len(request.generated) >= self.context_window):
            return "length"
        return ""

    def finish(self, request_id: str) -> Request | None:
        """Take a request out (its pages are free again); None if it already left.

        Its events stay claimable for a while if its stream was never opened.
        """
        with self._lock:
            request = self._requests.pop(request_id, None)
            self._aborts.pop(request_id, None)
            if request is None:
                return None
            if not request.stream_attached:
                self._unclaimed[request_id] = (time.monotonic(), request.events)
            request.phase = Phase.FINISHED
            return request

    # --- internals --------------------------------------------------------------------

    def _free_pages_locked(self) -> int:
        return (self.total_pages - sum(r.reserved_pages for r in self._requests.values())
                - self.cached_pages())

    def _has_work_locked(self) -> bool:
        return bool(self._aborts) or self._kv_arrived or any(
            r.phase is Phase.RUNNING
            or (r.phase is Phase.RESERVED and r.announced and r.local)
            for r in self._requests.values())

    def _expire_leases_locked(self) -> None:
        now = time.monotonic()
        for request_id, (finished_at, _) in list(self._unclaimed.items()):
            if now - finished_at > UNCLAIMED_SECONDS:
                del self._unclaimed[request_id]
        for request in self._requests.values():
            # A local prefill under way is not waiting for anything.
            if (request.phase is Phase.RESERVED and not request.prefilled
                    and now > request.lease_deadline):
                self._aborts.setdefault(
                    request.request_id, "lease expired: no KV pages arrived in time")
