"""The prefill worker's gRPC face: Prefill, Abort, Stats."""

from __future__ import annotations

import concurrent.futures
import time

import grpc

from kv_transfer.transports import GRPC, worker_transports
from olmo_model.runtime import ModelRunner
from pipeline.remote import InstanceLeader, start_worker_server
from pipeline.wire import address_from_proto, stage_infos
from protos import worker_pb2, worker_pb2_grpc
from protos.errors import ServingError, aborts_on_error
from protos.grpc_server import Server, time_remaining

from .batcher import PrefillJob
from .engine import PrefillEngine
from .stage import PrefillStage

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer, InstanceLeader):
    def __init__(self, runner: ModelRunner):
        self.stage = PrefillStage(runner)
        self.engine = PrefillEngine(self.stage)
        self._jobs: dict[str, PrefillJob] = {}
        self.transports, self.transport_note = worker_transports(runner.artifact.target_kind)

    @aborts_on_error
    def Prefill(self, request, context):
        job = PrefillJob(request.request_id, self._checked_tokens(request),
                         tuple(address_from_proto(s) for s in request.decode_stages))
        self._jobs[job.request_id] = job
        context.add_callback(lambda: self._cancel(job))
        sent_before = self.stage.sender.bytes_sent
        start = time.perf_counter()
        try:
            self.engine.submit(job)
            job.result.result(timeout=time_remaining(context))
        except concurrent.futures.TimeoutError:
            self._cancel(job)
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "prefill did not finish in time") from None
        finally:
            self._jobs.pop(job.request_id, None)
        return worker_pb2.PrefillResponse(
            kv_bytes=max(0, self.stage.sender.bytes_sent - sent_before),
            prefill_ms=1000 * (time.perf_counter() - start))

    def _checked_tokens(self, request: worker_pb2.PrefillRequest) -> list[int]:
        tokens = list(request.token_ids)
        vocab = self.layout.vocab_size
        if not tokens:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "prefill needs at least one token")
        if max(tokens) >= vocab:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"token id {max(tokens)} is outside the vocabulary of {vocab}")
        if not request.decode_stages:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "no decode stages to push KV to")
        return tokens

    def _cancel(self, job: PrefillJob) -> None:
        job.cancelled = True
        self.engine.cancel(job.request_id)

    def Abort(self, request, context):
        job = self._jobs.get(request.request_id)
        if job is not None:
            self._cancel(job)
        return worker_pb2.AbortResponse(found=job is not None)

    def Stats(self, request, context):
        queued, tokens = self.engine.batcher.queued()
        runner, sender = self.stage.runner, self.stage.sender
        return worker_pb2.WorkerStats(
            role="prefill", layout=self.layout, queued_requests=queued,
            running_sequences=len(self._jobs), queued_tokens=tokens,
            total_pages=runner.kv.total_pages, free_pages=runner.available_pages(),
            used_pages=runner.kv.total_pages - runner.available_pages(),
            kv_bytes_sent=sender.bytes_sent, pushes=sender.pushes,
            kv_transfer_ms=1000 * sender.transfer_seconds, transport=GRPC,
            transports=self.transports, transport_note=self.transport_note,
            stages=stage_infos(self.engine.chain))


def serve_prefill(runner: ModelRunner, host: str = "127.0.0.1", port: int = 0
                  ) -> tuple[Server, PrefillServicer]:
    """Serve a prefill worker; a full-model worker leads its own one-stage instance."""
    servicer = PrefillServicer(runner)
    server = start_worker_server(
        lambda s: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, s),
        SERVICE_NAME, servicer.stage, False, host, port)
    if runner.stage.is_full_model:
        servicer.lead(f"{host}:{server.port}")
    return server, servicer
