"""The words every layer shares: the roles a worker plays, how a cluster serves, and why a
request finished.

Inside a process these enums are what code passes around; at the wire a ``FinishReason``
is its proto enum number (both contracts, generation.proto and worker.proto, carry the one
``olmo.generation.v1.FinishReason``) and a ``Role`` its name.
"""

from __future__ import annotations

import enum

from protos import generation_pb2


class Role(enum.StrEnum):
    """What a worker does: prefill prompts and push their K/V, or decode tokens."""

    PREFILL = "prefill"
    DECODE = "decode"


class Mode(enum.StrEnum):
    """How a cluster serves: prefill and decode on separate workers, or both on each decode
    worker (no prefill workers, no K/V transfer)."""

    DISAGGREGATED = "disaggregated"
    AGGREGATED = "aggregated"


class FinishReason(enum.IntEnum):
    """Why a request's token stream ended; NONE while it runs. Values are the proto's."""

    NONE = generation_pb2.FINISH_REASON_UNSPECIFIED
    STOP = generation_pb2.FINISH_REASON_STOP        # EOS, a stop token or a stop string
    LENGTH = generation_pb2.FINISH_REASON_LENGTH    # max_tokens or the context window
    ABORT = generation_pb2.FINISH_REASON_ABORT
    ERROR = generation_pb2.FINISH_REASON_ERROR

    @property
    def label(self) -> str:
        """The lower-case word OpenAI's API and the metrics use ("stop", "length", ...)."""
        return self.name.lower()

    @property
    def failed(self) -> bool:
        return self in (FinishReason.ABORT, FinishReason.ERROR)


class GrammarKind(enum.StrEnum):
    """What a structured output's grammar is written as. Values name the fields of
    generation.proto's StructuredOutput oneof."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"   # any JSON object
    REGEX = "regex"
    CHOICE = "choice"             # exactly one of a list of strings
    EBNF = "ebnf"
