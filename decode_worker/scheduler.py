"""Which requests a decode instance holds, where each is in its life, and their KV pages.

A request is in one ``RequestState`` at a time and moves only by a named ``Transition``,
each taken under the scheduler's one lock; any other move raises ``IllegalTransition``::

    transition     from                                     to
    reserve        (new)                                    RESERVED    pages held, lease on
    announce       RESERVED                                 WAITING
    withdraw       RESERVED, ABORTING                       FINISHED    a stage refused it
    prefill chunk  WAITING, PREFILLING (local only)         PREFILLING
    run            WAITING (pushed), PREFILLING (local)     RUNNING     first token sampled
    step           RUNNING                                  RUNNING     no move: no lock
    abort          any but FINISHED                         ABORTING
    expire         RESERVED, WAITING (the lease ran out)    ABORTING
    finish         WAITING, PREFILLING, RUNNING, ABORTING   FINISHED    final event sent

``local`` (prefilled here: no push comes) is a property of the request, fixed at reserve,
not a state: it decides whether WAITING leads to ``run`` (pushed) or ``prefill chunk``.
An abort only marks the request; the step loop finishes it at its next turn, between
steps. Work begun before the abort (an announcement, a chunk, a token) may still land:
it is recorded, and the request stays ABORTING.

The gRPC handlers reserve, announce, withdraw and abort; the step loop does the rest,
and waits on the lock (a bounded wait, through the injected clock) for work.
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import threading
from collections.abc import Callable, Iterable, Sequence

import grpc

from pipeline.ops import MAX_REQUEST_ID_CHARS, SamplingConfig, TokenLogprobs
from pipeline.pages import PageBudget
from pipeline.prefix_cache import MISS, Hit
from protos.clock import MONOTONIC, Clock
from protos.errors import ServingError
from protos.vocabulary import FinishReason

from .stats import SchedulerStats

# Final events of requests that finished before their token stream was opened are kept
# this long for the stream to collect.
UNCLAIMED_SECONDS = 60.0
# A reservation holds its pages at most this long without its K/V: a longer lease
# would let one caller squat the cache.
MAX_LEASE_SECONDS = 300.0
LEASE_EXPIRED = "lease expired: no KV pages arrived in time"


class RequestState(enum.Enum):
    RESERVED = "reserved"      # pages held, lease running; its stages are being told
    WAITING = "waiting"        # announced: waits for its pushed K/V or its first chunk
    PREFILLING = "prefilling"  # local: part of its prompt computed (the lease stops)
    RUNNING = "running"        # first token sampled; one more each step
    ABORTING = "aborting"      # given up: the step loop finishes it at its next turn
    FINISHED = "finished"      # final event sent, pages free; no longer held


S = RequestState
LIVE = frozenset(set(S) - {S.FINISHED})


class Transition(enum.Enum):
    ANNOUNCE = enum.auto()        # every stage knows it: admission may begin
    WITHDRAW = enum.auto()        # a stage refused it before it was announced
    PREFILL_CHUNK = enum.auto()   # local: one more chunk of its prompt computed
    RUN = enum.auto()             # its K/V is complete: its first token is sampled
    STEP = enum.auto()            # one more token
    ABORT = enum.auto()           # the client, the router or a stage gave it up
    EXPIRE = enum.auto()          # its lease ran out before its K/V came
    FINISH = enum.auto()          # its final event is sent, its pages freed

    @property
    def verb(self) -> str:
        return self.name.lower().replace("_", " ")


# Each transition: the states it leaves from, and the state it leads to.
RULES: dict[Transition, tuple[frozenset[RequestState], RequestState]] = {
    Transition.ANNOUNCE: (frozenset({S.RESERVED}), S.WAITING),
    Transition.WITHDRAW: (frozenset({S.RESERVED, S.ABORTING}), S.FINISHED),
    Transition.PREFILL_CHUNK: (frozenset({S.WAITING, S.PREFILLING}), S.PREFILLING),
    Transition.RUN: (frozenset({S.WAITING, S.PREFILLING}), S.RUNNING),
    Transition.STEP: (frozenset({S.RUNNING}), S.RUNNING),
    Transition.ABORT: (LIVE, S.ABORTING),
    Transition.EXPIRE: (frozenset({S.RESERVED, S.WAITING}), S.ABORTING),
    Transition.FINISH: (frozenset({S.WAITING, S.PREFILLING, S.RUNNING, S.ABORTING}),
                        S.FINISHED),
}
# Results of work begun before an abort: recorded on an ABORTING request, which stays so.
LATE = frozenset({Transition.ANNOUNCE, Transition.PREFILL_CHUNK, Transition.RUN,
                  Transition.STEP})


class IllegalTransition(RuntimeError):
    """A move the request's state (or kind) does not allow: a bug in the caller."""

    def __init__(self, request_id: str, state: RequestState, transition: Transition,
                 why: str = ""):
        super().__init__(f"request {request_id!r} cannot {transition.verb} while "
                         f"{state.value}{': ' + why if why else ''}")
        self.state = state
        self.transition = transition


