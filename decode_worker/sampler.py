"""Per-request token sampling: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import numpy as np

from pipeline.ops import SamplingConfig


class Sampler:
    """Owns one request's randomness, so a seeded request replays exactly."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def sample(self, logits: np.ndarray) -> int:
        """One token from a row of logits; ValueError if the row is not all finite."""
        if not np.isfinite(logits).all():
            raise ValueError("the model produced non-finite logits for this sequence")
        c = self.config
        if c.temperature <= 0.0:
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
