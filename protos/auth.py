"""Who may call what: a cluster secret on internal and admin services, an API key on the
public API, both as ``authorization: Bearer <secret>`` metadata.

A server checks the secret of each service it guards in an interceptor, in constant
time, before the request is even parsed; health checks and reflection stay open, since
probes need them. A client attaches its secret to every call made on a channel.
"""

from __future__ import annotations

import collections
import hmac
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

SECRET_ENV = "OLMO_CLUSTER_TOKEN"
API_KEY_ENV = "OLMO_API_KEY"
_HEADER = "authorization"


# 128 bits as base64url (a hex secret needs 32 characters for as much).
MIN_SECRET_CHARS = 22
MAKE_ONE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def cluster_secret(token_file: str | Path | None = None, create: bool = False) -> str | None:
    """The cluster secret: $OLMO_CLUSTER_TOKEN, else the first line of ``token_file``; with
    ``create``, a missing file is made (mode 0600) with a new secret. None if none of these.

    Refused (ValueError, PermissionError) rather than used: a secret shorter than 128 bits,
    a token file another user owns or that others may read or write."""
    if os.environ.get(SECRET_ENV):
        return _strong(os.environ[SECRET_ENV].strip(), f"${SECRET_ENV}")
    if token_file is None:
        return None
    path = Path(token_file).expanduser()
    if path.is_file():
        _private(path)
        secret = path.read_text().strip()
        if not secret:
            raise ValueError(f"{path} is empty; put the cluster secret in it")
        return _strong(secret, str(path))
    if not create:
        raise FileNotFoundError(f"no cluster secret at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret


def _strong(secret: str, source: str) -> str:
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"the cluster secret in {source} has {len(secret)} characters; it "
                         f"needs at least {MIN_SECRET_CHARS} (128 bits). Make one with: "
                         f"{MAKE_ONE}")
    return secret


def _private(path: Path) -> None:
    """A token file only its owner, this user, can read or change."""
    status = path.stat()
    if status.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to user {status.st_uid}, not to this one "
                              f"({os.getuid()}); a cluster secret must be the user's own")
    if status.st_mode & 0o077:
        raise PermissionError(f"{path} may be read or written by others (mode "
                              f"{status.st_mode & 0o777:o}); chmod 600 {path}")


def api_key(key_file: str | Path | None = None) -> str | None:
    """The public API key: $OLMO_API_KEY, else the first line of ``key_file``, else None."""
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV].strip()
    if key_file is None:
        return None
    key = Path(key_file).expanduser().read_text().strip()
    if not key:
        raise ValueError(f"{key_file} is empty; put the API key in it")
    return key


class RequireSecret(grpc.ServerInterceptor):
    """Refuses calls to the guarded services (full names, e.g. ``olmo.worker.v1.DecodeWorker``)
    that do not carry the service's secret, with UNAUTHENTICATED. A service's secret is a
    string, or a function that tells whether an ``authorization`` value (bytes) is one
    of its keys (a public API's keys per tenant)."""

    def __init__(self, secrets_by_service: Mapping[str, str | Callable[[bytes], bool]]):
        self._accepts = {service: secret if callable(secret) else _equal_to(secret)
                         for service, secret in secrets_by_service.items()}

    def intercept_service(self, continuation, handler_call_details):
        service = handler_call_details.method.split("/")[1]
        accepts = self._accepts.get(service)
        handler = continuation(handler_call_details)
        if accepts is None or handler is None:
            return handler
        given = next((value for key, value in handler_call_details.invocation_metadata or ()
                      if key == _HEADER), "")
        if isinstance(given, str):
            given = given.encode()
        if accepts(given):
            return handler
        return _refusal(handler, f"{service} needs the right credentials (authorization: "
                                 "Bearer <secret>)")


def _equal_to(secret: str) -> Callable[[bytes], bool]:
    expected = f"Bearer {secret}".encode()
    return lambda given: hmac.compare_digest(given, expected)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that refuses without parsing the request."""

    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def refuse_stream(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # a generator, as a streaming handler must be

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class AttachSecret(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Puts ``authorization: Bearer <secret>`` on every call of a channel."""

    def __init__(self, secret: str):
        self._header = (_HEADER, f"Bearer {secret}")

    def _with_secret(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self._header], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_secret(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_secret(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_secret(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_secret(client_call_details), request_iterator)
