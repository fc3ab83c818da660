"""One decode stage's KV receiver: pushes assembled, verified, and kept until installed.

A request's K/V may reach a stage in several pushes (the prefill instance's stages need
not line up with ours). It is ready when its parts cover every layer of the stage
exactly once and, on the stage that owns the LM head, the last hidden state has come.
Nothing of a push that fails any check is kept.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import grpc
import numpy as np

from kv_transfer.buffers import Buffer, BufferPool
from kv_transfer.codec import KVAssembler
from olmo_model.kv_pages import KVSnapshot
from olmo_model.stages import StageSpec
from protos import worker_pb2
from protos.errors import ServingError


@dataclasses.dataclass
class PendingKV:
    """A request's K/V as it arrives at this stage."""

    prompt_tokens: int      # the tokens pushes carry: the prompt's from token_begin on
    token_begin: int = 0    # the prompt's first tokens before it are in the cache already
    parts: dict[int, KVSnapshot] = dataclasses.field(default_factory=dict)  # by layer_begin
    hidden: np.ndarray | None = None
    buffers: list[Buffer] = dataclasses.field(default_factory=list)  # the parts live there

    def snapshot(self) -> KVSnapshot:
        """The parts joined into one snapshot of the stage's layers."""
        ordered = [self.parts[k] for k in sorted(self.parts)]
        if len(ordered) == 1:
            return ordered[0]
        return KVSnapshot(ordered[0].layer_begin, ordered[-1].layer_end,
                          np.concatenate([p.keys for p in ordered]),
                          np.concatenate([p.values for p in ordered]), self.token_begin)


class KVReceiver:
    def __init__(self, layout: worker_pb2.ModelLayout, spec: StageSpec,
                 on_arrival: Callable[[], None] = lambda: None, accepts_shared: bool = True):
        self.layout = layout
        self.spec = spec
        self.on_arrival = on_arrival  # wakes the engine's step loop
        self.accepts_shared = accepts_shared  # pushes naming a same-host sender's buffer
        self._pending: dict[str, PendingKV] = {}
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.pushes_refused = 0
        self.pushes = 0  # taken (verified and kept)
        self.assemble_seconds = 0.0  # handling chunks as they arrive (not waiting for them)
        self.shared_pushes = 0  # of the pushes taken, those read from shared memory
        self.shared_bytes = 0
        self.buffers = BufferPool()  # pushes are assembled here, until installed

    def expect(self, request_id: str, prompt_tokens: int, token_begin: int = 0) -> None:
        with self._lock:
            self._pending[request_id] = PendingKV(prompt_tokens, token_begin)

    def receive(self, chunks: Iterable[worker_pb2.KVChunk]) -> int:
        """Take one push: assemble and verify it, keep it for its request; returns its bytes.

        Raises ServingError (and keeps nothing) when any check fails; the reservation
        stays open until its lease ends, so that the prefill leg can be retried.
        """
        # The header is checked against the reservation before anything is allocated.
        assembler = KVAssembler(self.layout, accepts_hidden=self.spec.is_last,
                                admit=self._check, accepts_shared=self.accepts_shared,
                                buffers=self.buffers)
        busy = 0.0
        try:
            for chunk in chunks:
                start = time.perf_counter()
                assembler.add(chunk)
                busy += time.perf_counter() - start
            self._keep(assembler.request_id, assembler.snapshot(), assembler.hidden,
                       assembler.buffer)
        except BaseException as exc:  # a refusal, or the stream broke: keep nothing
            if assembler.buffer is not None:
                self.buffers.give(assembler.buffer)
            if isinstance(exc, ServingError):
                with self._lock:
                    self.pushes_refused += 1
            raise
        with self._lock:
            self.pushes += 1
            self.assemble_seconds += busy
            if assembler.shared:
                self.shared_pushes += 1
                self.shared_bytes += assembler.bytes_received
        self.on_arrival()
        return assembler.bytes_received

    def ready(self, request_ids: Sequence[str]) -> list[str]:
        with self._lock:
            return [r for r in request_ids if r in self._pending and self._complete(r)]

    def take(self, request_id: str) -> PendingKV:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or not self._complete(request_id):
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"the K/V of request {request_id!r} is not all here")
            return self._pending.pop(request_id)

    def recycle(self, pending: PendingKV) -> None:
        """Its K/V is installed (or no longer wanted): its buffers serve the next pushes."""
        for buffer in pending.buffers:
            self.buffers.give(buffer)
        pending.buffers.clear()

    def drop(self, request_ids: Iterable[str]) -> None:
        with self._lock:
            dropped = [self._pending.pop(r, None) for r in request_ids]
        for pending in dropped:
            if pending is not None:
                self.recycle(pending)

    def clear(self) -> None:
        with self._lock:
            dropped, self._pending = list(self._pending.values()), {}
        for pending in dropped:
            self.recycle(pending)

    def waiting(self) -> int:
        with self._lock:
            return len(self._pending)

    def _check(self, request_id: str, token_begin: int, num_tokens: int) -> None:
        with self._lock:
            pending = self._pending.get(request_id)
        if pending is None:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"no open reservation for request {request_id!r} on this stage")
        if (token_begin, num_tokens) != (pending.token_begin, pending.prompt_tokens):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"push carries {num_tokens} tokens from position {token_begin} "
                               f"but {pending.prompt_tokens} from {pending.token_begin} were "
                               "reserved")

    def _keep(self, request_id: str, snapshot: KVSnapshot, hidden: np.ndarray | None,
              buffer: Buffer | None) -> None:
        self._check(request_id, snapshot.token_begin, snapshot.num_tokens)
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None:  # dropped while the push streamed in
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"request {request_id!r} was released during its push")
            if any(_overlaps(snapshot, part) for part in pending.parts.values()):
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"layers [{snapshot.layer_begin}, {snapshot.layer_end}) of "
                                   f"{request_id!r} arrived twice")
            if hidden is not None and pending.hidden is not None:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"the hidden state of {request_id!r} arrived twice")
            pending.parts[snapshot.layer_begin] = snapshot
            if buffer is not None:
                pending.buffers.append(buffer)
            if hidden is not None:
                pending.hidden = hidden
            self.bytes_received += snapshot.keys.nbytes + snapshot.values.nbytes

    def _complete(self, request_id: str) -> bool:
        pending = self._pending[request_id]
        covered = sum(p.layer_end - p.layer_begin for p in pending.parts.values())
        has_hidden = pending.hidden is not None or not self.spec.is_last
        return covered == self.spec.num_local_layers and has_hidden


def _overlaps(a: KVSnapshot, b: KVSnapshot) -> bool:
    return a.layer_begin < b.layer_end and b.layer_begin < a.layer_end
