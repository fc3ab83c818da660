"""The sampling controls' bounds: the router checks them for its clients, and every decode
worker again for itself."""

from __future__ import annotations

import math
from collections.abc import Mapping

MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's API allows
PENALTY_BOUND = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI bounds them
BIAS_BOUND = 100.0   # a logit_bias value lies in [-100, 100], as OpenAI bounds it
# A repetition penalty (vLLM's, CTRL's) lies in (0, this]; 1 is none. Past a few, every
# token seen before is as good as banned, which logit_bias says more plainly.
MAX_REPETITION_PENALTY = 10.0


def controls_problem(presence: float, frequency: float, repetition: float,
                     logit_bias: Mapping[int, float], min_tokens: int, max_tokens: int,
                     vocab_size: int) -> tuple[str, str] | None:
    """(the field, what is wrong with it) for the first control out of bounds, or None.
    ``repetition`` 0 means none, as on the wire."""
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not math.isfinite(value) or abs(value) > PENALTY_BOUND:
            return name, f"{name} must be in [-{PENALTY_BOUND:g}, {PENALTY_BOUND:g}], got {value}"
    if not math.isfinite(repetition) or not 0 <= repetition <= MAX_REPETITION_PENALTY:
        return "repetition_penalty", (f"repetition_penalty must be in (0, "
                                      f"{MAX_REPETITION_PENALTY:g}], got {repetition}")
    for token, bias in logit_bias.items():
        if token >= vocab_size:
            return "logit_bias", f"logit_bias token {token} is outside the vocabulary"
        if not math.isfinite(bias) or abs(bias) > BIAS_BOUND:
            return "logit_bias", (f"logit_bias values must be in [-{BIAS_BOUND:g}, "
                                  f"{BIAS_BOUND:g}], got {bias}")
    if min_tokens > max_tokens:
        return "min_tokens", f"min_tokens ({min_tokens}) is more than max_tokens ({max_tokens})"
    return None
