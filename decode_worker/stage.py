"""One pipeline stage of a decode instance: its layers, its KV cache, its part of each step.

A decode instance of S stages has S of these; its leader (the engine, on the first
stage) drives them with the same five operations whether a stage is local or reached
over gRPC: expect a request, report which requests have all their KV, install KV as
sequences, forward a batch, release sequences. The last stage owns the LM head, so it
holds each request's sampler and turns hidden states into tokens.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import numpy as np

from olmo_model.kv_pages import KVSnapshot
from olmo_model.runtime import ModelRunner

from .sampler import Sampler, SamplingConfig


@dataclasses.dataclass
class PendingKV:
    """A request's K/V as it arrives at this stage, possibly in several partial pushes."""

    prompt_tokens: int
    sampling: SamplingConfig
    parts: dict[int, KVSnapshot] = dataclasses.field(default_factory=dict)  # by layer_begin
    hidden: np.ndarray | None = None


class DecodeStage:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.stage = runner.stage
        self.lock = threading.RLock()
        self.pending: dict[str, PendingKV] = {}
        self.samplers: dict[int, Sampler] = {}  # by sequence id (last stage)
        self.sequences: set[int] = set()
        self.hidden_size = runner.config.hidden_size

    # --- requests and their KV --------------------------------------------------------

    def expect(self, request_id: str, prompt_tokens: int, sampling: SamplingConfig) -> None:
        """Accept pushes for this request (its lease is kept by the leader)."""
        with self.lock:
            self.pending[request_id] = PendingKV(prompt_tokens, sampling)

    def expects(self, request_id: str, num_tokens: int) -> str | None:
        """Why a push for this request cannot be taken, or None when it can."""
        with self.lock:
            pending = self.pending.get(request_id)
        if pending is None:
            return f"no open reservation for request {request_id!r} on this stage"
        if num_tokens != pending.prompt_tokens:
            return f"push carries {num_tokens} tokens but {pending.prompt_tokens} were reserved"
        return None

    def receive(self, request_id: str, snapshot: KVSnapshot, hidden: np.ndarray | None) -> None:
        with self.lock:
            pending = self.pending.get(request_id)
            if pending is None:
                raise KeyError(f"no open reservation for request {request_id!r}")
            if any(_overlaps(snapshot, part) for part in pending.parts.values()):
                raise ValueError(f"layers [{snapshot.layer_begin}, {snapshot.layer_end}) of "
                                 f"{request_id!r} arrived twice")
            pending.parts[snapshot.layer_begin] = snapshot
            if hidden is not None:
                pending.hidden = hidden

    def ready(self, request_ids: Sequence[str]) -> list[str]:
        with self.lock:
            return [r for r in request_ids if r in self.pending and self._complete(r)]

    def _complete(self, request_id: str) -> bool:
        pending = self.pending[request_id]
        covered = sum(p.layer_end - p.layer_begin for p in pending.parts.values())
        has_hidden = pending.hidden is not None or not self.stage.is_last
        return covered == self.stage.num_local_layers and has_hidden

    def install(self, pieces: Sequence[tuple[str, int]]) -> list[int]:
        """Install each request's KV as a sequence; the last stage samples first tokens."""
        hidden = []
        with self.lock:
            for request_id, seq_id in pieces:
                pending = self.pending.pop(request_id)
                self.runner.import_kv(seq_id, _join(pending.parts, self.stage.layer_begin))
                self.sequences.add(seq_id)
                if self.stage.is_last:
                    self.samplers[seq_id] = Sampler(pending.sampling)
                    hidden.append(pending.hidden)
            return self._sample([seq for _, seq in pieces], np.stack(hidden)) if hidden else []

    def expect_local(self, request_id: str, seq_id: int, sampling: SamplingConfig) -> None:
        """A sequence this instance prefills itself (aggregated mode)."""
        with self.lock:
            self.runner.add_sequence(seq_id)
            self.sequences.add(seq_id)
            if self.stage.is_last:
                self.samplers[seq_id] = Sampler(sampling)

    def release(self, seq_ids: Sequence[int], request_ids: Sequence[str]) -> None:
        with self.lock:
            for seq_id in seq_ids:
                if seq_id in self.sequences:
                    self.sequences.discard(seq_id)
                    self.runner.remove_sequence(seq_id)
                self.samplers.pop(seq_id, None)
            for request_id in request_ids:
                self.pending.pop(request_id, None)

    def reset(self) -> None:
        """Forget everything: the instance this stage belongs to was (re)formed."""
        with self.lock:
            self.release(sorted(self.sequences), list(self.pending))

    # --- forward passes ---------------------------------------------------------------

    def forward(self, pieces: Sequence[tuple[int, int, bool]], inputs: np.ndarray,
                decode: bool) -> np.ndarray | list[int]:
        """Run this stage's layers over a batch of (seq_id, length, last_piece).

        ``inputs`` are token ids on the first stage and hidden states elsewhere. Returns
        hidden states ``[total, hidden]``, or on the last stage the sampled token of each
        sequence (decode) or of each sequence whose prompt ends in this pass (prefill).
        """
        seq_ids = [p[0] for p in pieces]
        lengths = [p[1] for p in pieces]
        with self.lock:
            hidden = self.runner.embed(inputs) if self.stage.is_first else inputs
            out = self.runner.forward(seq_ids, lengths, hidden, decode=decode)
            if not self.stage.is_last:
                return out.numpy()
            last = self.runner.select_last(out, lengths).numpy()
            rows = [i for i, p in enumerate(pieces) if decode or p[2]]
            return self._sample([seq_ids[i] for i in rows], last[rows])

    def _sample(self, seq_ids: Sequence[int], hidden: np.ndarray) -> list[int]:
        if not seq_ids:
            return []
        logits = self.runner.logits(hidden)
        return [self.samplers[s].sample(row) for s, row in zip(seq_ids, logits)]


def _overlaps(a: KVSnapshot, b: KVSnapshot) -> bool:
    return a.layer_begin < b.layer_end and b.layer_begin < a.layer_end


def _join(parts: dict[int, KVSnapshot], layer_begin: int) -> KVSnapshot:
    ordered = [parts[k] for k in sorted(parts)]
    if len(ordered) == 1:
        return ordered[0]
    return KVSnapshot(layer_begin, ordered[-1].layer_end,
                      np.concatenate([p.keys for p in ordered]),
                      np.concatenate([p.values for p in ordered]))
