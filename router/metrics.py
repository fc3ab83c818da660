"""The router's Prometheus metrics: every request it serves (gRPC or HTTP), and its workers.

One registry per router, served at ``/metrics`` on the HTTP port, so a single scrape
target covers the cluster: request metrics are observed on the request path; worker
metrics (KV pages, reservations, queues) come from the stats the scheduler polls from
every worker 4 times a second, labelled by role and instance (the worker's address);
per-request prefill and KV transfer figures come back in each PrefillResponse, prefix
cache hits in each ReserveResponse and PrefillResponse. Names and buckets follow vLLM's,
in the ``olmo_`` namespace.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from protos import worker_pb2
from protos.layout import kv_bytes_per_token
from protos.vocabulary import FinishReason, Role

from .client_budget import ClientBudget
from .scheduler import Scheduler

# vLLM's TTFT buckets, with finer steps at the low end (a CPU token is milliseconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)
BYTES_BUCKETS = tuple(2.0 ** k for k in range(10, 33, 2))  # 1 KiB .. 4 GiB


class RouterMetrics:
    def __init__(self, scheduler: Scheduler, waiting: Callable[[], int],
                 budget: ClientBudget | None = None):
        disable_created_metrics()  # no *_created series beside every counter and histogram
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("olmo_requests", "Requests finished, by finish reason ("
                                + ", ".join(reason.label for reason in FinishReason if reason)
                                + ")", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("olmo_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("olmo_generation_tokens",
                                         "Tokens generated and streamed to clients", registry=r)
        self.ttft = Histogram("olmo_time_to_first_token_seconds",
                              "From a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("olmo_inter_token_latency_seconds",
                             "Between consecutive tokens of a request", buckets=ITL_BUCKETS,
                             registry=r)
        self.e2e = Histogram("olmo_e2e_request_latency_seconds",
                             "From a request's arrival to its last token",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("olmo_request_queue_time_seconds",
                                    "Time a request waited in line for decode capacity",
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.prefill_time = Histogram("olmo_request_prefill_time_seconds",
                                      "A prefill leg, queueing and KV pushes included",
                                      buckets=REQUEST_BUCKETS, registry=r)
        self.kv_seconds = Histogram("olmo_kv_transfer_seconds",
                                    "Time a request's KV pushes took", buckets=ITL_BUCKETS,
                                    registry=r)
        self.kv_bytes = Histogram("olmo_kv_transfer_bytes", "Bytes of a request's KV pushes",
                                  buckets=BYTES_BUCKETS, registry=r)
        self.prefix_queries = Counter(
            "olmo_prefix_cache_queries", "Prompt tokens looked up in a prefix cache, by the "
            "role of the worker", ["role"], registry=r)
        self.prefix_hits = Counter(
            "olmo_prefix_cache_hits", "Prompt tokens found in a prefix cache (not computed "
            "again), by the role of the worker", ["role"], registry=r)
        self.kv_bytes_saved = Counter(
            "olmo_kv_transfer_saved_bytes", "K/V bytes not pushed because the decode worker "
            "had the prompt's prefix cached", registry=r)
        self.local_prefills = Counter(
            "olmo_local_prefills", "Disaggregated requests whose decode worker prefilled "
            "the uncached rest itself (it was short)", registry=r)
        self.decode_full = Counter(
            "olmo_decode_full", "Times a request found every decode worker full and waited "
            "in line for capacity", registry=r)
        # Per tenant (router/tenants.py): as many label values as the tenants file names.
        self.tenant_requests = Counter("olmo_tenant_requests", "Requests that came, by tenant",
                                       ["tenant"], registry=r)
        self.tenant_refusals = Counter(
            "olmo_tenant_requests_refused", "Requests refused (HTTP 429, RESOURCE_EXHAUSTED) "
            "as their tenant was over a quota, by tenant", ["tenant"], registry=r)
        self.tenant_tokens = Counter("olmo_tenant_tokens", "Prompt and generated tokens of "
                                     "finished requests, by tenant", ["tenant"], registry=r)
        self.tenant_queue_time = Histogram(
            "olmo_tenant_queue_time_seconds", "Time a request waited in line for decode "
            "capacity, by tenant", ["tenant"], buckets=REQUEST_BUCKETS, registry=r)
        self.running = Gauge("olmo_num_requests_running",
                             "Requests being served (prefilling or decoding)", registry=r)
        Gauge("olmo_num_requests_waiting", "Requests waiting in line for decode capacity",
              registry=r).set_function(waiting)
        r.register(_WorkerCollector(scheduler))
        if budget is not None:
            r.register(_BudgetCollector(budget))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def finished(self, reason: FinishReason, prompt_tokens: int, seconds: float) -> None:
        self.requests.labels((reason or FinishReason.ERROR).label).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.e2e.observe(seconds)

    def reserved(self, response: worker_pb2.ReserveResponse, prompt_tokens: int,
                 layout: worker_pb2.ModelLayout, aggregated: bool) -> None:
        self.prefix_queries.labels(Role.DECODE).inc(prompt_tokens)
        self.prefix_hits.labels(Role.DECODE).inc(response.cached_tokens)
        if not aggregated:
            self.kv_bytes_saved.inc(response.cached_tokens * kv_bytes_per_token(layout))
            if response.prefill_locally:
                self.local_prefills.inc()

    def prefilled(self, request: worker_pb2.PrefillRequest,
                  response: worker_pb2.PrefillResponse) -> None:
        self.prefix_queries.labels(Role.PREFILL).inc(len(request.token_ids))
        self.prefix_hits.labels(Role.PREFILL).inc(response.cached_tokens)
        self.prefill_time.observe(response.prefill_ms / 1000)
        self.kv_seconds.observe(response.kv_transfer_ms / 1000)
        self.kv_bytes.observe(response.kv_bytes)


class _WorkerCollector:
    """Gauges of each worker, from the scheduler's latest poll of its stats."""

    FIELDS = {
        "kv_pages_used": ("used_pages", "KV pages the worker's cache holds for live sequences"),
        "kv_pages_cached": ("cached_pages", "KV pages only cached prefixes hold (evicted on "
                                            "demand)"),
        "prefix_cached_sequences": ("cached_sequences", "Finished sequences kept as cached "
                                                        "prefixes"),
        "kv_pages_free": ("free_pages", "KV pages neither in use nor reserved"),
        "kv_pages_total": ("total_pages", "KV pages of the worker's cache"),
        "kv_reservations": ("reservations", "Decode reservations waiting for their KV"),
        "worker_running_sequences": ("running_sequences", "Sequences the worker is serving"),
        "worker_queued_requests": ("queued_requests", "Prompts queued at a prefill worker"),
        "worker_queued_tokens": ("queued_tokens", "Prompt tokens queued at a prefill worker"),
    }
    # The KV handoff step by step, as each worker's running totals in ms: export, encode
    # and the whole push (transfer) on prefill workers; assemble and install on decode.
    HANDOFF_STEPS = {"export": "kv_export_ms", "encode": "kv_encode_ms",
                     "transfer": "kv_transfer_ms", "assemble": "kv_assemble_ms",
                     "install": "kv_install_ms"}

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self):
        workers = [w for role in Role for w in self.scheduler.workers(role)]
        up = GaugeMetricFamily("olmo_worker_up", "1 while the worker answers the router's "
                               "polls", labels=["role", "instance"])
        families = {name: GaugeMetricFamily(f"olmo_{name}", text, labels=["role", "instance"])
                    for name, (_, text) in self.FIELDS.items()}
        handoff = CounterMetricFamily(
            "olmo_kv_handoff_seconds", "Time each worker spent on each step of the KV handoff "
            "(prefill: export, encode, transfer = the whole push; decode: assemble, install)",
            labels=["role", "instance", "step"])
        pushes = CounterMetricFamily("olmo_kv_pushes", "KV pushes sent (prefill) or taken "
                                     "(decode)", labels=["role", "instance"])
        shared = CounterMetricFamily("olmo_kv_shared_memory_pushes", "Of the KV pushes, those "
                                     "whose K/V went through same-host shared memory",
                                     labels=["role", "instance"])
        drafted = CounterMetricFamily("olmo_spec_decode_draft_tokens", "Tokens drafted by "
                                      "prompt lookup and verified (speculative decoding)",
                                      labels=["role", "instance"])
        accepted = CounterMetricFamily("olmo_spec_decode_accepted_tokens", "Of the drafted "
                                       "tokens, those the model kept", labels=["role",
                                                                               "instance"])
        for worker in workers:
            labels = [worker.role, worker.address]
            up.add_metric(labels, float(self.scheduler.alive(worker.address)))
            if worker.stats is None:
                continue
            for name, (field, _) in self.FIELDS.items():
                families[name].add_metric(labels, float(getattr(worker.stats, field)))
            pushes.add_metric(labels, float(worker.stats.pushes))
            shared.add_metric(labels, float(worker.stats.shared_memory_pushes))
            drafted.add_metric(labels, float(worker.stats.spec_draft_tokens))
            accepted.add_metric(labels, float(worker.stats.spec_accepted_tokens))
            for step, field in self.HANDOFF_STEPS.items():
                ms = getattr(worker.stats, field)
                if ms:
                    handoff.add_metric([*labels, step], ms / 1000)
        yield up
        yield from families.values()
        yield pushes
        yield shared
        yield drafted
        yield accepted
        yield handoff

    def describe(self):
        return []


class _BudgetCollector:
    """How often clients ran over their budgets of the router's time."""

    def __init__(self, budget: ClientBudget):
        self.budget = budget

    def collect(self):
        yield CounterMetricFamily("olmo_client_requests_waited", "Requests that waited for "
                                  "their client's budget of the router's time",
                                  value=self.budget.waits)
        yield CounterMetricFamily("olmo_client_requests_refused", "Requests refused (HTTP 429, "
                                  "RESOURCE_EXHAUSTED) as their client was over its budget",
                                  value=self.budget.refusals)

    def describe(self):
        return []
