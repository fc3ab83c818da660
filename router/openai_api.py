"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics, on the same request path as the gRPC Generate API.

Each choice of a request is one ``GenerationServicer.prepare`` + ``run``, on a thread of
its own, feeding the event loop; so validation, admission, scheduling, resumption and
cancellation are the gRPC API's, and a client that disconnects cancels every choice on
every worker. Errors come in OpenAI's shape, with the HTTP status that fits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from tokenizers import Tokenizer

from protos import generation_pb2, tracing
from protos.errors import ServingError
from protos.sampling import MAX_TOP_LOGPROBS
from protos.vocabulary import FinishReason, Role

from .chat_template import ChatTemplate
from .client_budget import OverBudget
from .http_budget import (
    BudgetMiddleware,
    ConnectionsByClient,
    client_of_scope,
    over_quota_response,
)
from .service import GenerationServicer, Prepared, encode
from .structured_output import AskedGrammar, structured_output
from .tenants import Tenant
from .tool_calls import AskedTools, ToolCallStream, asked_tools, parse_tool_calls
from .validation import MAX_CACHE_SALT_CHARS, check_prompt_text

T = TypeVar("T")
MAX_CHOICES = 8  # n times the number of prompts
MAX_REQUEST_ID_CHARS = 128  # of a client's x-request-id, echoed back
DISCONNECT_CHECK_S = 0.1  # how soon a request stops once its client has left
CLIENT_CLOSED = 499  # the client closed the connection (nginx's word for it); none reads it
MAX_WIRE_INT = 2**31 - 1  # the largest count or token id any request field carries
JSON_ESCAPE_BYTES = 6  # the most JSON bytes one byte of text can take (\uXXXX)
# A body refused by its declared length is still read (and dropped) up to this size: a
# client that sends it whole before reading (urllib, httpx) would otherwise see its
# connection reset rather than the answer. Larger ones are refused without a byte read.
DRAIN_BYTES = 64 * 2**20
# A request's body must have arrived this long after its headers: one sent a byte at a
# time would hold its connection (and one of the router's connection slots) for ever.
BODY_TIMEOUT_S = 60.0
CHAT_ROLES = frozenset({"system", "user", "assistant"})
TOOL_ROLE = "tool"  # a tool's answer, in a chat whose template takes tools
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 409: "invalid_request_error", 429: "rate_limit_error"}
# Parameters we do not implement: refused unless left at their neutral value.
UNSUPPORTED = {"suffix": None, "functions": None}


class BadRequest(ServingError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message, param)


class RequestIdMiddleware:
    """Every answer carries ``x-request-id``: the client's own, when it sent a sane one
    (at most MAX_REQUEST_ID_CHARS printable ASCII characters), or one made for it; what
    a client quotes when it reports a problem."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"),
                     b"")
        request_id = (given if 0 < len(given) <= MAX_REQUEST_ID_CHARS
                      and given.isascii() and given.decode().isprintable()
                      else uuid.uuid4().hex.encode())

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                   (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """A route it does not have or a method it does not take, in OpenAI's error shape."""
    status = exc.status_code
    return JSONResponse(status_code=status, headers=exc.headers, content={"error": {
        "message": f"{request.method} {request.url.path}: {exc.detail}",
        "type": ERROR_TYPE.get(status, "invalid_request_error"), "param": None,
        "code": str(exc.detail).lower().replace(" ", "_")}})


def error_response(error: ServingError) -> JSONResponse:
    status = HTTP_STATUS.get(error.code, 500)
    return JSONResponse(status_code=status, content={"error": error_body(error)})


def error_body(error: ServingError) -> dict:
    status = HTTP_STATUS.get(error.code, 500)
    return {"message": error.message, "type": ERROR_TYPE.get(status, "server_error"),
            "param": error.param, "code": error.reason or error.code.name.lower()}


class HttpCall:
    """One choice's CallContext: cancelled when its client disconnects."""

    def __init__(self):
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] | None = []

    def is_active(self) -> bool:
        return self._callbacks is not None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._callbacks is None:
                return False
            self._callbacks.append(callback)
            return True

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks or [], None
        for callback in callbacks:
            callback()


