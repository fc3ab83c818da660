"""Which workers serve a request: decode by free KV pages, prefill by queued tokens."""

from __future__ import annotations

import dataclasses
import threading

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


class NoWorker(ServingError):
    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class Scheduler:
    """Holds the router's view of its workers and picks one of each role per request."""

    def __init__(self, stats_timeout: float = 2.0):
        self.stats_timeout = stats_timeout
        self._workers: dict[str, Worker] = {}
        self._picks: dict[str, int] = {}  # breaks ties round-robin, so no worker idles
        self._lock = threading.Lock()
        self.layout: worker_pb2.ModelLayout | None = None

    @staticmethod
    def stub_for(address: str, role: str):
        stub_type = (worker_pb2_grpc.DecodeWorkerStub if role == "decode"
                     else worker_pb2_grpc.PrefillWorkerStub)
        return stub_type(shared_channel(address))

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
            self._workers[address] = worker
        return worker

    def remove(self, address: str) -> None:
        with self._lock:
            self._workers.pop(address, None)

    def workers(self, role: str) -> list[Worker]:
        with self._lock:
            return [w for w in self._workers.values() if w.role == role]

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
            if worker.address in exclude:
                continue
            stats = self._stats(worker)
            if stats is not None:
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
