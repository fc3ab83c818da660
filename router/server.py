"""Start the router's public gRPC server over a set of workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from tokenizers import Tokenizer

from protos import generation_pb2, generation_pb2_grpc
from protos.grpc_server import Server, start_server

from .scheduler import Scheduler
from .service import GenerationServicer
from .validation import ModelFacts

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def serve_router(model_dir: Path, scheduler: Scheduler, aggregated: bool = False,
                 host: str = "127.0.0.1", port: int = 0, lease_ms: int = 30_000,
                 resume_on_decode_failure: bool = True,
                 extra: Sequence[tuple[Callable[[grpc.Server], None], str]] = ()
                 ) -> tuple[Server, GenerationServicer]:
    """Serve Generate (and any ``extra`` services) over the scheduler's workers.

    The model's facts (vocabulary, context window, EOS ids) come from the workers, which
    the scheduler has already met; only the tokenizer is read from ``model_dir``.
    """
    if scheduler.layout is None:
        raise ValueError("the router needs at least one worker to learn the model from")
    facts = ModelFacts.of(scheduler.layout)
    servicer = GenerationServicer(scheduler, load_tokenizer(model_dir), facts, aggregated,
                                  lease_ms, resume_on_decode_failure)
    server = start_server(
        [lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(servicer, s),
         *[register for register, _ in extra]],
        [SERVICE_NAME, *[name for _, name in extra]], host, port)
    return server, servicer


def static_scheduler(prefill: Sequence[str], decode: Sequence[str]) -> Scheduler:
    """A scheduler over fixed worker addresses (handshakes with each)."""
    scheduler = Scheduler()
    for address in decode:
        scheduler.add(address, "decode")
    for address in prefill:
        scheduler.add(address, "prefill")
    return scheduler
