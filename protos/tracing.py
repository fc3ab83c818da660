"""Request tracing with OpenTelemetry: one trace per request, across router and workers.

Off by default: every span is then the API's non-recording one and the code paths below
return before building anything. ``configure`` turns it on for a process (the router,
each worker, each Ray actor) with an SDK tracer provider that batches spans to an OTLP
collector (Jaeger, Tempo, the OpenTelemetry Collector); the standard ``OTEL_*``
variables (endpoint, headers, service name, resource attributes, sampler) apply.

A trace crosses processes as W3C ``traceparent`` (and ``tracestate``): in gRPC metadata
on every call made for a request, from HTTP clients' headers, and inside a stage pass
(``SequenceSlice.traceparent``) so that the stages of a staged instance attach their
spans to the request they work for. Work a worker does in batched passes (prefill
chunks, decode steps) is recorded per request after the fact, with the pass's start and
end times (``span_between``): a pass of 8 requests makes 8 spans, none on the pass's
own thread while it runs.

The router never makes a context current: its request code runs as generators that
may resume on other threads, so every span names its parent explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from protos.setting import setting

TRACER_NAME = "olmo-disagg"
_PROPAGATOR = TraceContextTextMapPropagator()
# The variables by which OpenTelemetry's own docs turn an exporter on.
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


@dataclasses.dataclass(frozen=True)
class TracingOptions:
    enabled: bool = setting(False, "export a trace of every request over OTLP (also on when "
                                   "$OTEL_EXPORTER_OTLP_ENDPOINT or _TRACES_ENDPOINT is set, "
                                   "or $OTEL_TRACES_EXPORTER=otlp)")
    endpoint: str | None = setting(None, "the OTLP/gRPC collector, e.g. http://jaeger:4317 "
                                         "(null: $OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else "
                                         "localhost:4317)")
    sample_ratio: float = setting(1.0, "the share of requests traced (a client's sampled "
                                       "traceparent is followed either way)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"tracing.sample_ratio must be in [0, 1], got {self.sample_ratio}")

    @property
    def wanted(self) -> bool:
        """On by these options or by the standard variables."""
        return (self.enabled or any(os.environ.get(v) for v in _ENDPOINT_VARIABLES)
                or os.environ.get("OTEL_TRACES_EXPORTER", "").strip() == "otlp")


_lock = threading.Lock()
_provider = None  # the SDK provider of this process, once configured
_tracer: trace.Tracer = trace.NoOpTracer()


def configure(options: TracingOptions, service: str) -> bool:
    """Export this process's spans as ``service`` (``OTEL_SERVICE_NAME`` wins), if the
    options or the environment ask for it; the first call in a process decides.
    Returns whether tracing is on."""
    if not options.wanted:
        return enabled()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    with _lock:
        if _provider is not None:
            return True
        # An explicit $OTEL_TRACES_SAMPLER is the SDK's to read; else our ratio.
        sampler = (None if os.environ.get("OTEL_TRACES_SAMPLER")
                   else ParentBased(TraceIdRatioBased(options.sample_ratio)))
        resource = Resource.create({SERVICE_NAME: service})  # $OTEL_SERVICE_NAME overrides
        provider = TracerProvider(resource=resource, sampler=sampler)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=options.endpoint, insecure=_insecure(options.endpoint))))
        _install_locked(provider)
    return True


def _insecure(endpoint: str | None) -> bool | None:
    """Plain text for an ``http://`` endpoint (the exporter's own reading of the
    variables otherwise)."""
    return True if endpoint and endpoint.startswith("http://") else None


def install(provider) -> object:
    """Trace with ``provider`` (an SDK TracerProvider, e.g. with an in-memory exporter in
    a test; None: off); returns the one it replaces."""
    with _lock:
        previous = _provider
        _install_locked(provider)
        return previous


def _install_locked(provider) -> None:
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME) if provider is not None else trace.NoOpTracer()


def enabled() -> bool:
    return _provider is not None


def shutdown() -> None:
    """Send what is batched (a process that ends)."""
    provider = _provider
    if provider is not None:
        provider.shutdown()


# --- spans ----------------------------------------------------------------------------

Parent = Span | Context | str | None  # a span, a context, a traceparent header, or none


def _context(parent: Parent) -> Context | None:
    if parent is None or isinstance(parent, Context):
        return parent
    if isinstance(parent, str):
        return _PROPAGATOR.extract({"traceparent": parent}) if parent else None
    return trace.set_span_in_context(parent)


def start(name: str, parent: Parent = None, kind: SpanKind = SpanKind.INTERNAL,
          attributes: Mapping | None = None, start_s: float | None = None,
          links: Sequence[Span] = ()) -> Span:
    """A span under ``parent`` (none: a new trace), from ``start_s`` (a perf_counter
    time) or now; end it with ``end``."""
    if not enabled():
        return trace.INVALID_SPAN
    return _tracer.start_span(
        name, _context(parent), kind, attributes=attributes,
        links=[Link(s.get_span_context()) for s in links if s.get_span_context().is_valid],
        start_time=None if start_s is None else epoch_ns(start_s))


def end(span: Span, end_s: float | None = None, error: BaseException | str | None = None,
        attributes: Mapping | None = None) -> None:
    """End ``span`` at ``end_s`` (a perf_counter time) or now; ``error`` marks it failed."""
    if not span.is_recording():
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        fail(span, error)
    span.end(None if end_s is None else epoch_ns(end_s))


def fail(span: Span, error: BaseException | str) -> None:
    """Mark ``span`` failed: the error's status code (gRPC's name) and message."""
    if not span.is_recording():
        return
    code = getattr(error, "code", None)
    code = code() if callable(code) else code
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", getattr(code, "name", str(code)))
    message = getattr(error, "message", None) or str(error)
    span.set_status(Status(StatusCode.ERROR, message))
    if isinstance(error, BaseException):
        span.record_exception(error)


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
    """``parent`` as a W3C traceparent ("" when tracing is off or it is not sampled)."""
    if isinstance(parent, str):
        return parent
    if not enabled() or parent is None:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, _context(parent))
    return carrier.get("traceparent", "")


def metadata(parent: Parent) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries ``parent`` to the callee (empty when off)."""
    if not enabled() or parent is None:
        return ()
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, _context(parent))
    return tuple(carrier.items())


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """The caller's trace context from gRPC invocation metadata (None: none, or off)."""
    if not enabled() or not metadata:
        return None
    carrier = {key: value for key, value in metadata
               if key in ("traceparent", "tracestate") and isinstance(value, str)}
    return _PROPAGATOR.extract(carrier) if "traceparent" in carrier else None


def from_headers(headers: Mapping[str, str]) -> Context | None:
    """An HTTP client's trace context (its ``traceparent`` header), or None."""
    if not enabled() or "traceparent" not in headers:
        return None
    return _PROPAGATOR.extract({key: headers[key] for key in ("traceparent", "tracestate")
                                if key in headers})
