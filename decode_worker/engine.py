"""The decode engine: reservations, KV admission and the continuous-batching loop.

The engine is its instance's leader. It keeps every request's state and, once per loop,
asks the instance's stages (itself first, then the others over gRPC) which reserved
requests have all their KV, installs those, and runs one decode step for everything
running. Installation happens between steps, never during one. A single-stage instance
is the same code with no downstream stages.

A request's life: ``reserve`` (pages held, lease running) -> KV pushed to every stage ->
admitted (installed, first token sampled from the pushed hidden state) -> running (one
token per step) -> finished (sequences released on every stage, final event sent).
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import threading
import time
from collections.abc import Sequence

import numpy as np

from olmo_model.runtime import ModelRunner, plan_chunks
from protos import worker_pb2

from .sampler import SamplingConfig
from .stage import DecodeStage
from .stage_chain import DecodeChain, sampling_from_proto

UNCLAIMED_SECONDS = 60.0
Op = worker_pb2.StageOp


class EngineError(Exception):
    """A request the engine refuses; ``code`` names the gRPC status that fits."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


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


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_tokens: int
    sampling: SamplingConfig
    reserved_pages: int
    lease_deadline: float
    local_prompt: list[int] | None
    seq_id: int
    phase: Phase = Phase.RESERVED
    generated: list[int] = dataclasses.field(default_factory=list)
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    stream_attached: bool = False
    announced: bool = False  # every stage knows it (EXPECT done): admission may begin


def piece(request_id: str = "", seq_id: int = 0, length: int = 0, last: bool = False
          ) -> worker_pb2.StagePiece:
    return worker_pb2.StagePiece(request_id=request_id, seq_id=seq_id, length=length,
                                 last_piece=last)