@dataclasses.dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    prompt_ids: list[int]  # what echo answers first
    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[generation_pb2.TokenLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, found in a prefix cache
    completion_tokens: int = 0
    logprob_chars: int = 0  # of the tokens whose logprobs have been streamed
    prompt_logprobs: list[generation_pb2.TokenLogprobs] = dataclasses.field(
        default_factory=list)  # each prompt token's after the first, with echo
    tool_stream: ToolCallStream | None = None  # streamed with tools: holds back their calls


@dataclasses.dataclass
class Job:
    """A parsed request: one prepared generation per choice."""

    kind: str                   # "completion" or "chat"
    prepared: list[Prepared]
    stream: bool
    include_usage: bool
    logprobs: bool
    prompts: int                # distinct prompts (usage counts each once)
    kept: int = 0               # choices answered per prompt: the best of them (0: all)
    echo: bool = False          # the prompt first, in text and log-probabilities
    grammar: AskedGrammar | None = None  # a structured output
    top: int = 0                # alternatives asked for per generated (or echoed) token
    prompt_top: int | None = None  # vLLM's prompt_logprobs: alternatives per prompt token
    tools: AskedTools | None = None  # a chat's tools: its answers are parsed for calls
    started: bool = False       # its choices are running (each ends its own hold)


class OpenAIServer:
    def __init__(self, servicer: GenerationServicer, tokenizer: Tokenizer | None,
                 model_name: str, chat: ChatTemplate | None):
        self.servicer = servicer
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.chat = chat
        self.created = int(time.time())
        limits = servicer.limits
        # Enough for the largest request: every choice's prompt at the byte limit, each
        # byte escaped in JSON at the most (\uXXXX), and the other fields.
        self.max_body_bytes = MAX_CHOICES * JSON_ESCAPE_BYTES * limits.max_prompt_bytes + 65536
        self.max_chat_bytes = limits.max_prompt_bytes
        # Enough items for the largest request: a full context window of token ids for
        # every choice, a chat of a message per token of it (each with its strings), and
        # the other fields.
        self.max_json_items = (MAX_CHOICES + 10) * servicer.facts.context_window + 4096
        self.markers = chat_markers(tokenizer, chat)
        self.app = RequestIdMiddleware(BudgetMiddleware(self._build(), servicer.budget,
                                                        DRAIN_BYTES))

    # --- routes -----------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="olmo-disagg", docs_url=None, redoc_url=None)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.get("/v1/models")(self.models)
        app.post("/tokenize")(self.tokenize)
        app.post("/detokenize")(self.detokenize)
        app.get("/v1/models/{model_id:path}")(self.model)
        # Routes it does not have, methods they do not take: OpenAI's error shape too.
        app.exception_handler(StarletteHTTPException)(http_error)
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)
        return app

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, self._completion_job)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, self._chat_job)

    async def tokenize(self, request: Request) -> Response:
        """vLLM's: a prompt's (or a chat's, rendered) token ids, as a completion would get."""
        answer = await self._parsed(request, self._tokenized)
        return answer if isinstance(answer, Response) else JSONResponse(answer)

    async def detokenize(self, request: Request) -> Response:
        """vLLM's: the text of token ids."""
        answer = await self._parsed(request, self._detokenized)
        return answer if isinstance(answer, Response) else JSONResponse(answer)

    async def models(self, request: Request) -> Response:
        if isinstance(refused := self._tenant(request), Response):
            return refused
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request, model_id: str) -> Response:
        if isinstance(refused := self._tenant(request), Response):
            return refused
        if model_id != self.model_name:
            return error_response(self._unknown_model(model_id))
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "olmo-disagg", "max_model_len": self.servicer.facts.context_window}

    def _unknown_model(self, model) -> ServingError:
        return ServingError(grpc.StatusCode.NOT_FOUND, f"model {model!r} is not served here; "
                            f"this server serves {self.model_name!r}", "model",
                            "model_not_found")

    async def health(self) -> Response:
        """Ready when some decode worker (and, disaggregated, some prefill worker) answers."""
        scheduler = self.servicer.scheduler
        roles = [Role.DECODE] if self.servicer.options.aggregated else list(Role)
        missing = [role for role in roles
                   if not any(scheduler.alive(w.address) for w in scheduler.workers(role))]
        if missing:
            return JSONResponse(status_code=503, content={
                "status": "unavailable", "missing": missing})
        return JSONResponse({"status": "ok"})

    async def metrics(self) -> Response:
        return Response(self.servicer.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # --- serving a request ------------------------------------------------------------

    async def _parsed(self, request: Request, parse: Callable[[dict, Tenant], T]
                      ) -> T | Response:
        """What ``parse`` makes of the request's body for its tenant, or the answer that
        refuses it: the API key and its tenant's request rate, the body's size and time,
        then the parsing, on a thread of its own and charged to the client."""
        tenant = self._tenant(request)
        if isinstance(tenant, Response):
            return tenant
        try:
            self.servicer.arrive(tenant)
        except OverBudget as exc:
            return over_quota_response(exc)
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                data = await self._read_body(request)
        except TimeoutError:
            return JSONResponse(status_code=408, content={"error": {
                "message": f"the body did not arrive within {BODY_TIMEOUT_S:g} s",
                "type": "invalid_request_error", "param": None, "code": "request_timeout"}})
        except ServingError as exc:
            return error_response(exc)
        except ClientDisconnect:  # it left before its body was whole: no one to answer
            return Response(status_code=CLIENT_CLOSED)
        try:
            # Off the event loop: tokenizing a long prompt must not stall other streams.
            client = client_of_scope(request.scope, self.servicer.budget.names)
            return await asyncio.to_thread(self._job_of, client, tenant, parse, data)
        except ServingError as exc:
            return error_response(exc)
        except OverBudget as exc:
            return over_quota_response(exc)
        except (ValueError, OverflowError) as exc:  # a value the wire cannot carry
            return error_response(BadRequest(f"the request cannot be sent on: {exc}"))

    async def _serve(self, request: Request, parse: Callable[[dict], Job]) -> Response:
        job = await self._parsed(request, parse)
        if isinstance(job, Response):
            return job
        events = self._run(job, request)
        try:
            first = await anext(events)
        except StopAsyncIteration:  # the client left before anything came
            return Response(status_code=CLIENT_CLOSED)
        finally:
            if not job.started:  # cancelled before it ran: what it holds is let go
                for prepared in job.prepared:
                    self.servicer.discard(prepared)
        if first[2] is not None:  # refused before any token: a plain error response
            await events.aclose()
            return error_response(first[2])
        if job.stream:
            return StreamingResponse(self._sse(job, first, events),
                                     media_type="text/event-stream")
        return await self._collect(job, first, events)

    def _job_of(self, client: str, tenant: Tenant, parse: Callable[[dict, Tenant], T],
                data: bytes) -> T:
        """What a body asks for; its parsing, rendering and tokenizing are charged to the
        client's budget."""
        started = time.thread_time()
        try:
            return parse(json_object(data, self.max_json_items), tenant)
        finally:
            self.servicer.budget.charge(client, time.thread_time() - started)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused by its declared length before any of it is read, and by what
        arrives once that passes the limit (a body sent in chunks declares none)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            if int(declared) <= DRAIN_BYTES:  # read, never kept or parsed: see DRAIN_BYTES
                async for _ in request.stream():
                    pass
            raise BadRequest(f"the body has {declared} bytes; at most {limit}")
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise BadRequest(f"the body has more than {limit} bytes")
            parts.append(part)
        return b"".join(parts)

    def _tenant(self, request: Request) -> Tenant | Response:
        """Whose API key the request carries, or the 401 that refuses it."""
        tenant = self.servicer.tenants.identify(request.headers.get("authorization"))
        if tenant is not None:
            return tenant
        return error_response(ServingError(grpc.StatusCode.UNAUTHENTICATED,
                                           "this API needs a valid API key "
                                           "(Authorization: Bearer <key>)"))

    async def _run(self, job: Job, request: Request) -> AsyncIterator[tuple]:
        """(choice index, response or None at its end, error or None), as they come; every
        choice on a thread of its own, all cancelled if the consumer stops early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        calls = [HttpCall() for _ in job.prepared]
        trace_parent = tracing.from_headers(request.headers)  # the client's, if it sent one

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

        def produce(index: int, prepared: Prepared, call: HttpCall) -> None:
            try:
                for response in self.servicer.run(prepared, call, trace_parent):
                    put((index, response, None))
                put((index, None, None))
            except ServingError as exc:
                if (exc.code is grpc.StatusCode.INVALID_ARGUMENT and exc.param is None
                        and job.grammar is not None):
                    # The router checked the rest before any worker saw it: what a worker
                    # refuses is the grammar (one that does not compile).
                    exc.param = job.grammar.field
                put((index, None, exc))
            except Exception as exc:  # never leave the client waiting
                put((index, None, ServingError(grpc.StatusCode.INTERNAL, str(exc))))

        job.started = True  # each choice is run now, and lets go of what it holds
        for index, (prepared, call) in enumerate(zip(job.prepared, calls)):
            threading.Thread(target=produce, args=(index, prepared, call), daemon=True,
                             name="http-choice").start()
        running = len(calls)
        check_at = loop.time() + DISCONNECT_CHECK_S
        try:
            while running:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    item = None
                # Tokens flowing or not: a client that left (a non-streaming one sees
                # nothing until the end) stops its request within a check.
                if item is None or loop.time() >= check_at:
                    if await request.is_disconnected():
                        return
                    check_at = loop.time() + DISCONNECT_CHECK_S
                if item is None:
                    continue
                if item[1] is None:
                    running -= 1
                yield item
        finally:
            for call in calls:
                call.cancel()

    async def _collect(self, job: Job, first: tuple, events: AsyncIterator) -> Response:
        choices = [Choice(i, p.prompt_ids) for i, p in enumerate(job.prepared)]
        item = first
        while True:
            index, response, error = item
            if error is not None:
                await events.aclose()
                return error_response(error)
            if response is not None:
                self._absorb(choices[index], response)
            try:
                item = await anext(events)
            except StopAsyncIteration:
                break
        answer = {
            "id": _new_id(job.kind), "object": _object(job.kind, stream=False),
            "created": int(time.time()), "model": self.model_name,
            "choices": [self._choice_body(job, c) for c in _best(job, choices)],
            "usage": self._usage(job, choices)}
        if job.kind == "chat" and job.prompt_top is not None:  # one prompt: vLLM's place
            answer["prompt_logprobs"] = self._prompt_logprobs(choices[0], job.prompt_top)
        return JSONResponse(answer)

    async def _sse(self, job: Job, first: tuple, events: AsyncIterator):
        """Server-sent events: a chunk per token (or text delta), then ``[DONE]``."""
        choices = [Choice(i, p.prompt_ids) for i, p in enumerate(job.prepared)]
        if job.tools is not None and job.tools.parse:
            for choice in choices:
                choice.tool_stream = ToolCallStream()
        stream_id, created = _new_id(job.kind), int(time.time())
        item = first
        try:
            while True:
                index, response, error = item
                if error is not None:
                    yield _event({"error": error_body(error)})
                    break
                if response is not None:
                    choice = choices[index]
                    started = bool(choice.completion_tokens or choice.text)
                    self._absorb(choice, response)
                    chunk = self._chunk(job, choice, response, first_of_choice=not started)
                    if chunk is not None:
                        yield _event({"id": stream_id, "object": _object(job.kind, stream=True),
                                      "created": created, "model": self.model_name,
                                      "choices": [chunk]})
                try:
                    item = await anext(events)
                except StopAsyncIteration:
                    if job.include_usage:
                        yield _event({"id": stream_id, "object": _object(job.kind, stream=True),
                                      "created": created, "model": self.model_name,
                                      "choices": [], "usage": self._usage(job, choices)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()

    # --- request parsing --------------------------------------------------------------

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise BadRequest("this model has no tokenizer.json", "model")
        return self.tokenizer

    def _tokenized(self, body: dict, _tenant: Tenant) -> dict:
        self._check_common(body)
        tokenizer = self._tokenizer()
        if "messages" in body:
            if self.chat is None:
                raise BadRequest("this model has no chat template (tokenizer_config.json)",
                                 "messages")
            messages = _messages(body["messages"], self.max_chat_bytes, self.markers)
            text = self.chat.render(messages, _bool_or(body, "add_generation_prompt", True))
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise BadRequest("prompt must be a string (or give messages)", "prompt")
            check_prompt_text(text, self.servicer.limits)
            _text(text, "prompt")
        tokens = encode(tokenizer, text)
        return {"count": len(tokens), "max_model_len": self.servicer.facts.context_window,
                "tokens": tokens}

    def _detokenized(self, body: dict, _tenant: Tenant) -> dict:
        self._check_common(body)
        tokenizer = self._tokenizer()
        tokens = body.get("tokens")
        window = self.servicer.facts.context_window
        if not isinstance(tokens, list) or len(tokens) > window:
            raise BadRequest(f"tokens must be a list of at most {window} token ids", "tokens")
        vocab = self.servicer.facts.vocab_size
        if not all(_is_int(t) and 0 <= t < vocab for t in tokens):
            raise BadRequest(f"tokens must be token ids in [0, {vocab})", "tokens")
        return {"prompt": tokenizer.decode(tokens, skip_special_tokens=False)}

    def _completion_job(self, body: dict, tenant: Tenant) -> Job:
        grammar = self._check_common(body)
        for name in ("tools", "tool_choice"):
            if body.get(name) not in (None, []):
                raise BadRequest(f"{name} is for /v1/chat/completions", name)
        prompts = _prompts(body.get("prompt"))
        top = _int(body, "logprobs", None, minimum=0)
        max_tokens = _int(body, "max_tokens", 16, minimum=1)
        n = _n(body)
        best_of = _int(body, "best_of", n, minimum=n, maximum=MAX_CHOICES)
        if len(prompts) * best_of > MAX_CHOICES:  # counted before any choice is built
            raise BadRequest(f"{len(prompts) * best_of} choices (n or best_of times "
                             f"prompts); at most {MAX_CHOICES}", "n")
        if best_of > n and _bool(body, "stream"):
            raise BadRequest("best_of cannot be streamed (the best are known at the end)",
                             "best_of")
        echo = _bool(body, "echo")
        if echo and _bool(body, "stream"):
            raise BadRequest("echo is answered whole, not streamed", "echo")
        prompt_top = _asked_prompt_logprobs(body)
        requests = []
        for prompt in prompts:
            for i in range(best_of):
                # Ranking best_of choices takes their log-probabilities, asked for or not.
                request = generation_pb2.GenerateRequest(sampling=self._sampling(
                    body, i, max_tokens, top is not None or best_of > n,
                    max(top or 0, prompt_top or 0)))
                request.sampling.prompt_logprobs = (echo and top is not None
                                                    or prompt_top is not None)
                if isinstance(prompt, str):
                    request.text = prompt
                else:
                    request.token_ids.ids.extend(prompt)
                requests.append(request)
        job = self._job("completion", body, requests, top is not None, len(prompts), grammar,
                        tenant)
        job.kept, job.echo, job.top, job.prompt_top = n, echo, top or 0, prompt_top
        return job

    def _chat_job(self, body: dict, tenant: Tenant) -> Job:
        grammar = self._check_common(body)
        if self.chat is None:
            raise BadRequest("this model has no chat template (tokenizer_config.json); use "
                             "/v1/completions", "messages")
        if self.tokenizer is None:
            raise BadRequest("this model has no tokenizer.json; use /v1/completions with "
                             "token ids", "messages")
        for name, neutral in (("best_of", 1), ("echo", False)):
            if body.get(name) not in (None, neutral):
                raise BadRequest(f"{name} is for /v1/completions", name)
        tools = asked_tools(body, self.chat.takes_tools)
        budget = self.max_chat_bytes
        if tools is not None:  # rendered into the prompt: they count, and carry no markers
            budget -= len(_checked_text(json.dumps(tools.tools), budget, self.markers, "tools",
                                        budget))
        messages = _messages(body.get("messages"), budget, self.markers, tools is not None)
        prompt = encode(self.tokenizer, self.chat.render(
            messages, tools=tools.tools if tools is not None else None))
        logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, minimum=0)
        if top and not logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        prompt_top = _asked_prompt_logprobs(body)
        room = self.servicer.facts.context_window - len(prompt)
        max_tokens = _int(body, "max_completion_tokens", None, minimum=1)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", max(1, room), minimum=1)
        requests = [generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=prompt),
            sampling=self._sampling(body, i, max_tokens, logprobs, max(top, prompt_top or 0)))
            for i in range(_n(body))]
        for request in requests:
            request.sampling.prompt_logprobs = prompt_top is not None
        job = self._job("chat", body, requests, logprobs, 1, grammar, tenant)
        job.top, job.prompt_top, job.tools = top, prompt_top, tools
        return job

    def _job(self, kind: str, body: dict, requests: list, logprobs: bool, prompts: int,
             grammar: AskedGrammar | None, tenant: Tenant) -> Job:
        """``requests``: at most MAX_CHOICES, counted before they were built."""
        stream = _bool(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest("stream_options must be an object", "stream_options")
        salt = _cache_salt(body)
        prepared = []
        try:
            for request in requests:
                request.cache_salt = salt
                if grammar is not None:
                    request.sampling.structured_output.CopyFrom(grammar.message)
                prepared.append(self.servicer.prepare(request, tenant))
        except (ServingError, OverBudget) as exc:
            for done in prepared:
                self.servicer.discard(done)
            if isinstance(exc, OverBudget):
                raise
            if kind == "chat" and exc.param == "prompt":  # a chat's prompt is its messages
                exc.param = "messages"
            raise
        return Job(kind, prepared, stream, bool(options.get("include_usage")), logprobs,
                   prompts, grammar=grammar)

    def _check_common(self, body: dict) -> AskedGrammar | None:
        """What completions and chats check alike, before building anything; returns the
        structured output asked for."""
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise self._unknown_model(model)
        for name, neutral in UNSUPPORTED.items():
            value = body.get(name)
            if value not in (None, neutral) and value != {} and value != []:
                raise BadRequest(f"{name} is not supported by this server", name)
        return structured_output(body)

    def _sampling(self, body: dict, choice: int, max_tokens: int, logprobs: bool,
                  top_logprobs: int) -> generation_pb2.SamplingParams:
        repetition = _number(body, "repetition_penalty", 1.0)
        if repetition <= 0:
            raise BadRequest("repetition_penalty must be > 0", "repetition_penalty")
        sampling = generation_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0), top_k=max(0, _int(body, "top_k", 0)),
            stop=_stops(body.get("stop")), ignore_eos=_bool(body, "ignore_eos"),
            logprobs=logprobs, top_logprobs=top_logprobs,
            stop_token_ids=self._stop_token_ids(body.get("stop_token_ids")),
            presence_penalty=_number(body, "presence_penalty", 0.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0),
            repetition_penalty=repetition, min_tokens=_int(body, "min_tokens", 0, minimum=0),
            logit_bias=self._logit_bias(body.get("logit_bias")),
            no_speculation=not _bool_or(body, "speculative", True))
        seed = body.get("seed")
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise BadRequest("seed must be an integer", "seed")
            sampling.seed = (seed + choice) % 2**64  # n choices, n different streams
        return sampling

    def _stop_token_ids(self, ids) -> list[int]:
        """vLLM's ``stop_token_ids``, counted before they are looked at."""
        if ids is None:
            return []
        limit = self.servicer.limits.max_stop_token_ids
        if not isinstance(ids, list) or len(ids) > limit:
            raise BadRequest(f"stop_token_ids must be a list of at most {limit} token ids",
                             "stop_token_ids")
        if not all(_is_int(t) and 0 <= t <= MAX_WIRE_INT for t in ids):
            raise BadRequest("stop_token_ids must be token ids", "stop_token_ids")
        return ids

    def _logit_bias(self, bias) -> dict[int, float]:
        """OpenAI's ``logit_bias``: token ids (as JSON object keys, strings) to numbers,
        counted before they are looked at."""
        if bias is None:
            return {}
        limit = self.servicer.limits.max_logit_bias
        if not isinstance(bias, dict) or len(bias) > limit:
            raise BadRequest(f"logit_bias must be an object of at most {limit} token ids",
                             "logit_bias")
        out = {}
        for token, value in bias.items():
            if not (token.isascii() and token.isdigit() and len(token) <= 10
                    and int(token) <= MAX_WIRE_INT):
                raise BadRequest(f"logit_bias keys must be token ids, got {token[:32]!r}",
                                 "logit_bias")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BadRequest("logit_bias values must be numbers", "logit_bias")
            out[int(token)] = float(value)
        return out

    # --- response building ------------------------------------------------------------

    def _absorb(self, choice: Choice, response: generation_pb2.GenerateResponse) -> None:
        choice.text.append(response.text)
        choice.logprobs.extend(response.logprobs)
        choice.prompt_logprobs.extend(response.prompt_logprobs)
        if response.finish_reason:
            choice.finish_reason = FinishReason(response.finish_reason)
            choice.prompt_tokens = response.usage.prompt_tokens
            choice.cached_tokens = response.usage.cached_tokens
            choice.completion_tokens = response.usage.completion_tokens
        elif response.token_ids:
            choice.completion_tokens += len(response.token_ids)

    def _choice_body(self, job: Job, choice: Choice) -> dict:
        text = "".join(choice.text)
        logprobs = self._logprobs(job, choice.logprobs) if job.logprobs else None
        if job.echo:
            text = self._prompt_text(choice.prompt_ids) + text
            if logprobs is not None:
                logprobs = self._echoed(job, choice, logprobs)
        if job.kind == "chat":
            message, finish = {"role": "assistant", "content": text}, _label(choice.finish_reason)
            parsed = parse_tool_calls(text) if job.tools and job.tools.parse else None
            if parsed is not None:
                message["content"] = parsed[0]
                message["tool_calls"] = [call.to_openai() for call in parsed[1]]
                finish = _tool_finish(finish)
            return {"index": choice.index, "message": message, "logprobs": logprobs,
                    "finish_reason": finish}
        body = {"index": choice.index, "text": text, "logprobs": logprobs,
                "finish_reason": _label(choice.finish_reason)}
        if job.prompt_top is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(choice, job.prompt_top)
        return body

    def _chunk(self, job: Job, choice: Choice, response: generation_pb2.GenerateResponse,
               first_of_choice: bool) -> dict | None:
        finish = _label(FinishReason(response.finish_reason))
        logprobs = None
        if job.logprobs and response.logprobs:
            logprobs = self._logprobs(job, list(response.logprobs), choice.logprob_chars)
            if job.kind != "chat":
                choice.logprob_chars = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        if not (response.text or finish or logprobs or first_of_choice):
            return None
        if job.kind == "chat":
            delta = {"content": response.text}
            if choice.tool_stream is not None:
                delta["content"] = choice.tool_stream.feed(response.text)
                if finish:
                    rest, calls = choice.tool_stream.finish()
                    delta["content"] += rest
                    if calls:
                        delta["tool_calls"] = [{"index": i, **call.to_openai()}
                                               for i, call in enumerate(calls)]
                        finish = _tool_finish(finish)
            if first_of_choice:
                delta["role"] = "assistant"
            return {"index": choice.index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": choice.index, "text": response.text, "logprobs": logprobs,
                "finish_reason": finish}

    def _logprobs(self, job: Job, tokens: list[generation_pb2.TokenLogprobs],
                  offset: int = 0) -> dict:
        """OpenAI's logprobs of ``tokens``; a completion's ``text_offset`` counts from
        ``offset``, the characters of the tokens before them."""
        text, top = self._token_text, job.top
        if job.kind == "chat":
            return {"content": [{
                "token": text(t.token_id), "logprob": t.logprob,
                "bytes": list(text(t.token_id).encode()),
                "top_logprobs": [{"token": text(a.token_id), "logprob": a.logprob,
                                  "bytes": list(text(a.token_id).encode())}
                                 for a in t.top[:top]]}
                for t in tokens]}
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(text(t.token_id))
        return {"tokens": [text(t.token_id) for t in tokens],
                "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{text(a.token_id): a.logprob for a in t.top[:top]} or None
                                 for t in tokens],
                "text_offset": offsets}

    def _prompt_text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(map(self._token_text, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _prompt_logprobs(self, choice: Choice, top: int) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token (none for the first), its own and its
        ``top`` likeliest alternatives', by token id, each with its rank."""
        out: list[dict | None] = [None]
        for t in choice.prompt_logprobs:
            entry = {str(t.token_id): {"logprob": t.logprob, "rank": t.rank,
                                       "decoded_token": self._token_text(t.token_id)}}
            for rank, a in enumerate(t.top[:top], start=1):
                entry.setdefault(str(a.token_id), {
                    "logprob": a.logprob, "rank": rank,
                    "decoded_token": self._token_text(a.token_id)})
            out.append(entry)
        return out

    def _echoed(self, job: Job, choice: Choice, generated: dict) -> dict:
        """A completion's logprobs with its prompt's before them: the first prompt token
        has none (nothing came before it), as OpenAI's echo answers."""
        texts = [self._token_text(t) for t in choice.prompt_ids]
        offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0))
        start = sum(map(len, texts))
        scored = choice.prompt_logprobs
        return {
            "tokens": texts + generated["tokens"],
            "token_logprobs": [None] + [t.logprob for t in scored] + generated["token_logprobs"],
            "top_logprobs": [None] + [{self._token_text(a.token_id): a.logprob
                                       for a in t.top[:job.top]} or None for t in scored]
            + generated["top_logprobs"],
            "text_offset": offsets + [start + o for o in generated["text_offset"]]}

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer else f"<{token_id}>"

    def _usage(self, job: Job, choices: list[Choice]) -> dict:
        per_prompt = len(choices) // job.prompts
        prompt = sum(c.prompt_tokens for c in choices[::per_prompt])
        cached = sum(c.cached_tokens for c in choices[::per_prompt])
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def _best(job: Job, choices: list[Choice]) -> list[Choice]:
    """Each prompt's ``job.kept`` choices of highest log-probability per token (OpenAI's
    best_of), indexed afresh; all of them, as they are, without best_of."""
    per_prompt = len(choices) // job.prompts
    if not job.kept or job.kept == per_prompt:
        return choices
    kept = []
    for begin in range(0, len(choices), per_prompt):
        group = sorted(choices[begin:begin + per_prompt], key=_per_token, reverse=True)
        kept += [dataclasses.replace(c, index=len(kept) + i)
                 for i, c in enumerate(group[:job.kept])]
    return kept


