"""Per-request token sampling: logit bias, penalties and min_tokens on the model's logits
(masked by a structured output's grammar first: see DecodeStage._sample), then greedy or
temperature, top-k, top-p, seeded."""

from __future__ import annotations

import collections
import secrets
from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.ops import SamplingConfig, TokenLogprobs

from .grammar import GrammarState, constrain

NON_FINITE = "the model produced non-finite logits for this sequence"


def finite_rows(logits: np.ndarray) -> np.ndarray:
    """Which rows of ``[batch, vocab]`` logits are all finite: one pass for the batch."""
    return np.isfinite(logits).all(axis=1)


class Sampler:
    """Owns one request's randomness and what its penalties count: the tokens it has
    generated (``record``).

    The n-th output token of a sampled request is drawn with a number fixed by its seed
    and n alone (``uniform``), by inverse transform over its distribution: so a seeded
    request replays exactly, after a resume on another worker too, and a verified draft
    (``verify``) gives the very tokens drawing one at a time would."""

    def __init__(self, config: SamplingConfig, eos_ids: Iterable[int] = (),
                 grammar: GrammarState | None = None):
        c = self.config = config
        self.seed = config.seed if config.seed is not None else secrets.randbits(64)
        self.grammar = grammar  # a structured output's: at its place after the output so far
        self.adjusts = bool(c.logit_bias or c.presence_penalty or c.frequency_penalty
                            or c.repetition_penalty != 1.0 or c.min_tokens)
        self._bias_ids = np.array([t for t, _ in c.logit_bias], np.int64)
        self._bias = np.array([b for _, b in c.logit_bias], np.float64)
        # What min_tokens holds back: the stop token ids, and EOS unless it is ignored.
        self._stops = np.array(sorted({*c.stop_token_ids,
                                       *(() if c.ignore_eos else eos_ids)}), np.int64)
        self.counts = collections.Counter(c.prior_output_ids)  # output tokens, each's count
        self.seen = set(c.prompt_ids) | set(c.prior_output_ids)  # prompt or output
        self.sampled = 0  # tokens this worker sampled (min_tokens counts from here)
        self.prompt_scores: list[TokenLogprobs] = []  # with prompt_logprobs, till taken

    @property
    def greedy(self) -> bool:
        return self.config.temperature <= 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the logits as they are (the batch's one argmax serves it)."""
        return self.greedy and not self.adjusts

    @property
    def reports_logprobs(self) -> bool:
        return self.config.logprobs or self.config.top_logprobs > 0

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits after logit_bias, min_tokens and the penalties, in float64: vLLM's
        order (processors, then the repetition, frequency and presence penalties)."""
        c = self.config
        out = logits.astype(np.float64)
        if self._bias_ids.size:
            out[self._bias_ids] += self._bias
        if self.sampled < c.min_tokens and self._stops.size:
            out[self._stops] = -np.inf
        if c.repetition_penalty != 1.0 and self.seen:
            ids = np.fromiter(self.seen, np.int64, len(self.seen))
            row = out[ids]
            out[ids] = np.where(row > 0, row / c.repetition_penalty,
                                row * c.repetition_penalty)
        if (c.frequency_penalty or c.presence_penalty) and self.counts:
            ids = np.fromiter(self.counts.keys(), np.int64, len(self.counts))
            times = np.fromiter(self.counts.values(), np.float64, len(self.counts))
            out[ids] -= c.frequency_penalty * times + c.presence_penalty
        return out

    def record(self, token: int) -> bool:
        """``token`` was sampled: the penalties count it from now on, the grammar moves past
        it. False if the grammar does not allow it (the sequence cannot go on)."""
        self.sampled += 1
        if self.adjusts:
            self.counts[token] += 1
            self.seen.add(token)
        return self.grammar is None or self.grammar.accept(token)

    def sample(self, logits: np.ndarray) -> int:
        """One token from a row of finite logits (the caller checks: see ``finite_rows``),
        but for the tokens a grammar masked (-inf)."""
        if self.adjusts:
            adjusted = self.adjusted(logits)
            # A complete grammar allows only its end, which min_tokens may hold back: the
            # grammar has the last word.
            if self.grammar is None or adjusted.max() > -np.inf:
                logits = adjusted
        if self.greedy:
            return int(np.argmax(logits))
        return self.draw(logits, self.position)

    @property
    def position(self) -> int:
        """The index in its output of the request's next token."""
        return len(self.config.prior_output_ids) + self.sampled

    def draw(self, logits: np.ndarray, position: int) -> int:
        """The token at output ``position``: its distribution inverted at its uniform."""
        order, probs = self.distribution(logits)
        cumulative = np.cumsum(probs)
        at = int(np.searchsorted(cumulative, uniform(self.seed, position) * cumulative[-1],
                                 side="right"))
        return int(order[min(at, len(order) - 1)])

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What a sampled token is drawn from: the tokens left by top-k and top-p, likeliest
        first, and their probabilities at the request's temperature."""
        c = self.config
        scaled = logits.astype(np.float64) / c.temperature
        order = np.argsort(-scaled, kind="stable")
        if 0 < c.top_k < len(order):
            order = order[:c.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if 0.0 < c.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), c.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return order, probs

    def verify(self, logits: np.ndarray, draft: Sequence[int]) -> tuple[list[int], bool]:
        """The tokens a step that verified ``draft`` gives (``logits``: ``[1 + len(draft),
        vocab]``, row i scoring the token after draft[:i]), each recorded: the drafted
        tokens the request would have made itself, then the first it makes instead (or the
        one after them all). Each position is picked as ``sample`` would (greedy, or drawn
        at its position; under the grammar as it stands after the tokens before it), so a
        draft changes no token, only how many a step makes. False with them if the grammar
        refused one (the sequence cannot go on)."""
        out = []
        for i, row in enumerate(logits[:len(draft) + 1]):
            token = self._pick(row)
            out.append(token)
            if not self.record(token):
                return out, False
            if i == len(draft) or token != draft[i]:
                return out, True
        raise AssertionError("a verified draft needs a row per drafted token and one more")

    def _pick(self, row: np.ndarray) -> int:
        """The token for one row of logits, as ``sample`` picks it, under the grammar (if
        any) at its current place, as the last stage holds a step's rows to it."""
        if self.grammar is not None:
            masked = row[None].copy()
            picks = constrain(masked, {0: self.grammar},
                              {0: int(np.argmax(row))} if self.plain_greedy else {})
            if picks:
                return picks[0]
            row = masked[0]
        return self.sample(row)

    def logprobs(self, logits: np.ndarray, token: int) -> TokenLogprobs | None:
        """The sampled token's log-probability under the model (the raw logits: before
        temperature, top-k and top-p) and the likeliest alternatives, if asked for."""
        if not self.reports_logprobs:
            return None
        return token_logprobs(logits[None], [token], self.config.top_logprobs)[0]

    def score_prompt(self, position: int, logits: np.ndarray) -> None:
        """Logits ``[n, vocab]`` of prompt positions ``position``.. give each next prompt
        token's log-probability (the last position's next token is no prompt's)."""
        prompt = self.config.prompt_ids
        rows = max(0, min(len(logits), len(prompt) - 1 - position))
        if rows:
            self.prompt_scores += token_logprobs(
                logits[:rows], prompt[position + 1:position + 1 + rows],
                self.config.top_logprobs)

    def take_prompt_scores(self) -> list[TokenLogprobs]:
        scores, self.prompt_scores = self.prompt_scores, []
        return scores


def token_logprobs(logits: np.ndarray, tokens, top: int) -> list[TokenLogprobs]:
    """Each row's log-probability of its token under the model, its rank, and its ``top``
    likeliest alternatives: rows of ``[n, vocab]`` logits, in float64."""
    scores = logits.astype(np.float64)
    peak = scores.max(axis=1, keepdims=True)
    logp = scores - (peak + np.log(np.exp(scores - peak).sum(axis=1, keepdims=True)))
    out = []
    for row, token in zip(logp, tokens):
        alternatives: tuple[tuple[int, float], ...] = ()
        if top:
            best = np.argpartition(-row, top - 1)[:top]
            best = best[np.argsort(-row[best], kind="stable")]
            alternatives = tuple((int(t), float(row[t])) for t in best)
        rank = 1 + int(np.count_nonzero(row > row[token]))
        out.append(TokenLogprobs(int(token), float(row[token]), alternatives, rank))
    return out


_MASK = 2**64 - 1


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1) fixed by ``seed`` and ``position`` alone (SplitMix64's mix of
    the two): the draw of a request's token at that position."""
    x = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return ((x ^ (x >> 31)) >> 11) * 2.0**-53
