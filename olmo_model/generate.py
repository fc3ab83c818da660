"""Greedy generation on one full-model runner: the aggregated baseline and the demo."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from .runtime import ModelRunner


@dataclasses.dataclass
class Generation:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: list[float]

    @property
    def ms_per_token(self) -> float:
        return 1000 * float(np.median(self.decode_seconds)) if self.decode_seconds else 0.0


def greedy_generate(runner: ModelRunner, prompt: Sequence[int], max_new_tokens: int,
                    stop_ids: Sequence[int] = (), seq_id: int = 0) -> Generation:
    """Greedy continuation of ``prompt``; the sequence is removed from the cache afterwards."""
    limit = runner.config.context_window_size
    if len(prompt) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(prompt)} tokens) plus {max_new_tokens} new tokens exceeds "
                         f"the context window of {limit}")
    runner.add_sequence(seq_id)
    try:
        start = time.perf_counter()
        token = int(np.argmax(runner.logits(runner.prefill([seq_id], [list(prompt)]))[0]))
        result = Generation([token], time.perf_counter() - start, [])
        while len(result.tokens) < max_new_tokens and token not in stop_ids:
            start = time.perf_counter()
            token = int(np.argmax(runner.decode([seq_id], [token])[0]))
            result.decode_seconds.append(time.perf_counter() - start)
            result.tokens.append(token)
        return result
    finally:
        runner.remove_sequence(seq_id)