def _per_token(choice: Choice) -> float:
    return (sum(t.logprob for t in choice.logprobs) / len(choice.logprobs)
            if choice.logprobs else float("-inf"))


def serve_openai(servicer: GenerationServicer, model_dir: Path, host: str = "127.0.0.1",
                 port: int = 0, tls: tuple[bytes, bytes] | None = None,
                 model_name: str | None = None):
    """Start the HTTP API beside the router's gRPC API (with its keys and tenants);
    returns the HttpServer."""
    from .http_server import HttpServer

    api = OpenAIServer(servicer, servicer.tokenizer, model_name or Path(model_dir).name,
                       ChatTemplate.of_model(model_dir))
    options = servicer.options
    return HttpServer(api.app, host, port, tls, options.max_http_connections,
                      ConnectionsByClient(options.clients.max_connections,
                                          servicer.budget.names))


# --- small parsers, each refusing with the parameter's name ---------------------------------

def json_items(data: bytes, stop_above: int) -> int:
    """How many items (values, keys, strings) a JSON text holds at most, counted over its
    bytes without parsing it: parsing costs by the item (a body of empty lists, "[[],[],
    ...]", takes 25 times as long per byte as one long string, and 56 bytes of memory
    for every 3 it has). Its strings are told apart as the parser does (quotes not
    escaped); the commas, colons, brackets and braces outside them each begin at most
    one item. Beyond ``stop_above`` strings, the rest goes uncounted."""
    plain = data.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in data else data
    strings = plain.count(b'"') // 2
    if strings > stop_above:
        return strings
    outside = b"".join(plain.split(b'"')[0::2]) if strings else plain
    return strings + len(outside) - len(outside.translate(None, b",:[{"))


