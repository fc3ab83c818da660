"""The sizes a worker's KV cache is made with: a dataclass of its own, free of TVM, so that
the cluster config (and the command line) can hold it without loading the runtime."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CacheLimits:
    """Sizes each worker's KV cache is created with; together they fix how many pages exist.

    The cluster config's ``cache`` section. A prefill chunk longer than the whole cache
    is cut to it.
    """

    max_sequences: int = dataclasses.field(default=16, metadata={
        "help": "sequences one worker's KV cache holds at once"})
    max_total_tokens: int = dataclasses.field(default=8192, metadata={
        "help": "tokens one worker's KV cache holds in all"})
    # A decode worker prefilling locally (aggregated mode, short uncached prompts) runs one
    # chunk between decode steps, so this bounds how long a new prompt pauses the streams
    # already running there.
    prefill_chunk_tokens: int = dataclasses.field(default=2048, metadata={
        "help": "prompt tokens per forward pass; local prefills interleave with decode "
                "steps by chunk"})
    page_size: int = dataclasses.field(default=16, metadata={
        "help": "tokens per KV page"})

    def __post_init__(self) -> None:
        for name in ("max_sequences", "max_total_tokens", "prefill_chunk_tokens",
                     "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"cache.{name} must be >= 1")
        if self.prefill_chunk_tokens > self.max_total_tokens:
            object.__setattr__(self, "prefill_chunk_tokens", self.max_total_tokens)

    def within_window(self, sliding_window: int) -> CacheLimits:
        """These limits, with prefill chunks no longer than a sliding window (0: none).

        TVM's attention over a pass's new tokens knows no window; it is exact for sliding
        layers only while no token of a chunk is a window or more past another.
        """
        if not sliding_window or self.prefill_chunk_tokens <= sliding_window:
            return self
        return dataclasses.replace(self, prefill_chunk_tokens=sliding_window)

    @classmethod
    def for_model(cls, config: Any) -> CacheLimits:
        """The defaults, grown to hold one whole context window (``config``: OLMoConfig)."""
        default = cls()
        return cls(max_total_tokens=max(default.max_total_tokens, config.context_window_size),
                   prefill_chunk_tokens=min(default.prefill_chunk_tokens,
                                            config.prefill_chunk_size))
