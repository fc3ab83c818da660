"""An OTLP/gRPC trace collector for benchmarks, and what a request's trace says of its TTFT.

Run as a process of its own (``python3 bench/trace_sink.py``): it prints the port it
listens on (127.0.0.1), takes spans as a collector (Jaeger, Tempo) would, and when its
standard input closes prints one JSON line: how many spans and traces came, and for each
traced request the share of its time to first token that its spans cover
(``ttft_coverage``; the tests use the same function on spans they collect in memory).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable
from concurrent import futures

# Spans that only group others: coverage counts the work under them.
GROUPS = frozenset({"olmo.generate", "attempt", "resume"})
ROOT = "olmo.generate"


@dataclasses.dataclass(frozen=True)
class SpanRecord:
    span_id: int
    parent_id: int | None
    name: str
    start: int  # ns since the epoch
    end: int
    first_token: int | None = None  # the request's span: when its first token came


def ttft_coverage(spans: Iterable[SpanRecord]) -> float | None:
    """Of one trace's request, the share of [its arrival, its first token] covered by the
    spans under its own (less GROUPS); None without a request span that saw a token."""
    spans = list(spans)
    roots = [s for s in spans if s.name == ROOT and s.first_token]
    if len(roots) != 1:
        return None
    root = roots[0]
    by_id = {s.span_id: s for s in spans}

    def under_root(span: SpanRecord) -> bool:
        while span.parent_id in by_id:
            span = by_id[span.parent_id]
            if span is root:
                return True
        return False

    begin, end = root.start, root.first_token
    intervals = sorted((max(s.start, begin), min(s.end, end)) for s in spans
                       if s.name not in GROUPS and s.end > begin and s.start < end
                       and under_root(s))
    total, reach = 0, begin
    for start, stop in intervals:
        if stop > reach:
            total += stop - max(start, reach)
            reach = stop
    return total / (end - begin) if end > begin else None


def main() -> None:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    traces: dict[bytes, list[SpanRecord]] = defaultdict(list)
    lock = threading.Lock()
    count = [0]

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            records = []
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for s in scope.spans:
                        first = next((e.time_unix_nano for e in s.events
                                      if e.name == "first_token"), None)
                        records.append((s.trace_id, SpanRecord(
                            int.from_bytes(s.span_id, "big"),
                            int.from_bytes(s.parent_span_id, "big") or None, s.name,
                            s.start_time_unix_nano, s.end_time_unix_nano, first)))
            with lock:
                count[0] += len(records)
                for trace_id, record in records:
                    traces[trace_id].append(record)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(4),
                         options=[("grpc.max_receive_message_length", 64 * 2**20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # until the benchmark is done
    server.stop(grace=1).wait()
    with lock:
        coverage = [c for c in map(ttft_coverage, traces.values()) if c is not None]
    print(json.dumps({"spans": count[0], "traces": len(traces), "ttft_coverage": coverage}),
          flush=True)


if __name__ == "__main__":
    main()
