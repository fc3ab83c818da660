"""Draft tokens for speculative decoding by prompt lookup (n-gram matching): the tokens
that followed the last time the sequence's latest n tokens appeared, in its prompt or its
output. Summaries, edits, code and answers from a retrieved passage copy spans of their
prompts, and those spans cost one verification pass instead of a step each.

Each sequence keeps an index of where every n-gram (of the sizes looked up) last ended,
grown a token at a time, so a proposal costs a few dict lookups however long the
sequence is. How many tokens it proposes adapts to how many it has had accepted: a
sequence whose drafts keep failing stops drafting, and tries again later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# Drafts are looked up in the sequence's last this many tokens of its prompt (and all its
# output): its index holds three n-grams a token, so a long prompt's costs no more memory
# than this window's.
LOOKUP_WINDOW = 4096
# A sequence whose drafting has stopped tries again, with one token, after this many steps;
# each time that try fails too, it waits twice as long (up to MAX_RETRY_AFTER_STEPS).
RETRY_AFTER_STEPS = 16
MAX_RETRY_AFTER_STEPS = 256
# Before anything is measured: a pass that verifies drafts costs half again a decode step
# of the same batch, and a sequence's first draft counts as kept whole (it is tried once).
PRIOR_COST_RATIO = 1.5
EMA = 0.2  # the weight of each new cost measure in the running average
ACCEPTANCE_EMA = 0.5  # ... and of each verified draft's kept share in a sequence's


@dataclasses.dataclass(frozen=True)
class DraftPolicy:
    """How many tokens to draft (at most), from n-grams of which sizes."""

    max_tokens: int = 4
    max_ngram: int = 4
    min_ngram: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("n-gram sizes must satisfy 1 <= min_ngram <= max_ngram")


class Drafter:
    """One sequence's prompt-lookup drafts, and how far they are trusted."""

    def __init__(self, policy: DraftPolicy, tokens: Sequence[int]):
        self.policy = policy
        # What comes before the lookup window is kept, not indexed.
        self.tokens: list[int] = list(tokens[:max(0, len(tokens) - LOOKUP_WINDOW)])
        # n -> {n-gram: the position just after its latest occurrence, the current one
        # excepted (it is indexed when the next token comes)}
        self._ends: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(policy.min_ngram, policy.max_ngram + 1)}
        self.budget = policy.max_tokens  # tokens it drafts now (0: stopped)
        self._idle_steps = 0
        self._retry_after = RETRY_AFTER_STEPS
        self._retrying = False  # its budget came back after a pause: this is a try
        self.drafted = 0
        self.accepted = 0
        self.acceptance = 1.0  # of its drafted tokens, the share kept lately
        self.extend(tokens[len(self.tokens):])

    def extend(self, tokens: Sequence[int]) -> None:
        """The sequence grew by ``tokens`` (its prompt, then what it generates)."""
        for token in tokens:
            # The n-grams ending at the previous last token are now earlier occurrences.
            end = len(self.tokens)
            for n, ends in self._ends.items():
                if end >= n:
                    ends[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def propose(self, limit: int) -> list[int]:
        """At most ``min(limit, budget)`` tokens that followed the longest n-gram the
        sequence ends with, where it last appeared before; none if it never did."""
        count = min(limit, self.budget)
        if count <= 0:
            if self.budget == 0:
                self._idle_steps += 1
                if self._idle_steps >= self._retry_after:
                    self.budget, self._idle_steps, self._retrying = 1, 0, True
            return []
        for n in range(self.policy.max_ngram, self.policy.min_ngram - 1, -1):
            if len(self.tokens) < n:
                continue
            start = self._ends[n].get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + count]
        return []

    def verified(self, drafted: int, accepted: int) -> None:
        """Of ``drafted`` tokens, ``accepted`` were the model's own: all of them lets it
        draft one more next time (up to the policy's), some of them as many as it kept and
        one more, none halves its budget; a budget run down to nothing stops it for a
        while (longer each time in a row)."""
        self.drafted += drafted
        self.accepted += accepted
        self.acceptance += ACCEPTANCE_EMA * (accepted / drafted - self.acceptance)
        if accepted:
            self._retry_after = RETRY_AFTER_STEPS
        elif self._retrying:  # a try after a pause failed: the next pause is longer
            self._retry_after = min(2 * self._retry_after, MAX_RETRY_AFTER_STEPS)
        self._retrying = False
        if accepted == drafted:
            self.budget = min(self.policy.max_tokens, self.budget + 1)
        elif accepted == 0:
            self.budget //= 2
        else:  # it kept some: draft what it kept, and one more
            self.budget = min(self.budget, accepted + 1)


class StepCosts:
    """What a pass that verifies drafts costs against a decode step of the same batch, as
    the engine measures them: drafts are verified in a step only when the tokens they are
    expected to add pay for it, so that speculating makes no batch slower."""

    def __init__(self):
        self.ratio = PRIOR_COST_RATIO  # a verifying pass over a decode step, lately
        self._decode: dict[int, float] = {}  # a decode step's seconds, by batch size

    def decoded(self, batch: int, seconds: float) -> None:
        last = self._decode.get(batch)
        self._decode[batch] = seconds if last is None else last + EMA * (seconds - last)

    def verified(self, batch: int, seconds: float) -> None:
        decode = self._decode.get(batch)
        if decode:
            self.ratio += EMA * (seconds / decode - self.ratio)

    def worth(self, batch: int, expected_tokens: float) -> bool:
        """Whether a verifying pass, expected to add ``expected_tokens`` to the ``batch``
        a decode step would make, makes more tokens per second."""
        return batch + expected_tokens >= self.ratio * batch
