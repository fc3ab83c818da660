"""This worker's stage of a prefill instance: its layers, and the K/V it ships.

Every stage runs its layers over a batch and pushes the K/V the pass computes straight
to the decode stage(s) owning those layers, as it goes: the stage's layers run in groups,
and each group's K/V leaves while the next group computes. A prompt prefilled in several
chunks streams the same way across passes: each chunk's K/V leaves while the next chunk
computes. The pieces of one sequence go one after another, so that a failed piece stops
the rest (``KVStream``, one ``KVTransfer`` per decode stage it goes to: opened with the
sequence, finished once its last piece is answered, aborted when the sequence goes
first). With the prompt's last piece, the last stage sends its last
hidden state to the decode stage that owns the LM head, and the pass waits for the
sequence's pieces to be answered. Of a sliding-window layer, only the positions it reads
again go: the prompt's last ``sliding_window`` (``OLMoConfig.kv_kept_from``). A
sequence's K/V stays after it is shipped, as a cached prefix, until the leader releases
it.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np

from kv_transfer.buffers import Buffer
from kv_transfer.codec import model_layout
from kv_transfer.grpc_transport import KVSender
from kv_transfer.transport import KVTransfer, PushGrant, PushSender
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
    transfers: tuple[KVTransfer, ...]  # one per target
    pushed_to: int               # positions before this are sent, or held there already
    prompt_tokens: int = 0       # the whole prompt (0: not known, so every position goes)
    last: Future | None = None   # the latest piece's push; it waits for the one before

    def close(self, error: ServingError | None, reason: str = "") -> None:
        """Its pieces are all answered (``error``: how one failed), or, with ``reason``,
        it ends before they are: no more of them go."""
        for transfer in self.transfers:
            if error is None and not reason:
                transfer.finish()
            else:
                transfer.abort(reason or str(error))


@dataclasses.dataclass
class OutgoingKV:
    """The K/V one pass computed for one stream, read into a buffer and pushed by layer
    group as the pass goes."""

    slice: SequenceSlice
    stream: KVStream
    token_begin: int
    buffer: Buffer
    keys: np.ndarray    # [stage layers, tokens, kv_heads, head_dim], filled as sent
    values: np.ndarray
    layers_sent: int = 0  # local layers [0, layers_sent) are exported and queued


class PrefillStage:
    def __init__(self, runner: ModelRunner, push_threads: int = 4,
                 share_memory: bool = True, streaming: bool = True, layer_groups: int = 4,
                 sender: PushSender | None = None):
        """``sender``: what pushes the K/V (default: over gRPC, through shared memory to
        decode workers on this host where ``share_memory``)."""
        self.runner = runner
        self.spec = runner.stage
        self._layout = model_layout(runner)
        self.sender = sender or KVSender(self._layout, share_memory=share_memory)
        self.streaming = streaming  # push each chunk's K/V as it is computed
        # Within a pass, push each of this many groups of layers' K/V once it has run
        # (host pages only: the export reads them while the pass goes on).
        self.layer_groups = layer_groups
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
        it computed (streaming), or the one that ``ends_prompt`` sends it all. Within the
        pass, each group of layers' K/V leaves as soon as the group has run. Returns the
        hidden states for the next stage and, by request id, why a sequence's K/V did not
        all arrive (for the prompts that ended).
        """
        seq_ids = [s.seq_id for s in batch.slices]
        lengths = [s.length for s in batch.slices]
        outgoing: list[OutgoingKV] = []
        with self._lock:
            self._add_new(batch)
            try:
                for s in batch.slices:
                    if self._piece_due(s):
                        outgoing.append(self._open_piece(s))
                groups = (self.runner.layer_groups(self.layer_groups)
                          if outgoing and self.runner.kv.on_host else [])
                embeds = embed_checked(self.runner, inputs) if self.spec.is_first else inputs
                out = self.runner.forward(
                    seq_ids, lengths, embeds, layer_groups=groups,
                    after_group=lambda layers: self._send_layers(outgoing, layers.stop))
                if outgoing:
                    last = (self.runner.select_last(out, lengths).numpy()
                            if self.spec.is_last else None)
                    rows = {s.seq_id: i for i, s in enumerate(batch.slices)}
                    self._send_layers(outgoing, self.spec.num_local_layers, last, rows)
            except Exception:
                for piece in outgoing:
                    self._abandon(piece)
                self._remove(seq_ids)
                raise
            ending = [(s.request_id, self._streams.pop(s.seq_id)) for s in batch.slices
                      if s.ends_prompt and s.seq_id in self._streams]
        failures = {}
        for request_id, stream in ending:
            try:  # bounded: every push has the sender's timeout
                stream.last.result()
            except ServingError as exc:
                failures[request_id] = exc
            stream.close(failures.get(request_id))
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
                grant = PushGrant(s.request_id, s.push_attempt, s.push_token, s.traceparent)
                transfers = tuple(self.sender.open(t.address, grant) for t in s.kv_targets)
                self._streams[s.seq_id] = KVStream(s.request_id, s.kv_targets, transfers,
                                                   s.push_from, s.prompt_tokens)

    def _remove(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            stream = self._streams.pop(seq_id, None)
            if stream is not None:  # a piece on its way still ends by itself
                stream.close(None, f"sequence {seq_id} left the prefill stage")
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

    def _open_piece(self, s: SequenceSlice) -> OutgoingKV:
        """The sequence's K/V not sent yet, to be read into one of the sender's buffers
        (shared memory that this host's decode workers may read the push from)."""
        stream = self._streams[s.seq_id]
        shape = self.runner.kv.snapshot_shape(s.total_tokens - stream.pushed_to)
        buffer = self.sender.buffers.take(Buffer.bytes_for(shape, self.runner.dtype))
        keys, values = buffer.arrays(shape, self.runner.dtype)
        piece = OutgoingKV(s, stream, stream.pushed_to, buffer, keys, values)
        stream.pushed_to = s.total_tokens
        return piece

    def _send_layers(self, outgoing: list[OutgoingKV], layer_end: int,
                     last: np.ndarray | None = None, rows: dict[int, int] | None = None
                     ) -> None:
        """Export and queue each piece's layers [sent, ``layer_end``) (local indices); the
        pieces that end their prompt carry its row of ``last``, the final hidden states,
        with their stage's last layers."""
        start = time.perf_counter()
        for piece in outgoing:
            layers = range(piece.layers_sent, layer_end)
            s = piece.slice
            exporting = time.perf_counter()
            snapshot = self.runner.kv.export_sequence(
                s.seq_id, s.total_tokens, piece.token_begin, (piece.keys, piece.values),
                # all at once reads any device's pages; a group, host pages only
                layers=None if len(layers) == self.spec.num_local_layers else layers)
            done = layer_end == self.spec.num_local_layers
            hidden = last[rows[s.seq_id]] if done and last is not None and s.ends_prompt else None
            self._send_piece(piece.stream, snapshot, piece.buffer, hidden,
                             (exporting, time.perf_counter()))
            piece.layers_sent = layer_end  # queued: the buffer now waits for this push
            if done:
                self._give_back_after(piece)
        self.export_seconds += time.perf_counter() - start

    def _abandon(self, piece: OutgoingKV) -> None:
        """A pass failed before the piece was all sent: its buffer comes back once what
        was sent of it has been answered."""
        if piece.layers_sent < self.spec.num_local_layers:
            self._give_back_after(piece)

    def _give_back_after(self, piece: OutgoingKV) -> None:
        """The piece's buffer comes back once the receivers have answered its last push
        (which waits for those before it), so that no receiver reads it after."""
        if piece.layers_sent == 0:  # nothing of it queued
            self.sender.buffers.give(piece.buffer)
        else:
            piece.stream.last.add_done_callback(lambda _: self.sender.buffers.give(piece.buffer))

    def _send_piece(self, stream: KVStream, snapshot: KVSnapshot, buffer: Buffer,
                    hidden: np.ndarray | None, exported: tuple[float, float]) -> None:
        """Queue a piece behind the stream's previous one (``exported``: when reading it
        from the pages began and ended)."""
        stream.last = self._pushers.submit(self._ship, stream, stream.last, snapshot, buffer,
                                           hidden, exported)

    def _ship(self, stream: KVStream, previous: Future | None, snapshot: KVSnapshot,
              buffer: Buffer, hidden: np.ndarray | None,
              exported: tuple[float, float] | None = None) -> None:
        """Push the overlap of our layers with each decode stage's; the one that owns the
        LM head (the last) also gets the hidden state. Nothing goes once an earlier piece
        failed: this piece fails as it did."""
        if previous is not None:
            previous.result()  # submitted first, so running or done: no pool deadlock
        parts = [(index, part) for index, target in enumerate(stream.targets)
                 for part in self._parts(stream, snapshot, target)]
        for index, part in parts:
            carries_hidden = (hidden is not None and index == len(stream.targets) - 1
                              and part is parts[-1][1])
            stream.transfers[index].push(part, hidden if carries_hidden else None, buffer,
                                         exported)

    def _parts(self, stream: KVStream, snapshot: KVSnapshot, target: StageAddress
               ) -> list[KVSnapshot]:
        """What of ``snapshot`` goes to ``target``: the layers it owns, in runs of layers
        that keep the same positions, each from the first position it keeps (none of a
        run that keeps none of these)."""
        overlap = target.overlap(snapshot.layer_begin, snapshot.layer_end)
        if overlap is None:
            return []
        prompt, config = stream.prompt_tokens, self.runner.config
        end = snapshot.token_begin + snapshot.num_tokens
        parts = []
        # (A prompt of unknown length, 0, keeps everything.)
        for kept, run in itertools.groupby(range(*overlap),
                                           key=lambda layer: config.kv_kept_from(layer, prompt)):
            layers = list(run)
            begin = max(snapshot.token_begin, kept)
            if begin >= end:
                continue
            lo, hi = layers[0] - snapshot.layer_begin, layers[-1] + 1 - snapshot.layer_begin
            skip = begin - snapshot.token_begin
            parts.append(KVSnapshot(layers[0], layers[-1] + 1, snapshot.keys[lo:hi, skip:],
                                    snapshot.values[lo:hi, skip:], begin))
        return parts
