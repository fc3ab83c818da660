"""The public Generate API: validate, tokenize, admit, reserve, prefill, stream, detokenize.

Disaggregated: reserve KV on a decode worker, open its token stream, ask a prefill
worker to prefill and push the pages there (retried once on another prefill worker);
only the pages after the prefix the decode worker has cached travel, and when few
tokens are left uncached the decode worker prefills them itself (conditional
disaggregation). Aggregated: the decode worker always prefills the prompt itself.
Workers are picked by load and by where the prompt's prefix is likely cached.

Workers only ever see request ids the router makes (one per attempt), never the
client's, so no client can name, abort or read another's request on a worker.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc
from tokenizers import Tokenizer

from protos import generation_pb2, generation_pb2_grpc, tracing, worker_pb2
from protos.errors import ServingError, status_code
from protos.grpc_server import time_remaining
from protos.vocabulary import FinishReason

from .admission import AdmissionQueue
from .client_budget import BYTE_COST_S, REQUEST_COST_S, ClientBudget, OverBudget
from .detokenizer import IncrementalDetokenizer, StopStringFilter
from .liveness import StallMonitor
from .metrics import RouterMetrics
from .options import RouterOptions
from .prefill_leg import PrefillLeg
from .scheduler import NoWorker, Scheduler, Worker, abort_quietly, answer_while
from .tenants import DEFAULT_TENANT, Tenant, Tenants
from .validation import (
    ModelFacts,
    cache_salt_digest,
    check_limits,
    invalid,
    validate,
    within_model,
)

# What the request parser gives for bytes that are not a GenerateRequest.
UNPARSABLE = object()


class CallContext(Protocol):
    """What a request's caller offers, whatever the transport."""

    def is_active(self) -> bool:
        """False once the caller has gone (cancelled, disconnected, deadline passed)."""

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the call ends; False (and never run) if it has already."""

    def time_remaining(self) -> float | None:
        """Seconds to the caller's deadline, or None without one."""


class GrpcCall:
    """A gRPC servicer context as a CallContext."""

    def __init__(self, context: grpc.ServicerContext):
        self.context = context

    def is_active(self) -> bool:
        return self.context.is_active()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self.context.add_callback(callback)

    def time_remaining(self) -> float | None:
        return time_remaining(self.context)


@dataclasses.dataclass
class Prepared:
    """A request that passed validation, with what generating it needs."""

    request: generation_pb2.GenerateRequest
    prompt_ids: list[int]
    sampling: worker_pb2.Sampling
    arrived: float  # perf_counter time it came in: TTFT and latency count from here
    tenant: Tenant = DEFAULT_TENANT  # who asked: its priority, and its quotas it holds
    ready: float = 0.0  # perf_counter time its checks and tokenizing were done


class DecodeLost(Exception):
    """The decode worker's token stream broke (the worker died, hung or became unreachable)."""


@dataclasses.dataclass
class Progress:
    """What a request has produced so far; survives a move to another decode worker."""

    prompt_ids: list[int]
    started: float
    detok: IncrementalDetokenizer | None
    stops: StopStringFilter
    stop_ids: frozenset[int]
    cache_salt: bytes = b""  # its prefix cache namespace on every worker (a digest)
    tenant: Tenant = DEFAULT_TENANT  # its place in the waiting line comes from here
    generated: list[int] = dataclasses.field(default_factory=list)
    ttft_ms: float = 0.0
    last_token_at: float = 0.0
    span: tracing.Span = tracing.NOT_TRACED  # the request's (its trace's root here)


@dataclasses.dataclass
class Attempt:
    """One decode worker serving (part of) a request, with its prefill leg."""

    request_id: str  # the router's, for this attempt
    decode: Worker
    stream: grpc.Call
    leg: PrefillLeg | None
    cached_tokens: int = 0  # of its prompt, in the decode worker's cache (when it prefills)

    @property
    def prompt_cached(self) -> int:
        """Of its prompt, the tokens not computed for it: whoever prefilled had them."""
        if self.leg is None:
            return self.cached_tokens
        return self.leg.response.cached_tokens if self.leg.response is not None else 0

    def cancel(self, reason: str) -> None:
        self.stream.cancel()
        if self.leg is not None:
            self.leg.cancel()
        abort_quietly(self.decode, self.request_id, reason)


