"""The prefill loop: batch waiting prompts, run them through the instance's stages.

The engine runs on its instance's leader (the worker of its first stage). Each batch
goes through the chain in prefill chunks; every stage ships the K/V of the sequences
that finish in a chunk to the decode instance (see ``stage.py``). A prompt forks from
the longest prefix in the instance's prefix cache and computes only the rest; once
shipped, its sequence stays cached for the prompts after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import grpc

from pipeline.chain import PromptToPrefill, StageChain
from pipeline.ops import Release
from pipeline.pages import PageBudget
from pipeline.prefix_cache import PrefixCache
from pipeline.stats import EngineCounters
from protos import tracing
from protos.errors import ServingError

from .batcher import PrefillJob, PromptBatcher
from .stage import PrefillStage


class PrefillEngine:
    def __init__(self, stage: PrefillStage, token_budget: int | None = None,
                 prefix_cache: bool = True):
        limits = stage.runner.limits
        self.stage = stage
        self.cache = PrefixCache(limits.page_size, enabled=prefix_cache,
                                 shares_pages=stage.runner.forks_share_pages)
        self.pages = PageBudget(stage.runner.kv.total_pages, limits.page_size)
        self.chain: StageChain | None = None  # set when this worker leads an instance
        self.chunk_size = limits.prefill_chunk_tokens
        self.batcher = PromptBatcher(token_budget or limits.prefill_chunk_tokens,
                                     limits.max_sequences)
        self._next_seq_id = 0
        self.counters = EngineCounters()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prefill-engine", daemon=True)
        self._thread.start()

    def lead(self, chain: StageChain) -> None:
        """Lead the instance of ``chain``; its members start clean."""
        self.cache.clear()
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
        self.stage.close()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            batch = [job for job in self.batcher.next_batch(timeout=0.1) if not job.cancelled]
            if batch:
                self._run(batch)

    def _run(self, batch: list[PrefillJob]) -> None:
        start = time.perf_counter()
        for job in batch:
            if job.traceparent:
                tracing.span_between("prefill.queue", job.traceparent, job.queued_at, start,
                                     {"olmo.batch_size": len(batch)})
        prompts, pages = zip(*(self._plan(job) for job in batch))
        try:
            self._make_room(prompts, sum(pages))
            outcome = self.chain.prefill(prompts, self.chunk_size)
        except Exception as exc:
            # Free what the failed pass left on every stage that is still there.
            for prompt in prompts:
                self.cache.forget(prompt.seq_id)
            self.chain.release(Release(tuple(p.seq_id for p in prompts)))
            if not isinstance(exc, ServingError):
                exc = ServingError(grpc.StatusCode.INTERNAL, f"prefill failed: {exc}")
            for job in batch:
                job.fail(exc)
            return
        seconds = time.perf_counter() - start
        self.counters.prefilled_tokens += sum(len(p.token_ids) for p in prompts)
        freed = []
        for job, prompt in zip(batch, prompts):
            freed += self.cache.finish(prompt.seq_id, job.token_ids, job.cache_salt)
        if freed:
            self.chain.release(Release(tuple(freed)))
        for job in batch:
            failure = outcome.push_failures.get(job.request_id)
            if failure is not None:
                job.fail(failure)
            else:
                job.finish(seconds)

    def _plan(self, job: PrefillJob) -> tuple[PromptToPrefill, int]:
        """The job's sequence (forked from its longest cached prefix, computing the rest)
        and the pages it takes beyond those it shares with that prefix."""
        self._next_seq_id += 1
        cached = self.cache.lookup(job.token_ids, job.cache_salt)
        self.cache.start(self._next_seq_id, cached)
        self.cache.count(len(job.token_ids), cached.tokens)
        job.cached_tokens = cached.tokens
        prompt = PromptToPrefill(self._next_seq_id, job.token_ids[cached.tokens:],
                                 job.request_id, job.kv_targets, cached.seq_id, cached.tokens,
                                 job.skip_tokens, push_attempt=job.attempt,
                                 push_token=job.push_token, traceparent=job.traceparent)
        return prompt, self.pages.new_pages(len(job.token_ids), cached.shared_pages)

    def _make_room(self, prompts: Sequence[PromptToPrefill], pages: int) -> None:
        """Evict cached prefixes (least recently used first, never one a prompt forks)
        until the batch's ``pages`` new pages fit this stage's cache, or none is left."""
        parents = {p.fork_from for p in prompts}
        while self.pages.missing(self.stage.runner.available_pages(), pages):
            evicted = self.cache.evict_oldest(keep=parents)
            if evicted is None:
                return
            self.chain.release(Release((evicted,)))
