"""The decode instance's step loop, run by its leader (the worker of its first stage).

Once per loop: finish aborted requests, admit reservations whose K/V has reached every
stage (install it; the first token is sampled from the pushed hidden state) or run one
prefill chunk of the local ones, then run one ``batch_decode`` step for everything
running: a decode step never waits for more than one chunk of anyone's prompt. Installation
happens between steps, never during one. A single-stage instance is the same loop over
a chain of one local stage.

The leader also keeps the instance's prefix cache: a reservation forks its sequence
from the longest cached prefix of its prompt (a push then carries only the rest), and
prefills locally when the rest is short; a finished sequence stays cached.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np

from pipeline.chain import PromptToPrefill, StageChain
from pipeline.ops import (
    Admission,
    Expectation,
    ForwardBatch,
    Release,
    SamplingConfig,
    SequenceSlice,
    TokenLogprobs,
)
from pipeline.prefix_cache import MISS, PrefixCache
from pipeline.stats import EngineCounters, EngineStats
from protos import tracing
from protos.errors import ServingError
from protos.vocabulary import FinishReason

from .drafter import Drafter, DraftPolicy, StepCosts
from .scheduler import DecodeScheduler, Request, RequestState, TokenOut
from .stage import DecodeStage
from .stats import DecodeStats, kv_received

PUSH_TOKEN_BYTES = 16  # 128 bits: not guessed within a reservation's lease
# A traced request's decode steps are a span per this many of the engine's steps (and
# one for the rest): windows close together, so that a step costs no work per request.
STEPS_PER_SPAN = 32


@dataclasses.dataclass
class StepWindow:
    """A traced request's decode steps since its last steps span."""

    request: Request
    started: float      # perf_counter time the window opened
    steps_before: int   # the engine's step count then
    tokens_before: int  # the tokens the request had then


@dataclasses.dataclass(frozen=True)
class Reservation:
    pages: int            # held for it, beyond the cached pages it shares
    cached_tokens: int    # the prompt's first tokens it forks from the prefix cache
    local: bool           # prefilled here: no push comes
    push_token: bytes     # what pushes for it must carry (empty when local)