@dataclasses.dataclass(frozen=True)
class TokenOut:
    """One event on a request's token stream."""

    token: int | None
    finish_reason: FinishReason = FinishReason.NONE
    error: str = ""
    code: grpc.StatusCode | None = None  # ABORT/ERROR: the status that fits
    logprobs: TokenLogprobs | None = None  # when the request asked for them
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # with the first token, when asked for


@dataclasses.dataclass(eq=False)
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
    cache_salt: bytes = b""   # its prefix cache namespace: looked up and cached under it
    state: RequestState = RequestState.RESERVED
    abort_reason: str = ""    # ABORTING: why
    generated: list[int] = dataclasses.field(default_factory=list)
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    stream_attached: bool = False
    prefilled: int = 0        # local: prompt tokens (after the cached ones) computed so far
    traceparent: str = ""     # the router's span it is traced under (protos/tracing.py)

    @property
    def cached_tokens(self) -> int:
        return self.cached.tokens

    @property
    def to_prefill(self) -> int:
        """Local: the prompt tokens it computes here (those after its cached prefix)."""
        return len(self.prompt_ids) - self.cached_tokens

    def kv_tokens(self) -> list[int] | None:
        """The tokens its K/V holds, once it has run (the last token generated was never
        forwarded); None if it never ran or its prompt is unknown."""
        if not self.generated or not self.prompt_ids:
            return None
        return self.prompt_ids + self.generated[:-1]


@dataclasses.dataclass
class Work:
    """What the step loop does next."""

    aborts: list[Request]     # ABORTING: finish them first
    waiting: list[Request]    # WAITING or PREFILLING: admit them if their KV is here


