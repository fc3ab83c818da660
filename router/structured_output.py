"""A structured output as HTTP clients ask for one: OpenAI's ``response_format``, vLLM's
``structured_outputs`` and its older ``guided_*`` fields, SGLang's ``regex`` and ``ebnf``.
All become one generation.proto StructuredOutput, held to the bounds every decode worker
holds it to (``validation.check_grammar``)."""

from __future__ import annotations

import dataclasses
import json

from protos import generation_pb2
from protos.vocabulary import GrammarKind

from .validation import check_grammar, invalid

# vLLM's structured_outputs keys (and its guided_* fields' suffixes) for each kind.
VLLM_KEYS = {"json": GrammarKind.JSON_SCHEMA, "regex": GrammarKind.REGEX,
             "choice": GrammarKind.CHOICE, "grammar": GrammarKind.EBNF,
             "json_object": GrammarKind.JSON_OBJECT}
# OpenAI's response_format for plain text: no grammar (beside which another may be asked).
TEXT_FORMAT = {"type": "text"}
# Top-level fields that each ask for one kind.
FIELDS = {**{f"guided_{key}": kind for key, kind in VLLM_KEYS.items()},
          "regex": GrammarKind.REGEX, "ebnf": GrammarKind.EBNF}


@dataclasses.dataclass(frozen=True)
class AskedGrammar:
    """A request's structured output, and the field that asked for it: what a decode
    worker refuses of such a request (a grammar that does not compile) is that field's."""

    field: str
    message: generation_pb2.StructuredOutput


def structured_output(body: dict) -> AskedGrammar | None:
    """The request's structured output, or None; INVALID_ARGUMENT naming the field for
    one that is malformed, too large, or given in more than one way."""
    asked = [(name, body[name]) for name in ("response_format", "structured_outputs", *FIELDS)
             if body.get(name) not in (None, False, TEXT_FORMAT)]
    if len(asked) > 1:
        raise invalid(f"ask for one structured output, not {len(asked)}: "
                      + ", ".join(name for name, _ in asked), asked[1][0])
    if not asked:
        return None
    name, value = asked[0]
    if name == "response_format":
        grammar = _response_format(value)
    elif name == "structured_outputs":
        grammar = _vllm(value)
    else:
        grammar = _grammar(FIELDS[name], value, name)
    if grammar is None:
        return None
    check_grammar(grammar, name)
    return AskedGrammar(name, grammar)


def _response_format(value) -> generation_pb2.StructuredOutput | None:
    """OpenAI's: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == GrammarKind.JSON_OBJECT:
        return generation_pb2.StructuredOutput(json_object=True)
    if kind == GrammarKind.JSON_SCHEMA:
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise invalid("response_format.json_schema needs a schema (a JSON object)",
                          "response_format")
        return _grammar(GrammarKind.JSON_SCHEMA, spec["schema"], "response_format")
    raise invalid('response_format.type must be "text", "json_object" or "json_schema"',
                  "response_format")


def _vllm(value) -> generation_pb2.StructuredOutput:
    """vLLM's structured_outputs: an object with one of json, regex, choice, grammar,
    json_object."""
    given = ([key for key in VLLM_KEYS if value.get(key) not in (None, False)]
             if isinstance(value, dict) else [])
    if len(given) != 1:
        raise invalid("structured_outputs needs exactly one of " + ", ".join(VLLM_KEYS),
                      "structured_outputs")
    return _grammar(VLLM_KEYS[given[0]], value[given[0]], "structured_outputs")


def _grammar(kind: GrammarKind, value, param: str) -> generation_pb2.StructuredOutput:
    """One kind's value as the message: a schema as JSON text or an object, a list of
    strings for a choice, text for a regex or EBNF, true for any JSON object."""
    message = generation_pb2.StructuredOutput()
    try:
        if kind is GrammarKind.JSON_OBJECT:
            if value is not True:
                raise invalid(f"{param}: json_object must be true", param)
            message.json_object = True
        elif kind is GrammarKind.CHOICE:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise invalid(f"{param}: a choice is a list of strings", param)
            message.choice.options.extend(value)
        elif kind is GrammarKind.JSON_SCHEMA and isinstance(value, dict):
            message.json_schema = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        elif isinstance(value, str):
            setattr(message, kind, value)
        else:
            raise invalid(f"{param}: a {kind} is text" + (
                " or a JSON object" if kind is GrammarKind.JSON_SCHEMA else ""), param)
    except UnicodeEncodeError:
        raise invalid(f"{param} is not valid Unicode text (a lone surrogate?)", param) from None
    return message
