"""The operations a stage performs, as the dataclasses every stage speaks in-process."""

from __future__ import annotations

import dataclasses
import math

import grpc
import numpy as np

from protos.errors import ServingError
from protos.sampling import MAX_TOP_LOGPROBS, controls_problem, grammar_problem
from protos.vocabulary import GrammarKind

# Request ids on workers are the router's (32 hex digits); anything longer is refused.
MAX_REQUEST_ID_CHARS = 128
MAX_CACHE_SALT_BYTES = 64  # the router sends a 16-byte digest of the client's salt


def checked_cache_salt(salt: bytes) -> bytes:
    """A request's prefix-cache salt, refused (INVALID_ARGUMENT) when too long."""
    if len(salt) > MAX_CACHE_SALT_BYTES:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"a cache salt has at most {MAX_CACHE_SALT_BYTES} bytes")
    return salt


@dataclasses.dataclass(frozen=True)
class OutputGrammar:
    """What a request's output must follow (generation.proto's StructuredOutput)."""

    kind: GrammarKind
    source: str = ""                # the JSON schema, regex or EBNF text
    choices: tuple[str, ...] = ()   # a choice's options

    def problem(self) -> str | None:
        return grammar_problem(self.kind, self.source, self.choices)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the last decode stage samples a request's tokens."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False      # report each sampled token's log-probability
    top_logprobs: int = 0       # ... and this many most likely alternatives
    # generation.proto's SamplingParams says how each of these applies.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    prompt_ids: tuple[int, ...] = ()  # the prompt, for a control that needs it
    prior_output_ids: tuple[int, ...] = ()    # output before a resume, for the penalties
    prompt_logprobs: bool = False  # score the prompt (each next token), with the first token
    grammar: OutputGrammar | None = None  # structured output: every token follows it
    no_speculation: bool = False  # never verify drafts for it (a per-request opt-out)

    @property
    def speculable(self) -> bool:
        """Whether drafts can be verified for it in one pass: it samples from the logits as
        they are or masked by a grammar (no bias, penalty or min_tokens, which each drafted
        token would change for the next), and has not opted out."""
        return (not self.logit_bias and not self.presence_penalty
                and not self.frequency_penalty and self.repetition_penalty == 1.0
                and not self.min_tokens and not self.no_speculation)

    def problem(self, vocab_size: int) -> str | None:
        """What makes this config unusable for a model of ``vocab_size`` tokens, or None."""
        if self.max_tokens < 1:
            return "max_tokens must be at least 1"
        if not math.isfinite(self.temperature) or self.temperature < 0:
            return f"temperature must be a finite number >= 0, got {self.temperature}"
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1], got {self.top_p}"
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            return f"stop token id {bad[0]} is outside the vocabulary of {vocab_size}"
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            return f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
        problem = controls_problem(self.presence_penalty, self.frequency_penalty,
                                   self.repetition_penalty, dict(self.logit_bias),
                                   self.min_tokens, self.max_tokens, vocab_size)
        if problem:
            return problem[1]
        if self.grammar is not None:
            if self.ignore_eos:
                return "ignore_eos cannot be used with a structured output (its end is EOS)"
            return self.grammar.problem()
        return None


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model, and the likeliest alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), likeliest first
    rank: int = 1  # 1 + how many tokens the model found likelier


@dataclasses.dataclass(frozen=True)
class StageAddress:
    """Where one stage of an instance serves, and the layers it owns: [layer_begin, layer_end)."""

    address: str
    layer_begin: int
    layer_end: int

    def overlap(self, begin: int, end: int) -> tuple[int, int] | None:
        """The part of layers [begin, end) this stage owns, or None."""
        lo, hi = max(begin, self.layer_begin), min(end, self.layer_end)
        return (lo, hi) if lo < hi else None


