"""Which workers serve a request: decode by free KV pages, prefill by queued tokens."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc

from protos import worker_pb2, worker_pb2_grpc
from protos.errors import ServingError
from protos.grpc_server import shared_channel
from protos.layout import layout_mismatch


@dataclasses.dataclass
class Worker:
    address: str
    role: str
    stub: object
    layout: worker_pb2.ModelLayout | None = None
    stages: list = dataclasses.field(default_factory=list)  # the instance's StageInfos
    stats: worker_pb2.WorkerStats | None = None  # as last polled
    seen: float = 0.0  # monotonic time of its last answer


class NoWorker(ServingError):
    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class Scheduler:
    """Holds the router's view of its workers and picks one of each role per request.

    A background poll asks every worker for its stats every ``POLL_SECONDS``; a worker
    that has not answered for ``STALE_SECONDS`` is not alive: it is not picked, and the
    router cuts the requests it holds (see ``alive``), until it answers again.
    """

    POLL_SECONDS = 0.25
    STALE_SECONDS = 2.0

    def __init__(self, secret: str | None = None, stats_timeout: float = 2.0):
        self.secret = secret  # the cluster's: every call to a worker carries it
        self.stats_timeout = stats_timeout
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

    def stub_for(self, address: str, role: str):
        stub_type = (worker_pb2_grpc.DecodeWorkerStub if role == "decode"
                     else worker_pb2_grpc.PrefillWorkerStub)
        return stub_type(shared_channel(address, self.secret))

    def add(self, address: str, role: str) -> Worker:
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
            reason = layout_mismatch(self.layout, stats.layout)
            if reason:
                raise ValueError(f"worker {address} serves an incompatible model: {reason}")
            worker.layout = stats.layout
            worker.stages = list(stats.stages)
            worker.stats, worker.seen = stats, time.monotonic()
            self._workers[address] = worker
        return worker

    def remove(self, address: str) -> None:
        with self._lock:
            self._workers.pop(address, None)

    def workers(self, role: str) -> list[Worker]:
        with self._lock:
            return [w for w in self._workers.values() if w.role == role]

    def could_ever_fit(self, num_tokens: int) -> bool:
        """Whether some decode worker's whole cache, empty, would hold this many tokens (as
        its last stats said; True while none has reported)."""
        sizes = [(w.stats.total_pages, w.layout.page_size) for w in self.workers("decode")
                 if w.stats is not None]
        return not sizes or any(-(-num_tokens // page) <= pages for pages, page in sizes)

    def pick_decode(self, exclude: set[str] = frozenset()) -> list[Worker]:
        """Decode workers best first: most free pages, then fewest running sequences."""
        return self._rank("decode", exclude,
                          lambda stats: (-stats.free_pages, stats.running_sequences))

    def pick_prefill(self, exclude: set[str] = frozenset()) -> Worker:
        """The reachable prefill worker with the fewest queued prompt tokens."""
        return self._rank("prefill", exclude, lambda stats: (stats.queued_tokens,))[0]

    def _rank(self, role: str, exclude: set[str], load) -> list[Worker]:
        ranked = []
        for worker in self.workers(role):
            if worker.address in exclude or not self.alive(worker.address):
                continue
            stats = self._stats(worker)
            if stats is not None:
                worker.stats, worker.seen = stats, time.monotonic()
                with self._lock:
                    picks = self._picks.get(worker.address, 0)
                ranked.append(((*load(stats), picks, worker.address), worker))
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


def abort_quietly(worker: Worker, request_id: str, reason: str) -> None:
    """Tell a worker to drop a request, without waiting for it: a worker that cannot be
    reached has nothing to drop, and one that has stopped must not stall the caller."""
    worker.stub.Abort.future(worker_pb2.AbortRequest(request_id=request_id, reason=reason),
                             timeout=2)