class DecodeEngine:
    def __init__(self, stage: DecodeStage, idle_wait: float = 0.02, prefix_cache: bool = True,
                 drafts: DraftPolicy | None = None):
        runner = stage.runner
        self.stage = stage
        self.config = runner.config
        self.chunk_size = runner.limits.prefill_chunk_tokens
        self.cache = PrefixCache(runner.limits.page_size, enabled=prefix_cache,
                                 shares_pages=runner.forks_share_pages,
                                 sliding_window=runner.config.sliding_window)
        self.scheduler = DecodeScheduler(
            total_pages=runner.kv.total_pages,
            max_sequences=runner.limits.max_sequences, page_size=runner.limits.page_size,
            context_window=runner.config.context_window_size,
            vocab_size=runner.config.vocab_size, eos_ids=runner.config.eos_token_id,
            cached_pages=self.cache.held_pages)
        # Held while the cache and the stages' sequences change together: a reservation
        # picking (and forking) its prefix until it is announced, a request finishing
        # (and maybe joining the cache). So no request finishes between its stages
        # learning of it and its announcement.
        self._cache_lock = threading.Lock()
        self.counters = EngineCounters()
        # Speculative decoding (None: off): each speculable request's drafter, and the
        # length of its K/V after the last pass that verified drafts for it.
        self.drafts = drafts
        self.step_costs = StepCosts()
        self._drafters: dict[str, Drafter] = {}
        self._held: dict[str, int] = {}
        self._windows: dict[str, StepWindow] = {}  # traced requests' steps, by request id
        self._steps = 0  # decode steps run
        self._last_step_end = 0.0
        self._largest_batch = 0  # since the windows last closed
        self._went_round = time.monotonic()  # the loop's last turn (loop_age)
        stage.receiver.on_arrival = self.scheduler.kv_arrived
        self.chain: StageChain | None = None  # set when this worker leads an instance
        self.idle_wait = idle_wait
        self._thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self._thread.start()

    def lead(self, chain: StageChain) -> None:
        """Lead the instance of ``chain``; its members start clean (release everything)."""
        with self._cache_lock:
            self.cache.clear()
            chain.release(Release(reset=True))
            self.chain = chain

    def _pushed_kept_from(self, prompt_tokens: int) -> int:
        """The first position a pushed prompt's sliding layers hold (pushes send only what
        they read again)."""
        return max((self.config.kv_kept_from(layer, prompt_tokens)
                    for layer in self.config.sliding_layers), default=0)

    # --- called from gRPC handlers ----------------------------------------------------

    def reserve(self, request_id: str, prompt_tokens: int, prompt_ids: list[int],
                sampling: SamplingConfig, lease_seconds: float, prefill_locally: bool = False,
                local_below: int = 0, cache_salt: bytes = b"", traceparent: str = ""
                ) -> Reservation:
        """Hold pages for a request and tell every stage of it. Its sequence forks from
        the longest prefix of ``prompt_ids`` (when given) cached under its ``cache_salt``;
        it is prefilled here if ``prefill_locally``, or if at most ``local_below`` of its
        tokens are not cached. Its work here is traced under ``traceparent``."""
        chain = self._leading()
        # Prompt log-probabilities score every position: this worker prefills them all.
        scores = sampling.prompt_logprobs
        prefill_locally = prefill_locally or scores
        self.scheduler.check(request_id, prompt_tokens, prompt_ids, sampling, lease_seconds,
                             prefill_locally)
        if sampling.grammar is not None:  # refused here, before anything is held, if bad
            self.stage.grammars.compile(sampling.grammar)
        if scores and len(chain.stages) > 1:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "prompt log-probabilities "
                               "need a decode instance of one stage")
        if scores or sampling.repetition_penalty != 1.0:  # the sampler reads the prompt
            sampling = dataclasses.replace(sampling, prompt_ids=tuple(prompt_ids))
        with self._cache_lock:
            cached = (self.cache.lookup(prompt_ids, cache_salt) if prompt_ids and not scores
                      else MISS)
            local = prefill_locally or (bool(prompt_ids)
                                        and prompt_tokens - cached.tokens <= local_below)
            self._make_room(self.scheduler.pages_needed(prompt_tokens, sampling, cached),
                            keep=cached.seq_id)
            request = self.scheduler.reserve(request_id, prompt_tokens, prompt_ids, sampling,
                                             lease_seconds, local, cached, cache_salt)
            request.traceparent = traceparent
            self.cache.start(request.seq_id, cached,
                             0 if local else self._pushed_kept_from(prompt_tokens))
            token = b"" if local else secrets.token_bytes(PUSH_TOKEN_BYTES)
            try:
                chain.expect([Expectation(request_id, prompt_tokens - cached.tokens, sampling,
                                          local, request.seq_id, cached.seq_id,
                                          cached.tokens, token)])
            except ServingError as exc:
                self.scheduler.withdraw(request)
                self.cache.forget(request.seq_id)
                chain.release(Release((request.seq_id,), (request_id,)))
                if exc.code is grpc.StatusCode.INVALID_ARGUMENT:  # the request's own fault
                    raise
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "a pipeline stage refused "
                                   f"the request: {exc.message}") from exc
            self.cache.count(len(prompt_ids), cached.tokens)
            self.scheduler.announce(request)
        return Reservation(request.reserved_pages, cached.tokens, local, token)

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        return self.scheduler.abort(request_id, reason)

    def stats(self) -> DecodeStats:
        cache = self.cache.stats()
        return DecodeStats(self.scheduler.stats(), cache, kv_received(self.stage),
                           EngineStats.of(self.stage.runner, cache, self.counters))

    def stop(self) -> None:
        self.scheduler.stop()
        self._thread.join(timeout=10)
        self.stage.receiver.buffers.close()  # its idle assembly buffers
        self.stage.grammars.stop()

    # --- the engine thread ------------------------------------------------------------

    def _leading(self) -> StageChain:
        if self.chain is None:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this decode worker is a member stage; send requests to the "
                               "first stage of its instance")
        return self.chain

    def loop_age(self) -> float:
        """Seconds since the engine loop last went round: a few ms on a healthy worker,
        growing on one whose step hangs (its gRPC threads still answer)."""
        return time.monotonic() - self._went_round

    def _loop(self) -> None:
        while True:
            work = self.scheduler.next_work(self.idle_wait)
            self._went_round = time.monotonic()
            if work is None:
                return
            for request in work.aborts:
                self._finish(request.request_id,
                             TokenOut(None, FinishReason.ABORT, request.abort_reason))
            try:
                self._admit(work.waiting)
                self._step()
            except Exception as exc:  # a failed step must not leave requests hanging
                self._fail_all(f"decode step failed: {exc}")

    def _admit(self, waiting: list[Request]) -> None:
        """Install K/V that has reached every stage (or prefill locally); sample first tokens."""
        pushed = [r for r in waiting if not r.local]
        if pushed:
            ready = set(self.chain.ready([r.request_id for r in pushed]))
            admitted = [r for r in pushed if r.request_id in ready]
            if admitted:
                arrived = {r.request_id: self.stage.receiver.arrived_at(r.request_id)
                           for r in admitted if r.traceparent}
                started = time.perf_counter()
                result = self.chain.install([Admission(r.request_id, r.seq_id)
                                             for r in admitted])
                self._emit(admitted, result.tokens, result.failed, result.logprobs)
                self._trace_first_tokens(admitted, arrived, started, result.failed)
        local = [r for r in waiting if r.local]
        if local:
            # One chunk per loop (chunked prefill): running sequences take a decode step
            # between a long prompt's chunks instead of waiting for all of it.
            prompts = [PromptToPrefill(r.seq_id, r.prompt_ids[r.cached_tokens:], r.request_id,
                                       fork_from=r.cached.seq_id, fork_pos=r.cached_tokens,
                                       done=r.prefilled, traceparent=r.traceparent)
                       for r in local]
            outcome = self.chain.prefill(prompts, self.chunk_size, max_passes=1)
            for request, computed in zip(local, outcome.computed):
                self.scheduler.prefill_chunk(request, computed)
            self.counters.prefilled_tokens += sum(outcome.computed)
            # Those whose prompt ended get their first token; those that failed end too.
            ended = [i for i, (r, p) in enumerate(zip(local, prompts))
                     if r.prefilled == len(p.token_ids) or r.seq_id in outcome.failed]
            self._emit([local[i] for i in ended], [outcome.first_tokens[i] for i in ended],
                       outcome.failed, outcome.logprobs, outcome.prompt_logprobs)
            self._open_windows([local[i] for i in ended])

    def _step(self) -> None:
        running = self.scheduler.running()
        if not running:
            return
        drafts = {r.request_id: self._draft(r) for r in running} if self.drafts else {}
        expected = sum(self._drafters[rid].acceptance * len(d) for rid, d in drafts.items()
                       if d)
        if expected and not self.step_costs.worth(len(running), expected):
            drafts = {}  # not worth a verifying pass this step
        slices = []
        for r in running:
            draft = drafts.get(r.request_id, ())
            slices.append(SequenceSlice(
                r.seq_id, 1 + len(draft), r.prompt_tokens + len(r.generated) + len(draft),
                True, r.request_id, draft=tuple(draft), trim=self._holds_more(r)))
        batch = ForwardBatch(tuple(slices), decode=not any(drafts.values()))
        inputs = np.asarray([t for r in running for t in (r.generated[-1],
                                                          *drafts.get(r.request_id, ()))],
                            dtype=np.int32)
        started = time.perf_counter()
        result = self.chain.forward(batch, inputs)
        ended = time.perf_counter()
        if self.drafts:
            seconds = ended - started
            if batch.decode:
                self.step_costs.decoded(len(running), seconds)
            else:
                self.step_costs.verified(len(running), seconds)
        for r, s in zip(running, slices):
            if s.draft:  # its K/V holds every drafted token now, kept or not
                self._held[r.request_id] = s.total_tokens
                accepted = len(result.more.get(r.seq_id, ()))
                self.counters.drafted_tokens += len(s.draft)
                self.counters.accepted_tokens += accepted
                self._drafters[r.request_id].verified(len(s.draft), accepted)
            else:
                self._held.pop(r.request_id, None)
        self._steps += 1
        self._last_step_end = ended
        self._largest_batch = max(self._largest_batch, len(running))
        self._emit(running, result.tokens, result.failed, result.logprobs, more=result.more,
                   more_logprobs=result.more_logprobs)
        for r in running:
            if r.request_id in self._drafters and r.state is RequestState.RUNNING:
                self._drafters[r.request_id].extend(r.generated[-1 - len(
                    result.more.get(r.seq_id, ())):])
        if self._windows and self._steps % STEPS_PER_SPAN == 0:
            for window in list(self._windows.values()):
                self._end_window(window.request)
                self._open_windows([window.request], ended)
            self._largest_batch = 0

    def _trace_first_tokens(self, admitted: Sequence[Request], arrived: dict[str, float | None],
                            started: float, failed: dict[int, str]) -> None:
        """A span per traced request admitted with pushed K/V: from its last piece (the
        wait for the loop's turn included) through installing it and sampling its first
        token from the pushed hidden state."""
        now = time.perf_counter()
        for r in admitted:
            if r.traceparent:
                since = min(arrived.get(r.request_id) or started, started)
                tracing.span_between("decode.first_token", r.traceparent, since, now, {
                    "olmo.waited_ms": 1000 * (started - since),
                    "olmo.batch_size": len(admitted)}, error=failed.get(r.seq_id))
        self._open_windows(admitted, now)

    def _open_windows(self, requests: Sequence[Request], at: float | None = None) -> None:
        """Start counting the decode steps of those traced requests that now run."""
        for r in requests:
            if r.traceparent and r.state is RequestState.RUNNING:
                self._windows[r.request_id] = StepWindow(
                    r, at or time.perf_counter(), self._steps, len(r.generated))

    def _end_window(self, request: Request, error: str = "") -> None:
        """A span of the request's steps since its window opened (none if it took none)."""
        window = self._windows.pop(request.request_id, None)
        steps = self._steps - window.steps_before if window is not None else 0
        if steps:
            tracing.span_between("decode.steps", request.traceparent, window.started,
                                 self._last_step_end, {
                                     "olmo.steps": steps,
                                     "olmo.tokens": len(request.generated) - window.tokens_before,
                                     "olmo.largest_batch": self._largest_batch},
                                 error=error)

    def _draft(self, request: Request) -> list[int]:
        """Tokens to verify after the request's next one (none if it cannot take any)."""
        if not request.sampling.speculable:
            return []
        drafter = self._drafters.get(request.request_id)
        if drafter is None:
            drafter = self._drafters[request.request_id] = Drafter(
                self.drafts, request.prompt_ids + request.generated)
        # A step makes the next token besides the drafts: all within max_tokens and the
        # context window.
        room = min(request.sampling.max_tokens - len(request.generated),
                   self.config.context_window_size - request.prompt_tokens
                   - len(request.generated)) - 1
        return drafter.propose(room)

    def _holds_more(self, request: Request) -> bool:
        """Whether the request's K/V holds tokens past what it has kept (drafts rejected,
        or tokens past where it finished): the last token generated is not in it yet."""
        kept = request.prompt_tokens + len(request.generated) - 1
        return self._held.get(request.request_id, kept) > kept

    def _emit(self, requests: Sequence[Request], tokens: Sequence[int],
              failed: dict[int, str], logprobs: dict[int, TokenLogprobs],
              prompt_logprobs: dict[int, list[TokenLogprobs]] | None = None,
              more: dict[int, list[int]] | None = None,
              more_logprobs: dict[int, list[TokenLogprobs]] | None = None) -> None:
        """Each request's new token (and, after a verified draft, the ``more`` that
        follow it, with their ``more_logprobs``, until one finishes it); one that could
        not be sampled ends alone, with INTERNAL."""
        sampled = []
        for request, token in zip(requests, tokens):
            if request.seq_id in failed:
                self._finish(request.request_id,
                             TokenOut(None, FinishReason.ERROR, failed[request.seq_id],
                                      grpc.StatusCode.INTERNAL))
            else:
                sampled.append((request, token))
        for (request, token), reason in zip(sampled, self.scheduler.append(sampled)):
            event = TokenOut(token, reason, logprobs=logprobs.get(request.seq_id),
                             prompt_logprobs=tuple((prompt_logprobs or {}).get(
                                 request.seq_id, ())))
            extras = (more or {}).get(request.seq_id, ()) if not reason else ()
            scores = (more_logprobs or {}).get(request.seq_id) or [None] * len(extras)
            for extra, score in zip(extras, scores):
                request.events.put(event)
                reason = self.scheduler.append([(request, extra)])[0]
                event = TokenOut(extra, reason, logprobs=score)
                if reason:
                    break
            if reason:
                self._finish(request.request_id, event)
            else:
                request.events.put(event)

    def _finish(self, request_id: str, event: TokenOut) -> None:
        """Free the request on every stage (its sequence may stay, cached), then send its
        final event."""
        with self._cache_lock:
            request = self.scheduler.finish(request_id)
            if request is None:
                return
            try:
                # A failed request's K/V may be incomplete: it is never cached.
                # Nor is one whose K/V holds tokens it did not keep (verified drafts).
                tokens = (None if event.finish_reason is FinishReason.ERROR
                          or self._holds_more(request) else request.kv_tokens())
                self._held.pop(request_id, None)
                self._drafters.pop(request_id, None)
                self._end_window(request, event.error if event.finish_reason.failed else "")
                freed = self.cache.finish(request.seq_id, tokens, request.cache_salt)
                self.chain.release(Release(tuple(freed), (request.request_id,)))
            finally:
                request.events.put(event)

    def _make_room(self, pages: int, keep: int | None) -> None:
        """Evict cached prefixes (least recently used first, never ``keep``) until
        ``pages`` pages are free, or none is left to evict."""
        shortfall = self.scheduler.shortfall(pages)
        if shortfall:
            evicted = self.cache.evict(shortfall, keep=(keep,))
            if evicted:
                self.chain.release(Release(tuple(evicted)))

    def _fail_all(self, message: str) -> None:
        for request_id in self.scheduler.request_ids():
            try:
                self._finish(request_id, TokenOut(None, FinishReason.ERROR, message))
            except Exception:  # a stage may be gone; still tell every client
                pass
        with self._cache_lock:  # what a failed step left cached is not to be trusted
            try:
                self.chain.release(Release(tuple(self.cache.clear())))
            except Exception:
                pass
