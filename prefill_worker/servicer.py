"""The prefill worker's gRPC face: Prefill, Abort, Stats."""

from __future__ import annotations

import concurrent.futures

import grpc

from olmo_model.runtime import ModelRunner
from protos import worker_pb2, worker_pb2_grpc
from protos.grpc_server import Server, start_server, time_remaining

from .batcher import PrefillJob
from .engine import PrefillEngine, PushFailed

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, runner: ModelRunner):
        self.engine = PrefillEngine(runner)
        self._jobs: dict[str, PrefillJob] = {}

    def Prefill(self, request, context):
        tokens = list(request.token_ids)
        vocab = self.engine.runner.config.vocab_size
        if not tokens:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prefill needs at least one token")
        if max(tokens) >= vocab:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"token id {max(tokens)} is outside the vocabulary of {vocab}")
        job = PrefillJob(request.request_id, tokens, request.decode_address)
        self._jobs[job.request_id] = job
        context.add_callback(lambda: self._cancel(job))
        self.engine.submit(job)
        try:
            sent, prefill_s, transfer_s = job.result.result(timeout=time_remaining(context))
        except concurrent.futures.TimeoutError:
            self._cancel(job)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "prefill did not finish in time")
        except PushFailed as exc:
            context.abort(exc.code, str(exc))
        except Exception as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {exc}")
        finally:
            self._jobs.pop(job.request_id, None)
        return worker_pb2.PrefillResponse(kv_bytes=sent, prefill_ms=1000 * prefill_s,
                                          transfer_ms=1000 * transfer_s)

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
        return worker_pb2.WorkerStats(
            role="prefill", layout=self.engine.layout, queued_requests=queued,
            running_sequences=len(self._jobs),
            queued_tokens=tokens, total_pages=runner.kv.total_pages,
            free_pages=runner.available_pages(),
            used_pages=runner.kv.total_pages - runner.available_pages(),
            kv_bytes_sent=self.engine.sender.bytes_sent, pushes=self.engine.sender.pushes,
            kv_transfer_ms=1000 * self.engine.sender.transfer_seconds, transport="grpc")


def serve_prefill(runner: ModelRunner, host: str = "127.0.0.1", port: int = 0
                  ) -> tuple[Server, PrefillServicer]:
    servicer = PrefillServicer(runner)
    server = start_server(
        [lambda s: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, s)],
        [SERVICE_NAME], host, port)
    return server, servicer