class DecodeEngine:
    def __init__(self, runner: ModelRunner, stop_ids: Sequence[int] = (),
                 idle_wait: float = 0.02):
        self.runner = runner
        self.stage = DecodeStage(runner)
        self.chain = DecodeChain(self.stage)
        self.downstream: list[str] = []  # the instance's other stages, in order
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
        self._kv_arrived = False
        self._stopped = False
        self.kv_bytes_received = 0
        self.pushes_refused = 0
        self._thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self._thread.start()

    # --- called from gRPC handlers ----------------------------------------------------

    def reserve(self, request_id: str, prompt_tokens: int, sampling: worker_pb2.Sampling,
                lease_seconds: float, local_prompt: list[int] | None = None) -> int:
        config = sampling_from_proto(sampling)
        if prompt_tokens <= 0:
            raise EngineError("INVALID_ARGUMENT", "a reservation needs at least one prompt token")
        if prompt_tokens + config.max_tokens > self.context_window:
            raise EngineError(
                "INVALID_ARGUMENT",
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({config.max_tokens}) exceeds "
                f"the context window of {self.context_window}")
        pages = self.runner.kv.pages_for(prompt_tokens + config.max_tokens)
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
            self._next_seq_id += 1
            request = Request(request_id, prompt_tokens, config, pages,
                              time.monotonic() + lease_seconds, local_prompt, self._next_seq_id)
            self._requests[request_id] = request
        expect = worker_pb2.StageExpect(
            request_id=request_id, prompt_tokens=prompt_tokens, sampling=sampling,
            local=local_prompt is not None, seq_id=request.seq_id)
        try:
            self.chain.run(worker_pb2.StageRequest(op=Op.STAGE_OP_EXPECT, expects=[expect]),
                           self.downstream)
        except Exception as exc:
            with self._lock:
                self._requests.pop(request_id, None)
            raise EngineError("UNAVAILABLE", f"a pipeline stage refused the request: {exc}") \
                from exc
        with self._lock:
            request.announced = True
            self._lock.notify()
        return pages

    def check_push(self, request_id: str, num_tokens: int) -> None:
        """Refuse a push early, before its bytes are read, when it cannot be installed."""
        reason = self.stage.expects(request_id, num_tokens)
        if reason:
            code = "INVALID_ARGUMENT" if "tokens but" in reason else "FAILED_PRECONDITION"
            raise EngineError(code, reason)

    def submit_kv(self, request_id: str, snapshot, hidden: np.ndarray | None) -> None:
        self.check_push(request_id, snapshot.num_tokens)
        try:
            self.stage.receive(request_id, snapshot, hidden)
        except (KeyError, ValueError) as exc:
            raise EngineError("FAILED_PRECONDITION", str(exc)) from exc
        with self._lock:
            self.kv_bytes_received += snapshot.keys.nbytes + snapshot.values.nbytes
            self._kv_arrived = True
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
                "reservations": phases.count(Phase.RESERVED),
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
                    if self.downstream and self._reserved_locked():
                        break  # other stages' pushes do not wake us: poll them
                if self._stopped:
                    break
                self._expire_leases_locked()
                self._kv_arrived = False
                aborts, self._aborts = self._aborts, {}
                reserved = [r for r in self._requests.values()
                            if r.phase is Phase.RESERVED and r.announced]
            for request_id, reason in aborts.items():
                self._finish(request_id, TokenOut(None, "abort", reason))
            try:
                self._admit(reserved)
                self._step()
            except Exception as exc:  # a failed step must not leave requests hanging
                self._fail_all(f"decode step failed: {exc}")

    def _has_work_locked(self) -> bool:
        return bool(self._aborts) or self._kv_arrived or any(
            r.phase is Phase.RUNNING
            or (r.phase is Phase.RESERVED and r.announced and r.local_prompt is not None)
            for r in self._requests.values())

    def _reserved_locked(self) -> bool:
        return any(r.phase is Phase.RESERVED for r in self._requests.values())

    def _expire_leases_locked(self) -> None:
        now = time.monotonic()
        for request_id, (finished_at, _) in list(self._unclaimed.items()):
            if now - finished_at > UNCLAIMED_SECONDS:
                del self._unclaimed[request_id]
        for request in self._requests.values():
            if request.phase is Phase.RESERVED and now > request.lease_deadline:
                self._aborts.setdefault(
                    request.request_id, "lease expired: no KV pages arrived in time")

    def _admit(self, reserved: list[Request]) -> None:
        """Install KV that has reached every stage (or prefill locally); sample first tokens."""
        pushed = [r for r in reserved if r.local_prompt is None]
        if pushed:
            ready = set(self._run(Op.STAGE_OP_READY,
                                  [piece(r.request_id) for r in pushed]).ready)
            admitted = [r for r in pushed if r.request_id in ready]
            if admitted:
                tokens = self._run(Op.STAGE_OP_INSTALL,
                                   [piece(r.request_id, r.seq_id) for r in admitted]).tokens
                self._start(admitted, tokens)
        local = [r for r in reserved if r.local_prompt is not None]
        if local:
            self._start(local, self._prefill_locally(local))

    def _prefill_locally(self, requests: list[Request]) -> list[int]:
        first: dict[int, int] = {}
        prompts = [r.local_prompt for r in requests]
        for chunk in plan_chunks([len(p) for p in prompts], self.runner.limits.prefill_chunk_size):
            pieces = [piece(requests[c.index].request_id, requests[c.index].seq_id, c.length,
                            c.begin + c.length == len(prompts[c.index])) for c in chunk]
            ids = np.concatenate([prompts[c.index][c.begin:c.begin + c.length] for c in chunk])
            tokens = self._run(Op.STAGE_OP_FORWARD, pieces, token_ids=ids).tokens
            finishing = [c.index for c in chunk if c.begin + c.length == len(prompts[c.index])]
            first.update(zip(finishing, tokens))
        return [first[i] for i in range(len(requests))]

    def _start(self, requests: list[Request], tokens: Sequence[int]) -> None:
        for request, token in zip(requests, tokens):
            request.phase = Phase.RUNNING
            self._emit(request, token)

    def _step(self) -> None:
        with self._lock:
            running = [r for r in self._requests.values() if r.phase is Phase.RUNNING]
        if not running:
            return
        tokens = self._run(Op.STAGE_OP_FORWARD, [piece(r.request_id, r.seq_id, 1, True)
                                                 for r in running],
                           token_ids=[r.generated[-1] for r in running], decode=True).tokens
        for request, token in zip(running, tokens):
            self._emit(request, token)

    def _run(self, op: int, pieces: list[worker_pb2.StagePiece], **fields
             ) -> worker_pb2.StageResponse:
        return self.chain.run(worker_pb2.StageRequest(op=op, pieces=pieces, **fields),
                              self.downstream)

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
        self._run(Op.STAGE_OP_RELEASE, [piece(request.request_id, request.seq_id)])

    def _fail_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._requests)
        for request_id in ids:
            try:
                self._finish(request_id, TokenOut(None, "error", message))
            except Exception:  # a stage may be gone; still tell every client
                pass