def json_object(data: bytes, max_items: int) -> dict:
    """The body's JSON object, its items counted before it is parsed (``json_items``)."""
    items = json_items(data, max_items)
    if items > max_items:
        raise BadRequest(f"the body's JSON has more than {max_items} items (values, keys, "
                         "strings); at most that many fit a request to this model")
    try:
        body = json.loads(data)
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _prompts(prompt) -> list:
    """The request's prompts, each a string or a list of token ids. A list of prompts is
    counted before it is looked at, and token ids must fit the wire (the vocabulary is
    checked later, against the model)."""
    if isinstance(prompt, str):
        return [_text(prompt, "prompt")]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [_token_ids(prompt)]
        if len(prompt) > MAX_CHOICES:
            raise BadRequest(f"{len(prompt)} prompts; at most {MAX_CHOICES}", "prompt")
        if all(isinstance(p, str) for p in prompt):
            return [_text(p, "prompt") for p in prompt]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [_token_ids(p) for p in prompt]
    raise BadRequest("prompt must be a string, a list of token ids, or a list of either",
                     "prompt")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(ids: list[int]) -> list[int]:
    if not all(0 <= t <= MAX_WIRE_INT for t in ids):
        raise BadRequest(f"token ids must be in [0, {MAX_WIRE_INT}]", "prompt")
    return ids


