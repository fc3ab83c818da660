"""The decode worker's gRPC face: Reserve, PushKV, StreamTokens, Abort, Stats."""

from __future__ import annotations

import queue
from collections.abc import Iterator

from kv_transfer.transports import GRPC, worker_transports
from olmo_model.runtime import ModelRunner
from pipeline.remote import InstanceLeader, start_worker_server
from pipeline.wire import sampling_from_proto, stage_infos
from protos import worker_pb2, worker_pb2_grpc
from protos.errors import ServingError, aborts_on_error
from protos.grpc_server import Server

from .engine import DecodeEngine
from .stage import DecodeStage

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name
DEFAULT_LEASE_MS = 30_000


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer, InstanceLeader):
    def __init__(self, runner: ModelRunner):
        self.stage = DecodeStage(runner)
        self.engine = DecodeEngine(self.stage)
        self.transports, self.transport_note = worker_transports(runner.artifact.target_kind)

    @aborts_on_error
    def Reserve(self, request, context):
        lease = (request.lease_ms or DEFAULT_LEASE_MS) / 1000.0
        local = list(request.local_prefill_token_ids) or None
        pages = self.engine.reserve(request.request_id, request.prompt_tokens,
                                    sampling_from_proto(request.sampling), lease, local)
        return worker_pb2.ReserveResponse(reserved_pages=pages, layout=self.layout)

    @aborts_on_error
    def PushKV(self, request_iterator: Iterator[worker_pb2.KVChunk], context):
        return worker_pb2.PushResponse(bytes=self.stage.receiver.receive(request_iterator))

    def StreamTokens(self, request, context):
        try:
            events = self.engine.scheduler.events(request.request_id)
        except ServingError as exc:
            exc.abort(context)
        context.add_callback(lambda: self.engine.abort(request.request_id, "stream cancelled"))
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            yield worker_pb2.TokenEvent(
                token_id=event.token or 0, has_token=event.token is not None,
                finish_reason=event.finish_reason, error=event.error)
            if event.finish_reason:
                return

    def Abort(self, request, context):
        return worker_pb2.AbortResponse(
            found=self.engine.abort(request.request_id, request.reason or "aborted"))

    def Stats(self, request, context):
        return worker_pb2.WorkerStats(role="decode", layout=self.layout, transport=GRPC,
                                      transports=self.transports,
                                      transport_note=self.transport_note,
                                      stages=stage_infos(self.engine.chain),
                                      **self.engine.stats())


def serve_decode(runner: ModelRunner, host: str = "127.0.0.1", port: int = 0
                 ) -> tuple[Server, DecodeServicer]:
    """Serve a decode worker; a full-model worker leads its own one-stage instance."""
    servicer = DecodeServicer(runner)
    server = start_worker_server(
        lambda s: worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, s),
        SERVICE_NAME, servicer.stage, True, host, port)
    if runner.stage.is_full_model:
        servicer.lead(f"{host}:{server.port}")
    return server, servicer
