"""How a failure travels: one exception type that carries a real gRPC status code.

Whatever refuses a request (validation, admission, a KV push, a pipeline stage) raises
``ServingError`` with the status that fits; the servicer at the wire aborts with exactly
that code, and a caller turns a failed RPC back into one with ``ServingError.from_rpc``.
No code is ever parsed out of a message.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NoReturn, TypeVar

import grpc

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

Handler = TypeVar("Handler", bound=Callable)


class ServingError(Exception):
    """A failure with the gRPC status it should reach the caller with; a refusal of one
    field of the request may name it (``param``, the OpenAI API's word) and say why in a
    word clients look for (``reason``, as gRPC's ErrorInfo has it: "context_length_exceeded")."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.reason = reason

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError, where: str) -> ServingError:
        """A failed call as a ServingError, its status kept and ``where`` put in front."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code, f"{where}: {details}")

    def abort(self, context: grpc.ServicerContext) -> NoReturn:
        context.abort(self.code, self.message)


def status_number(code: grpc.StatusCode) -> int:
    """The status as its wire number (for messages that carry one)."""
    return code.value[0]


def status_code(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def aborts_on_error(handler: Handler) -> Handler:
    """A unary servicer method whose ServingErrors end the call with their own status."""

    @functools.wraps(handler)
    def serve(self, request, context):
        try:
            return handler(self, request, context)
        except ServingError as exc:
            exc.abort(context)

    return serve  # type: ignore[return-value]
