"""Request traces (OpenTelemetry): a disaggregated request is one trace, from the client's
traceparent through router, prefill worker, K/V pushes and decode worker, whose spans
cover its time to first token; an HTTP client's traceparent is followed; a resume after a
decode worker hangs is a span linked to the attempt it follows; a stalled push ends its
attempt in an error span within the liveness bound. Spans are collected with the SDK's
in-memory exporter from a real cluster in this process."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import local_cluster
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from cluster.cluster_config import RoleConfig
from decode_worker import engine as decode_engine
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from protos import tracing
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from trace_sink import SpanRecord, ttft_coverage  # noqa: E402

LIMITS = CacheLimits(max_sequences=8, max_total_tokens=4096, prefill_chunk_tokens=64)
PROMPT = " ".join(f"word{i}" for i in range(60))  # several 64-token prefill chunks
# 465 tokens: most of the context window, so that the TTFT is mostly work (a few
# tenths of a millisecond between threads are uncovered whatever its length).
LONG_PROMPT = " ".join(f"word{i}" for i in range(155))
FIRST_TOKEN_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def exporter():
    spans = InMemorySpanExporter()
    previous = tracing.install(SimpleSpanProcessor(spans))
    yield spans
    tracing.install(previous)


@pytest.fixture(scope="module")
def cluster(exporter):
    """Disaggregated, two prefill and two decode instances (a resume has somewhere to
    go), the demo model, the HTTP API."""
    options = RouterOptions(local_prefill_below_tokens=0, worker_gone_s=2.5,
                            first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S, token_timeout_s=30)
    made = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, http=True, router=options,
                         prefill=RoleConfig(instances=2), decode=RoleConfig(instances=2))
    yield made
    made.stop()


def trace_of(exporter: InMemorySpanExporter, trace_id: int, timeout: float = 10
             ) -> list[ReadableSpan]:
    """The trace's spans, once its request's span has ended (after the last response)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        if any(s.name == "olmo.generate" for s in spans):
            return spans
        time.sleep(0.05)
    raise AssertionError("the request's span did not end")


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def ttft_share(spans: list[ReadableSpan]) -> float:
    """What the trace says of the request's time to first token: the share its spans cover
    (bench/trace_sink.py's reading, as a collector's)."""
    share = ttft_coverage(SpanRecord(
        s.context.span_id, s.parent.span_id if s.parent else None, s.name, s.start_time,
        s.end_time, next((e.timestamp for e in s.events if e.name == "first_token"), None))
        for s in spans)
    assert share is not None, "no request span with a first token"
    return share


def test_off_by_default_no_span_is_made_and_nothing_is_sent():
    previous = tracing.install(None)
    try:
        span = tracing.start("anything")
        assert not span.is_recording()
        assert tracing.metadata(span) == () and tracing.header(span) == ""
        assert tracing.from_metadata([("traceparent", "00-" + "1" * 32 + "-" + "2" * 16
                                       + "-01")]) is None
    finally:
        tracing.install(previous)


