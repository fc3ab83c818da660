"""The HTTP API's clients pay for their requests from their budgets (router/client_budget.py),
checked before any of a request's body is read."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable

from fastapi.responses import Response

from .client_budget import (
    BYTE_COST_S,
    REQUEST_COST_S,
    ClientBudget,
    ClientNames,
    OverBudget,
    client_of,
    retry_after_header,
)

# A refusal is answered this long after the request came: a client that answers each
# refusal with a new request would otherwise spin the router as fast as it can refuse.
# The connection it holds meanwhile counts against its connection cap.
REFUSAL_DELAY_S = 1.0


def rate_limit_error(message: str, code: str) -> bytes:
    """An OpenAI-shaped 429 body."""
    return json.dumps({"error": {"message": message, "type": "rate_limit_error",
                                 "param": None, "code": code}}).encode()


_CAPPED = rate_limit_error("this client holds as many connections as it may",
                           "too_many_connections")
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                        % (len(_CAPPED), _CAPPED))


class ConnectionsByClient:
    """Open connections per client, capped, for the HTTP server's protocol (on its event
    loop only). Past the cap a connection is held unread and answered 429 after
    REFUSAL_DELAY_S (an immediate answer would invite an immediate reconnect); past
    twice the cap it is reset at once, which costs the least."""

    def __init__(self, cap: int, names: ClientNames):
        self.cap = cap
        self.names = names
        self.open: collections.Counter[str] = collections.Counter()

    def opened(self, peer) -> tuple[str | None, Callable | None]:
        """(the client to tell ``closed``, or None; None, or what to do with the
        connection ``turned_away(loop, transport)`` instead of serving it). A trusted
        proxy's connections are its clients': not counted."""
        if peer and self.names.trusted(peer[0]):
            return None, None
        client = client_of(peer[0] if peer else None)
        if self.open[client] >= 2 * self.cap:
            return None, _reset
        self.open[client] += 1
        return client, None if self.open[client] <= self.cap else _refuse_later

    def closed(self, client: str) -> None:
        self.open[client] -= 1
        if not self.open[client]:
            del self.open[client]


def _reset(loop, transport) -> None:
    transport.abort()


def _refuse_later(loop, transport) -> None:
    def refuse() -> None:
        if not transport.is_closing():
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()

    loop.call_later(REFUSAL_DELAY_S, refuse)


def client_of_scope(scope, names: ClientNames) -> str:
    """Who sent the request: named once, by the first to ask (the middleware), and kept
    in the scope's state for the handler that charges the client later."""
    state = scope.setdefault("state", {})
    if "client" not in state:
        state["client"] = _client_of(scope, names)
    return state["client"]


def _client_of(scope, names: ClientNames) -> str:
    peer = scope.get("client")
    forwarded = b",".join(value for name, value in scope["headers"]
                          if name == b"x-forwarded-for")
    return names.of(peer[0] if peer else None, forwarded.decode("latin-1") or None)


class BudgetMiddleware:
    """An ASGI app in front of ``app``: every request of a client over its budget waits
    (or is refused 429 with Retry-After) before its body is read; the body's bytes are
    charged as declared, and as they arrive past that. ``read_at_most``: the largest
    body the app reads (larger declared ones are refused unread, and cost nothing)."""

    def __init__(self, app, budget: ClientBudget, read_at_most: int):
        self.app = app
        self.budget = budget
        self.read_at_most = read_at_most

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.budget.enabled:
            await self.app(scope, receive, send)
            return
        client = client_of_scope(scope, self.budget.names)
        declared = _content_length(scope)
        expected = declared if declared <= self.read_at_most else 0
        try:
            wait = self.budget.admit(client, REQUEST_COST_S + expected * BYTE_COST_S)
        except OverBudget as exc:  # charged as a request: refusals are paid for too
            await asyncio.sleep(REFUSAL_DELAY_S)
            await _refuse(send, str(exc), exc.retry_after_s)
            return
        if wait:
            try:
                await asyncio.sleep(wait)
            finally:
                self.budget.waited(client)
        received = 0

        async def paying_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                before, received = received, received + len(message.get("body", b""))
                self.budget.charge(client, (max(received, expected) - max(before, expected))
                                   * BYTE_COST_S)
            return message

        await self.app(scope, paying_receive, send)


def _content_length(scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


async def _refuse(send, message: str, retry_after_s: float) -> None:
    body = rate_limit_error(message, "rate_limit_exceeded")
    await send({"type": "http.response.start", "status": 429, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", retry_after_header(retry_after_s).encode())]})
    await send({"type": "http.response.body", "body": body})


def over_quota_response(exc: OverBudget) -> Response:
    """The 429 of a request over its tenant's quota, with when a retry would pass."""
    return Response(rate_limit_error(str(exc), "rate_limit_exceeded"), status_code=429,
                    media_type="application/json",
                    headers={"retry-after": retry_after_header(exc.retry_after_s)})
