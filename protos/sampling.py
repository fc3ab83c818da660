"""The sampling controls' bounds: the router checks them for its clients, and every decode
worker again for itself."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from protos.vocabulary import GrammarKind

MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's API allows
PENALTY_BOUND = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI bounds them
BIAS_BOUND = 100.0   # a logit_bias value lies in [-100, 100], as OpenAI bounds it
# A repetition penalty (vLLM's, CTRL's) lies in (0, this]; 1 is none. Past a few, every
# token seen before is as good as banned, which logit_bias says more plainly.
MAX_REPETITION_PENALTY = 10.0
# A structured output's grammar: its text (a schema, a regex, EBNF, or a choice's options
# together) in bytes, a choice's options, and a schema's nesting of JSON objects and lists.
# Compiling costs time and memory in proportion to what the grammar spells out, times the
# vocabulary: these keep a compile to well under a second on a 50K vocabulary.
MAX_GRAMMAR_BYTES = 32 * 1024
MAX_GRAMMAR_CHOICES = 256
MAX_SCHEMA_DEPTH = 32


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


def grammar_parts(message) -> tuple[GrammarKind, str, tuple[str, ...]] | None:
    """A StructuredOutput message's kind, source text (a JSON schema, regex or EBNF) and
    choice options; None when it sets none."""
    kind = message.WhichOneof("kind")
    if kind is None:
        return None
    kind = GrammarKind(kind)
    if kind in (GrammarKind.JSON_OBJECT, GrammarKind.CHOICE):
        return kind, "", tuple(message.choice.options)
    return kind, getattr(message, kind), ()


def grammar_problem(kind: GrammarKind, source: str, choices: Sequence[str]) -> str | None:
    """What is wrong with a structured output's grammar before compiling it (sizes, counts,
    a schema that is no JSON object), or None. Characters are counted before bytes, and
    both before a schema is parsed."""
    if kind is GrammarKind.JSON_OBJECT:
        return None
    if kind is GrammarKind.CHOICE:
        if not 0 < len(choices) <= MAX_GRAMMAR_CHOICES:
            return f"a choice has 1 to {MAX_GRAMMAR_CHOICES} options, got {len(choices)}"
        if not all(choices):
            return "a choice's options must not be empty"
        texts = choices
    else:
        if not source:
            return f"the {kind} is empty"
        texts = (source,)
    if (sum(map(len, texts)) > MAX_GRAMMAR_BYTES
            or sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) > MAX_GRAMMAR_BYTES):
        return f"the {kind} has more than {MAX_GRAMMAR_BYTES} bytes"
    if kind is GrammarKind.JSON_SCHEMA:
        try:
            schema = json.loads(source)
        except RecursionError:
            return f"the json_schema is nested more than {MAX_SCHEMA_DEPTH} levels deep"
        except ValueError:
            return "the json_schema is not JSON"
        if not isinstance(schema, dict):
            return "the json_schema must be a JSON object"
        if json_depth(schema) > MAX_SCHEMA_DEPTH:
            return f"the json_schema is nested more than {MAX_SCHEMA_DEPTH} levels deep"
    return None


def json_depth(value) -> int:
    """How deeply JSON objects and lists nest in ``value`` (a scalar: 0)."""
    depth, level = 0, [value]
    while level := [node for node in level if isinstance(node, (dict, list))]:
        depth += 1
        level = [child for node in level
                 for child in (node.values() if isinstance(node, dict) else node)]
    return depth