def test_the_options_and_the_standard_variables_turn_it_on(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.TracingOptions().wanted and tracing.TracingOptions(enabled=True).wanted
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.TracingOptions().wanted
    with pytest.raises(ValueError):
        tracing.TracingOptions(sample_ratio=1.5)


SAMPLED = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


@pytest.mark.parametrize("traceparent", [
    "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01-extra",  # version 00 has four fields
    "ff-" + "ab" * 16 + "-" + "cd" * 8 + "-01",         # version ff is invalid
    "00-" + "0" * 32 + "-" + "cd" * 8 + "-01",          # all-zero trace id
    "00-" + "ab" * 16 + "-" + "0" * 16 + "-01",         # all-zero parent id
    "00-abc-def-01", "garbage", "", SAMPLED + "-" + "x" * 10_000])
def test_a_traceparent_that_is_not_one_starts_a_trace_of_its_own(exporter, traceparent):
    assert tracing.from_headers({"traceparent": traceparent}) is None
    span = tracing.start("request", tracing.from_metadata([("traceparent", traceparent)]))
    assert span.is_recording() and span.parent is None
    tracing.end(span)


def test_sampling_new_traces_by_ratio_and_following_a_clients_flag(exporter):
    previous = tracing.install(SimpleSpanProcessor(InMemorySpanExporter()), sample_ratio=0.0)
    try:
        assert not tracing.start("new").is_recording()  # ratio 0: no new trace
        sampled = tracing.start("child", tracing.from_headers({"traceparent": SAMPLED}))
        assert sampled.is_recording()
        assert sampled.get_span_context().trace_id == int("ab" * 16, 16)
        assert tracing.header(sampled).endswith("-01")
        unsampled = tracing.from_headers({"traceparent": SAMPLED[:-2] + "00"})
        assert not tracing.start("child", unsampled).is_recording()
        assert tracing.metadata(tracing.start("child", unsampled)) == ()
    finally:
        tracing.install(previous)


def test_a_disaggregated_request_is_one_trace_that_covers_its_ttft(cluster, exporter):
    client_span = tracing.start("client")
    client = GenerationClient(cluster.router_address)
    request = generate_request(LONG_PROMPT, max_tokens=40, ignore_eos=True)
    tokens = [t for r in client.stub.Generate(request, timeout=60,
                                              metadata=tracing.metadata(client_span))
              for t in r.token_ids]
    tracing.end(client_span)
    client.close()
    assert len(tokens) == 40
    spans = trace_of(exporter, client_span.get_span_context().trace_id)
    by_id = {s.context.span_id: s for s in spans}

    def parent(span: ReadableSpan) -> ReadableSpan:
        return by_id[span.parent.span_id]

    root = one(spans, "olmo.generate")
    assert root.parent.span_id == client_span.get_span_context().span_id
    attempt = one(spans, "attempt")
    assert parent(attempt) is root and parent(one(spans, "prepare")) is root
    assert parent(one(spans, "reserve")) is one(spans, "admission")
    server = one(spans, "prefill_worker.prefill")
    leg = one(spans, "prefill_leg")
    assert parent(server) is leg and parent(leg) is attempt
    assert parent(one(spans, "prefill.queue")) is server
    passes = [s for s in spans if s.name == "prefill.pass"]
    assert len(passes) >= 2 and all(parent(s) is server for s in passes)
    pushes = [s for s in spans if s.name == "kv.push"]
    assert pushes and all(parent(s) is server for s in pushes)
    for push in pushes:  # each piece: export, queueing, encoding, the receiver's part
        assert {"olmo.export_ms", "olmo.queued_ms", "olmo.encode_ms",
                "olmo.receive_ms"} <= set(push.attributes)
        assert push.attributes["olmo.bytes"] > 0
    assert parent(one(spans, "decode.first_token")) is attempt
    steps = [s for s in spans if s.name == "decode.steps"]
    assert all(parent(s) is attempt for s in steps)
    assert sum(s.attributes["olmo.steps"] for s in steps) == 39  # the first came from prefill
    assert sum(s.attributes["olmo.tokens"] for s in steps) == 39
    # Windows close together every STEPS_PER_SPAN steps of the engine's.
    assert all(s.attributes["olmo.steps"] <= decode_engine.STEPS_PER_SPAN for s in steps)
    assert len(steps) <= 39 // decode_engine.STEPS_PER_SPAN + 2
    assert all(s.status.status_code is not StatusCode.ERROR for s in spans)
    # What the trace says the first token took: at least 95% of it is in a span.
    share = ttft_share(spans)
    assert share >= 0.95, f"spans cover {share:.1%} of the TTFT"


def test_an_http_clients_traceparent_is_followed(cluster, exporter):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    request = urllib.request.Request(
        f"{cluster.http_url}/v1/completions", method="POST",
        data=json.dumps({"model": DEMO_MODEL_DIR.name, "prompt": "Hello",
                         "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json",
                 "traceparent": f"00-{trace_id}-{parent_id}-01"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200
    root = one(trace_of(exporter, int(trace_id, 16)), "olmo.generate")
    assert root.parent.span_id == int(parent_id, 16)


def traced_stream(cluster, exporter, hang: threading.Event):
    """Stream one traced request while whatever waits on ``hang`` (bounded) stalls; set it
    after. Returns the trace's spans and the tokens."""
    client_span = tracing.start("client")
    client = GenerationClient(cluster.router_address)
    request = generate_request(PROMPT, max_tokens=60, ignore_eos=True)
    try:
        tokens = [t for r in client.stub.Generate(request, timeout=90,
                                                  metadata=tracing.metadata(client_span))
                  for t in r.token_ids]
    finally:
        hang.set()
        client.close()
    tracing.end(client_span)
    return trace_of(exporter, client_span.get_span_context().trace_id), tokens


def test_a_resume_after_a_decode_worker_hangs_is_linked_to_the_attempt_it_follows(
        cluster, exporter, monkeypatch):
    hang = threading.Event()
    holder: list = []  # the first decode worker to step the stream 6 times hangs
    for worker in cluster.decode:
        steps = [0]

        def hung(*args, _forward=worker.stage.runner.forward, _steps=steps, _worker=worker,
                 **kwargs):
            _steps[0] += 1
            if _steps[0] > 5 and holder in ([], [_worker]):  # mid-stream
                holder[:] = [_worker]
                hang.wait(timeout=15)
            return _forward(*args, **kwargs)

        monkeypatch.setattr(worker.stage.runner, "forward", hung)
    spans, tokens = traced_stream(cluster, exporter, hang)
    assert len(tokens) == 60
    attempt, resume = one(spans, "attempt"), one(spans, "resume")
    assert attempt.status.status_code is StatusCode.ERROR
    assert [link.context.span_id for link in resume.links] == [attempt.context.span_id]
    assert resume.attributes["olmo.resumed_after_tokens"] > 0


def test_a_stalled_push_ends_its_attempt_in_an_error_span_within_the_liveness_bound(
        cluster, exporter, monkeypatch):
    hang, pushes = threading.Event(), [0]
    for worker in cluster.decode:
        def stalled(chunks, _receive=worker.stage.receiver.receive):
            pushes[0] += 1
            if pushes[0] == 1:  # the first push of all
                hang.wait(timeout=20)
            return _receive(chunks)

        monkeypatch.setattr(worker.stage.receiver, "receive", stalled)
    spans, tokens = traced_stream(cluster, exporter, hang)
    assert len(tokens) == 60
    attempt = one(spans, "attempt")
    assert attempt.status.status_code is StatusCode.ERROR
    assert "did not finish in time" in attempt.status.description
    took = (attempt.end_time - attempt.start_time) / 1e9
    assert took < FIRST_TOKEN_TIMEOUT_S + 3, f"the stalled attempt ended after {took:.1f} s"
    assert one(spans, "resume").status.status_code is not StatusCode.ERROR
