"""Which workers serve a request: decode by room in their KV caches, prefill by queued
tokens, each against where the prompt's prefix is likely cached."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

import grpc

from protos import worker_pb2, worker_pb2_grpc
from protos.clock import MONOTONIC, Clock
from protos.errors import ServingError
from protos.grpc_server import shared_channel
from protos.layout import layout_mismatch
from protos.vocabulary import Role

from .cache_map import CacheMap


@dataclasses.dataclass
class Worker:
    address: str
    role: Role
    stub: object
    layout: worker_pb2.ModelLayout | None = None
    stages: list = dataclasses.field(default_factory=list)  # the instance's StageInfos
    stats: worker_pb2.WorkerStats | None = None  # as last polled
    seen: float = 0.0  # the scheduler's clock time of its last answer
    draining: bool = False  # finishing what it holds: never picked, still polled
    # This router's load on it now, in the cost's units (prompt tokens being prefilled
    # there; requests held there, times SEQUENCE_LOAD_TOKENS): exact at every pick,
    # where polled stats lag by up to a poll.
    in_flight: float = 0.0
    # Its prefix cache's journal (KV events): which, and the last event applied.
    kv_epoch: bytes = b""
    kv_after: int = 0


class NoWorker(ServingError):
    """No worker of the role may be picked now. ``for_now``: one may be soon (it is slow,
    not gone), so a request may wait for it rather than fail."""

    def __init__(self, message: str, for_now: bool = False):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
        self.for_now = for_now


class Scheduler:
    """Holds the router's view of its workers and picks one of each role per request.

    A background poll asks every worker for its stats every ``POLL_SECONDS``; picks read
    the last answers for room (never a call of their own: one silent worker must not hold
    up every request's pick) and this router's own count of what each worker is serving
    for load (``charge``/``discharge``: exact, where the polls lag). Slow is not
    dead: a worker that has not answered for ``SLOW_SECONDS`` is not picked (``pickable``)
    but keeps what it holds; only after ``gone_seconds`` is it gone (``alive`` false),
    and the router cuts its streams to resume them elsewhere. A worker that answers
    again after being gone, or is added anew, starts afresh: no tie-break debt, and
    nothing of the prefixes it was thought to cache.

    KV-aware routing: a worker's load counts against it and the prompt tokens it is
    thought to hold cached (``CacheMap``) for it, ``kv_weight`` tokens of load per cached
    token; 0 routes by load alone. Load is in prompt tokens: on a prefill worker, those
    this router has it prefill; on a decode worker, ``SEQUENCE_LOAD_TOKENS`` per request
    this router has it serve (reserved or running), since with prefixes shared a busy
    worker's pages barely fill. Ties go by room in the KV cache, then round-robin. (One
    router counts all the load there is; the router is one process.)
    """

    POLL_SECONDS = 0.25
    SLOW_SECONDS = 2.0
    # A decode worker one request busier than another is picked only if it holds this
    # many more tokens of the prompt, over ``kv_weight``: at weight 4, 64 tokens. A
    # chat's next turn (hundreds of tokens cached) stays with its worker unless that one
    # is several requests busier; a 1024-token prefix cached on one worker alone spreads
    # to the others once that one holds 16 more requests (the first one there caches it).
    SEQUENCE_LOAD_TOKENS = 256

    def __init__(self, secret: str | None, kv_weight: float, gone_seconds: float = 10.0,
                 stats_timeout: float = 2.0, clock: Clock = MONOTONIC, poll: bool = True,
                 kv_events: bool = True):
        """``poll``: start the background poll (unit tests, on a fake ``clock``, report
        answers with ``heard_from`` instead). ``kv_events``: ask workers what their
        prefix caches hold (when ``kv_weight`` routes by it)."""
        self.secret = secret  # the cluster's: every call to a worker carries it
        self.stats_timeout = stats_timeout
        self.kv_weight = kv_weight
        self.kv_events = kv_events and kv_weight > 0
        self.gone_seconds = max(gone_seconds, self.SLOW_SECONDS)
        self.clock = clock
        self.cache_map = CacheMap()
        self._workers: dict[str, Worker] = {}
        self._picks: dict[str, int] = {}  # breaks ties round-robin, so no worker idles
        self._lock = threading.Lock()
        self.layout: worker_pb2.ModelLayout | None = None
        self._stopped = threading.Event()
        if poll:
            threading.Thread(target=self._poll, name="worker-poll", daemon=True).start()

    def close(self) -> None:
        self._stopped.set()

    def alive(self, address: str) -> bool:
        """Whether the worker is not gone: it answered a poll within ``gone_seconds``
        (unknown addresses are not alive)."""
        return self._silent_for(address) <= self.gone_seconds

    def pickable(self, address: str) -> bool:
        """Whether the worker may take new work: it answered within ``SLOW_SECONDS``."""
        return self._silent_for(address) <= self.SLOW_SECONDS

    def _silent_for(self, address: str) -> float:
        """Since when nothing was heard from it: its last answer, or, if its engine loop
        had not gone round for a while by then (a hung step), that long before."""
        with self._lock:
            worker = self._workers.get(address)
        if worker is None:
            return float("inf")
        stuck = worker.stats.step_loop_age_ms / 1000 if worker.stats is not None else 0.0
        return self.clock.now() - worker.seen + stuck

    def stub_for(self, address: str, role: Role):
        stub_type = (worker_pb2_grpc.DecodeWorkerStub if role == Role.DECODE
                     else worker_pb2_grpc.PrefillWorkerStub)
        return stub_type(shared_channel(address, self.secret))

    def add(self, address: str, role: Role) -> Worker:
        """Handshake with a worker and keep it; refuses a worker of another model layout."""
        worker = Worker(address, role, self.stub_for(address, role))
        asked_at = self.clock.now()
        stats = worker.stub.Stats(self._stats_request(worker), timeout=30)
        if stats.role != role:
            raise ValueError(f"{address} is a {stats.role} worker, not a {role} worker")
        if not stats.stages or stats.stages[0].layer_begin != 0:
            raise ValueError(f"{address} does not lead an instance (it serves layers "
                             f"{stats.layout.layer_begin}-{stats.layout.layer_end - 1} only)")
        self.adopt(worker, stats)
        self._told(worker, stats, asked_at)
        return worker

    def adopt(self, worker: Worker, stats: worker_pb2.WorkerStats) -> None:
        """Keep a worker whose handshake answered ``stats``, as a fresh one."""
        with self._lock:
            if self.layout is None:
                self.layout = stats.layout
                self.cache_map.page_size = stats.layout.page_size
            reason = layout_mismatch(self.layout, stats.layout)
            if reason:
                raise ValueError(f"worker {worker.address} serves an incompatible model: "
                                 f"{reason}")
            worker.layout = stats.layout
            worker.stages = list(stats.stages)
            worker.stats, worker.seen = stats, self.clock.now()
            self._workers[worker.address] = worker
            self._start_afresh(worker.address)
        self.cache_map.forget(worker.address)

    def heard_from(self, worker: Worker, stats: worker_pb2.WorkerStats,
                   asked_at: float | None = None) -> None:
        """A poll's answer (to a poll sent at ``asked_at``). A worker that was gone starts
        afresh (it may have restarted)."""
        with self._lock:
            now = self.clock.now()
            was_gone = now - worker.seen > self.gone_seconds
            worker.stats, worker.seen = stats, now
            if was_gone:
                self._start_afresh(worker.address)
        if was_gone:  # what it told is forgotten: the next poll asks for all of it
            self.cache_map.forget(worker.address)
            worker.kv_epoch, worker.kv_after = b"", 0
            return
        self._told(worker, stats, now if asked_at is None else asked_at)

    def _stats_request(self, worker: Worker) -> worker_pb2.StatsRequest:
        """A poll, asking for the worker's KV events when routing weighs caches."""
        return worker_pb2.StatsRequest(kv_events=self.kv_events,
                                       kv_epoch=worker.kv_epoch, kv_after=worker.kv_after)

    def _told(self, worker: Worker, stats: worker_pb2.WorkerStats, asked_at: float) -> None:
        if stats.HasField("kv_events"):
            events = stats.kv_events
            self.cache_map.told(worker.address, events, asked_at)
            worker.kv_epoch, worker.kv_after = events.epoch, events.last

    def _start_afresh(self, address: str) -> None:
        """No tie-break debt (with the lock held): as many picks as the least picked
        other, so that it neither waits behind old counts nor takes every tie."""
        others = [n for a, n in self._picks.items() if a != address]
        self._picks[address] = min(others, default=0)

    def drain(self, address: str) -> None:
        """Pick the worker no more, but keep polling it: the requests it still serves
        are not cut for want of an answer (``alive``) until it is removed."""
        with self._lock:
            worker = self._workers.get(address)
            if worker is not None:
                worker.draining = True
        self.cache_map.forget(address)

    def remove(self, address: str) -> None:
        with self._lock:
            self._workers.pop(address, None)
        self.cache_map.forget(address)

    def remember(self, address: str, key: str, tokens: Sequence[int], salt: bytes = b""
                 ) -> None:
        """The worker at ``address`` now caches ``tokens`` under ``salt`` (for KV-aware
        routing)."""
        if self.kv_weight:
            self.cache_map.record(address, key, tokens, salt, self.clock.now())

    def workers(self, role: Role) -> list[Worker]:
        """The role's workers that may be picked (not draining)."""
        with self._lock:
            return [w for w in self._workers.values() if w.role == role and not w.draining]

    def could_ever_fit(self, num_tokens: int) -> bool:
        """Whether some decode worker's whole cache, empty, would hold this many tokens (as
        its last stats said; True while none has reported)."""
        sizes = [(w.stats.total_pages, w.layout.page_size) for w in self.workers(Role.DECODE)
                 if w.stats is not None]
        return not sizes or any(-(-num_tokens // page) <= pages for pages, page in sizes)

    def pick_decode(self, exclude: set[str] = frozenset(), tokens: Sequence[int] = (),
                    salt: bytes = b"") -> list[Worker]:
        """Pickable decode workers best first (see ``rank_decode``)."""
        return [worker for worker, _ in self.rank_decode(exclude, tokens, salt)]

    def rank_decode(self, exclude: set[str] = frozenset(), tokens: Sequence[int] = (),
                    salt: bytes = b"") -> list[tuple[Worker, tuple]]:
        """Pickable decode workers best first, each with its cost: least load (requests
        this router has them serve) less the weighted prefix of ``tokens`` cached there;
        then most room (free or merely cached pages, as last polled)."""
        def cost(worker: Worker, stats: worker_pb2.WorkerStats, hit: int) -> tuple:
            return (worker.in_flight - self.kv_weight * hit,
                    -(stats.free_pages + stats.cached_pages))
        return self._rank(Role.DECODE, exclude, tokens, salt, cost)

    def pick_prefill(self, exclude: set[str] = frozenset(), tokens: Sequence[int] = (),
                     salt: bytes = b"") -> Worker:
        """The pickable prefill worker with the fewest prompt tokens this router has it
        prefill, less the weighted prefix of ``tokens`` cached there."""
        return self._rank(Role.PREFILL, exclude, tokens, salt, lambda worker, stats, hit: (
            worker.in_flight - self.kv_weight * hit,))[0][0]

    def charge(self, worker: Worker, load: float) -> None:
        """This router sent ``worker`` a request of ``load`` (see ``Worker.in_flight``)."""
        with self._lock:
            worker.in_flight += load

    def discharge(self, worker: Worker, load: float) -> None:
        """That request is done there."""
        with self._lock:
            worker.in_flight = max(0.0, worker.in_flight - load)

    def _rank(self, role: Role, exclude: set[str], tokens: Sequence[int], salt: bytes,
              cost: Callable[[Worker, worker_pb2.WorkerStats, int], tuple]
              ) -> list[tuple[Worker, tuple]]:
        """Pickable candidates best first, with their ``cost`` (of a worker, its last
        polled stats and the prefix of ``tokens`` it is thought to cache). Raises
        NoWorker."""
        known = [w for w in self.workers(role) if w.address not in exclude]
        candidates = [w for w in known if self.pickable(w.address) and w.stats is not None]
        if not candidates:  # worth waiting for only while one is slow, not gone
            raise NoWorker(f"no {role} worker is reachable",
                           for_now=any(self.alive(w.address) for w in known))
        hits = (self.cache_map.hits([w.address for w in candidates], tokens, salt)
                if self.kv_weight and tokens else {})
        with self._lock:
            ranked = sorted(((cost(w, w.stats, hits.get(w.address, 0)),
                              self._picks.get(w.address, 0), w.address), w) for w in candidates)
            first = ranked[0][1]
            self._picks[first.address] = self._picks.get(first.address, 0) + 1
        return [(worker, costs) for (costs, _, _), worker in ranked]

    def _poll(self) -> None:
        """One stats call in flight per worker, answered whenever it answers: a worker
        that hangs delays nobody else's poll."""
        in_flight: set[str] = set()
        while not self._stopped.wait(self.POLL_SECONDS):
            with self._lock:
                due = [w for w in self._workers.values() if w.address not in in_flight]
                in_flight.update(w.address for w in due)
            for worker in due:
                asked_at = self.clock.now()
                call = worker.stub.Stats.future(self._stats_request(worker),
                                                timeout=self.stats_timeout)
                call.add_done_callback(
                    lambda done, w=worker, t=asked_at: self._polled(w, done, in_flight, t))

    def _polled(self, worker: Worker, call, in_flight: set[str], asked_at: float) -> None:
        try:
            self.heard_from(worker, call.result(), asked_at)
        except (grpc.RpcError, grpc.FutureCancelledError):
            pass
        with self._lock:
            in_flight.discard(worker.address)


# Calls nobody waits for, held until they end: gRPC cancels a call whose future is
# garbage-collected, which lost nearly every abort (measured: 6 of 200 arrived) and left
# reservations waiting out their lease. Each has a deadline, so the set stays small.
_unawaited: set[grpc.Future] = set()
_unawaited_lock = threading.Lock()


def _forget(call: grpc.Future) -> None:
    with _unawaited_lock:
        _unawaited.discard(call)


def answer_while(call: grpc.Future, still_worth_waiting: Callable[[], bool],
                 poll_seconds: float = Scheduler.POLL_SECONDS):
    """A call's answer; None, with the call cancelled, once ``still_worth_waiting()``
    says no (its worker has gone slow, say). Raises what the call raises."""
    while True:
        try:
            return call.result(timeout=poll_seconds)
        except grpc.FutureTimeoutError:
            if not still_worth_waiting():
                call.cancel()
                return None


def abort_quietly(worker: Worker, request_id: str, reason: str) -> None:
    """Tell a worker to drop a request, without waiting for it: a worker that cannot be
    reached has nothing to drop, and one that has stopped must not stall the caller."""
    call = worker.stub.Abort.future(
        worker_pb2.AbortRequest(request_id=request_id, reason=reason), timeout=2)
    with _unawaited_lock:
        _unawaited.add(call)
    call.add_done_callback(_forget)
