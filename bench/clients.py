"""The two ways a benchmark talks to a cluster, timed the same way: gRPC Generate, and the
OpenAI-compatible HTTP API (/v1/completions, server-sent events). Each ``request`` streams
one greedy completion and returns its TTFT, end-to-end time, tokens and time per token."""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from urllib.parse import urlparse


def timing(start: float, arrivals: list[float], tokens: int) -> dict:
    """TTFT, end to end, tokens, time per output token after the first, and the gaps
    between successive token arrivals (ITL), from when each piece of the stream came."""
    if not arrivals:
        raise RuntimeError("the stream ended without a token")
    first, last = arrivals[0], arrivals[-1]
    return {"ttft": first - start, "e2e": last - start, "tokens": tokens,
            "tpot": (last - first) / max(1, tokens - 1),
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])]}


class GrpcTarget:
    def __init__(self, address: str, api_key: str | None = None):
        from router.client import GenerationClient

        self.client = GenerationClient(address, api_key)

    def request(self, prompt: list[int], max_tokens: int, timeout: float | None = None,
                traceparent: str = "") -> dict:
        """``traceparent``: a W3C trace context to send (the request joins that trace)."""
        from router.client import generate_request

        start = time.perf_counter()
        arrivals: list[float] = []
        tokens = 0
        request = generate_request(prompt, max_tokens, ignore_eos=True)
        metadata = (("traceparent", traceparent),) if traceparent else None
        for response in self.client.stub.Generate(request, timeout=timeout,
                                                  metadata=metadata):
            if response.token_ids:
                arrivals.append(time.perf_counter())
                tokens += len(response.token_ids)
        return timing(start, arrivals, tokens)

    def close(self) -> None:
        self.client.close()


class HttpTarget:
    """One kept-alive connection per calling thread, as a pooled HTTP client would."""

    def __init__(self, url: str):
        self.url = urlparse(url)
        self._local = threading.local()

    def request(self, prompt: list[int], max_tokens: int, timeout: float | None = None,
                traceparent: str = "") -> dict:
        """``timeout`` is not a bound on the whole request here: every read has the
        connection's own (600 s). ``traceparent``: as GrpcTarget's."""
        connection = self._connection()
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}})
        start = time.perf_counter()
        arrivals: list[float] = []
        tokens = 0
        headers = {"Content-Type": "application/json"}
        if traceparent:
            headers["traceparent"] = traceparent
        connection.request("POST", "/v1/completions", body, headers)
        reply = connection.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.read()[:500]!r}")
        for line in reply:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            if chunk["choices"]:
                arrivals.append(time.perf_counter())
            else:
                tokens = chunk["usage"]["completion_tokens"]
        reply.read()
        return timing(start, arrivals, tokens)

    def _connection(self) -> http.client.HTTPConnection:
        if not hasattr(self._local, "connection"):
            self._local.connection = http.client.HTTPConnection(self.url.hostname,
                                                                self.url.port, timeout=600)
        return self._local.connection

    def close(self) -> None:
        pass


def add_client_process_args(parser: argparse.ArgumentParser) -> None:
    """The hidden arguments of a bench's client process (run apart from the cluster, so
    that client parsing does not share the server's interpreter)."""
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grpc", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
