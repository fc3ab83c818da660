"""The prefill leg of a disaggregated request: ask a prefill worker to prefill and push the
K/V the decode instance holding the reservation lacks; retried once on another worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from protos import tracing, worker_pb2

from .scheduler import NoWorker, Scheduler, Worker, abort_quietly, answer_while


class PrefillLeg:
    """Runs in the background; ``error`` says why it failed, if it did.

    Each call is bounded by the request's deadline and by the reservation's lease: once
    the lease has ended, the decode worker would refuse the push anyway.
    """

    def __init__(self, scheduler: Scheduler, request_id: str, prompt_ids: list[int],
                 cache_salt: bytes, reserved: worker_pb2.ReserveResponse, decode: Worker,
                 deadline: float | None, lease_seconds: float, exclude: set[str],
                 attempts: int = 2,
                 on_done: Callable[[worker_pb2.PrefillRequest, worker_pb2.PrefillResponse],
                                   None] = lambda request, response: None,
                 trace_parent: tracing.Parent = None):
        self.scheduler = scheduler
        self.trace_parent = trace_parent  # each try is a span under it
        self.on_done = on_done  # told of a prefill that finished
        # skip_tokens: the decode instance holds the prompt's first tokens already; the
        # push token lets the pushes into its reservation.
        self.request = worker_pb2.PrefillRequest(request_id=request_id, token_ids=prompt_ids,
                                                 decode_stages=decode.stages,
                                                 skip_tokens=reserved.cached_tokens,
                                                 push_token=reserved.push_token,
                                                 cache_salt=cache_salt)
        self.decode = decode
        self.give_up = time.monotonic() + lease_seconds
        if deadline is not None:
            self.give_up = min(self.give_up, deadline)
        self.exclude = exclude   # prefill workers that failed this request before
        self.attempts = attempts
        self.error: str | None = None
        self.worker: Worker | None = None
        self.response: worker_pb2.PrefillResponse | None = None
        self._call = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.response is not None

    def _run(self) -> None:
        tried = set(self.exclude)
        reasons = []
        for attempt in range(self.attempts):
            if self._cancelled.is_set():
                return
            # A decode worker drops the K/V an earlier try pushed in part (and refuses
            # what that try still sends) once this try's first push arrives.
            self.request.attempt = attempt
            try:
                self.worker = self.scheduler.pick_prefill(tried, self.request.token_ids,
                                                          self.request.cache_salt)
            except NoWorker as exc:
                reasons.append(exc.message)
                break
            tried.add(self.worker.address)
            load = len(self.request.token_ids)
            self.scheduler.charge(self.worker, load)
            span = tracing.start("prefill_leg", self.trace_parent, tracing.SpanKind.CLIENT, {
                "olmo.worker": self.worker.address, "olmo.try": attempt,
                "olmo.skip_tokens": self.request.skip_tokens})
            error = None
            try:
                self._call = self.worker.stub.Prefill.future(
                    self.request, timeout=max(0.0, self.give_up - time.monotonic()),
                    metadata=tracing.metadata(span))
                self.response = self._await(self._call, self.worker)
                if self.response is not None:
                    self.scheduler.remember(self.worker.address, self.request.request_id,
                                            self.request.token_ids, self.request.cache_salt)
                    self.on_done(self.request, self.response)
                    span.set_attributes({"olmo.kv_bytes": self.response.kv_bytes,
                                         "olmo.cached_tokens": self.response.cached_tokens})
                    return
                error = f"prefill worker {self.worker.address} stopped answering"
                reasons.append(error)
            except grpc.FutureCancelledError:
                error = "cancelled"
                return  # cancel() did it: the request is gone
            except grpc.RpcError as exc:
                error = exc
                reasons.append(f"prefill worker {self.worker.address}: {exc.code().name}: "
                               f"{exc.details()}")
                if self._cancelled.is_set() or exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    break
            finally:
                self.scheduler.discharge(self.worker, load)
                tracing.end(span, error=error)
        self.error = "prefill failed: " + "; ".join(reasons)
        # The decode worker would otherwise wait for a push until its lease ends.
        abort_quietly(self.decode, self.request.request_id, self.error)

    def _await(self, call, worker: Worker) -> worker_pb2.PrefillResponse | None:
        """The call's answer; None (the call cancelled) once its worker is too slow to
        be picked (a prompt is cheaper to prefill again elsewhere than to wait for a
        worker that may be gone), so that another worker can take the prompt."""
        return answer_while(call, lambda: self.scheduler.pickable(worker.address))

    def cancel(self) -> None:
        self._cancelled.set()
        if self._call is not None:
            self._call.cancel()
        if self.worker is not None:
            abort_quietly(self.worker, self.request.request_id, "cancelled")
