"""Request tracing with OpenTelemetry: one trace per request, across router and workers.

Off by default: ``start`` then returns ``NOT_TRACED``, whose methods do nothing, and the
code paths that record spans return before building anything. ``configure`` turns it on
for a process (the router, each worker, each Ray actor): spans are batched by the SDK's
``BatchSpanProcessor`` to its OTLP/gRPC exporter, for any collector (Jaeger, Tempo, the
OpenTelemetry Collector); the standard ``OTEL_*`` variables for the exporter (endpoint,
headers, certificates) and the resource (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``) apply.

A request's spans are made here, not by the SDK's tracer: a ``Span`` is a small handle
(ids, name, times, attributes); an ended one waits in a queue, and a thread of this module
makes it the SDK's ``ReadableSpan`` and hands it to the span processor, as the SDK's own
spans go, a batch every ``HANDOFF_S``. The SDK's tracer validates and locks on every
attribute, and would do it all on the request's path: a request makes about 20 spans, and
on a 2-CPU machine serving a small model that path is where each microsecond shows
(docs/benchmarks.md, "Request traces").

A trace crosses processes as W3C ``traceparent`` (and ``tracestate``): in gRPC metadata
on every call made for a request, from HTTP clients' headers, and inside a stage pass
(``SequenceSlice.traceparent``) so that the stages of a staged instance attach their
spans to the request they work for. Work a worker does in batched passes (prefill
chunks, decode steps) is recorded per request after the fact, with the pass's start and
end times (``span_between``). Nothing here is tied to a thread: every span names its
parent, as the router's request code runs as generators that resume on other threads.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from protos.setting import setting

__all__ = ["SpanKind", "TracingOptions", "Span", "NOT_TRACED", "configure", "install",
           "enabled", "start", "end", "span_between", "header", "metadata", "from_metadata",
           "from_headers"]

SCOPE_NAME = "olmo-disagg"
# The variables by which OpenTelemetry's own docs turn an OTLP exporter on.
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# W3C Trace Context, version 00 (and later versions' first four fields).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
MAX_TRACEPARENT_CHARS = 256
MAX_TRACESTATE_CHARS = 512


@dataclasses.dataclass(frozen=True)
class TracingOptions:
    enabled: bool = setting(False, "export a trace of every request over OTLP (also on when "
                                   "$OTEL_EXPORTER_OTLP_ENDPOINT or _TRACES_ENDPOINT is set, "
                                   "or $OTEL_TRACES_EXPORTER=otlp)")
    endpoint: str | None = setting(None, "the OTLP/gRPC collector, e.g. http://jaeger:4317 "
                                         "(null: $OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else "
                                         "localhost:4317)")
    sample_ratio: float = setting(1.0, "the share of requests traced (a client's traceparent "
                                       "decides for its request instead)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"tracing.sample_ratio must be in [0, 1], got {self.sample_ratio}")

    @property
    def wanted(self) -> bool:
        """On by these options or by the standard variables."""
        return (self.enabled or any(os.environ.get(v) for v in _ENDPOINT_VARIABLES)
                or os.environ.get("OTEL_TRACES_EXPORTER", "").strip() == "otlp")


@dataclasses.dataclass
class _Sink:
    """Where ended spans go in this process."""

    processor: Any         # an SDK SpanProcessor
    resource: Any          # the SDK Resource they are from
    scope: Any             # the SDK InstrumentationScope they are from
    sample_below: int      # a new trace is sampled when its id's low 64 bits are below


_lock = threading.Lock()
_sink: _Sink | None = None
# Ended spans wait here (span, end time in ns) until the hand-off thread takes them.
_ended: collections.deque = collections.deque()
_wake = threading.Event()
HANDOFF_S = 0.5
MAX_WAITING = 65536  # past this many waiting spans (an exporter far behind), new ones are dropped


def configure(options: TracingOptions, service: str) -> bool:
    """Export this process's spans as ``service`` (``OTEL_SERVICE_NAME`` wins), if the
    options or the environment ask for it; the first call in a process decides.
    Returns whether tracing is on."""
    if not options.wanted:
        return enabled()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    with _lock:
        if _sink is not None:
            return True
    # The exporter reads the variables itself, and sends plain text to an http:// endpoint.
    install(BatchSpanProcessor(OTLPSpanExporter(endpoint=options.endpoint)),
            Resource.create({SERVICE_NAME: service}), options.sample_ratio)
    atexit.register(shutdown)  # what is batched when the process ends still goes
    return True


def install(processor, resource=None, sample_ratio: float = 1.0):
    """Send ended spans to ``processor`` (an SDK SpanProcessor, e.g. a SimpleSpanProcessor
    over an in-memory exporter in a test; None: tracing off), as spans of ``resource``;
    returns the processor it replaces."""
    global _sink
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    flush()  # what ended goes where it was meant to
    with _lock:
        previous = _sink.processor if _sink is not None else None
        _sink = None if processor is None else _Sink(
            processor, resource or Resource.create(), InstrumentationScope(SCOPE_NAME),
            int(sample_ratio * 2**64))
        if _sink is not None:
            _start_handoff_locked()
        return previous


_handoff: threading.Thread | None = None


def _start_handoff_locked() -> None:
    global _handoff
    if _handoff is None or not _handoff.is_alive():
        _handoff = threading.Thread(target=_hand_off, name="trace-handoff", daemon=True)
        _handoff.start()


def _hand_off() -> None:
    """Every HANDOFF_S (or sooner when many wait), the ended spans to the processor."""
    while True:
        _wake.wait(HANDOFF_S)
        _wake.clear()
        flush()


def flush() -> None:
    """Hand every ended span to the processor now (a test, a process that ends)."""
    from opentelemetry.sdk.trace import Event, ReadableSpan

    sink = _sink
    while True:
        try:
            span, end_ns = _ended.popleft()
        except IndexError:  # none left (another flush may have taken the last)
            return
        if sink is None:
            continue
        sink.processor.on_end(ReadableSpan(
            span.name, span.context, span.parent, sink.resource, span.attributes,
            [Event(*event) for event in span.events],
            span.links, span.kind, status=span.status or Status(StatusCode.UNSET),
            start_time=span.start_ns, end_time=end_ns, instrumentation_scope=sink.scope))


def enabled() -> bool:
    return _sink is not None


def shutdown() -> None:
    """Send what is batched (a process that ends)."""
    sink = _sink
    if sink is not None:
        flush()
        sink.processor.shutdown()


# --- spans ----------------------------------------------------------------------------

class Span:
    """A span being recorded; ``end`` sends it. Not locked: one request's code at a time
    touches it (its thread may change)."""

    def __init__(self, name: str, context: SpanContext, parent: SpanContext | None,
                 kind: SpanKind, start_ns: int, attributes: Mapping | None,
                 links: Sequence[Link]):
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.start_ns = start_ns
        self.attributes = dict(attributes or {})
        self.events: list = []
        self.links = links
        self.status: Status | None = None

    def is_recording(self) -> bool:
        return True

    def get_span_context(self) -> SpanContext:
        return self.context

    def set_attribute(self, key: str, value) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: Mapping) -> None:
        self.attributes.update(attributes)

    def add_event(self, name: str, attributes: Mapping | None = None,
                  timestamp_ns: int | None = None) -> None:
        # Made the SDK's Event when handed off: its attributes are checked and locked.
        self.events.append((name, attributes, timestamp_ns or time.time_ns()))


class _NotTraced(Span):
    """What ``start`` gives when a request is not traced: records nothing."""

    def __init__(self):
        super().__init__("", SpanContext(0, 0, False), None, SpanKind.INTERNAL, 0, None, ())

    def is_recording(self) -> bool:
        return False

    def set_attribute(self, key: str, value) -> None:
        pass

    def set_attributes(self, attributes: Mapping) -> None:
        pass

    def add_event(self, name: str, attributes: Mapping | None = None,
                  timestamp_ns: int | None = None) -> None:
        pass


NOT_TRACED: Span = _NotTraced()
Parent = Span | SpanContext | str | None  # a span, its context, a traceparent, or none


def _parent_context(parent: Parent) -> SpanContext | None:
    if parent is None or isinstance(parent, SpanContext):
        return parent
    if isinstance(parent, str):
        return _parse(parent, "")
    return parent.context if parent.is_recording() else SpanContext(0, 0, False)


def start(name: str, parent: Parent = None, kind: SpanKind = SpanKind.INTERNAL,
          attributes: Mapping | None = None, start_s: float | None = None,
          links: Sequence[Span] = ()) -> Span:
    """A span under ``parent`` (none: a new trace, sampled by the configured ratio), from
    ``start_s`` (a perf_counter time) or now; end it with ``end``. NOT_TRACED when tracing
    is off or the parent is not sampled."""
    sink = _sink
    if sink is None:
        return NOT_TRACED
    context = _parent_context(parent)
    if context is None:
        trace_id = random.getrandbits(128) or 1
        if (trace_id & (2**64 - 1)) >= sink.sample_below:
            return NOT_TRACED
        state = None
    elif context.is_valid and context.trace_flags.sampled:
        trace_id, state = context.trace_id, context.trace_state
    else:
        return NOT_TRACED
    own = SpanContext(trace_id, random.getrandbits(64) or 1, False, _SAMPLED, state)
    return Span(name, own, context, kind, time.time_ns() if start_s is None
                else epoch_ns(start_s), attributes,
                [Link(s.context) for s in links if s.is_recording()] if links else ())


def end(span: Span, end_s: float | None = None, error: BaseException | str | None = None,
        attributes: Mapping | None = None) -> None:
    """Send ``span``, ended at ``end_s`` (a perf_counter time) or now; ``error`` marks it
    failed."""
    if _sink is None or not span.is_recording():
        return
    if attributes:
        span.attributes.update(attributes)
    if error is not None:
        _fail(span, error)
    if len(_ended) >= MAX_WAITING:
        return
    _ended.append((span, time.time_ns() if end_s is None else epoch_ns(end_s)))
    if len(_ended) > 4096:
        _wake.set()


def _fail(span: Span, error: BaseException | str) -> None:
    """Mark ``span`` failed: the error's status code (gRPC's name) and message."""
    code = getattr(error, "code", None)
    code = code() if callable(code) else code
    if code is not None:
        span.attributes["rpc.grpc.status_code"] = getattr(code, "name", str(code))
    message = getattr(error, "message", None) or str(error)
    span.status = Status(StatusCode.ERROR, message)
    if isinstance(error, BaseException):
        span.add_event("exception", {"exception.type": type(error).__name__,
                                     "exception.message": message})


def span_between(name: str, parent: Parent, start_s: float, end_s: float,
                 attributes: Mapping | None = None, error: str | None = None) -> Span:
    """A span that already happened (perf_counter times), e.g. a request's share of a
    batched pass; returned ended, to parent others."""
    span = start(name, parent, attributes=attributes, start_s=start_s)
    end(span, end_s, error or None)
    return span


def epoch_ns(perf_s: float) -> int:
    """A ``time.perf_counter()`` time as OpenTelemetry's (nanoseconds since the epoch)."""
    return time.time_ns() - int((time.perf_counter() - perf_s) * 1e9)


