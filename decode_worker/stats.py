"""What a decode worker reports in its Stats: its scheduler's requests and pages, its
prefix cache, the K/V it received, its engine's totals, as typed parts (pipeline/stats.py)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pipeline.stats import InstanceStats, KVTransferStats
from protos import worker_pb2

if TYPE_CHECKING:  # the scheduler imports this module; the stage need not load with it
    from .stage import DecodeStage


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    running_sequences: int
    reservations: int   # requests not decoding yet: waiting for their K/V or prefill
    total_pages: int    # the scheduler's budget (the cache less its spare page)
    free_pages: int     # neither in use nor reserved

    def to_proto(self) -> worker_pb2.WorkerStats:
        return worker_pb2.WorkerStats(
            running_sequences=self.running_sequences, reservations=self.reservations,
            total_pages=self.total_pages, free_pages=self.free_pages)


def kv_received(stage: DecodeStage) -> KVTransferStats:
    r = stage.receiver
    return KVTransferStats(pushes=r.pushes, bytes_received=r.bytes_received,
                           pushes_refused=r.pushes_refused, shared_pushes=r.shared_pushes,
                           shared_bytes=r.shared_bytes, assemble_seconds=r.assemble_seconds,
                           install_seconds=stage.install_seconds)


DecodeStats = InstanceStats[SchedulerStats]