@dataclasses.dataclass
class Blame:
    """Workers that failed this request: later attempts avoid them."""

    decode: set[str] = dataclasses.field(default_factory=set)
    prefill: set[str] = dataclasses.field(default_factory=set)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Generate: admit, reserve, prefill, relay tokens; resumes once if a decode worker
    dies or goes silent.

    Resuming sends prompt plus the tokens already streamed to another decode worker as a
    new prompt, so the client sees one unbroken stream. Greedy output is unchanged by
    the move; a seeded sampled request restarts its random stream at the move.
    """

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer | None, facts: ModelFacts,
                 options: RouterOptions | None = None, api_key: str | None = None):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.facts = facts
        self.options = options = options or RouterOptions()
        # What requests are checked against: the options' limits, the prompt's bytes no
        # more than the context window can hold.
        self.limits = within_model(options.limits, tokenizer, facts.context_window)
        self.max_attempts = 2 if options.resume_on_decode_failure else 1
        self.admission = AdmissionQueue(options.max_waiting_requests, options.max_queue_wait_s,
                                        aging_s=options.tenants.aging_s)
        self.tenants = Tenants(options.tenants, api_key)  # both APIs' keys and quotas
        self.stalls = StallMonitor(options.first_token_timeout_s, options.token_timeout_s,
                                   scheduler.alive, scheduler.gone_seconds)
        self._client_ids: set[str] = set()  # ids clients chose, of requests in flight
        self._lock = threading.Lock()
        self.budget = ClientBudget(options.clients)  # both APIs' clients, by address
        self.metrics = RouterMetrics(scheduler, self.admission.waiting, self.budget)

    def close(self) -> None:
        self.stalls.stop()
        self.scheduler.close()

    def Generate(self, request, context):
        """The gRPC face of ``prepare`` and ``run``; the client pays for the preparing."""
        metadata = context.invocation_metadata() or ()
        forwarded = ",".join(value for key, value in metadata
                             if key == "x-forwarded-for" and isinstance(value, str))
        client = self.budget.names.of(peer_address(context.peer()), forwarded or None)
        # The interceptor let in only known keys; a key revoked since is refused here.
        tenant = self.tenants.identify(next((v for k, v in metadata if k == "authorization"),
                                            None))
        if tenant is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this API needs a valid API key "
                          "(authorization: Bearer <key>)")
        self._wait_for_budget(client, request, context)
        if request is UNPARSABLE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "the request is not a GenerateRequest (strings must be UTF-8)")
        started = time.thread_time()
        try:
            self.arrive(tenant)
            prepared = self.prepare(request, tenant)
        except OverBudget as exc:
            _refuse_over_budget(context, exc)
        except ServingError as exc:
            exc.abort(context)
        finally:
            self.budget.charge(client, time.thread_time() - started)
        try:
            yield from self.run(prepared, GrpcCall(context), tracing.from_metadata(metadata))
        except ServingError as exc:
            exc.abort(context)

    def _wait_for_budget(self, client: str, request, context) -> None:
        """Start when ``client``'s budget allows (a bounded wait, on this call's thread),
        or refuse RESOURCE_EXHAUSTED with gRPC's retry pushback."""
        size = 0 if request is UNPARSABLE else request.ByteSize()
        try:
            wait = self.budget.admit(client, REQUEST_COST_S + size * BYTE_COST_S)
        except OverBudget as exc:
            _refuse_over_budget(context, exc)
        if wait:
            try:
                time.sleep(wait)
            finally:
                self.budget.waited(client)

    def arrive(self, tenant: Tenant) -> None:
        """A request of ``tenant`` came (one per API call, however many choices):
        OverBudget past its requests per second."""
        self.metrics.tenant_requests.labels(tenant.name).inc()
        try:
            self.tenants.arrive(tenant)
        except OverBudget:
            self.metrics.tenant_refusals.labels(tenant.name).inc()
            raise

    def prepare(self, request: generation_pb2.GenerateRequest,
                tenant: Tenant = DEFAULT_TENANT) -> Prepared:
        """Check a request (sizes before tokenizing), hold its place in its ``tenant``'s
        quotas (OverBudget past them) and claim its client id; raises ServingError.
        Every prepared request must then be ``run`` or ``discard``-ed."""
        arrived = time.perf_counter()
        check_limits(request, self.limits, self.facts)
        prompt_ids = self._prompt_ids(request)
        sampling = validate(request, prompt_ids, self.facts)
        try:
            self.tenants.start(tenant, len(prompt_ids) + sampling.max_tokens)
        except OverBudget:
            self.metrics.tenant_refusals.labels(tenant.name).inc()
            raise
        try:
            self._claim(request.request_id)
        except ServingError:
            self.tenants.end(tenant, len(prompt_ids) + sampling.max_tokens)
            raise
        return Prepared(request, prompt_ids, sampling, arrived, tenant, time.perf_counter())

    def discard(self, prepared: Prepared) -> None:
        """Let go of a prepared request that will not be run."""
        self._unclaim(prepared.request.request_id)
        self.tenants.end(prepared.tenant, len(prepared.prompt_ids) + prepared.sampling.max_tokens)

    def run(self, prepared: Prepared, call: CallContext, trace_parent: tracing.Parent = None
            ) -> Iterator[generation_pb2.GenerateResponse]:
        """Serve a prepared request, one response per token; raises ServingError. Closing
        the iterator early (the client left) cancels the request on every worker.
        ``trace_parent``: the client's trace context, if it sent one."""
        self.metrics.running.inc()
        reason = FinishReason.ABORT  # unless it ends otherwise: the client left
        generated = 0
        span = self._request_span(prepared, trace_parent)
        error = None
        try:
            for response in self._generate(prepared, call, span):
                generated += len(response.token_ids)
                if response.finish_reason:
                    reason = FinishReason(response.finish_reason)
                yield response
        except ServingError as exc:
            # A request whose client left ends as aborted, not as an error of ours.
            reason = FinishReason.ERROR if call.is_active() else FinishReason.ABORT
            error = exc
            raise
        finally:
            tracing.end(span, error=error, attributes={
                "olmo.finish_reason": reason.label, "olmo.completion_tokens": generated})
            self.metrics.running.dec()
            self.metrics.finished(reason, len(prepared.prompt_ids),
                                  time.perf_counter() - prepared.arrived)
            self._unclaim(prepared.request.request_id)
            self.tenants.end(prepared.tenant, prepared.sampling.max_tokens - generated)
            self.metrics.tenant_tokens.labels(prepared.tenant.name).inc(
                len(prepared.prompt_ids) + generated)
            self.admission.capacity_freed()

    @staticmethod
    def _request_span(prepared: Prepared, parent: tracing.Parent) -> tracing.Span:
        """The request's span, from its arrival, with its checks and tokenizing as the
        first child."""
        span = tracing.start("olmo.generate", parent, tracing.SpanKind.SERVER,
                             start_s=prepared.arrived,
                             attributes={"olmo.tenant": prepared.tenant.name,
                                         "olmo.prompt_tokens": len(prepared.prompt_ids),
                                         "olmo.max_tokens": prepared.sampling.max_tokens})
        tracing.span_between("prepare", span, prepared.arrived, prepared.ready or prepared.arrived)
        return span

    def _generate(self, prepared: Prepared, call: CallContext, span: tracing.Span):
        request, prompt_ids, sampling = prepared.request, prepared.prompt_ids, prepared.sampling
        client_id = request.request_id or uuid.uuid4().hex
        progress = Progress(
            prompt_ids, prepared.arrived,
            IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                   skip_ids=() if sampling.ignore_eos else self.facts.eos_token_ids)
            if self.tokenizer else None,
            StopStringFilter(request.sampling.stop), frozenset(sampling.stop_token_ids),
            cache_salt_digest(request.cache_salt), prepared.tenant, span=span)
        remaining = call.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        blame = Blame()
        last_error = ""
        previous: list[tracing.Span] = []  # the attempt a resume follows
        for _ in range(self.max_attempts):
            attempt_span = tracing.start(
                "resume" if previous else "attempt", span, links=previous,
                attributes={"olmo.resumed_after_tokens": len(progress.generated)}
                if previous else None)
            try:
                attempt = self._start(progress, sampling, deadline, blame, call, attempt_span)
            except ServingError as exc:
                tracing.end(attempt_span, error=exc)
                if last_error:  # a retry found no one: the client learns why it retried
                    raise ServingError(exc.code, f"{exc.message} (after: {last_error})"
                                       ) from exc
                raise
            error = None
            finished = threading.Event()
            try:
                if not call.add_callback(
                        lambda a=attempt, f=finished: None if f.is_set() else a.cancel(
                            "client cancelled")):
                    attempt.cancel("client cancelled")  # it left before the callback was set
                    return
                yield from self._relay(client_id, attempt, progress, blame, call)
                # What the decode worker's cache holds now: the next turn of a chat
                # resends it all, and should go there.
                self.scheduler.remember(attempt.decode.address, attempt.request_id,
                                        progress.prompt_ids + progress.generated[:-1],
                                        progress.cache_salt)
                return
            except DecodeLost as lost:
                last_error = str(lost)
                error = lost
            except ServingError as exc:
                error = exc
                raise
            finally:
                finished.set()
                attempt.stream.cancel()
                self.scheduler.discharge(attempt.decode, self.scheduler.SEQUENCE_LOAD_TOKENS)
                tracing.end(attempt_span, error=error)
                previous = [attempt_span]
        raise ServingError(grpc.StatusCode.UNAVAILABLE, last_error)

    def _claim(self, client_id: str) -> None:
        if not client_id:
            return
        with self._lock:
            if client_id in self._client_ids:
                raise ServingError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"request {client_id!r} is already in flight")
            self._client_ids.add(client_id)

    def _unclaim(self, client_id: str) -> None:
        with self._lock:
            self._client_ids.discard(client_id)

    def _start(self, progress: Progress, sampling: worker_pb2.Sampling,
               deadline: float | None, blame: Blame, call: CallContext,
               span: tracing.Span = tracing.NOT_TRACED) -> Attempt:
        attempt_id = uuid.uuid4().hex
        # Building the reservation, waiting in line for a decode worker and its answer.
        admission = tracing.start("admission", span, attributes={
            "olmo.priority": progress.tenant.priority.name.lower()})
        tokens = progress.prompt_ids + progress.generated
        todo = worker_pb2.Sampling()
        todo.CopyFrom(sampling)
        todo.max_tokens = sampling.max_tokens - len(progress.generated)
        todo.min_tokens = max(0, sampling.min_tokens - len(progress.generated))
        if progress.generated:  # a resume: its output so far counts for the penalties,
            todo.prior_output_ids[:] = progress.generated
            todo.prompt_logprobs = False  # and its prompt's scores came with the first token
        reserve = worker_pb2.ReserveRequest(
            request_id=attempt_id, prompt_tokens=len(tokens), sampling=todo,
            lease_ms=self.options.lease_ms, prompt_token_ids=tokens,
            prefill_locally=self.options.aggregated,
            local_prefill_below=self.options.local_prefill_below_tokens,
            cache_salt=progress.cache_salt)
        waited = time.perf_counter()
        try:
            decode, reserved = self.admission.admit(
                lambda: self._try_reserve(reserve, blame.decode, span, admission), deadline,
                call.is_active, progress.tenant.priority, progress.tenant.name)
        except ServingError as exc:
            tracing.end(admission, error=exc)
            raise
        tracing.end(admission, attributes={
            "olmo.decode_worker": decode.address, "olmo.cached_tokens": reserved.cached_tokens,
            "olmo.prefill_locally": reserved.prefill_locally})
        # Telling the cache map, opening the token stream, starting the prefill leg.
        dispatch = tracing.start("dispatch", span)
        self.metrics.queue_time.observe(time.perf_counter() - waited)
        self.metrics.tenant_queue_time.labels(progress.tenant.name).observe(
            time.perf_counter() - waited)
        self.metrics.reserved(reserved, len(tokens), decode.layout, self.options.aggregated)
        self.scheduler.remember(decode.address, attempt_id, tokens, progress.cache_salt)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        stream = decode.stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id=attempt_id),
                                          timeout=remaining)
        self.scheduler.charge(decode, self.scheduler.SEQUENCE_LOAD_TOKENS)
        leg = None if reserved.prefill_locally else PrefillLeg(
            self.scheduler, attempt_id, tokens, progress.cache_salt, reserved, decode, deadline,
            self.options.lease_ms / 1000, blame.prefill, on_done=self.metrics.prefilled,
            trace_parent=span)
        tracing.end(dispatch)
        return Attempt(attempt_id, decode, stream, leg, reserved.cached_tokens)

    def _try_reserve(self, reserve: worker_pb2.ReserveRequest, exclude: set[str],
                     attempt_span: tracing.Span = tracing.NOT_TRACED,
                     admission_span: tracing.Span = tracing.NOT_TRACED
                     ) -> tuple[Worker, worker_pb2.ReserveResponse] | None:
        """The decode worker that took the reservation, and its answer; None when all are
        full, or too slow to answer, for now. Each try is a ``reserve`` span under
        ``admission_span``; the worker traces the request under ``attempt_span``."""
        try:
            ranked = self.scheduler.rank_decode(exclude, reserve.prompt_token_ids,
                                                reserve.cache_salt)
        except NoWorker as exc:
            if exc.for_now:  # slow, not gone: wait in line for one to answer again
                return None
            raise
        candidates = [worker for worker, _ in ranked]
        if admission_span.is_recording():
            admission_span.add_event("route", {
                "olmo.candidates": [w.address for w in candidates],
                "olmo.scores": [repr(cost) for _, cost in ranked]})
        needed = reserve.prompt_tokens + reserve.sampling.max_tokens
        if not self.scheduler.could_ever_fit(needed):
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{needed} tokens (prompt plus max_tokens) would not fit even an "
                               "empty decode worker's KV cache; lower max_tokens")
        refusals, full, slow = [], False, False
        for worker in candidates:
            span = tracing.start("reserve", admission_span, tracing.SpanKind.CLIENT,
                                 {"olmo.worker": worker.address})
            try:
                # Given up on once the worker goes slow: the next one may answer at once.
                reserved = answer_while(
                    worker.stub.Reserve.future(reserve, timeout=10,
                                               metadata=tracing.metadata(attempt_span)),
                    lambda w=worker: self.scheduler.pickable(w.address))
                if reserved is not None:
                    tracing.end(span)
                    return worker, reserved
                slow = True  # it may answer again: wait in line, as for a full one
                tracing.end(span, error="stopped answering")
                abort_quietly(worker, reserve.request_id, "no answer to the reservation")
                refusals.append(f"{worker.address}: stopped answering")
            except grpc.RpcError as exc:
                tracing.end(span, error=exc)
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ServingError(exc.code(), exc.details()) from None
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    full = True
                else:  # an answer lost on the way (a deadline) may hide a reservation
                    abort_quietly(worker, reserve.request_id, "no answer to the reservation")
                refusals.append(f"{worker.address}: {exc.details()}")
        if full:
            self.metrics.decode_full.inc()
        if full or slow:
            return None  # wait in line for capacity
        raise ServingError(grpc.StatusCode.UNAVAILABLE,
                           "no decode worker can take this request: " + "; ".join(refusals))

    def _relay(self, client_id: str, attempt: Attempt, progress: Progress, blame: Blame,
               call: CallContext):
        """Tokens from the decode worker to the client. Raises DecodeLost (with the worker
        to blame added to ``blame``) when the stream breaks or goes silent."""
        watch = self.stalls.watch(attempt.stream, attempt.decode.address)
        try:
            for event in attempt.stream:
                self.stalls.saw_token(watch)
                reason = FinishReason(event.finish_reason)
                if reason.failed:
                    # The router aborts only after it stops reading, so an abort seen here
                    # came from the worker side: a failed prefill leg, an expired lease.
                    leg = attempt.leg
                    raise ServingError(
                        status_code(event.code) if event.code else grpc.StatusCode.UNAVAILABLE,
                        leg.error if leg is not None and leg.error else event.error)
                response = self._response(client_id, event, reason, attempt, progress)
                yield response
                if response.finish_reason:
                    return
        except grpc.RpcError as exc:
            if watch.expired:
                raise self._lost_to_silence(attempt, blame, watch.expired) from exc
            if exc.code() == grpc.StatusCode.CANCELLED and not call.is_active():
                return
            abort_quietly(attempt.decode, attempt.request_id, "router lost the token stream")
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ServingError(exc.code(), f"deadline exceeded after "
                                               f"{len(progress.generated)} tokens") from exc
            blame.decode.add(attempt.decode.address)
            raise DecodeLost(f"decode worker {attempt.decode.address}: {exc.code().name}: "
                             f"{exc.details()}") from exc
        finally:
            self.stalls.unwatch(watch)
        blame.decode.add(attempt.decode.address)
        raise DecodeLost(f"decode worker {attempt.decode.address} closed the stream early")

    def _lost_to_silence(self, attempt: Attempt, blame: Blame, why: str) -> DecodeLost:
        """A stream the stall monitor cut (``why``: the bound that fired): drop the attempt
        on both workers and blame the one that was silent (the prefill worker, if its leg
        had not finished and its decode worker still answers)."""
        attempt.cancel("the token stream went silent")
        leg = attempt.leg
        decode = attempt.decode.address
        if (leg is not None and not leg.done and leg.worker is not None
                and self.scheduler.alive(decode)):
            blame.prefill.add(leg.worker.address)
            return DecodeLost(f"prefill worker {leg.worker.address} did not finish in time")
        blame.decode.add(decode)
        return DecodeLost(f"decode worker {decode} {why}")

    def _response(self, client_id: str, event: worker_pb2.TokenEvent, reason: FinishReason,
                  attempt: Attempt, progress: Progress) -> generation_pb2.GenerateResponse:
        """The client's response to one worker event (``reason``: the event's, read once)."""
        text, ids = "", []
        if event.has_token:
            ids = [event.token_id]
            progress.generated.append(event.token_id)
            self._observe_token(progress)
            if progress.detok is not None and event.token_id not in progress.stop_ids:
                text = progress.stops.feed(progress.detok.add(event.token_id))
        if progress.stops.stopped and not reason:
            reason = FinishReason.STOP
            abort_quietly(attempt.decode, attempt.request_id, "stop string")
        if reason and not progress.stops.stopped:
            text += progress.stops.flush()
        response = generation_pb2.GenerateResponse(
            request_id=client_id, token_ids=ids, text=text, finish_reason=reason)
        if event.HasField("logprobs"):
            response.logprobs.append(event.logprobs)
        response.prompt_logprobs.extend(event.prompt_logprobs)
        if reason:
            response.usage.CopyFrom(generation_pb2.Usage(
                prompt_tokens=len(progress.prompt_ids), completion_tokens=len(progress.generated),
                time_to_first_token_ms=progress.ttft_ms,
                cached_tokens=min(attempt.prompt_cached, len(progress.prompt_ids))))
        return response

    def _observe_token(self, progress: Progress) -> None:
        now = time.perf_counter()
        if not progress.ttft_ms:
            progress.ttft_ms = 1000 * (now - progress.started)
            self.metrics.ttft.observe(now - progress.started)
            progress.span.add_event("first_token", {"olmo.ttft_ms": progress.ttft_ms},
                                    tracing.epoch_ns(now))
        else:
            self.metrics.itl.observe(now - progress.last_token_at)
        progress.last_token_at = now
        self.metrics.generation_tokens.inc()

    def _prompt_ids(self, request) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "text":
            if self.tokenizer is None:
                raise invalid("this model has no tokenizer.json; send token_ids")
            return encode(self.tokenizer, request.text)
        raise invalid("the request has no prompt (set text or token_ids)")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text``'s token ids. Through ``encode_batch``, which lets go of the GIL while it
    works (``encode`` holds it: a long prompt would stop every other thread)."""
    return tokenizer.encode_batch([text])[0].ids


def peer_address(peer: str) -> str:
    """The address in a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


def _refuse_over_budget(context: grpc.ServicerContext, exc: OverBudget) -> None:
    """RESOURCE_EXHAUSTED with gRPC's retry pushback: when a retry would pass (rounded up:
    a wait of a fraction of a millisecond is not "retry now")."""
    context.set_trailing_metadata([("grpc-retry-pushback-ms",
                                    str(max(1, math.ceil(1e3 * exc.retry_after_s))))])
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
