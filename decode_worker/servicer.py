"""The decode worker's gRPC face: Reserve, PushKV, StreamTokens, Abort, Stats, StageCall."""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence

import grpc

from olmo_model.runtime import ModelRunner
from protos import worker_pb2, worker_pb2_grpc
from protos.grpc_server import Server
from protos.kv_stream import KVAssembler, PushRefused, model_layout
from protos.kv_transport import GRPC, worker_transports
from protos.stage_rpc import pipeline_stages, serve_stage_call, start_stage_worker

from .engine import DecodeEngine, EngineError

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name
DEFAULT_LEASE_MS = 30_000


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, runner: ModelRunner):
        self.engine = DecodeEngine(runner)
        self.layout = model_layout(runner)
        self.stages: list[worker_pb2.StageInfo] = []
        self.transports, self.transport_note = worker_transports(runner.artifact.target_kind)

    def set_pipeline(self, address: str, downstream: Sequence[str]) -> None:
        """Lead an instance whose other stages serve at ``downstream`` (in layer order)."""
        self.stages = pipeline_stages(address, self.layout, downstream,
                                      worker_pb2_grpc.DecodeWorkerStub)
        # A (re)formed instance starts clean: members drop what an earlier leader left.
        self.engine.chain.run(worker_pb2.StageRequest(op=worker_pb2.STAGE_OP_RELEASE,
                                                      reset=True), downstream)
        self.engine.downstream = list(downstream)

    def Reserve(self, request, context):
        lease = (request.lease_ms or DEFAULT_LEASE_MS) / 1000.0
        local = list(request.local_prefill_token_ids) or None
        try:
            pages = self.engine.reserve(request.request_id, request.prompt_tokens,
                                        request.sampling, lease, local)
        except EngineError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        return worker_pb2.ReserveResponse(reserved_pages=pages, layout=self.layout)

    def PushKV(self, request_iterator: Iterator[worker_pb2.KVChunk], context):
        assembler = KVAssembler(self.layout, accepts_hidden=self.engine.stage.stage.is_last)
        try:
            for chunk in request_iterator:
                assembler.add(chunk)
                if chunk.WhichOneof("part") == "header":
                    self.engine.check_push(assembler.request_id, assembler.num_tokens)
            self.engine.submit_kv(assembler.request_id, assembler.snapshot(), assembler.hidden)
        except PushRefused as exc:
            # Nothing of a refused push is installed. The reservation stays open until its
            # lease ends, so that the router can retry the prefill leg elsewhere.
            self.engine.refuse_push()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"KV push refused: {exc}")
        except EngineError as exc:
            self.engine.refuse_push()
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        return worker_pb2.PushResponse(bytes=assembler.bytes_received)

    def StreamTokens(self, request, context):
        try:
            events = self.engine.events(request.request_id)
        except EngineError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
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
                                      transport_note=self.transport_note, stages=self.stages,
                                      **self.engine.stats())

    def Call(self, request, context):
        """StageWorker.Call: this worker as a member stage of another worker's instance."""
        return serve_stage_call(self.engine.chain.run, request, context)


def serve_decode(runner: ModelRunner, host: str = "127.0.0.1", port: int = 0
                 ) -> tuple[Server, DecodeServicer]:
    servicer = DecodeServicer(runner)
    server = start_stage_worker(servicer, worker_pb2_grpc.add_DecodeWorkerServicer_to_server,
                                SERVICE_NAME, runner, host, port)
    return server, servicer
