"""The prefill worker's gRPC face: Prefill, Abort, Stats, StageCall."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence

import grpc

from olmo_model.runtime import ModelRunner
from protos import worker_pb2, worker_pb2_grpc
from protos.grpc_server import Server, time_remaining
from protos.kv_transport import GRPC, worker_transports
from protos.stage_rpc import pipeline_stages, serve_stage_call, start_stage_worker

from .batcher import PrefillJob
from .engine import PrefillEngine, PushFailed

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, runner: ModelRunner):
        self.engine = PrefillEngine(runner)
        self._jobs: dict[str, PrefillJob] = {}
        self.stages: list[worker_pb2.StageInfo] = []
        self.transports, self.transport_note = worker_transports(runner.artifact.target_kind)

    def set_pipeline(self, address: str, downstream: Sequence[str]) -> None:
        """Lead an instance whose other stages serve at ``downstream`` (in layer order)."""
        self.stages = pipeline_stages(address, self.engine.layout, downstream,
                                      worker_pb2_grpc.PrefillWorkerStub)
        self.engine.downstream = list(downstream)

    def Prefill(self, request, context):
        tokens = list(request.token_ids)
        vocab = self.engine.runner.config.vocab_size
        if not tokens:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prefill needs at least one token")
        if max(tokens) >= vocab:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"token id {max(tokens)} is outside the vocabulary of {vocab}")
        if not request.decode_stages:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no decode stages to push KV to")
        if (request.transport or GRPC) not in self.transports:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"transport {request.transport!r} is not available here "
                          f"({self.transport_note})")
        job = PrefillJob(request.request_id, tokens, list(request.decode_stages))
        self._jobs[job.request_id] = job
        context.add_callback(lambda: self._cancel(job))
        sent_before = self.engine.sender.bytes_sent
        start = time.perf_counter()
        self.engine.submit(job)
        try:
            job.result.result(timeout=time_remaining(context))
        except concurrent.futures.TimeoutError:
            self._cancel(job)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "prefill did not finish in time")
        except PushFailed as exc:
            context.abort(exc.code, str(exc))
        except grpc.RpcError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"a pipeline stage of this prefill instance failed: {exc.details()}")
        except Exception as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {exc}")
        finally:
            self._jobs.pop(job.request_id, None)
        return worker_pb2.PrefillResponse(
            kv_bytes=max(0, self.engine.sender.bytes_sent - sent_before),
            prefill_ms=1000 * (time.perf_counter() - start))

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
        runner = self.engine.runner
        sender = self.engine.sender
        return worker_pb2.WorkerStats(
            role="prefill", layout=self.engine.layout, queued_requests=queued,
            running_sequences=len(self._jobs), queued_tokens=tokens,
            total_pages=runner.kv.total_pages, free_pages=runner.available_pages(),
            used_pages=runner.kv.total_pages - runner.available_pages(),
            kv_bytes_sent=sender.bytes_sent, pushes=sender.pushes,
            kv_transfer_ms=1000 * sender.transfer_seconds, transport=GRPC,
            transports=self.transports, transport_note=self.transport_note, stages=self.stages)

    def Call(self, request, context):
        """StageWorker.Call: this worker as a member stage of another worker's instance."""
        return serve_stage_call(self.engine.stage.run, request, context)


def serve_prefill(runner: ModelRunner, host: str = "127.0.0.1", port: int = 0
                 ) -> tuple[Server, PrefillServicer]:
    servicer = PrefillServicer(runner)
    server = start_stage_worker(servicer, worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                                SERVICE_NAME, runner, host, port)
    return server, servicer
