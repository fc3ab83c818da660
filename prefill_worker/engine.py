"""The prefill loop: batch waiting prompts, run one ragged prefill through every stage.

The engine is its instance's leader. Each batch is split into prefill chunks; each chunk
goes through the instance's stages (this one first, the others over gRPC), and every
stage ships the K/V of the sequences that finish in that chunk to the decode instance.
A sequence lives in a prefill cache only from its first chunk until its K/V is shipped.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from olmo_model.runtime import ModelRunner, plan_chunks
from protos import worker_pb2

from .batcher import PrefillJob, PromptBatcher
from .stage import PrefillStage


class PushFailed(Exception):
    """The decode worker refused or could not take the KV push."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class PrefillEngine:
    def __init__(self, runner: ModelRunner, token_budget: int | None = None):
        self.runner = runner
        self.stage = PrefillStage(runner)
        self.layout = self.stage.layout
        self.downstream: list[str] = []  # the instance's other stages, in order
        self.batcher = PromptBatcher(token_budget or runner.limits.prefill_chunk_size,
                                     runner.limits.max_num_sequences)
        self._next_seq_id = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prefill-engine", daemon=True)
        self._thread.start()

    @property
    def sender(self):
        return self.stage.sender

    def submit(self, job: PrefillJob) -> None:
        self.batcher.put(job)

    def cancel(self, request_id: str) -> bool:
        return self.batcher.cancel(request_id)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            batch = [job for job in self.batcher.next_batch(timeout=0.1) if not job.cancelled]
            if batch:
                self._run(batch)

    def _run(self, batch: list[PrefillJob]) -> None:
        start = time.perf_counter()
        seq_ids = []
        for _ in batch:
            self._next_seq_id += 1
            seq_ids.append(self._next_seq_id)
        prompts = [job.token_ids for job in batch]
        errors: dict[str, str] = {}
        try:
            for chunk in plan_chunks([len(p) for p in prompts],
                                     self.runner.limits.prefill_chunk_size):
                pieces = [worker_pb2.StagePiece(
                    request_id=batch[c.index].request_id, seq_id=seq_ids[c.index],
                    length=c.length, last_piece=c.begin + c.length == len(prompts[c.index]),
                    total_tokens=c.begin + c.length,
                    decode_stages=batch[c.index].decode_stages) for c in chunk]
                ids = np.concatenate([prompts[c.index][c.begin:c.begin + c.length]
                                      for c in chunk])
                request = worker_pb2.StageRequest(op=worker_pb2.STAGE_OP_FORWARD,
                                                  pieces=pieces, token_ids=ids)
                errors.update(self.stage.run(request, self.downstream).push_errors)
        except Exception as exc:
            for job in batch:
                job.result.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        for job in batch:
            if job.request_id in errors:
                code, _, details = errors[job.request_id].partition(": ")
                job.result.set_exception(PushFailed(
                    getattr(grpc.StatusCode, code, grpc.StatusCode.FAILED_PRECONDITION),
                    f"KV push for {job.request_id} failed: {details}"))
            else:
                job.result.set_result((seconds,))
