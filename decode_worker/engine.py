"""The decode engine: reservations, KV admission and the continuous-batching loop.

One thread owns the model runner and its KV cache. Everything else (gRPC handlers)
talks to it through this class's locked methods; received KV is installed by the engine
thread between decode steps, never during one.

A request's life: ``reserve`` (pages held, lease running) -> ``submit_kv`` (verified K/V
and hidden state queued) -> admitted (K/V installed, first token sampled from the hidden
state) -> running (one token per step) -> finished (pages freed, final event sent).
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import threading
import time
from collections.abc import Sequence

import numpy as np

from olmo_model.kv_pages import KVSnapshot
from olmo_model.runtime import ModelRunner

from .sampler import Sampler, SamplingConfig

UNCLAIMED_SECONDS = 60.0


class EngineError(Exception):
    """A request the engine refuses; ``code`` names the gRPC status that fits."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Phase(enum.Enum):
    RESERVED = "reserved"    # waiting for its KV push (or its local prefill)
    READY = "ready"          # KV verified, waiting for the engine to install it
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class TokenOut:
    """One event on a request's token stream."""

    token: int | None
    finish_reason: str = ""  # "", "stop", "length", "abort", "error"
    error: str = ""


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_tokens: int
    sampling: SamplingConfig
    reserved_pages: int
    lease_deadline: float
    local_prompt: list[int] | None
    phase: Phase = Phase.RESERVED
    seq_id: int = -1
    generated: list[int] = dataclasses.field(default_factory=list)
    snapshot: KVSnapshot | None = None
    hidden: np.ndarray | None = None
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    sampler: Sampler | None = None
    stream_attached: bool = False


