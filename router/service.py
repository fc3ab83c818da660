"""The public Generate API: validate, tokenize, reserve, prefill, stream, detokenize.

Disaggregated: reserve KV on a decode worker, open its token stream, ask a prefill
worker to prefill and push the pages there (retried once on another prefill worker).
Aggregated: the decode worker prefills the prompt itself; nothing is transferred.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import grpc
from tokenizers import Tokenizer

from protos import generation_pb2, generation_pb2_grpc, worker_pb2
from protos.errors import ServingError
from protos.grpc_server import time_remaining

from .detokenizer import IncrementalDetokenizer, StopStringFilter
from .scheduler import NoWorker, Scheduler, Worker
from .validation import ModelFacts, invalid, validate

FINISH = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "abort": generation_pb2.FINISH_REASON_ABORT,
    "error": generation_pb2.FINISH_REASON_ERROR,
}


class PrefillLeg:
    """Runs the prefill leg in the background, retrying once on another prefill worker."""

    def __init__(self, scheduler: Scheduler, request_id: str, prompt_ids: list[int],
                 decode: Worker, deadline: float | None, attempts: int = 2):
        self.scheduler = scheduler
        self.request = worker_pb2.PrefillRequest(request_id=request_id, token_ids=prompt_ids,
                                                 decode_stages=decode.stages)
        self.decode = decode
        self.deadline = deadline
        self.attempts = attempts
        self.error: str | None = None
        self.worker: Worker | None = None
        self.response: worker_pb2.PrefillResponse | None = None
        self._call = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tried: set[str] = set()
        reasons = []
        for _ in range(self.attempts):
            if self._cancelled.is_set():
                return
            try:
                self.worker = self.scheduler.pick_prefill(exclude=tried)
            except NoWorker as exc:
                reasons.append(str(exc))
                break
            tried.add(self.worker.address)
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            try:
                self._call = self.worker.stub.Prefill.future(self.request, timeout=timeout)
                self.response = self._call.result()
                return
            except grpc.RpcError as exc:
                reasons.append(f"prefill worker {self.worker.address}: {exc.code().name}: "
                               f"{exc.details()}")
                if self._cancelled.is_set() or exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    break
        self.error = "prefill failed: " + "; ".join(reasons)
        # The decode worker would otherwise wait for a push until its lease ends.
        try:
            self.decode.stub.Abort(worker_pb2.AbortRequest(
                request_id=self.request.request_id, reason=self.error), timeout=5)
        except grpc.RpcError:
            pass

    def cancel(self) -> None:
        self._cancelled.set()
        if self._call is not None:
            self._call.cancel()
        if self.worker is not None:
            try:
                self.worker.stub.Abort(worker_pb2.AbortRequest(
                    request_id=self.request.request_id, reason="cancelled"), timeout=2)
            except grpc.RpcError:
                pass


class DecodeLost(Exception):
    """The decode worker's token stream broke (the worker died or became unreachable)."""


@dataclasses.dataclass
class Progress:
    """What a request has produced so far; survives a move to another decode worker."""

    prompt_ids: list[int]
    started: float
    detok: IncrementalDetokenizer | None
    stops: StopStringFilter
    stop_ids: frozenset[int]
    generated: list[int] = dataclasses.field(default_factory=list)
    ttft_ms: float = 0.0


