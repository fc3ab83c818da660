"""This worker's stage of a decode instance: its layers, its KV cache, its part of each step.

The instance's leader runs the same operations on every stage (``pipeline.StageChain``):
expect a request, report which requests have all their K/V here, install that K/V as
sequences, forward a batch, release sequences. The stage that owns the LM head also
holds each sequence's sampler and turns hidden states into tokens.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np

from kv_transfer.codec import model_layout
from olmo_model.runtime import ModelRunner
from pipeline.ops import (
    Admission,
    Expectation,
    ForwardBatch,
    ForwardResult,
    Release,
    SequenceSlice,
)
from pipeline.stage import embed_checked, start_sequence
from protos import worker_pb2
from protos.errors import ServingError

from .grammar import GrammarCompiler, GrammarState, constrain
from .receiver import KVReceiver, PendingKV
from .sampler import NON_FINITE, Sampler, finite_rows

# Prompt positions scored at once: a block's logits are its rows times the vocabulary.
SCORE_ROWS = 64
OFF_GRAMMAR = "the sampled token does not follow the request's grammar"

if TYPE_CHECKING:
    import tvm


@dataclasses.dataclass(frozen=True)
class _Start:
    """A request's sequence to start, and (last stage) the sampler it will have."""
    expectation: Expectation
    sampler: Sampler | None


