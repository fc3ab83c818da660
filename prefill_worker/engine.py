"""The prefill loop: batch waiting prompts, run one ragged prefill, hand off each sequence.

The engine thread owns the runner and its KV cache. A sequence lives in the cache only
from its prefill until its K/V has been exported; pushes to decode workers run on a
small thread pool so the next prefill does not wait for the network.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from olmo_model.runtime import ModelRunner
from protos.kv_stream import model_layout

from .batcher import PrefillJob, PromptBatcher
from .kv_sender import KVSender, describe_rpc_error


class PushFailed(Exception):
    """The decode worker refused or could not take the KV push."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class PrefillEngine:
    def __init__(self, runner: ModelRunner, token_budget: int | None = None,
                 push_threads: int = 4):
        self.runner = runner
        self.layout = model_layout(runner)
        self.batcher = PromptBatcher(token_budget or runner.limits.prefill_chunk_size,
                                     runner.limits.max_num_sequences)
        self.sender = KVSender(self.layout)
        self._pushers = ThreadPoolExecutor(push_threads, thread_name_prefix="kv-push")
        self._next_seq_id = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prefill-engine", daemon=True)
        self._thread.start()

    def submit(self, job: PrefillJob) -> None:
        self.batcher.put(job)

    def cancel(self, request_id: str) -> bool:
        return self.batcher.cancel(request_id)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)
        self._pushers.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            batch = [job for job in self.batcher.next_batch(timeout=0.1) if not job.cancelled]
            if batch:
                self._run(batch)

    def _run(self, batch: list[PrefillJob]) -> None:
        seq_ids = []
        try:
            for _ in batch:
                self._next_seq_id += 1
                seq_ids.append(self._next_seq_id)
                self.runner.add_sequence(self._next_seq_id)
            start = time.perf_counter()
            hidden = self.runner.prefill(seq_ids, [job.token_ids for job in batch])
            snapshots = [self.runner.export_kv(s, len(job.token_ids))
                         for s, job in zip(seq_ids, batch)]
            prefill_seconds = time.perf_counter() - start
        except Exception as exc:
            for job in batch:
                job.result.set_exception(exc)
            return
        finally:
            for seq_id in seq_ids:
                self.runner.remove_sequence(seq_id)
        for job, snapshot, row in zip(batch, snapshots, hidden):
            self._pushers.submit(self._push, job, snapshot, row, prefill_seconds)

    def _push(self, job: PrefillJob, snapshot, hidden: np.ndarray, prefill_seconds: float) -> None:
        if job.cancelled:
            return
        try:
            sent, seconds = self.sender.push(job.decode_address, job.request_id, snapshot, hidden)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                code = grpc.StatusCode.FAILED_PRECONDITION
            job.result.set_exception(PushFailed(
                code, f"KV push to decode worker {job.decode_address} failed: "
                      f"{describe_rpc_error(exc)}"))
            return
        job.result.set_result((sent, prefill_seconds, seconds))
