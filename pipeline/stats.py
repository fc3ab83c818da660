"""What a worker counts, as typed values: each component reports a frozen dataclass with a
``to_proto()`` that names its WorkerStats fields one by one, so a renamed field fails
where it is named, not where a dict of counters meets the message.

A worker's stats are such parts put together (``InstanceStats``): a part that reported a
field another part does too would overwrite it, so each field has exactly one owner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from protos import worker_pb2

from .prefix_cache import PrefixCacheStats

if TYPE_CHECKING:  # (loading the runtime is seconds of start-up)
    from olmo_model.runtime import ModelRunner


class StatsPart(Protocol):
    def to_proto(self) -> worker_pb2.WorkerStats:
        """A WorkerStats with this part's fields set (the others left at zero)."""


@dataclasses.dataclass
class EngineCounters:
    """Running totals an engine keeps (its thread adds, the Stats call reads)."""

    prefilled_tokens: int = 0  # prompt tokens computed here (not found cached)
    drafted_tokens: int = 0    # speculative decoding: tokens drafted and verified
    accepted_tokens: int = 0   # ... and of those, the ones the model agreed with


@dataclasses.dataclass(frozen=True)
class EngineStats:
    used_pages: int         # the cache's pages held for live sequences (not merely cached)
    prefilled_tokens: int   # prompt tokens computed here (not found cached)
    drafted_tokens: int = 0   # speculative decoding: drafted and verified
    accepted_tokens: int = 0  # ... and kept

    def to_proto(self) -> worker_pb2.WorkerStats:
        return worker_pb2.WorkerStats(used_pages=self.used_pages,
                                      prefilled_tokens=self.prefilled_tokens,
                                      spec_draft_tokens=self.drafted_tokens,
                                      spec_accepted_tokens=self.accepted_tokens)

    @classmethod
    def of(cls, runner: ModelRunner, cache: PrefixCacheStats,
           counters: EngineCounters) -> EngineStats:
        held = runner.kv.total_pages - runner.available_pages()
        return cls(max(0, held - cache.cached_pages), counters.prefilled_tokens,
                   counters.drafted_tokens, counters.accepted_tokens)


@dataclasses.dataclass(frozen=True)
class KVTransferStats:
    """The K/V handoff step by step, as running totals over completed pushes: a prefill
    worker fills in what it sends, a decode worker what it receives."""

    pushes: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    pushes_refused: int = 0
    shared_pushes: int = 0         # of the pushes, those through same-host shared memory
    shared_bytes: int = 0
    shared_seconds: float = 0.0
    transfer_seconds: float = 0.0  # whole pushes as the sender waited for them
    export_seconds: float = 0.0    # sender: reading K/V out of the pages
    encode_seconds: float = 0.0    # sender: copying it into chunks, checksumming
    assemble_seconds: float = 0.0  # receiver: verifying chunks, copying them into arrays
    install_seconds: float = 0.0   # receiver: writing received K/V into the pages

    def to_proto(self) -> worker_pb2.WorkerStats:
        return worker_pb2.WorkerStats(
            pushes=self.pushes, kv_bytes_sent=self.bytes_sent,
            kv_bytes_received=self.bytes_received, pushes_refused=self.pushes_refused,
            shared_memory_pushes=self.shared_pushes, shared_memory_bytes=self.shared_bytes,
            shared_memory_ms=1000 * self.shared_seconds,
            kv_transfer_ms=1000 * self.transfer_seconds,
            kv_export_ms=1000 * self.export_seconds, kv_encode_ms=1000 * self.encode_seconds,
            kv_assemble_ms=1000 * self.assemble_seconds,
            kv_install_ms=1000 * self.install_seconds)


def merged(parts: Iterable[StatsPart]) -> worker_pb2.WorkerStats:
    """One WorkerStats holding every part's fields."""
    message = worker_pb2.WorkerStats()
    for part in parts:
        message.MergeFrom(part.to_proto())
    return message


Load = TypeVar("Load", bound=StatsPart)


@dataclasses.dataclass(frozen=True)
class InstanceStats(Generic[Load]):
    """What a worker reports: its role's load (a decode worker's scheduler, a prefill
    worker's queue), its prefix cache, its K/V handoff and its engine's totals."""

    load: Load
    cache: PrefixCacheStats
    kv: KVTransferStats
    engine: EngineStats

    def to_proto(self) -> worker_pb2.WorkerStats:
        return merged((self.load, self.cache, self.kv, self.engine))