class DecodeStage:
    def __init__(self, runner: ModelRunner, accepts_shared: bool = True):
        self.runner = runner
        self.spec = runner.stage
        self._layout = model_layout(runner)
        self.receiver = KVReceiver(self._layout, self.spec, accepts_shared=accepts_shared,
                                   kept_from=runner.config.kv_kept_from)
        self.samplers: dict[int, Sampler] = {}  # by sequence id (the last stage only)
        # Structured output: the last stage's samplers follow grammars; the instance's
        # leader compiles each first, to refuse a bad one before anything is reserved.
        self.grammars = GrammarCompiler(runner.model_dir, runner.config.vocab_size,
                                        runner.config.eos_token_id)
        self.sequences: set[int] = set()  # running, reserved or cached
        self._seq_of_request: dict[str, int] = {}
        self.install_seconds = 0.0  # writing received K/V into the pages
        self._lock = threading.RLock()  # held through every pass and change of the cache
        # Expectations and releases arrive on gRPC threads while a pass may hold the lock
        # for seconds (a long prefill chunk of a big model): they queue here, in order,
        # and take effect when the lock is next taken, so a reservation is answered at
        # once. The receiver's part of each happens at once, in the same order.
        self._queue_lock = threading.Lock()
        self._queued: list[_Start | Release] = []
        self._starting: set[int] = set()  # sequences queued to start
        self._failed_starts: dict[int, str] = {}  # sequences that could not start, why

    def layout(self) -> worker_pb2.ModelLayout:
        return self._layout

    # --- requests and their KV --------------------------------------------------------

    def expect(self, expectations: Sequence[Expectation]) -> None:
        """Start each request's sequence (a fork of its cached prefix, or empty) before
        anything that follows it, so that the prefix cannot be evicted before the rest
        arrives or is prefilled; pushes for it are accepted from now."""
        # Grammars compile before anything is queued: a decode step never waits for one.
        grammars = {e.seq_id: self._grammar_state(e) for e in expectations
                    if self.spec.is_last and e.sampling.grammar is not None}
        starts = [_Start(e, Sampler(e.sampling, self.runner.config.eos_token_id,
                                    grammars.get(e.seq_id)) if self.spec.is_last else None)
                  for e in expectations]
        with self._queue_lock:
            for e in expectations:
                self._check_new(e.seq_id)
            for start in starts:
                e = start.expectation
                self._starting.add(e.seq_id)
                if not e.local:
                    self.receiver.expect(e.request_id, e.prompt_tokens, e.fork_pos,
                                         e.push_token)
            self._queued.extend(starts)
        self._apply_if_idle()
        refused = [e for e in expectations if e.seq_id in self._failed_starts]
        if refused:  # started at once (no pass was running), and refused
            reasons = [self._failed_starts[e.seq_id] for e in refused]
            self.release(Release(tuple(e.seq_id for e in refused),
                                 tuple(e.request_id for e in refused)))
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, "; ".join(reasons))

    def _grammar_state(self, e: Expectation) -> GrammarState:
        """The request's sequence at the start of its grammar, past any output it had
        before a resume; the grammar ends on EOS or one of the request's stop tokens."""
        s = e.sampling
        return self.grammars.start(self.grammars.compile(s.grammar),
                                   {*s.stop_token_ids, *self.runner.config.eos_token_id},
                                   s.prior_output_ids)

    def ready(self, request_ids: Sequence[str]) -> list[str]:
        return self.receiver.ready(request_ids)

    def install(self, admissions: Sequence[Admission]) -> ForwardResult:
        """Install each request's K/V as its sequence; the last stage samples first tokens
        (one per admission, in order). One that cannot be installed fails alone, in the
        result's ``failed``: the others are installed and sampled all the same."""
        failed: dict[int, str] = {}
        hidden: dict[int, np.ndarray] = {}
        with self._lock:
            self._apply_queued()
            for a in admissions:
                try:
                    hidden[a.seq_id] = self._install(a).hidden
                except Exception as exc:  # its K/V gone, no page for it: it alone fails
                    failed[a.seq_id] = f"installing its K/V failed: {exc}"
            if not self.spec.is_last:
                return ForwardResult(failed=failed)
            return self._sample_survivors([a.seq_id for a in admissions], hidden, failed)

    def _install(self, admission: Admission) -> PendingKV:
        """One request's received K/V into its sequence (with the lock held); what was
        received, its buffer back in the pool."""
        if admission.seq_id not in self.sequences:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, self._failed_starts.get(
                admission.seq_id, f"sequence {admission.seq_id} was never expected here"))
        pending = self.receiver.take(admission.request_id)
        start = time.perf_counter()
        try:
            self.runner.import_kv(admission.seq_id, self.receiver.snapshot(pending))
        finally:
            self.receiver.recycle(pending)
            self.install_seconds += time.perf_counter() - start
        return pending

    def release(self, release: Release) -> None:
        with self._queue_lock:
            if release.reset:
                self.receiver.clear()
            else:
                self.receiver.drop(release.request_ids)
            self._queued.append(release)
        self._apply_if_idle()

    # --- the queue of starts and releases -------------------------------------------------

    def _apply_if_idle(self) -> None:
        """Apply what is queued now unless a pass holds the lock (it applies it next)."""
        if self._lock.acquire(blocking=False):
            try:
                self._apply_queued()
            finally:
                self._lock.release()

    def _apply_queued(self) -> None:
        """Start and release sequences in the order asked (with the lock held)."""
        with self._queue_lock:
            queued, self._queued = self._queued, []
        for op in queued:
            if isinstance(op, Release):
                self._release(op)
            else:
                self._start(op)

    def _start(self, start: _Start) -> None:
        e = start.expectation
        try:
            start_sequence(self.runner, self.sequences, e.seq_id, e.fork_from, e.fork_pos)
        except Exception as exc:  # the request fails when its sequence is next used
            self._failed_starts[e.seq_id] = f"sequence {e.seq_id} could not start: {exc}"
            return
        finally:
            self._starting.discard(e.seq_id)
        self._seq_of_request[e.request_id] = e.seq_id
        if start.sampler is not None:
            self.samplers[e.seq_id] = start.sampler

    def _release(self, release: Release) -> None:
        seq_ids = sorted(self.sequences) if release.reset else release.seq_ids
        for seq_id in seq_ids:
            if seq_id in self.sequences:
                self.sequences.discard(seq_id)
                self.runner.remove_sequence(seq_id)
            self.samplers.pop(seq_id, None)
            self._failed_starts.pop(seq_id, None)
        if release.reset:
            self._seq_of_request.clear()
            self._failed_starts.clear()
            return
        for request_id in release.request_ids:
            self.samplers.pop(self._seq_of_request.pop(request_id, None), None)

    # --- forward passes ---------------------------------------------------------------

    def forward(self, batch: ForwardBatch, inputs: np.ndarray) -> ForwardResult:
        """This stage's layers over a batch of its sequences (decode steps, or prefill
        chunks of sequences the instance prefills itself); the last stage samples the
        sequences whose prompt ends in the pass."""
        seq_ids = [s.seq_id for s in batch.slices]
        lengths = [s.length for s in batch.slices]
        with self._lock:
            self._apply_queued()
            unknown = set(seq_ids) - self.sequences
            if unknown:
                reasons = [self._failed_starts.get(i, f"sequence {i} is not on this stage")
                           for i in sorted(unknown)]
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, "; ".join(reasons))
            if batch.decode and any(n != 1 for n in lengths):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "a decode step is one token per sequence")
            for s in batch.slices:
                if s.trim:  # drafts rejected last step: their K/V goes
                    self.runner.truncate_sequence(s.seq_id, s.total_tokens - s.length)
            hidden = embed_checked(self.runner, inputs) if self.spec.is_first else inputs
            try:
                out = self.runner.forward(seq_ids, lengths, hidden, decode=batch.decode)
            except Exception:
                return self._one_by_one(batch, hidden)
            if not self.spec.is_last:
                return ForwardResult(hidden=out.numpy())
            if batch.decode:
                # Each sequence's one token is its last: the output is already the last
                # hidden states, and stays on the device for the logits.
                return self._sample(seq_ids, out)
            if batch.verifies:
                return self._verify(batch.slices, out.numpy())
            last = self.runner.select_last(out, lengths).numpy()
            self._score_prompts(batch.slices, out)
            rows = [i for i, s in enumerate(batch.slices) if s.ends_prompt]
            return self._sample([seq_ids[i] for i in rows], last[rows])

    def _one_by_one(self, batch: ForwardBatch, hidden) -> ForwardResult:
        """A pass that failed (with the lock held), undone and run again a sequence at a
        time, so that one that cannot go on (no page for it, say) fails alone and the
        others go on."""
        self._undo(batch.slices)
        rows = hidden if isinstance(hidden, np.ndarray) else hidden.numpy()
        outs: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        what = "decode step" if batch.decode else "prefill chunk"
        begin = 0
        for s in batch.slices:
            try:
                outs[s.seq_id] = self.runner.forward(
                    [s.seq_id], [s.length], rows[begin:begin + s.length],
                    decode=batch.decode).numpy()
            except Exception as exc:  # this one alone cannot go on
                self._undo([s])
                failed[s.seq_id] = f"its {what} failed: {exc}"
            begin += s.length
        if not self.spec.is_last:  # the next stages run the failed ones on zeros
            out = np.zeros((begin, self.runner.config.hidden_size), rows.dtype)
            begin = 0
            for s in batch.slices:
                if s.seq_id in outs:
                    out[begin:begin + s.length] = outs[s.seq_id]
                begin += s.length
            return ForwardResult(hidden=out, failed=failed)
        if batch.verifies:
            ok = [s for s in batch.slices if s.seq_id in outs]
            verified = (self._verify(ok, np.concatenate([outs[s.seq_id] for s in ok]))
                        if ok else ForwardResult())
            tokens = iter(verified.tokens)
            return ForwardResult(
                tokens=[0 if s.seq_id in failed else next(tokens) for s in batch.slices],
                failed={**failed, **verified.failed}, logprobs=verified.logprobs,
                more=verified.more, more_logprobs=verified.more_logprobs)
        if not batch.decode:
            for s in batch.slices:
                if s.seq_id in outs:
                    self._score_prompts([s], outs[s.seq_id])
        ending = [s.seq_id for s in batch.slices if s.ends_prompt]
        return self._sample_survivors(ending, {q: out[-1] for q, out in outs.items()}, failed)

    def _score_prompts(self, slices: Sequence[SequenceSlice], out) -> None:
        """The prompt log-probabilities of the slices whose requests asked for them, from
        the pass's output rows (``[total, hidden]``, the slices' rows in order), a block
        of positions at a time: a block's logits are its rows times the vocabulary."""
        scoring = {s.seq_id for s in slices if s.seq_id in self.samplers
                   and self.samplers[s.seq_id].config.prompt_logprobs}
        if not scoring:
            return
        rows = out if isinstance(out, np.ndarray) else out.numpy()
        begin = 0
        for s in slices:
            if s.seq_id in scoring:
                sampler, position = self.samplers[s.seq_id], s.total_tokens - s.length
                for at in range(0, s.length, SCORE_ROWS):
                    block = rows[begin + at:begin + min(s.length, at + SCORE_ROWS)]
                    sampler.score_prompt(position + at, self.runner.logits(block))
            begin += s.length

    def _sample_survivors(self, seq_ids: Sequence[int], hidden: dict[int, np.ndarray],
                          failed: dict[int, str]) -> ForwardResult:
        """A token for each of ``seq_ids`` that did not fail (sampled from its row of
        ``hidden``), a placeholder for each that did, in order; ``failed`` joins those
        that cannot be sampled."""
        survivors = [q for q in seq_ids if q not in failed]
        sampled = (self._sample(survivors, np.stack([hidden[q] for q in survivors]))
                   if survivors else ForwardResult())
        tokens = iter(sampled.tokens)
        return ForwardResult(tokens=[0 if q in failed else next(tokens) for q in seq_ids],
                             failed={**failed, **sampled.failed}, logprobs=sampled.logprobs)

    def _undo(self, slices) -> None:
        """Take back what a failed pass may have appended to these sequences."""
        for s in slices:
            self.runner.truncate_sequence(s.seq_id, s.total_tokens - s.length)

    def _verify(self, slices: Sequence[SequenceSlice], rows: np.ndarray) -> ForwardResult:
        """A decode step whose sequences may carry drafts (``rows``: the pass's output,
        ``[tokens, hidden]``, the slices' rows in order). A sequence without one is
        sampled as in any step. One with a draft gets the drafted tokens its sampler keeps,
        then one of its own (``Sampler.verify``): in ``tokens`` the first, in ``more`` the
        rest. What it computed past those stays in its K/V until the next step trims it."""
        take, first_row, begin = [], [], 0  # the rows whose logits count; each slice's first
        for s in slices:
            first_row.append(len(take))
            take += range(begin, begin + s.length) if s.draft else [begin + s.length - 1]
            begin += s.length
        logits = self.runner.logits(rows[take])
        plain = [k for k, s in enumerate(slices) if not s.draft]
        sampled = self._sample_logits([slices[k].seq_id for k in plain],
                                      logits[[first_row[k] for k in plain]])
        result = ForwardResult(failed=sampled.failed, logprobs=sampled.logprobs)
        plain_tokens = iter(sampled.tokens)
        for s, row in zip(slices, first_row):
            if not s.draft:
                result.tokens.append(next(plain_tokens))
                continue
            block = logits[row:row + s.length]
            if not np.isfinite(block).all():
                result.tokens.append(0)
                result.failed[s.seq_id] = NON_FINITE
                continue
            sampler = self.samplers[s.seq_id]
            tokens, ok = sampler.verify(block, s.draft)
            if not ok:
                result.failed[s.seq_id] = OFF_GRAMMAR
            result.tokens.append(tokens[0])
            scores = ([sampler.logprobs(row, token) for row, token in zip(block, tokens)]
                      if sampler.reports_logprobs else [])
            if scores:
                result.logprobs[s.seq_id] = scores[0]
            if len(tokens) > 1:
                result.more[s.seq_id] = tokens[1:]
                if scores:
                    result.more_logprobs[s.seq_id] = scores[1:]
        return result

    def _sample(self, seq_ids: Sequence[int], hidden: np.ndarray | tvm.runtime.Tensor
                ) -> ForwardResult:
        """One token per sequence; a sequence that cannot be sampled fails alone."""
        if not seq_ids:
            return ForwardResult()
        return self._sample_logits(seq_ids, self.runner.logits(hidden))

    def _sample_logits(self, seq_ids: Sequence[int], logits: np.ndarray) -> ForwardResult:
        """One token per sequence from its row of ``logits``."""
        result = ForwardResult()
        if not seq_ids:
            return result
        samplers = [self.samplers[seq_id] for seq_id in seq_ids]
        # The checks and the greedy choices of the whole batch, each in one numpy pass.
        finite = finite_rows(logits).tolist()
        greedy = np.argmax(logits, axis=1).tolist()
        grammars = {i: s.grammar for i, s in enumerate(samplers)
                    if s.grammar is not None and finite[i]}
        raw = {}  # rows as the model gave them, for log-probabilities under the model
        if grammars:
            raw = {i: logits[i].copy() for i in grammars if samplers[i].reports_logprobs}
            picks = constrain(logits, grammars, {
                i: greedy[i] for i in grammars if samplers[i].plain_greedy})
            for i, token in picks.items():
                greedy[i] = token
        for i, (seq_id, sampler, row) in enumerate(zip(seq_ids, samplers, logits)):
            if not finite[i]:
                result.tokens.append(0)
                result.failed[seq_id] = NON_FINITE
                continue
            token = greedy[i] if sampler.plain_greedy else sampler.sample(row)
            if sampler.config.prompt_logprobs and not sampler.sampled:  # its first token
                result.prompt_logprobs[seq_id] = sampler.take_prompt_scores()
            if not sampler.record(token):
                result.failed[seq_id] = OFF_GRAMMAR
            result.tokens.append(token)
            logprobs = sampler.logprobs(raw.get(i, row), token)
            if logprobs is not None:
                result.logprobs[seq_id] = logprobs
        return result

    def _check_new(self, seq_id: int) -> None:
        if seq_id in self.sequences or seq_id in self._starting:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"sequence {seq_id} is already on this stage")
