"""Per-request token sampling: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import numpy as np

from pipeline.ops import SamplingConfig, TokenLogprobs

NON_FINITE = "the model produced non-finite logits for this sequence"


def finite_rows(logits: np.ndarray) -> np.ndarray:
    """Which rows of ``[batch, vocab]`` logits are all finite: one pass for the batch."""
    return np.isfinite(logits).all(axis=1)


class Sampler:
    """Owns one request's randomness, so a seeded request replays exactly."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    @property
    def greedy(self) -> bool:
        return self.config.temperature <= 0.0

    def sample(self, logits: np.ndarray) -> int:
        """One token from a row of finite logits (the caller checks: see ``finite_rows``)."""
        c = self.config
        if self.greedy:
            return int(np.argmax(logits))
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
        return int(order[self.rng.choice(len(order), p=probs)])

    def logprobs(self, logits: np.ndarray, token: int) -> TokenLogprobs | None:
        """The sampled token's log-probability under the model (the raw logits: before
        temperature, top-k and top-p) and the likeliest alternatives, if asked for."""
        c = self.config
        if not (c.logprobs or c.top_logprobs):
            return None
        scores = logits.astype(np.float64)
        peak = scores.max()
        logp = scores - (peak + np.log(np.exp(scores - peak).sum()))
        top: tuple[tuple[int, float], ...] = ()
        if c.top_logprobs:
            best = np.argpartition(-logp, c.top_logprobs - 1)[:c.top_logprobs]
            best = best[np.argsort(-logp[best], kind="stable")]
            top = tuple((int(t), float(logp[t])) for t in best)
        return TokenLogprobs(int(token), float(logp[token]), top)