class DecodeScheduler:
    def __init__(self, total_pages: int, max_sequences: int, page_size: int,
                 context_window: int, vocab_size: int, eos_ids: Iterable[int],
                 cached_pages: Callable[[], int] = lambda: 0, clock: Clock = MONOTONIC):
        """``total_pages``: all the cache has (the spare page is kept back here);
        ``cached_pages``: those cached prefixes hold, and running forks share with them."""
        self.pages = PageBudget(total_pages, page_size, cached_pages)
        self.max_sequences = max_sequences
        self.context_window = context_window
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos_ids)
        self._clock = clock
        self._lock = threading.Condition()
        self._requests: dict[str, Request] = {}
        self._unclaimed: dict[str, tuple[float, queue.Queue]] = {}
        self._next_seq_id = 0
        self._kv_arrived = False
        self._stopped = False

    @property
    def total_pages(self) -> int:
        """Pages reservations may be promised (the cache's, less the spare)."""
        return self.pages.total_pages

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
        return self.pages.new_pages(prompt_tokens + sampling.max_tokens, cached.shared_pages)

    def reserve(self, request_id: str, prompt_tokens: int, prompt_ids: list[int],
                sampling: SamplingConfig, lease_seconds: float, local: bool,
                cached: Hit = MISS, cache_salt: bytes = b"") -> Request:
        """Admit a checked request (RESERVED) and hold the pages it may need; it is not
        scheduled until ``announce``. Raises ServingError when it cannot be taken now."""
        pages = self.pages_needed(prompt_tokens, sampling, cached)
        with self._lock:
            if request_id in self._requests:
                raise ServingError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"request {request_id!r} is already reserved")
            if len(self._requests) >= self.max_sequences:
                raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"decode worker holds its maximum of {self.max_sequences} "
                                   "sequences; retry later")
            self.pages.reserve(request_id, pages)
            self._next_seq_id += 1
            request = Request(request_id, prompt_tokens, prompt_ids, sampling, pages,
                              self._clock.now() + lease_seconds, self._next_seq_id, local,
                              cached, cache_salt)
            self._requests[request_id] = request
            return request

    def free_pages(self) -> int:
        """Pages neither reserved nor held by (or shared with) cached prefixes."""
        with self._lock:
            return self.pages.free()

    def shortfall(self, pages: int) -> int:
        """Pages to evict from the prefix cache before ``pages`` could be reserved."""
        with self._lock:
            return self.pages.shortfall(pages)

    def announce(self, request: Request) -> None:
        """RESERVED -> WAITING: every stage knows it; the step loop may admit it."""
        with self._lock:
            self._move(request, Transition.ANNOUNCE)
            self._lock.notify()

    def withdraw(self, request: Request) -> None:
        """RESERVED -> FINISHED, silently: a reservation its stages refused."""
        with self._lock:
            self._move(request, Transition.WITHDRAW)
            self._remove_locked(request)

    def kv_arrived(self) -> None:
        with self._lock:
            self._kv_arrived = True
            self._lock.notify()

    def abort(self, request_id: str, reason: str) -> bool:
        """Give a request up (-> ABORTING; the first reason stays); False if not held."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                return False
            self._move(request, Transition.ABORT)
            request.abort_reason = request.abort_reason or reason
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

    def stats(self) -> SchedulerStats:
        with self._lock:
            states = [r.state for r in self._requests.values()]
            return SchedulerStats(
                running_sequences=states.count(S.RUNNING),
                reservations=sum(s in (S.RESERVED, S.WAITING, S.PREFILLING) for s in states),
                total_pages=self.pages.total_pages, free_pages=self.pages.free())

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    # --- from the step loop -----------------------------------------------------------

    def next_work(self, idle_wait: float) -> Work | None:
        """What to do now, after waiting at most ``idle_wait`` for work; None once stopped.

        The work may be empty: pushes to other stages of a staged instance do not wake
        this loop, so it looks again every ``idle_wait`` anyway.
        """
        with self._lock:
            if not self._stopped and not self._has_work_locked():
                self._clock.wait(self._lock, idle_wait)
            if self._stopped:
                return None
            self._expire_locked()
            self._kv_arrived = False
            held = self._requests.values()
            # ABORTING ones are only finished: admitting them too would start (or, mid
            # prefill, continue) a sequence on stages about to free it.
            return Work([r for r in held if r.state is S.ABORTING],
                        [r for r in held if r.state in (S.WAITING, S.PREFILLING)])

    def running(self) -> list[Request]:
        with self._lock:
            return [r for r in self._requests.values() if r.state is S.RUNNING]

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._requests)

    def requests(self) -> list[Request]:
        """The requests held now (a copy of the list; the requests themselves are live)."""
        with self._lock:
            return list(self._requests.values())

    def prefill_chunk(self, request: Request, computed: int) -> None:
        """WAITING/PREFILLING -> PREFILLING: ``computed`` more prompt tokens of a local
        request are in its K/V (none: the pass had no room for it, nothing changes)."""
        if not computed:
            return
        with self._lock:
            self._move(request, Transition.PREFILL_CHUNK, computed)
            request.prefilled += computed

    def append(self, sampled: Sequence[tuple[Request, int]]) -> list[FinishReason]:
        """Record each request's new token: its first (run) or its next (step). Returns why
        each finishes with it, or NONE.

        Moves take the lock. A step of a running request is no move (RUNNING stays
        RUNNING, and only the step loop touches ``generated``), so a batch of running
        requests, every decode step, records its tokens without it; an abort racing it
        finds the request RUNNING or leaves it ABORTING with one late token, both allowed.
        """
        if any(request.state is not S.RUNNING for request, _ in sampled):
            with self._lock:
                for request, _ in sampled:
                    if request.state is not S.RUNNING:
                        self._move(request,
                                   Transition.STEP if request.generated else Transition.RUN)
        reasons = []
        for request, token in sampled:
            request.generated.append(token)
            reasons.append(self._finish_reason(request, token))
        return reasons

    def finish(self, request_id: str) -> Request | None:
        """-> FINISHED: take a request out (its pages are free again); None if it already
        left. Its events stay claimable for a while if its stream was never opened."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                return None
            self._move(request, Transition.FINISH)
            self._remove_locked(request)
            if not request.stream_attached:
                self._unclaimed[request_id] = (self._clock.now(), request.events)
            return request

    # --- internals --------------------------------------------------------------------

    def _move(self, request: Request, transition: Transition, computed: int = 0) -> None:
        """Take ``transition`` (the lock held), or raise IllegalTransition."""
        sources, target = RULES[transition]
        late = request.state is S.ABORTING and transition in LATE
        if request.state not in sources and not late:
            raise IllegalTransition(request.request_id, request.state, transition)
        why = self._guard(request, transition, computed)
        if why:
            raise IllegalTransition(request.request_id, request.state, transition, why)
        if not late:
            request.state = target

    @staticmethod
    def _guard(request: Request, transition: Transition, computed: int) -> str:
        """What besides its state forbids the move: a pushed request is never prefilled
        here, a local one runs only once its whole prompt is computed."""
        if transition is Transition.PREFILL_CHUNK:
            if not request.local:
                return "its K/V is pushed, not prefilled here"
            if request.prefilled + computed > request.to_prefill:
                return (f"{computed} more tokens would pass its {request.to_prefill} "
                        "to prefill")
        if transition is Transition.RUN and request.local:
            if request.prefilled != request.to_prefill:
                return f"{request.prefilled} of its {request.to_prefill} tokens prefilled"
        return ""

    def _finish_reason(self, request: Request, token: int) -> FinishReason:
        s = request.sampling
        if token in s.stop_token_ids or (token in self.eos_ids and not s.ignore_eos):
            return FinishReason.STOP
        if (len(request.generated) >= s.max_tokens
                or request.prompt_tokens + len(request.generated) >= self.context_window):
            return FinishReason.LENGTH
        return FinishReason.NONE

    def _remove_locked(self, request: Request) -> None:
        del self._requests[request.request_id]
        self.pages.release(request.request_id)

    def _has_work_locked(self) -> bool:
        return self._kv_arrived or any(
            r.state in (S.RUNNING, S.ABORTING, S.PREFILLING)
            or (r.state is S.WAITING and r.local)
            for r in self._requests.values())

    def _expire_locked(self) -> None:
        now = self._clock.now()
        for request_id, (finished_at, _) in list(self._unclaimed.items()):
            if now - finished_at > UNCLAIMED_SECONDS:
                del self._unclaimed[request_id]
        for request in self._requests.values():
            # A local prefill under way (PREFILLING) is not waiting for anything.
            if request.state in RULES[Transition.EXPIRE][0] and now > request.lease_deadline:
                self._move(request, Transition.EXPIRE)
                request.abort_reason = LEASE_EXPIRED
