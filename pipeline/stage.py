"""What a stage is: the operations an instance's leader runs on each of its stages.

The worker's own stage implements these with direct calls on its model runner; a stage
in another process is a ``RemoteStage`` with the same methods over gRPC. Every stage
forwards and releases; a decode stage is a ``ReceivingStage``: it also takes pushed K/V
(expect, ready, install).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grpc
import numpy as np

from olmo_model.runtime import ModelRunner
from protos import worker_pb2
from protos.errors import ServingError

from .ops import Admission, Expectation, ForwardBatch, ForwardResult, Release


class Stage(Protocol):
    def layout(self) -> worker_pb2.ModelLayout:
        """The model and layer range this stage serves."""

    def forward(self, batch: ForwardBatch, inputs: np.ndarray) -> ForwardResult:
        """Run this stage's layers over the batch (token ids on the first stage, the
        previous stage's hidden states elsewhere)."""

    def release(self, release: Release) -> None:
        """Free sequences and forget requests; never fails for ones it does not hold."""


class ReceivingStage(Stage, Protocol):
    def expect(self, expectations: Sequence[Expectation]) -> None:
        """Accept pushes for these requests (or, local ones, start their sequences)."""

    def ready(self, request_ids: Sequence[str]) -> list[str]:
        """Those of ``request_ids`` whose K/V (and, last stage, hidden state) are all here."""

    def install(self, admissions: Sequence[Admission]) -> ForwardResult:
        """Install each request's K/V as its sequence; the last stage samples first tokens."""


def embed_checked(runner: ModelRunner, token_ids: np.ndarray):
    """The first stage's embedding, after checking every id is in the vocabulary (an id
    outside it would read past the embedding table)."""
    vocab = runner.config.vocab_size
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocab):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"token ids must be in [0, {vocab}); got {token_ids.min()}.."
                           f"{token_ids.max()}")
    return runner.embed(token_ids)


def start_sequence(runner: ModelRunner, sequences: set[int], seq_id: int,
                   fork_from: int | None, fork_pos: int) -> None:
    """Add ``seq_id`` to a stage's cache and to ``sequences``: empty, or sharing the first
    ``fork_pos`` tokens of cached sequence ``fork_from``, which must be on this stage."""
    if fork_from is None:
        runner.add_sequence(seq_id)
    elif fork_from not in sequences:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"cached sequence {fork_from} is not on this stage")
    else:
        runner.fork_sequence(fork_from, seq_id, fork_pos)
    sequences.add(seq_id)