class DecodeEngine:
    def __init__(self, runner: ModelRunner, stop_ids: Sequence[int] = (),
                 idle_wait: float = 0.02):
        self.runner = runner
        self.eos_ids = frozenset(stop_ids or runner.config.eos_token_id)
        self.context_window = runner.config.context_window_size
        self.max_sequences = runner.limits.max_num_sequences
        # One page is kept back: TVM's cache needs a spare page at a page boundary.
        self.total_pages = runner.kv.total_pages - 1
        self.idle_wait = idle_wait
        self._lock = threading.Condition()
        self._requests: dict[str, Request] = {}
        self._aborts: dict[str, str] = {}
        # Final events of requests that finished before their token stream was opened.
        self._unclaimed: dict[str, tuple[float, queue.Queue]] = {}
        self._next_seq_id = 0
        self._stopped = False
        self.kv_bytes_received = 0
        self.pushes_refused = 0
        self._thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self._thread.start()

    # --- called from gRPC handlers ----------------------------------------------------

    def reserve(self, request_id: str, prompt_tokens: int, sampling: SamplingConfig,
                lease_seconds: float, local_prompt: list[int] | None = None) -> int:
        if prompt_tokens <= 0:
            raise EngineError("INVALID_ARGUMENT", "a reservation needs at least one prompt token")
        if prompt_tokens + sampling.max_tokens > self.context_window:
            raise EngineError(
                "INVALID_ARGUMENT",
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({sampling.max_tokens}) exceeds "
                f"the context window of {self.context_window}")
        pages = self.runner.kv.pages_for(prompt_tokens + sampling.max_tokens)
        with self._lock:
            if request_id in self._requests:
                raise EngineError("ALREADY_EXISTS", f"request {request_id!r} is already reserved")
            if len(self._requests) >= self.max_sequences:
                raise EngineError("RESOURCE_EXHAUSTED",
                                  f"decode worker holds its maximum of {self.max_sequences} "
                                  "sequences; retry later")
            free = self._free_pages_locked()
            if pages > free:
                raise EngineError("RESOURCE_EXHAUSTED",
                                  f"request needs {pages} KV pages but only {free} are free; "
                                  "retry later or lower max_tokens")
            self._requests[request_id] = Request(
                request_id, prompt_tokens, sampling, pages,
                time.monotonic() + lease_seconds, local_prompt)
            if local_prompt is not None:
                self._requests[request_id].phase = Phase.READY
            self._lock.notify()
        return pages

    def check_push(self, request_id: str, num_tokens: int) -> None:
        """Refuse a push early, before its bytes are read, when it cannot be installed."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is None or request.phase is not Phase.RESERVED:
                raise EngineError("FAILED_PRECONDITION",
                                  f"no open reservation for request {request_id!r}")
            if num_tokens != request.prompt_tokens:
                raise EngineError("INVALID_ARGUMENT",
                                  f"push carries {num_tokens} tokens but {request.prompt_tokens} "
                                  "were reserved")

    def submit_kv(self, request_id: str, snapshot: KVSnapshot, hidden: np.ndarray) -> None:
        with self._lock:
            self.check_push(request_id, snapshot.num_tokens)
            request = self._requests[request_id]
            request.snapshot, request.hidden, request.phase = snapshot, hidden, Phase.READY
            self.kv_bytes_received += snapshot.keys.nbytes + snapshot.values.nbytes
            self._lock.notify()

    def refuse_push(self) -> None:
        with self._lock:
            self.pushes_refused += 1

    def events(self, request_id: str) -> queue.Queue:
        with self._lock:
            if request_id in self._unclaimed:
                return self._unclaimed.pop(request_id)[1]
            request = self._requests.get(request_id)
            if request is None:
                raise EngineError("NOT_FOUND", f"unknown request {request_id!r}")
            request.stream_attached = True
            return request.events

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        with self._lock:
            if request_id not in self._requests:
                return False
            self._aborts[request_id] = reason
            self._lock.notify()
            return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            phases = [r.phase for r in self._requests.values()]
            return {
                "running_sequences": phases.count(Phase.RUNNING),
                "reservations": phases.count(Phase.RESERVED) + phases.count(Phase.READY),
                "total_pages": self.total_pages,
                "free_pages": self._free_pages_locked(),
                "used_pages": self.runner.kv.total_pages - self.runner.available_pages(),
                "kv_bytes_received": self.kv_bytes_received,
                "pushes_refused": self.pushes_refused,
            }

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # --- the engine thread ------------------------------------------------------------

    def _free_pages_locked(self) -> int:
        return self.total_pages - sum(r.reserved_pages for r in self._requests.values())

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._has_work_locked():
                    self._lock.wait(timeout=self.idle_wait)
                    self._expire_leases_locked()
                if self._stopped:
                    break
                self._expire_leases_locked()
                aborts, self._aborts = self._aborts, {}
                ready = [r for r in self._requests.values() if r.phase is Phase.READY]
            for request_id, reason in aborts.items():
                self._finish(request_id, TokenOut(None, "abort", reason))
            try:
                self._admit(ready)
                self._step()
            except Exception as exc:  # a failed step must not leave requests hanging
                self._fail_all(f"decode step failed: {exc}")

    def _has_work_locked(self) -> bool:
        return bool(self._aborts) or any(
            r.phase in (Phase.READY, Phase.RUNNING) for r in self._requests.values())

    def _expire_leases_locked(self) -> None:
        now = time.monotonic()
        for request_id, (finished_at, _) in list(self._unclaimed.items()):
            if now - finished_at > UNCLAIMED_SECONDS:
                del self._unclaimed[request_id]
        for request in self._requests.values():
            if request.phase is Phase.RESERVED and now > request.lease_deadline:
                self._aborts.setdefault(
                    request.request_id, "lease expired: no KV pages arrived in time")

    def _admit(self, ready: list[Request]) -> None:
        """Install received KV (or prefill locally) and sample each request's first token."""
        pushed = [r for r in ready if r.local_prompt is None]
        local = [r for r in ready if r.local_prompt is not None]
        for request in pushed:
            request.seq_id = self._new_seq_id()
            self.runner.import_kv(request.seq_id, request.snapshot)
            request.snapshot = None
        if local:
            for request in local:
                request.seq_id = self._new_seq_id()
                self.runner.add_sequence(request.seq_id)
            hidden = self.runner.prefill([r.seq_id for r in local], [r.local_prompt for r in local])
            for request, row in zip(local, hidden):
                request.hidden = row
        if not ready:
            return
        logits = self.runner.logits(np.stack([r.hidden for r in ready]))
        for request, row in zip(ready, logits):
            request.hidden = None
            request.sampler = Sampler(request.sampling)
            request.phase = Phase.RUNNING
            self._emit(request, request.sampler.sample(row))

    def _step(self) -> None:
        with self._lock:
            running = [r for r in self._requests.values() if r.phase is Phase.RUNNING]
        if not running:
            return
        logits = self.runner.decode([r.seq_id for r in running], [r.generated[-1] for r in running])
        for request, row in zip(running, logits):
            self._emit(request, request.sampler.sample(row))

    def _emit(self, request: Request, token: int) -> None:
        request.generated.append(token)
        s = request.sampling
        reason = ""
        if token in s.stop_token_ids or (token in self.eos_ids and not s.ignore_eos):
            reason = "stop"
        elif (len(request.generated) >= s.max_tokens
              or request.prompt_tokens + len(request.generated) >= self.context_window):
            reason = "length"
        if reason:
            self._finish(request.request_id, TokenOut(token, reason))
        else:
            request.events.put(TokenOut(token))

    def _finish(self, request_id: str, event: TokenOut) -> None:
        with self._lock:
            request = self._requests.pop(request_id, None)
            self._aborts.pop(request_id, None)
            if request is not None and not request.stream_attached:
                self._unclaimed[request_id] = (time.monotonic(), request.events)
        if request is None:
            return
        request.phase = Phase.FINISHED
        request.events.put(event)
        if request.seq_id >= 0:
            self.runner.remove_sequence(request.seq_id)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            ids = [r.request_id for r in self._requests.values() if r.phase is not Phase.RESERVED]
        for request_id in ids:
            try:
                self._finish(request_id, TokenOut(None, "error", message))
            except Exception:  # the cache may be unusable; still tell every client
                pass

    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id
