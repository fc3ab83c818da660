"""An ASGI app served by uvicorn on a thread of its own, on a socket bound up front (so
port 0 gives a free port that is known before serving starts), with a bound on how long a
connection may take to send a request's headers and on how many one client may hold."""

from __future__ import annotations

import functools
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .http_budget import ConnectionsByClient

HEADERS_TIMEOUT_S = 10.0  # a connection's request headers must all arrive within this


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, but a connection that has not sent a whole request's
    headers ``HEADERS_TIMEOUT_S`` after it opened (or after its last answer) is closed.
    uvicorn times out idle kept-alive connections only: a new one that sends nothing, or
    headers a byte at a time, would hold one of the ``max_connections`` for ever, and
    enough of them would leave the API answering 503 to everyone. With ``connections``
    (router/http_budget.py), one that its client may not open is answered and closed
    unread, by its rules."""

    def __init__(self, *args, connections: ConnectionsByClient | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._connections = connections
        self._client: str | None = None
        self._turned_away = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self._connections is not None:
            self._client, turned_away = self._connections.opened(
                transport.get_extra_info("peername"))
            if turned_away is not None:
                self._turned_away = True  # nothing it sends is parsed, let alone served
                transport.pause_reading()
                turned_away(self.loop, transport)
                return
        self._expect_headers()

    def data_received(self, data: bytes) -> None:
        if not self._turned_away:  # uvloop delivers data even to a paused new transport
            super().data_received(data)

    def connection_lost(self, exc) -> None:
        try:
            super().connection_lost(exc)
        finally:
            if self._client is not None:
                self._connections.closed(self._client)
                self._client = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_headers()

    def _expect_headers(self) -> None:
        self.loop.call_later(HEADERS_TIMEOUT_S, self._headers_due, self.cycle)

    def _headers_due(self, cycle_then) -> None:
        """No new request began since (uvicorn makes a cycle per request's headers)."""
        if self.cycle is cycle_then and not self.transport.is_closing():
            self.transport.close()


class HttpServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[bytes, bytes] | None = None, max_connections: int | None = None,
                 per_client: ConnectionsByClient | None = None):
        """Serve ``app`` on host:port; ``tls`` is (private key, certificate chain) in PEM;
        past ``max_connections`` open connections uvicorn answers 503, past
        ``per_client``'s cap for one client 429. uvicorn's own reading of forwarding
        headers is off: it believes them from 127.0.0.1, where anyone may write them
        (router/client_budget.py's ClientNames believes them from named proxies only)."""
        # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets
        # that say they are TCP, and with Nagle on each streamed token waits for the
        # client's delayed ACK (40 ms here).
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                     socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        options = {}
        self._tls_dir = None
        if tls is not None:  # uvicorn reads key and certificate from files
            self._tls_dir = tempfile.TemporaryDirectory(prefix="olmo-tls-")
            key, cert = Path(self._tls_dir.name) / "key.pem", Path(self._tls_dir.name) / "cert.pem"
            key.touch(mode=0o600)
            key.write_bytes(tls[0])
            cert.write_bytes(tls[1])
            options = {"ssl_keyfile": str(key), "ssl_certfile": str(cert)}
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, limit_concurrency=max_connections,
                                http=functools.partial(BoundedH11Protocol,
                                                       connections=per_client),
                                proxy_headers=False, **options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]},
                                        name="http-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server on {host}:{self.port} did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        scheme = "https" if self._tls_dir else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (open streams get ``grace`` seconds, by default uvicorn's 2)."""
        if grace is not None:
            self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
        if self._tls_dir is not None:
            self._tls_dir.cleanup()
