"""This worker's stage of a prefill instance: its layers, and the K/V it ships.

Every stage runs its layers over a batch, then pushes the K/V the pass computed straight
to the decode stage(s) owning those layers. A prompt prefilled in several chunks streams:
each chunk's K/V leaves as one piece while the next chunk computes, the pieces of one
sequence one after another, so that a failed piece stops the rest (``KVStream``). With the
prompt's last piece, the last stage sends its last hidden state to the decode stage that
owns the LM head, and the pass waits for the sequence's pieces to be answered. A
sequence's K/V stays after it is shipped, as a cached prefix, until the leader releases it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np

from kv_transfer.buffers import Buffer
from kv_transfer.codec import model_layout
from kv_transfer.grpc_transport import KVSender
from olmo_model.kv_pages import KVSnapshot
from olmo_model.runtime import ModelRunner
from pipeline.ops import ForwardBatch, ForwardResult, Release, SequenceSlice, StageAddress
from pipeline.stage import embed_checked, start_sequence
from protos import worker_pb2
from protos.errors import ServingError


@dataclasses.dataclass
class KVStream:
    """One sequence's K/V on its way to the decode instance, piece by piece."""

    request_id: str
    targets: tuple[StageAddress, ...]
    attempt: int
    pushed_to: int               # positions before this are sent, or held there already
    last: Future | None = None   # the latest piece's push; it waits for the one before