def _text(text: str, param: str) -> str:
    """``text``, if it is valid Unicode all through (a lone surrogate is not)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise BadRequest(f"{param} is not valid Unicode text (a lone surrogate?)",
                         param) from None
    return text


def _cache_salt(body: dict) -> str:
    """vLLM's ``cache_salt``: prompts share cached prefixes only with those of the same
    salt (empty: the shared cache)."""
    salt = body.get("cache_salt")
    if salt is None:
        return ""
    if not isinstance(salt, str) or not salt:
        raise BadRequest("cache_salt must be a non-empty string", "cache_salt")
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise BadRequest(f"cache_salt has more than {MAX_CACHE_SALT_CHARS} characters",
                         "cache_salt")
    return _text(salt, "cache_salt")


def _messages(messages, max_bytes: int, markers: frozenset[str], tools: bool = False
              ) -> list[dict]:
    """The messages as the template takes them, each checked before any is rendered: a
    known role (``developer`` is ``system``; ``tool`` in a chat with ``tools``), text
    content, at most ``max_bytes`` in all, and none of the ``markers`` that give a
    rendered prompt its structure. With tools, an assistant turn's ``tool_calls`` and a
    tool turn's ``tool_call_id`` go to the template too, checked alike."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    roles = CHAT_ROLES | {TOOL_ROLE} if tools else CHAT_ROLES
    out, left = [], max_bytes
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message needs a role and content", "messages")
        role = ROLE_ALIASES.get(message["role"], message["role"])
        if role not in roles:
            raise BadRequest(f"unknown role {message['role'][:32]!r}; roles are "
                             f"{', '.join(sorted({*roles, *ROLE_ALIASES}))}", "messages")
        content = message.get("content")
        if content is None and role == "assistant":  # a turn of tool calls has none
            content = ""
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str)
                       and p.get("type") == "text" for p in content):
                raise BadRequest("only text content parts are supported", "messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise BadRequest("message content must be a string or text parts", "messages")
        left -= len(_checked_text(content, left, markers, "messages", max_bytes))
        turn = {"role": role, "content": content}
        if tools and role == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = _tool_calls(message["tool_calls"])
            left -= len(_checked_text(json.dumps(turn["tool_calls"]), left, markers,
                                      "messages", max_bytes))
        if tools and role == TOOL_ROLE and isinstance(message.get("tool_call_id"), str):
            turn["tool_call_id"] = message["tool_call_id"]
            left -= len(_checked_text(turn["tool_call_id"], left, markers, "messages",
                                      max_bytes))
        out.append(turn)
    return out


def _checked_text(text: str, left: int, markers: frozenset[str], param: str,
                  limit: int) -> bytes:
    """``text`` as UTF-8, refused if it has more than the ``left`` bytes of the chat's
    ``limit`` (characters counted first: never more than bytes) or holds one of the
    template's ``markers``."""
    if len(text) > left or len(data := _text(text, param).encode()) > left:
        raise BadRequest(f"the {param} have more than {limit} bytes", param)
    found = next((m for m in markers if m in text), None)
    if found is not None:
        raise BadRequest(f"{param} may not contain {found!r}: the chat template's own "
                         "markers and special tokens give the prompt its structure", param)
    return data


def _tool_calls(calls) -> list[dict]:
    """An assistant turn's tool calls, as the template takes them (arguments parsed)."""
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments", "{}"), str) for c in calls):
        raise BadRequest("tool_calls must be a list of {function: {name, arguments}}",
                         "messages")
    out = []
    for call in calls:
        try:
            arguments = json.loads(call["function"].get("arguments", "{}"))
        except ValueError:
            raise BadRequest("tool call arguments must be JSON", "messages") from None
        out.append({"id": str(call.get("id", "")), "type": "function", "function": {
            "name": call["function"]["name"], "arguments": arguments}})
    return out


def _tool_finish(finish: str | None) -> str | None:
    """OpenAI's finish reason for an answer that called tools."""
    return "tool_calls" if finish == FinishReason.STOP.label else finish


def chat_markers(tokenizer: Tokenizer | None, chat: ChatTemplate | None) -> frozenset[str]:
    """The strings a client's message may not carry: the tokenizer's special tokens and
    the ``<|...|>`` markers the chat template writes."""
    found = set(re.findall(r"<\|[^|<>\s]{1,32}\|>", chat.source)) if chat else set()
    if tokenizer is not None:
        found |= {t.content for t in tokenizer.get_added_tokens_decoder().values()
                  if t.special and t.content}
    return frozenset(found)


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [_text(stop, "stop")]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [_text(s, "stop") for s in stop]
    raise BadRequest("stop must be a string or a list of strings", "stop")


def _asked_prompt_logprobs(body: dict) -> int | None:
    """vLLM's prompt_logprobs: how many alternatives per prompt token, or None."""
    top = _int(body, "prompt_logprobs", None, minimum=0, maximum=MAX_TOP_LOGPROBS)
    if top is not None and _bool(body, "stream"):
        raise BadRequest("prompt_logprobs are answered whole, not streamed", "prompt_logprobs")
    return top


def _n(body: dict) -> int:
    return _int(body, "n", 1, minimum=1, maximum=MAX_CHOICES)


def _int(body: dict, name: str, default, minimum: int | None = None,
         maximum: int = MAX_WIRE_INT):
    """An integer field; at most ``maximum`` (by default what the wire's fields hold:
    the model's own limits are checked later, with their reasons)."""
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise BadRequest(f"{name} must be an integer", name)
    if minimum is not None and value < minimum:
        raise BadRequest(f"{name} must be at least {minimum}", name)
    if value > maximum:
        raise BadRequest(f"{name} must be at most {maximum}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadRequest(f"{name} must be a number", name)
    return float(value)


def _bool_or(body: dict, name: str, default: bool) -> bool:
    return default if body.get(name) is None else _bool(body, name)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise BadRequest(f"{name} must be true or false", name)
    return bool(value)


def _label(reason: FinishReason) -> str | None:
    """OpenAI's word for why a choice ended (the reason's label); None while it runs."""
    return reason.label if reason else None


def _new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def _object(kind: str, stream: bool) -> str:
    if kind == "chat":
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
