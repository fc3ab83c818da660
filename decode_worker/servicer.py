"""The decode worker's gRPC face: Reserve, PushKV, StreamTokens, Abort, Stats."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc

from olmo_model.runtime import ModelRunner
from protos import worker_pb2, worker_pb2_grpc
from protos.grpc_server import Server, start_server
from protos.kv_stream import KVAssembler, PushRefused, model_layout

from .engine import DecodeEngine, EngineError
from .sampler import SamplingConfig

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name
DEFAULT_LEASE_MS = 30_000


def sampling_from_proto(s: worker_pb2.Sampling) -> SamplingConfig:
    return SamplingConfig(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p or 1.0,
        top_k=s.top_k, seed=s.seed if s.has_seed else None,
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos)


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, runner: ModelRunner):
        self.engine = DecodeEngine(runner)
        self.layout = model_layout(runner)

    def Reserve(self, request, context):
        lease = (request.lease_ms or DEFAULT_LEASE_MS) / 1000.0
        local = list(request.local_prefill_token_ids) or None
        try:
            pages = self.engine.reserve(request.request_id, request.prompt_tokens,
                                        sampling_from_proto(request.sampling), lease, local)
        except EngineError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        return worker_pb2.ReserveResponse(reserved_pages=pages, layout=self.layout)

    def PushKV(self, request_iterator: Iterator[worker_pb2.KVChunk], context):
        assembler = KVAssembler(self.layout, expects_hidden=True)
        try:
            for chunk in request_iterator:
                assembler.add(chunk)
                if chunk.WhichOneof("part") == "header":
                    self.engine.check_push(assembler.request_id, assembler.num_tokens)
            snapshot = assembler.snapshot()
            self.engine.submit_kv(assembler.request_id, snapshot, assembler.hidden)
        except PushRefused as exc:
            self._refuse(assembler.request_id, str(exc), context)
        except EngineError as exc:
            self.engine.refuse_push()
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        return worker_pb2.PushResponse(bytes=assembler.bytes_received)

    def _refuse(self, request_id: str, reason: str, context) -> None:
        # Nothing of a refused push is installed. The reservation stays open until its
        # lease ends, so that the router can retry the prefill leg elsewhere.
        self.engine.refuse_push()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"KV push refused: {reason}")

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
        return worker_pb2.WorkerStats(role="decode", layout=self.layout, transport="grpc",
                                      **self.engine.stats())


def serve_decode(runner: ModelRunner, host: str = "127.0.0.1", port: int = 0
                 ) -> tuple[Server, DecodeServicer]:
    servicer = DecodeServicer(runner)
    server = start_server(
        [lambda s: worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, s)],
        [SERVICE_NAME], host, port)
    return server, servicer
