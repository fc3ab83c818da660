"""This worker's stage of a prefill instance: its layers, and the K/V it ships.

Every stage runs its layers over a batch, then pushes the K/V of each sequence whose
prompt ended in the pass straight to the decode stage(s) owning those layers; the last
stage also selects each such sequence's last hidden state and sends it to the decode
stage that owns the LM head. A sequence's K/V stays after it is shipped, as a cached
prefix, until the leader releases it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import grpc
import numpy as np

from kv_transfer.buffers import Buffer
from kv_transfer.codec import model_layout
from kv_transfer.grpc_transport import KVSender
from olmo_model.kv_pages import KVSnapshot
from olmo_model.runtime import ModelRunner
from pipeline.ops import ForwardBatch, ForwardResult, Release, StageAddress
from pipeline.stage import embed_checked, start_sequence
from protos import worker_pb2
from protos.errors import ServingError


class PrefillStage:
    def __init__(self, runner: ModelRunner, secret: str | None = None, push_threads: int = 4,
                 share_memory: bool = True):
        self.runner = runner
        self.spec = runner.stage
        self._layout = model_layout(runner)
        self.sender = KVSender(self._layout, secret, share_memory=share_memory)
        self.sequences: set[int] = set()
        self.export_seconds = 0.0  # reading shipped K/V out of the pages
        self._lock = threading.Lock()
        self._pushers = ThreadPoolExecutor(push_threads, thread_name_prefix="kv-push")

    def layout(self) -> worker_pb2.ModelLayout:
        return self._layout

    def forward(self, batch: ForwardBatch, inputs: np.ndarray) -> ForwardResult:
        """Run the layers and push the K/V of sequences whose prompt ends here.

        A slice that ``starts_sequence`` adds it to the cache (a fork of a cached one, or
        empty); one that ``ends_prompt`` ships its K/V from ``push_from`` on. Returns the
        hidden states for the next stage and, by request id, why a push failed.
        """
        seq_ids = [s.seq_id for s in batch.slices]
        lengths = [s.length for s in batch.slices]
        finished = [s for s in batch.slices if s.ends_prompt]
        exports: list[tuple[KVSnapshot, Buffer]] = []
        with self._lock:
            self._add_new(batch)
            try:
                embeds = embed_checked(self.runner, inputs) if self.spec.is_first else inputs
                out = self.runner.forward(seq_ids, lengths, embeds)
                last = (self.runner.select_last(out, lengths).numpy()
                        if self.spec.is_last else None)
                start = time.perf_counter()
                for s in finished:
                    exports.append(self._export(s.seq_id, s.total_tokens, s.push_from))
                self.export_seconds += time.perf_counter() - start
            except Exception:
                self._give_back(buffer for _, buffer in exports)
                self._remove(seq_ids)
                raise
        rows = {s.seq_id: i for i, s in enumerate(batch.slices)}
        pushes = [self._pushers.submit(self._ship, s.request_id, snapshot, buffer,
                                       None if last is None else last[rows[s.seq_id]],
                                       s.kv_targets)
                  for s, (snapshot, buffer) in zip(finished, exports)]
        wait(pushes)  # each bounded by the push timeout; then no receiver reads the buffers
        self._give_back(buffer for _, buffer in exports)
        failures = {}
        for s, push in zip(finished, pushes):
            try:
                push.result()
            except ServingError as exc:
                failures[s.request_id] = exc
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

    def _remove(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            if seq_id in self.sequences:
                self.sequences.discard(seq_id)
                self.runner.remove_sequence(seq_id)

    def _export(self, seq_id: int, total_tokens: int, begin: int) -> tuple[KVSnapshot, Buffer]:
        """A sequence's K/V from ``begin`` on, in one of the sender's buffers (shared
        memory that this host's decode workers may read the push from)."""
        shape = self.runner.kv.snapshot_shape(total_tokens - begin)
        buffer = self.sender.buffers.take(Buffer.bytes_for(shape, self.runner.dtype))
        try:
            out = buffer.arrays(shape, self.runner.dtype)
            return self.runner.export_kv(seq_id, total_tokens, begin, out), buffer
        except Exception:
            self.sender.buffers.give(buffer)
            raise

    def _give_back(self, buffers: Iterable[Buffer]) -> None:
        for buffer in buffers:
            self.sender.buffers.give(buffer)

    def _ship(self, request_id: str, snapshot: KVSnapshot, buffer: Buffer,
              hidden: np.ndarray | None, targets: Sequence[StageAddress]) -> None:
        """Push the overlap of our layers with each decode stage's; the one that owns the
        LM head (the last) also gets the hidden state."""
        for index, target in enumerate(targets):
            overlap = target.overlap(snapshot.layer_begin, snapshot.layer_end)
            if overlap is None:
                continue
            lo, hi = (layer - snapshot.layer_begin for layer in overlap)
            part = KVSnapshot(overlap[0], overlap[1], snapshot.keys[lo:hi],
                              snapshot.values[lo:hi], snapshot.token_begin)
            carries_hidden = hidden is not None and index == len(targets) - 1
            self.sender.push(target.address, request_id, part,
                             hidden if carries_hidden else None, buffer)
