"""Running an operation through an instance's stages: the one place that does it.

The leader holds its instance as a ``StageChain``: its own stage first, then the others
in layer order. Each operation runs on every stage in turn, and a forward pass feeds
each stage the previous one's output. A one-stage instance is a chain of its own stage
alone, so its operations are plain method calls with nothing serialized.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence

import grpc
import numpy as np

from olmo_model.runtime import Piece, plan_chunks
from protos import tracing
from protos.errors import ServingError
from protos.layout import layout_mismatch

from .ops import (
    Admission,
    Expectation,
    ForwardBatch,
    ForwardResult,
    Release,
    SequenceSlice,
    StageAddress,
    TokenLogprobs,
)
from .stage import ReceivingStage, Stage


@dataclasses.dataclass(frozen=True)
class PromptToPrefill:
    """A new sequence to prefill through the chain: ``token_ids`` are what it computes,
    after the ``fork_pos`` tokens it shares with cached sequence ``fork_from``."""

    seq_id: int
    token_ids: Sequence[int]
    request_id: str = ""
    kv_targets: tuple[StageAddress, ...] = ()  # prefill role: where its K/V goes
    fork_from: int | None = None
    fork_pos: int = 0
    push_from: int = 0  # prefill role: the decode side holds the tokens before this
    push_attempt: int = 0  # prefill role: the leg's try, which its pushes carry
    push_token: bytes = b""  # prefill role: the decode reservation's, which its pushes carry
    done: int = 0       # of ``token_ids``, those earlier passes computed already
    traceparent: str = ""  # the request's trace context: its passes are spans under it

    @property
    def remaining(self) -> Sequence[int]:
        return self.token_ids[self.done:]


@dataclasses.dataclass
class PrefillOutcome:
    """First tokens by prompt (sampled only where the last stage samples, and only for
    prompts that ended); the rest as in ForwardResult, by sequence id (failed, logprobs)
    or request id (push failures)."""

    first_tokens: list[int | None]
    computed: list[int]  # tokens of each prompt computed by this call
    failed: dict[int, str]
    logprobs: dict[int, TokenLogprobs]
    push_failures: dict[str, ServingError]
    prompt_logprobs: dict[int, list[TokenLogprobs]] = dataclasses.field(default_factory=dict)


class StageChain:
    def __init__(self, stages: Sequence[Stage], addresses: Sequence[StageAddress]):
        if len(stages) != len(addresses):
            raise ValueError(f"{len(stages)} stages but {len(addresses)} addresses")
        self.stages = list(stages)
        self.addresses = list(addresses)

    @classmethod
    def form(cls, leader: Stage, leader_address: str,
             members: Sequence[tuple[str, Stage]] = ()) -> StageChain:
        """The chain of ``leader`` and its ``(address, stage)`` members, in layer order,
        checked to serve one model and to cover every layer exactly once."""
        ours = leader.layout()
        addresses = [StageAddress(leader_address, ours.layer_begin, ours.layer_end)]
        for address, member in members:
            theirs = member.layout()
            reason = layout_mismatch(ours, theirs)
            if reason:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"pipeline stage {address} serves another model: {reason}")
            addresses.append(StageAddress(address, theirs.layer_begin, theirs.layer_end))
        check_coverage(addresses, ours.num_layers)
        return cls([leader, *(stage for _, stage in members)], addresses)

    @property
    def staged(self) -> bool:
        return len(self.stages) > 1

    # --- every stage ------------------------------------------------------------------

    def forward(self, batch: ForwardBatch, inputs: np.ndarray,
                stage_ends: list[float] | None = None) -> ForwardResult:
        """Token ids in; the last stage's result out, with every stage's push failures and
        the sequences any stage could not step (each fails alone). ``stage_ends``: gets
        the perf_counter time each stage finished."""
        failures: dict[str, ServingError] = {}
        failed: dict[int, str] = {}
        for stage in self.stages:
            result = stage.forward(batch, inputs)
            if stage_ends is not None:
                stage_ends.append(time.perf_counter())
            failures.update(result.push_failures)
            failed.update(result.failed)
            inputs = result.hidden
        result.push_failures, result.failed = failures, failed
        return result

    def prefill(self, prompts: Sequence[PromptToPrefill], chunk_size: int,
                max_passes: int | None = None) -> PrefillOutcome:
        """The prompts' remaining tokens through the chain in passes of at most
        ``chunk_size`` tokens; with ``max_passes``, stop after that many (the caller
        resumes from ``computed``)."""
        first: dict[int, int] = {}
        computed = [0] * len(prompts)
        failed: dict[int, str] = {}
        logprobs: dict[int, TokenLogprobs] = {}
        failures: dict[str, ServingError] = {}
        scored: dict[int, list[TokenLogprobs]] = {}
        chunks = plan_chunks([p.remaining for p in prompts], chunk_size)
        for chunk in itertools.islice(chunks, max_passes):
            slices = tuple(self._slice(prompts[c.index], c) for c in chunk.pieces)
            started = time.perf_counter()
            stage_ends = [] if tracing.enabled() else None
            result = self.forward(ForwardBatch(slices), chunk.token_ids, stage_ends)
            if stage_ends:
                self._trace_pass(slices, started, stage_ends, result.failed)
            failures.update(result.push_failures)
            failed.update(result.failed)
            logprobs.update(result.logprobs)
            scored.update(result.prompt_logprobs)
            first.update(zip([c.index for c in chunk.pieces if c.ends], result.tokens))
            for piece in chunk.pieces:
                computed[piece.index] += piece.length
        return PrefillOutcome([first.get(i) for i in range(len(prompts))], computed, failed,
                              logprobs, failures, scored)

    def _trace_pass(self, slices: Sequence[SequenceSlice], started: float,
                    stage_ends: Sequence[float], failed: dict[int, str]) -> None:
        """Each traced request's share of a prefill pass: a span under its request (with
        one per stage, when there are several), timed as the pass was."""
        tokens = sum(s.length for s in slices)
        for s in slices:
            if not s.traceparent:
                continue
            span = tracing.span_between("prefill.pass", s.traceparent, started, stage_ends[-1], {
                "olmo.tokens": s.length, "olmo.prefilled_to": s.total_tokens,
                "olmo.batch_tokens": tokens, "olmo.batch_size": len(slices)},
                error=failed.get(s.seq_id))
            if self.staged:
                for address, begin, end in zip(self.addresses, [started, *stage_ends],
                                               stage_ends):
                    tracing.span_between("stage.forward", span, begin, end, {
                        "olmo.stage": address.address,
                        "olmo.layers": f"[{address.layer_begin}, {address.layer_end})"})

    @staticmethod
    def _slice(prompt: PromptToPrefill, piece: Piece) -> SequenceSlice:
        return SequenceSlice(seq_id=prompt.seq_id, length=piece.length,
                             total_tokens=prompt.fork_pos + prompt.done + piece.end,
                             ends_prompt=piece.ends,
                             request_id=prompt.request_id, kv_targets=prompt.kv_targets,
                             fork_from=prompt.fork_from, fork_pos=prompt.fork_pos,
                             push_from=prompt.push_from, push_attempt=prompt.push_attempt,
                             push_token=prompt.push_token,
                             prompt_tokens=prompt.fork_pos + len(prompt.token_ids),
                             traceparent=prompt.traceparent)

    def release(self, release: Release) -> None:
        """Every stage frees what it can: a stage that is gone must not keep the others
        from freeing their pages."""
        for stage in self.stages:
            try:
                stage.release(release)
            except ServingError:
                pass  # a dead stage has nothing left to free

    # --- decode stages ----------------------------------------------------------------

    def expect(self, expectations: Sequence[Expectation]) -> None:
        for stage in self._decode_stages():
            stage.expect(expectations)

    def ready(self, request_ids: Sequence[str]) -> list[str]:
        """Requests whose K/V has reached every stage."""
        ready = list(request_ids)
        for stage in self._decode_stages():
            if not ready:
                break
            ready = stage.ready(ready)
        return ready

    def install(self, admissions: Sequence[Admission]) -> ForwardResult:
        """Install on every stage; the last one's sampled first tokens, and every
        admission that failed on any stage (each fails alone)."""
        result, failed = ForwardResult(), {}
        for stage in self._decode_stages():
            result = stage.install(admissions)
            failed.update(result.failed)
        result.failed = failed
        return result

    def _decode_stages(self) -> list[ReceivingStage]:
        return self.stages  # type: ignore[return-value]  # a decode instance's chain


def check_coverage(stages: Sequence[StageAddress], num_layers: int) -> None:
    """Stages must cover layers 0..num_layers contiguously, in order."""
    bounds = [(s.layer_begin, s.layer_end) for s in stages]
    edge = 0
    for begin, end in bounds:
        if begin != edge:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"pipeline stages {bounds} do not cover layers 0..{num_layers} "
                               "in order")
        edge = end
    if edge != num_layers:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"pipeline stages {bounds} stop at layer {edge} of {num_layers}")
