"""Start the router's public gRPC server over a set of workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from tokenizers import Tokenizer

from protos import generation_pb2
from protos.auth import RequireSecret
from protos.grpc_server import Server, start_server
from protos.vocabulary import Role

from .options import RouterOptions
from .scheduler import Scheduler
from .service import UNPARSABLE, GenerationServicer
from .validation import ModelFacts, max_request_bytes

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
# Each Generate call holds a thread while it waits in line or streams; past this many
# at once gRPC refuses new calls with RESOURCE_EXHAUSTED instead of queueing them.
RUNNING_CALLS = 256


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def parse_generate_request(data: bytes) -> generation_pb2.GenerateRequest | object:
    """UNPARSABLE for bytes that are not a GenerateRequest (e.g. strings that are not
    UTF-8), so that Generate answers INVALID_ARGUMENT where gRPC would say INTERNAL."""
    try:
        return generation_pb2.GenerateRequest.FromString(data)
    except DecodeError:
        return UNPARSABLE


def serve_router(model_dir: Path, scheduler: Scheduler, options: RouterOptions | None = None,
                 host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 tls: tuple[bytes, bytes] | None = None,
                 extra: Sequence[tuple[Callable[[grpc.Server], None], str]] = ()
                 ) -> tuple[Server, GenerationServicer]:
    """Serve Generate over the scheduler's workers, and any ``extra`` (register, service
    name) services beside it: those are the cluster's own (the admin API) and require
    its secret.

    The model's facts (vocabulary, context window, EOS ids) come from the workers, which
    the scheduler has already met; only the tokenizer is read from ``model_dir``. With an
    ``api_key`` or ``options.tenants``' file, Generate requires a key (router/tenants.py);
    ``tls`` is (private key, certificate chain) in PEM.
    """
    if scheduler.layout is None:
        raise ValueError("the router needs at least one worker to learn the model from")
    options = options or RouterOptions()
    facts = ModelFacts.of(scheduler.layout)
    servicer = GenerationServicer(scheduler, load_tokenizer(model_dir), facts, options, api_key)
    guarded = {name: scheduler.secret for _, name in extra if scheduler.secret}
    if not servicer.tenants.open:  # refused before the request is parsed
        guarded[SERVICE_NAME] = lambda given: servicer.tenants.identify(given) is not None
    server = start_server(
        [lambda s: _add_generation(servicer, s), *[register for register, _ in extra]],
        [SERVICE_NAME, *[name for _, name in extra]], host, port,
        max_workers=RUNNING_CALLS + options.max_waiting_requests,
        interceptors=[RequireSecret(guarded)] if guarded else [], tls=tls,
        max_message_bytes=max_request_bytes(servicer.limits, facts.context_window))
    return server, servicer


def _add_generation(servicer: GenerationServicer, server: grpc.Server) -> None:
    """The generated registration, with a request parser that never fails the call."""
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=parse_generate_request,
        response_serializer=generation_pb2.GenerateResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def static_scheduler(prefill: Sequence[str], decode: Sequence[str], secret: str | None,
                     options: RouterOptions) -> Scheduler:
    """A scheduler over fixed worker addresses (handshakes with each), weighing and
    judging them as the router's ``options`` say."""
    scheduler = Scheduler(secret, options.kv_weight, options.worker_gone_s,
                          kv_events=options.kv_events)
    for address in decode:
        scheduler.add(address, Role.DECODE)
    for address in prefill:
        scheduler.add(address, Role.PREFILL)
    return scheduler