@dataclasses.dataclass
class Attempt:
    """One decode worker serving (part of) a request, with its prefill leg."""

    request_id: str
    decode: Worker
    stream: object
    leg: PrefillLeg | None

    def cancel(self, reason: str) -> None:
        self.stream.cancel()
        if self.leg is not None:
            self.leg.cancel()
        _abort(self.decode, self.request_id, reason)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Generate: reserve, prefill, relay tokens; resumes once if a decode worker dies.

    Resuming sends prompt plus the tokens already streamed to another decode worker as a
    new prompt, so the client sees one unbroken stream. Greedy output is unchanged by
    the move; a seeded sampled request restarts its random stream at the move.
    """

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer | None, facts: ModelFacts,
                 aggregated: bool = False, lease_ms: int = 30_000, resume_on_decode_failure=True):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.facts = facts
        self.aggregated = aggregated
        self.lease_ms = lease_ms
        self.max_attempts = 2 if resume_on_decode_failure else 1

    def Generate(self, request, context):
        request_id = request.request_id or uuid.uuid4().hex
        try:
            prompt_ids = self._prompt_ids(request)
            sampling = validate(request, prompt_ids, self.facts)
        except ServingError as exc:
            exc.abort(context)
        progress = Progress(
            prompt_ids, time.perf_counter(),
            IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                   skip_ids=() if sampling.ignore_eos else self.facts.eos_token_ids)
            if self.tokenizer else None,
            StopStringFilter(request.sampling.stop), frozenset(sampling.stop_token_ids))
        remaining = time_remaining(context)
        deadline = None if remaining is None else time.monotonic() + remaining
        failed: set[str] = set()
        for attempt_no in range(self.max_attempts):
            attempt_id = request_id if attempt_no == 0 else f"{request_id}~resume{attempt_no}"
            attempt = self._start(attempt_id, progress, sampling, deadline, failed, context)
            finished = threading.Event()
            context.add_callback(
                lambda a=attempt, f=finished: None if f.is_set() else a.cancel("client cancelled"))
            try:
                yield from self._relay(request_id, attempt, progress, context)
                return
            except DecodeLost as lost:
                failed.add(attempt.decode.address)
                last_error = str(lost)
            finally:
                finished.set()
                attempt.stream.cancel()
        context.abort(grpc.StatusCode.UNAVAILABLE, last_error)

    def _start(self, attempt_id: str, progress: Progress, sampling: worker_pb2.Sampling,
               deadline: float | None, failed: set[str], context) -> Attempt:
        tokens = progress.prompt_ids + progress.generated
        todo = worker_pb2.Sampling()
        todo.CopyFrom(sampling)
        todo.max_tokens = sampling.max_tokens - len(progress.generated)
        decode = self._reserve(attempt_id, tokens, todo, failed, context)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        stream = decode.stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id=attempt_id),
                                          timeout=remaining)
        leg = None if self.aggregated else PrefillLeg(self.scheduler, attempt_id, tokens,
                                                      decode, deadline)
        return Attempt(attempt_id, decode, stream, leg)

    def _relay(self, request_id: str, attempt: Attempt, progress: Progress, context):
        try:
            for event in attempt.stream:
                if event.finish_reason in ("error", "abort"):
                    # The router aborts only after it stops reading, so an abort seen here
                    # came from the worker side: a failed prefill leg, an expired lease.
                    leg = attempt.leg
                    context.abort(grpc.StatusCode.UNAVAILABLE,
                                  leg.error if leg is not None and leg.error else event.error)
                response = self._response(request_id, event, attempt, progress)
                yield response
                if response.finish_reason:
                    return
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and not context.is_active():
                return
            _abort(attempt.decode, attempt.request_id, "router lost the token stream")
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                context.abort(exc.code(), f"deadline exceeded after {len(progress.generated)} "
                                          "tokens")
            raise DecodeLost(f"decode worker {attempt.decode.address}: {exc.code().name}: "
                             f"{exc.details()}") from exc
        raise DecodeLost(f"decode worker {attempt.decode.address} closed the stream early")

    def _response(self, request_id: str, event: worker_pb2.TokenEvent, attempt: Attempt,
                  progress: Progress) -> generation_pb2.GenerateResponse:
        text, ids = "", []
        if event.has_token:
            ids = [event.token_id]
            progress.generated.append(event.token_id)
            if not progress.ttft_ms:
                progress.ttft_ms = 1000 * (time.perf_counter() - progress.started)
            if progress.detok is not None and event.token_id not in progress.stop_ids:
                text = progress.stops.feed(progress.detok.add(event.token_id))
        reason = event.finish_reason
        if progress.stops.stopped and not reason:
            reason = "stop"
            _abort(attempt.decode, attempt.request_id, "stop string")
        if reason and not progress.stops.stopped:
            text += progress.stops.flush()
        response = generation_pb2.GenerateResponse(
            request_id=request_id, token_ids=ids, text=text, finish_reason=FINISH.get(reason, 0))
        if reason:
            response.usage.CopyFrom(generation_pb2.Usage(
                prompt_tokens=len(progress.prompt_ids), completion_tokens=len(progress.generated),
                time_to_first_token_ms=progress.ttft_ms))
        return response

    def _prompt_ids(self, request) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "text":
            if self.tokenizer is None:
                raise invalid("this model has no tokenizer.json; send token_ids")
            return self.tokenizer.encode(request.text).ids
        raise invalid("the request has no prompt (set text or token_ids)")

    def _reserve(self, request_id, prompt_ids, sampling, exclude, context) -> Worker:
        reserve = worker_pb2.ReserveRequest(
            request_id=request_id, prompt_tokens=len(prompt_ids), sampling=sampling,
            lease_ms=self.lease_ms,
            local_prefill_token_ids=prompt_ids if self.aggregated else [])
        try:
            candidates = self.scheduler.pick_decode(exclude)
        except NoWorker as exc:
            exc.abort(context)
        refusals, codes = [], set()
        for worker in candidates:
            try:
                worker.stub.Reserve(reserve, timeout=10)
                return worker
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    context.abort(exc.code(), exc.details())
                refusals.append(f"{worker.address}: {exc.details()}")
                codes.add(exc.code())
        code = (grpc.StatusCode.RESOURCE_EXHAUSTED
                if grpc.StatusCode.RESOURCE_EXHAUSTED in codes else grpc.StatusCode.UNAVAILABLE)
        context.abort(code, "no decode worker can take this request now: " + "; ".join(refusals))


def _abort(worker: Worker, request_id: str, reason: str) -> None:
    try:
        worker.stub.Abort(worker_pb2.AbortRequest(request_id=request_id, reason=reason),
                          timeout=2)
    except grpc.RpcError:
        pass
