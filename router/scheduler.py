"""Which workers serve a request: decode by room in their KV caches, prefill by queued
tokens, each against where the prompt's prefix is likely cached."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from protos import worker_pb2, worker_pb2_grpc
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
    seen: float = 0.0  # monotonic time of its last answer
    draining: bool = False  # finishing what it holds: never picked, still polled


class NoWorker(ServingError):
    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class Scheduler:
    """Holds the router's view of its workers and picks one of each role per request.

    A background poll asks every worker for its stats every ``POLL_SECONDS``; a worker
    that has not answered for ``STALE_SECONDS`` is not alive: it is not picked, and the
    router cuts the requests it holds (see ``alive``), until it answers again.

    KV-aware routing: a worker's load counts against it and the prompt tokens it is
    thought to hold cached (``CacheMap``) for it, ``kv_weight`` tokens of load per cached
    token; 0 routes by load alone. Load is in prompt tokens: a prefill worker's queued
    ones; on a decode worker, ``SEQUENCE_LOAD_TOKENS`` per request it holds (running or
    reserved), since with prefixes shared a busy worker's pages barely fill. Ties go by
    room in the KV cache, then round-robin.
    """

    POLL_SECONDS = 0.25
    STALE_SECONDS = 2.0
    # A decode worker one request busier than another is picked only if it holds this
    # many more tokens of the prompt, over ``kv_weight``: at weight 4, 64 tokens. A
    # chat's next turn (hundreds of tokens cached) stays with its worker unless that one
    # is several requests busier; a 1024-token prefix cached on one worker alone spreads
    # to the others once that one holds 16 more requests (the first one there caches it).
    SEQUENCE_LOAD_TOKENS = 256

    def __init__(self, secret: str | None, kv_weight: float, stats_timeout: float = 2.0):
        self.secret = secret  # the cluster's: every call to a worker carries it
        self.stats_timeout = stats_timeout
        self.kv_weight = kv_weight
        self.cache_map = CacheMap()
        self._workers: dict[str, Worker] = {}
        self._picks: dict[str, int] = {}  # breaks ties round-robin, so no worker idles
        self._lock = threading.Lock()
        self.layout: worker_pb2.ModelLayout | None = None
        self._stopped = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="worker-poll", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stopped.set()

    def alive(self, address: str) -> bool:
        """Whether the worker answered a stats poll lately (unknown addresses are not)."""
        with self._lock:
            worker = self._workers.get(address)
        return worker is not None and time.monotonic() - worker.seen <= self.STALE_SECONDS

    def stub_for(self, address: str, role: Role):
        stub_type = (worker_pb2_grpc.DecodeWorkerStub if role == Role.DECODE
                     else worker_pb2_grpc.PrefillWorkerStub)
        return stub_type(shared_channel(address, self.secret))

    def add(self, address: str, role: Role) -> Worker:
        """Handshake with a worker and keep it; refuses a worker of another model layout."""
        worker = Worker(address, role, self.stub_for(address, role))
        stats = worker.stub.Stats(worker_pb2.StatsRequest(), timeout=30)
        if stats.role != role:
            raise ValueError(f"{address} is a {stats.role} worker, not a {role} worker")
        if not stats.stages or stats.stages[0].layer_begin != 0:
            raise ValueError(f"{address} does not lead an instance (it serves layers "
                             f"{stats.layout.layer_begin}-{stats.layout.layer_end - 1} only)")
        with self._lock:
            if self.layout is None:
                self.layout = stats.layout
                self.cache_map.page_size = stats.layout.page_size
            reason = layout_mismatch(self.layout, stats.layout)
            if reason:
                raise ValueError(f"worker {address} serves an incompatible model: {reason}")
            worker.layout = stats.layout
            worker.stages = list(stats.stages)
            worker.stats, worker.seen = stats, time.monotonic()
            self._workers[address] = worker
        return worker

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

    def remember(self, address: str, key: str, tokens: Sequence[int]) -> None:
        """The worker at ``address`` now caches ``tokens`` (for KV-aware routing)."""
        if self.kv_weight:
            self.cache_map.record(address, key, tokens)

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

    def pick_decode(self, exclude: set[str] = frozenset(), tokens: Sequence[int] = ()
                    ) -> list[Worker]:
        """Decode workers best first: least load (requests held) less the weighted prefix
        of ``tokens`` cached there; then most room (free or merely cached pages)."""
        def cost(worker: Worker, stats: worker_pb2.WorkerStats, hit: int) -> tuple:
            load = (stats.running_sequences + stats.reservations) * self.SEQUENCE_LOAD_TOKENS
            return (load - self.kv_weight * hit, -(stats.free_pages + stats.cached_pages))
        return self._rank(Role.DECODE, exclude, tokens, cost)

    def pick_prefill(self, exclude: set[str] = frozenset(), tokens: Sequence[int] = ()
                     ) -> Worker:
        """The reachable prefill worker with the fewest queued prompt tokens, less the
        weighted prefix of ``tokens`` cached there."""
        return self._rank(Role.PREFILL, exclude, tokens, lambda worker, stats, hit: (
            stats.queued_tokens - self.kv_weight * hit,))[0]

    def _rank(self, role: Role, exclude: set[str], tokens: Sequence[int],
              cost: Callable[[Worker, worker_pb2.WorkerStats, int], tuple]) -> list[Worker]:
        candidates = [w for w in self.workers(role)
                      if w.address not in exclude and self.alive(w.address)]
        hits = (self.cache_map.hits([w.address for w in candidates], tokens)
                if self.kv_weight and tokens else {})
        ranked = []
        for worker in candidates:
            stats = self._stats(worker)
            if stats is not None:
                worker.stats, worker.seen = stats, time.monotonic()
                with self._lock:
                    picks = self._picks.get(worker.address, 0)
                ranked.append(((*cost(worker, stats, hits.get(worker.address, 0)), picks,
                                worker.address), worker))
        if not ranked:
            raise NoWorker(f"no {role} worker is reachable")
        ranked.sort(key=lambda item: item[0])
        with self._lock:
            first = ranked[0][1].address
            self._picks[first] = self._picks.get(first, 0) + 1
        return [worker for _, worker in ranked]

    def _stats(self, worker: Worker) -> worker_pb2.WorkerStats | None:
        try:
            return worker.stub.Stats(worker_pb2.StatsRequest(), timeout=self.stats_timeout)
        except grpc.RpcError:
            return None

    def _poll(self) -> None:
        """One stats call in flight per worker, answered whenever it answers: a worker
        that hangs delays nobody else's poll."""
        in_flight: set[str] = set()
        while not self._stopped.wait(self.POLL_SECONDS):
            with self._lock:
                due = [w for w in self._workers.values() if w.address not in in_flight]
                in_flight.update(w.address for w in due)
            for worker in due:
                call = worker.stub.Stats.future(worker_pb2.StatsRequest(),
                                                timeout=self.stats_timeout)
                call.add_done_callback(
                    lambda done, w=worker: self._polled(w, done, in_flight))

    def _polled(self, worker: Worker, call, in_flight: set[str]) -> None:
        try:
            worker.stats, worker.seen = call.result(), time.monotonic()
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


def abort_quietly(worker: Worker, request_id: str, reason: str) -> None:
    """Tell a worker to drop a request, without waiting for it: a worker that cannot be
    reached has nothing to drop, and one that has stopped must not stall the caller."""
    call = worker.stub.Abort.future(
        worker_pb2.AbortRequest(request_id=request_id, reason=reason), timeout=2)
    with _unawaited_lock:
        _unawaited.add(call)
    call.add_done_callback(_forget)