class PrefillStage:
    def __init__(self, runner: ModelRunner, secret: str | None = None, push_threads: int = 4,
                 share_memory: bool = True, streaming: bool = True):
        self.runner = runner
        self.spec = runner.stage
        self._layout = model_layout(runner)
        self.sender = KVSender(self._layout, secret, share_memory=share_memory)
        self.streaming = streaming  # push each chunk's K/V as it is computed
        self.sequences: set[int] = set()
        self._streams: dict[int, KVStream] = {}  # by sequence, while its prompt is prefilled
        self.export_seconds = 0.0  # reading shipped K/V out of the pages
        self._lock = threading.Lock()
        self._pushers = ThreadPoolExecutor(push_threads, thread_name_prefix="kv-push")

    def layout(self) -> worker_pb2.ModelLayout:
        return self._layout

    def forward(self, batch: ForwardBatch, inputs: np.ndarray) -> ForwardResult:
        """Run the layers and push the K/V the pass computed.

        A slice that ``starts_sequence`` adds it to the cache (a fork of a cached one, or
        empty) and opens its stream, from ``push_from`` on; each later slice sends what
        it computed (streaming), or the one that ``ends_prompt`` sends it all. Returns
        the hidden states for the next stage and, by request id, why a sequence's K/V
        did not all arrive (for the prompts that ended).
        """
        seq_ids = [s.seq_id for s in batch.slices]
        lengths = [s.length for s in batch.slices]
        pieces: list[tuple[SequenceSlice, KVSnapshot, Buffer]] = []
        with self._lock:
            self._add_new(batch)
            try:
                embeds = embed_checked(self.runner, inputs) if self.spec.is_first else inputs
                out = self.runner.forward(seq_ids, lengths, embeds)
                last = (self.runner.select_last(out, lengths).numpy()
                        if self.spec.is_last else None)
                start = time.perf_counter()
                for s in batch.slices:
                    if self._piece_due(s):
                        pieces.append((s, *self._export(s)))
                self.export_seconds += time.perf_counter() - start
            except Exception:
                for _, _, buffer in pieces:
                    self.sender.buffers.give(buffer)
                self._remove(seq_ids)
                raise
            rows = {s.seq_id: i for i, s in enumerate(batch.slices)}
            for s, snapshot, buffer in pieces:
                hidden = last[rows[s.seq_id]] if last is not None and s.ends_prompt else None
                self._send_piece(self._streams[s.seq_id], snapshot, buffer, hidden)
            ending = [(s.request_id, self._streams.pop(s.seq_id)) for s in batch.slices
                      if s.ends_prompt and s.seq_id in self._streams]
        failures = {}
        for request_id, stream in ending:
            try:  # bounded: every push has the sender's timeout
                stream.last.result()
            except ServingError as exc:
                failures[request_id] = exc
        return ForwardResult(hidden=None if self.spec.is_last else out.numpy(),
                             push_failures=failures)

    def close(self) -> None:
        """Stop the push threads and free the idle export buffers (the worker is done)."""
        self._pushers.shutdown(wait=False)
        self.sender.close()

    def release(self, release: Release) -> None:
        with self._lock:
            self._remove(sorted(self.sequences) if release.reset else release.seq_ids)

    def _add_new(self, batch: ForwardBatch) -> None:
        for s in batch.slices:
            if s.seq_id in self.sequences:
                if s.starts_sequence:
                    raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"sequence {s.seq_id} is already on this stage")
            elif not s.starts_sequence:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"sequence {s.seq_id} continues but is not on this stage")
            else:
                start_sequence(self.runner, self.sequences, s.seq_id, s.fork_from, s.fork_pos)
            if s.starts_sequence and s.kv_targets:
                self._streams[s.seq_id] = KVStream(s.request_id, s.kv_targets,
                                                   s.push_attempt, s.push_from)

    def _remove(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self._streams.pop(seq_id, None)  # pieces on their way still end by themselves
            if seq_id in self.sequences:
                self.sequences.discard(seq_id)
                self.runner.remove_sequence(seq_id)

    def _piece_due(self, s: SequenceSlice) -> bool:
        """Whether this pass sends a piece of the slice's sequence: streaming, whatever it
        computed past what the decode side holds; else, once, all of it at the end."""
        stream = self._streams.get(s.seq_id)
        if stream is None or s.total_tokens <= stream.pushed_to:
            return False
        return self.streaming or s.ends_prompt

    def _export(self, s: SequenceSlice) -> tuple[KVSnapshot, Buffer]:
        """The sequence's K/V not sent yet, in one of the sender's buffers (shared memory
        that this host's decode workers may read the push from)."""
        stream = self._streams[s.seq_id]
        shape = self.runner.kv.snapshot_shape(s.total_tokens - stream.pushed_to)
        buffer = self.sender.buffers.take(Buffer.bytes_for(shape, self.runner.dtype))
        try:
            out = buffer.arrays(shape, self.runner.dtype)
            snapshot = self.runner.export_kv(s.seq_id, s.total_tokens, stream.pushed_to, out)
        except Exception:
            self.sender.buffers.give(buffer)
            raise
        stream.pushed_to = s.total_tokens
        return snapshot, buffer

    def _send_piece(self, stream: KVStream, snapshot: KVSnapshot, buffer: Buffer,
                    hidden: np.ndarray | None) -> None:
        """Queue a piece behind the stream's previous one; its buffer comes back once the
        receivers have answered (so no receiver reads it after)."""
        stream.last = self._pushers.submit(self._ship, stream, stream.last, snapshot, buffer,
                                           hidden)
        stream.last.add_done_callback(lambda _: self.sender.buffers.give(buffer))

    def _ship(self, stream: KVStream, previous: Future | None, snapshot: KVSnapshot,
              buffer: Buffer, hidden: np.ndarray | None) -> None:
        """Push the overlap of our layers with each decode stage's; the one that owns the
        LM head (the last) also gets the hidden state. Nothing goes once an earlier piece
        failed: this piece fails as it did."""
        if previous is not None:
            previous.result()  # submitted first, so running or done: no pool deadlock
        for index, target in enumerate(stream.targets):
            overlap = target.overlap(snapshot.layer_begin, snapshot.layer_end)
            if overlap is None:
                continue
            lo, hi = (layer - snapshot.layer_begin for layer in overlap)
            part = KVSnapshot(overlap[0], overlap[1], snapshot.keys[lo:hi],
                              snapshot.values[lo:hi], snapshot.token_begin)
            carries_hidden = hidden is not None and index == len(stream.targets) - 1
            self.sender.push(target.address, stream.request_id, part,
                             hidden if carries_hidden else None, buffer, stream.attempt)
