"""The prefill worker's gRPC face: Prefill, Abort, Stats."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc

from kv_transfer.transports import GRPC, worker_transports
from olmo_model.runtime import ModelRunner
from pipeline.chain import check_coverage
from pipeline.ops import MAX_REQUEST_ID_CHARS, StageAddress, checked_cache_salt
from pipeline.options import DEFAULT_OPTIONS, WorkerOptions
from pipeline.remote import InstanceLeader, start_worker_server
from pipeline.stats import EngineStats
from pipeline.wire import address_from_proto, stage_infos
from protos import tracing, worker_pb2, worker_pb2_grpc
from protos.errors import ServingError, aborts_on_error
from protos.grpc_server import Server, time_remaining
from protos.vocabulary import Role

from .batcher import PrefillJob
from .engine import PrefillEngine
from .stage import PrefillStage
from .stats import LoadStats, PrefillStats, kv_sent

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name
# However long a caller is willing to wait, a prefill call answers within this.
MAX_WAIT_SECONDS = 600.0


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer, InstanceLeader):
    def __init__(self, runner: ModelRunner, secret: str | None = None,
                 options: WorkerOptions = DEFAULT_OPTIONS):
        self.secret = secret
        self.stage = PrefillStage(runner, share_memory=options.kv_shared_memory,
                                  streaming=options.kv_streaming,
                                  layer_groups=options.kv_layer_groups)
        self.engine = PrefillEngine(self.stage, prefix_cache=options.prefix_cache)
        self._jobs: dict[str, PrefillJob] = {}
        self._lock = threading.Lock()
        self.transports, self.transport_note = worker_transports(
            runner.artifact.target_kind, bool(self.stage.sender.host))

    @aborts_on_error
    def Prefill(self, request, context):
        span = tracing.start("prefill_worker.prefill",
                             tracing.from_metadata(context.invocation_metadata()),
                             tracing.SpanKind.SERVER,
                             {"olmo.request_id": request.request_id,
                              "olmo.prompt_tokens": len(request.token_ids)})
        error = None
        try:
            response = self._prefill(request, context, span)
            span.set_attributes({"olmo.cached_tokens": response.cached_tokens,
                                 "olmo.kv_bytes": response.kv_bytes})
            return response
        except Exception as exc:
            error = exc
            raise
        finally:
            tracing.end(span, error=error)

    def _prefill(self, request, context, span: tracing.Span) -> worker_pb2.PrefillResponse:
        job = PrefillJob(request.request_id, self._checked_tokens(request),
                         self._checked_targets(request), request.skip_tokens,
                         request.attempt, request.push_token,
                         checked_cache_salt(request.cache_salt), tracing.header(span))
        with self._lock:
            if job.request_id in self._jobs:
                raise ServingError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"request {job.request_id!r} is already being prefilled")
            self._jobs[job.request_id] = job
        if not context.add_callback(lambda: self._cancel(job, "cancelled by the caller")):
            self._cancel(job, "cancelled by the caller")  # gone before the callback was set
        start = job.queued_at = time.perf_counter()
        try:
            self.engine.submit(job)
            job.result.result(timeout=min(time_remaining(context) or MAX_WAIT_SECONDS,
                                          MAX_WAIT_SECONDS))
        except concurrent.futures.TimeoutError:
            self._cancel(job, "timed out")
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "prefill did not finish in time") from None
        finally:
            with self._lock:
                self._jobs.pop(job.request_id, None)
            sent, seconds = self.stage.sender.take_totals(job.request_id)
        return worker_pb2.PrefillResponse(kv_bytes=sent, kv_transfer_ms=1000 * seconds,
                                          prefill_ms=1000 * (time.perf_counter() - start),
                                          cached_tokens=job.cached_tokens)

    def _checked_tokens(self, request: worker_pb2.PrefillRequest) -> list[int]:
        tokens = list(request.token_ids)
        layout, limits = self.layout, self.stage.runner.limits
        problem = None
        if not 0 < len(request.request_id) <= MAX_REQUEST_ID_CHARS:
            problem = f"a request id has 1 to {MAX_REQUEST_ID_CHARS} characters"
        elif not tokens:
            problem = "prefill needs at least one token"
        elif len(tokens) > min(layout.context_window, limits.max_total_tokens):
            problem = (f"{len(tokens)} tokens do not fit this prefill worker (context window "
                       f"{layout.context_window}, cache {limits.max_total_tokens} tokens)")
        elif max(tokens) >= layout.vocab_size:
            problem = f"token id {max(tokens)} is outside the vocabulary of {layout.vocab_size}"
        elif request.skip_tokens >= len(tokens):
            problem = (f"skip_tokens ({request.skip_tokens}) must leave at least one of the "
                       f"{len(tokens)} prompt tokens to push")
        if problem:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return tokens

    def _checked_targets(self, request: worker_pb2.PrefillRequest) -> tuple[StageAddress, ...]:
        """The decode instance's stages: they must cover every layer, in order."""
        targets = tuple(address_from_proto(s) for s in request.decode_stages)
        try:
            check_coverage(targets, self.layout.num_layers)
        except ServingError as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"decode stages to push KV to: {exc.message}") from None
        return targets

    def _cancel(self, job: PrefillJob, reason: str) -> None:
        self.engine.cancel(job.request_id)
        job.cancel(reason)

    def Abort(self, request, context):
        with self._lock:
            job = self._jobs.get(request.request_id)
        if job is not None:
            self._cancel(job, request.reason or "aborted")
        return worker_pb2.AbortResponse(found=job is not None)

    def Stats(self, request, context):
        message = self.stats().to_proto()
        message.MergeFrom(worker_pb2.WorkerStats(
            role=Role.PREFILL, layout=self.layout, transport=GRPC, transports=self.transports,
            transport_note=self.transport_note, stages=stage_infos(self.engine.chain),
            kv_events=(self.engine.cache.kv_events(request.kv_epoch, request.kv_after)
                       if request.kv_events else None)))
        return message

    def stats(self) -> PrefillStats:
        queued, tokens = self.engine.batcher.queued()
        runner = self.stage.runner
        cache = self.engine.cache.stats()
        with self._lock:
            running = len(self._jobs)
        load = LoadStats(queued, tokens, running, runner.kv.total_pages, runner.available_pages())
        return PrefillStats(load, cache, kv_sent(self.stage),
                            EngineStats.of(runner, cache, self.engine.counters))


def serve_prefill(runner: ModelRunner, host: str = "127.0.0.1", port: int = 0,
                  secret: str | None = None, options: WorkerOptions = DEFAULT_OPTIONS
                  ) -> tuple[Server, PrefillServicer]:
    """Serve a prefill worker (refusing calls without ``secret``, when given); a full-model
    worker leads its own one-stage instance."""
    servicer = PrefillServicer(runner, secret, options)
    server = start_worker_server(
        lambda s: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, s),
        SERVICE_NAME, servicer, False, host, port, secret)
    if runner.stage.is_full_model:
        servicer.lead(f"{host}:{server.port}")
    return server, servicer