@dataclasses.dataclass(frozen=True)
class SequenceSlice:
    """One sequence's share of a forward pass."""

    seq_id: int
    length: int                 # tokens of this sequence in this pass
    total_tokens: int           # the sequence's length after this pass
    ends_prompt: bool = True    # this pass holds its last prompt token (decode steps: always)
    request_id: str = ""
    # Prefill: the decode instance's stages, where the sequence's K/V goes as it is computed.
    kv_targets: tuple[StageAddress, ...] = ()
    # The sequence starts as a fork of cached sequence ``fork_from``'s first ``fork_pos``
    # tokens (their pages shared); the pass then computes only what follows.
    fork_from: int | None = None
    fork_pos: int = 0
    push_from: int = 0          # prefill: push the K/V of positions from here on
    push_attempt: int = 0       # prefill: the leg's try, which its pushes carry
    push_token: bytes = b""     # prefill: the decode reservation's, which its pushes carry
    # Decode: tokens drafted after the slice's first, verified by the pass (its length is
    # 1 + len(draft)); ``trim``: drop K/V the sequence holds past the slice's start (drafts
    # rejected last step) before the pass.
    draft: tuple[int, ...] = ()
    trim: bool = False
    prompt_tokens: int = 0      # prefill: the whole prompt's length (0: not known)
    traceparent: str = ""       # the request's trace context (protos/tracing.py), if traced

    @property
    def starts_sequence(self) -> bool:
        """This pass holds the sequence's first computed token."""
        return self.total_tokens - self.length == self.fork_pos


@dataclasses.dataclass(frozen=True)
class ForwardBatch:
    """A ragged batch for one forward pass: the first stage gets token ids as its inputs,
    every later stage the previous stage's hidden states."""

    slices: tuple[SequenceSlice, ...]
    decode: bool = False        # a decode step (else a prefill pass)

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.slices)

    @property
    def verifies(self) -> bool:
        """A decode step that verifies drafts (run as a pass over several tokens each)."""
        return not self.decode and any(s.draft for s in self.slices)


@dataclasses.dataclass
class ForwardResult:
    """What a stage gives back from a forward pass."""

    hidden: np.ndarray | None = None   # stages before the last: input to the next stage
    # The last decode stage: one token per sampled sequence (per slice that ends its
    # prompt, or per admission). Any stage: those it could not step, install or sample,
    # by sequence id: each fails alone, and its entry in ``tokens`` is a placeholder.
    tokens: list[int] = dataclasses.field(default_factory=list)
    failed: dict[int, str] = dataclasses.field(default_factory=dict)
    logprobs: dict[int, TokenLogprobs] = dataclasses.field(default_factory=dict)  # who asked
    # With a first token: its prompt's log-probabilities, for a sequence that asked.
    prompt_logprobs: dict[int, list[TokenLogprobs]] = dataclasses.field(default_factory=dict)
    # A verified draft: the tokens after a sequence's entry in ``tokens``, and their
    # log-probabilities (who asked).
    more: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    more_logprobs: dict[int, list[TokenLogprobs]] = dataclasses.field(default_factory=dict)
    # Prefill: sequences whose K/V push failed, by request id.
    push_failures: dict[str, ServingError] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Expectation:
    """Decode: a reserved request, whose K/V will be pushed to (or prefilled by) the instance."""

    request_id: str
    prompt_tokens: int    # the tokens its push carries (or it prefills): after fork_pos
    sampling: SamplingConfig
    local: bool = False   # the instance prefills it itself; no push comes
    seq_id: int = 0       # the sequence it becomes, made at once
    fork_from: int | None = None  # a cached sequence whose first fork_pos tokens it shares
    fork_pos: int = 0
    push_token: bytes = b""  # what its pushes must carry (none when local)


@dataclasses.dataclass(frozen=True)
class Admission:
    """Decode: install a request's received K/V as this sequence."""

    request_id: str
    seq_id: int


@dataclasses.dataclass(frozen=True)
class Release:
    """Free sequences; forget requests that ended (their reservations, any K/V received,
    their samplers: a finished request's sequence may stay, as a cached prefix); or
    free everything."""

    seq_ids: tuple[int, ...] = ()
    request_ids: tuple[str, ...] = ()
    reset: bool = False
