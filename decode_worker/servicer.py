"""The decode worker's gRPC face: Reserve, StreamTokens, Abort, Stats behind the cluster
secret; PushKV (the KVPush service) let in by each reservation's push token."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from kv_transfer.grpc_transport import PUSH_METHOD, PUSH_SERVICE, push_response
from kv_transfer.shared_memory import host_identity
from kv_transfer.transports import GRPC, worker_transports
from kv_transfer.wire_blocks import BlockViewsRegistration
from olmo_model.runtime import ModelRunner
from pipeline.ops import checked_cache_salt
from pipeline.options import DEFAULT_OPTIONS, WorkerOptions
from pipeline.remote import InstanceLeader, start_worker_server
from pipeline.wire import logprobs_to_proto, sampling_from_proto, stage_infos
from protos import tracing, worker_pb2, worker_pb2_grpc
from protos.errors import ServingError, aborts_on_error, status_number
from protos.grpc_server import Server, time_remaining
from protos.vocabulary import Role

from .drafter import DraftPolicy
from .engine import DecodeEngine
from .stage import DecodeStage

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name
DEFAULT_LEASE_MS = 30_000
MAX_PUSH_SECONDS = 120.0


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer, worker_pb2_grpc.KVPushServicer,
                     InstanceLeader):
    def __init__(self, runner: ModelRunner, secret: str | None = None,
                 options: WorkerOptions = DEFAULT_OPTIONS):
        self.secret = secret
        # Told to every sender: one on this host may then push through shared memory.
        self.shared_memory_host = host_identity() if options.kv_shared_memory else ""
        self.stage = DecodeStage(runner, accepts_shared=bool(self.shared_memory_host))
        drafts = (DraftPolicy(options.speculative_tokens, options.prompt_lookup_max,
                              options.prompt_lookup_min) if options.speculative_tokens else None)
        self.engine = DecodeEngine(self.stage, prefix_cache=options.prefix_cache, drafts=drafts)
        self.transports, self.transport_note = worker_transports(
            runner.artifact.target_kind, bool(self.shared_memory_host))

    @aborts_on_error
    def Reserve(self, request, context):
        lease = (request.lease_ms or DEFAULT_LEASE_MS) / 1000.0
        held = self.engine.reserve(request.request_id, request.prompt_tokens,
                                   list(request.prompt_token_ids),
                                   sampling_from_proto(request.sampling), lease,
                                   request.prefill_locally, request.local_prefill_below,
                                   checked_cache_salt(request.cache_salt),
                                   tracing.header(tracing.from_metadata(
                                       context.invocation_metadata())))
        return worker_pb2.ReserveResponse(reserved_pages=held.pages, layout=self.layout,
                                          cached_tokens=held.cached_tokens,
                                          prefill_locally=held.local,
                                          push_token=held.push_token)

    @aborts_on_error
    def PushKV(self, request_iterator: Iterator[worker_pb2.KVChunk], context):
        # A sender that stalls mid-push (and set no deadline of its own) must not hold
        # this handler's thread for ever: past the bound the call is cancelled.
        remaining = time_remaining(context)
        timer = None
        if remaining is None or remaining > MAX_PUSH_SECONDS:
            timer = threading.Timer(MAX_PUSH_SECONDS, context.cancel)
            timer.start()
        try:
            # Its answer says what it accepts (the senders' negotiation of the next
            # pushes) and its time taking the push (the sender's trace shows it).
            return push_response(self.stage.receiver.receive(request_iterator),
                                 self.stage.receiver.accepts())
        finally:
            if timer is not None:
                timer.cancel()

    def StreamTokens(self, request, context):
        try:
            events = self.engine.scheduler.events(request.request_id)
        except ServingError as exc:
            exc.abort(context)
        if not context.add_callback(
                lambda: self.engine.abort(request.request_id, "stream cancelled")):
            self.engine.abort(request.request_id, "stream cancelled")
            return
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            message = worker_pb2.TokenEvent(
                token_id=event.token or 0, has_token=event.token is not None,
                finish_reason=event.finish_reason.value, error=event.error,
                code=status_number(event.code) if event.code else 0)
            if event.logprobs is not None:
                message.logprobs.CopyFrom(logprobs_to_proto(event.logprobs))
            message.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in event.prompt_logprobs)
            yield message
            if event.finish_reason:
                return

    def Abort(self, request, context):
        return worker_pb2.AbortResponse(
            found=self.engine.abort(request.request_id, request.reason or "aborted"))

    def Stats(self, request, context):
        message = self.engine.stats().to_proto()
        message.MergeFrom(worker_pb2.WorkerStats(
            role=Role.DECODE, layout=self.layout, transport=GRPC, transports=self.transports,
            transport_note=self.transport_note, stages=stage_infos(self.engine.chain),
            step_loop_age_ms=1000 * self.engine.loop_age(),
            kv_events=(self.engine.cache.kv_events(request.kv_epoch, request.kv_after)
                       if request.kv_events else None)))
        return message


def serve_decode(runner: ModelRunner, host: str = "127.0.0.1", port: int = 0,
                 secret: str | None = None, options: WorkerOptions = DEFAULT_OPTIONS
                 ) -> tuple[Server, DecodeServicer]:
    """Serve a decode worker (refusing calls without ``secret``, when given); a full-model
    worker leads its own one-stage instance."""
    servicer = DecodeServicer(runner, secret, options)

    def register(server):
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
        # Pushes' blocks are read as views of the received bytes, not parsed into copies.
        worker_pb2_grpc.add_KVPushServicer_to_server(
            servicer, BlockViewsRegistration(server, PUSH_METHOD))

    server = start_worker_server(register, SERVICE_NAME, servicer, True, host, port, secret,
                                 self_authenticating=[PUSH_SERVICE])
    if runner.stage.is_full_model:
        servicer.lead(f"{host}:{server.port}")
    return server, servicer
