"""What a prefill worker reports in its Stats: its queue and pages, its prefix cache, the
K/V it pushed, its engine's totals, as typed parts (see pipeline/stats.py)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pipeline.stats import InstanceStats, KVTransferStats
from protos import worker_pb2

if TYPE_CHECKING:
    from .stage import PrefillStage


def kv_sent(stage: PrefillStage) -> KVTransferStats:
    s = stage.sender
    return KVTransferStats(pushes=s.pushes, bytes_sent=s.bytes_sent,
                           shared_pushes=s.shared_pushes, shared_bytes=s.shared_bytes,
                           shared_seconds=s.shared_seconds, transfer_seconds=s.transfer_seconds,
                           export_seconds=stage.export_seconds, encode_seconds=s.encode_seconds)


@dataclasses.dataclass(frozen=True)
class LoadStats:
    """What the router weighs a prefill worker by, and its pages."""

    queued_requests: int    # prompts waiting for a prefill batch
    queued_tokens: int      # their tokens
    running_sequences: int  # prefill calls under way, queued ones included
    total_pages: int
    free_pages: int

    def to_proto(self) -> worker_pb2.WorkerStats:
        return worker_pb2.WorkerStats(
            queued_requests=self.queued_requests, queued_tokens=self.queued_tokens,
            running_sequences=self.running_sequences, total_pages=self.total_pages,
            free_pages=self.free_pages)


PrefillStats = InstanceStats[LoadStats]