# --- across processes -----------------------------------------------------------------

def header(parent: Parent) -> str:
    """``parent`` as a W3C traceparent ("" when there is none to carry)."""
    if isinstance(parent, str):
        return parent
    context = _parent_context(parent) if _sink is not None else None
    if context is None or not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def metadata(parent: Parent) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries ``parent`` to the callee (empty when there is none)."""
    if isinstance(parent, str):
        return (("traceparent", parent),) if parent else ()
    context = _parent_context(parent) if _sink is not None else None
    if context is None or not context.is_valid:
        return ()
    carried = (("traceparent", header(context)),)
    if context.trace_state:
        carried += (("tracestate", context.trace_state.to_header()),)
    return carried


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> SpanContext | None:
    """The caller's trace context from gRPC invocation metadata (None: none, or off)."""
    if _sink is None or not metadata:
        return None
    traceparent = state = ""
    for key, value in metadata:
        if key == "traceparent" and isinstance(value, str):
            traceparent = value
        elif key == "tracestate" and isinstance(value, str):
            state = value
    return _parse(traceparent, state) if traceparent else None


def from_headers(headers: Mapping[str, str]) -> SpanContext | None:
    """An HTTP client's trace context (its ``traceparent`` header), or None."""
    if _sink is None or "traceparent" not in headers:
        return None
    return _parse(headers["traceparent"], headers.get("tracestate", ""))


def _parse(traceparent: str, state: str) -> SpanContext | None:
    """A W3C traceparent (and tracestate) as the remote parent it names; None if it is
    not one (its trace then starts here). What a client sends is bounded before anything
    is parsed or kept: a traceparent is 55 characters (a later version's a little more),
    and a tracestate beyond W3C's 512 is dropped."""
    if len(traceparent) > MAX_TRACEPARENT_CHARS:
        return None
    return _parsed(traceparent, state if len(state) <= MAX_TRACESTATE_CHARS else "")


@functools.lru_cache(maxsize=4096)  # a request's spans name its parent's header again
def _parsed(traceparent: str, state: str) -> SpanContext | None:
    found = _TRACEPARENT.fullmatch(traceparent.strip().lower())
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} \
            or set(span_id) == {"0"}:
        return None
    try:
        trace_state = TraceState.from_header([state]) if state else None
    except ValueError:
        trace_state = None
    return SpanContext(int(trace_id, 16), int(span_id, 16), True,
                       TraceFlags(int(flags, 16) & TraceFlags.SAMPLED), trace_state)
