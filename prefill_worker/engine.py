"""The prefill loop: batch waiting prompts, run them through the instance's stages.

The engine runs on its instance's leader (the worker of its first stage). Each batch
goes through the chain in prefill chunks; every stage ships the K/V of the sequences
that finish in a chunk to the decode instance (see ``stage.py``).
"""

from __future__ import annotations

import threading
import time

import grpc

from pipeline.chain import PromptToPrefill, StageChain
from pipeline.ops import Release
from protos.errors import ServingError

from .batcher import PrefillJob, PromptBatcher
from .stage import PrefillStage


class PrefillEngine:
    def __init__(self, stage: PrefillStage, token_budget: int | None = None):
        limits = stage.runner.limits
        self.stage = stage
        self.chain: StageChain | None = None  # set when this worker leads an instance
        self.chunk_size = limits.prefill_chunk_size
        self.batcher = PromptBatcher(token_budget or limits.prefill_chunk_size,
                                     limits.max_num_sequences)
        self._next_seq_id = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prefill-engine", daemon=True)
        self._thread.start()

    def lead(self, chain: StageChain) -> None:
        """Lead the instance of ``chain``; its members start clean."""
        chain.release(Release(reset=True))
        self.chain = chain

    def submit(self, job: PrefillJob) -> None:
        if self.chain is None:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this prefill worker is a member stage; send prompts to the "
                               "first stage of its instance")
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
        prompts = []
        for job in batch:
            self._next_seq_id += 1
            prompts.append(PromptToPrefill(self._next_seq_id, job.token_ids, job.request_id,
                                           job.kv_targets))
        try:
            outcome = self.chain.prefill(prompts, self.chunk_size)
        except Exception as exc:
            # Free what the failed pass left on every stage that is still there.
            self.chain.release(Release(tuple(p.seq_id for p in prompts)))
            if not isinstance(exc, ServingError):
                exc = ServingError(grpc.StatusCode.INTERNAL, f"prefill failed: {exc}")
            for job in batch:
                job.fail(exc)
            return
        seconds = time.perf_counter() - start
        for job in batch:
            failure = outcome.push_failures.get(job.request_id)
            if failure is not None:
                job.fail(failure)
            else:
                job.finish(seconds)
