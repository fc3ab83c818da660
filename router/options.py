"""How the router binds, admits, bounds and places requests: the cluster config's
``router`` section, used as it is by the router."""

from __future__ import annotations

import dataclasses
import enum

from protos.setting import setting

from .client_budget import ClientLimits
from .tenants import TenantOptions
from .validation import RequestLimits


class DecodeFailurePolicy(enum.StrEnum):
    """What happens to a request whose decode worker dies mid-stream."""

    RESUME = "resume"   # once more on another decode worker, from the tokens sent so far
    FAIL = "fail"       # UNAVAILABLE to the client


@dataclasses.dataclass(frozen=True)
class RouterOptions:
    host: str = setting("127.0.0.1", "where the public APIs bind (0.0.0.0: every interface)")
    port: int = setting(50051, "the gRPC Generate API's port (0: any free one)")
    http_port: int = setting(8000, "the OpenAI-compatible API and /metrics (0: any free "
                                   "port; -1: none)")
    # uvicorn answers connections past it 503, so idle ones cannot use up the router's
    # file descriptors.
    max_http_connections: int = setting(512, "open HTTP connections at most; more get 503")
    lease_ms: int = setting(30_000, "a reservation is freed if its K/V has not come by then")
    on_decode_failure: DecodeFailurePolicy = setting(
        DecodeFailurePolicy.RESUME, "a request whose decode worker dies mid-stream: resume "
                                    "it elsewhere, or fail it")
    limits: RequestLimits = RequestLimits()
    clients: ClientLimits = ClientLimits()
    tenants: TenantOptions = TenantOptions()
    max_waiting_requests: int = setting(128, "requests waiting for decode capacity; more are "
                                             "refused RESOURCE_EXHAUSTED")
    max_queue_wait_s: float = setting(30.0, "how long one waits in that line, at most")
    # A token stream silent for longer than this is cut, and the request resumed on
    # another decode worker (or failed UNAVAILABLE): before its first token (prefill and
    # queueing at the workers included) and between tokens. In aggregated mode the
    # second must exceed the longest local prefill, which pauses every stream.
    first_token_timeout_s: float = setting(30.0, "a stream silent this long before its "
                                                 "first token is cut and resumed")
    token_timeout_s: float = setting(10.0, "... or this long between tokens")
    # Slow is not dead: a worker that misses the polls for a couple of seconds (a
    # CPU-starved host, a long step) is only passed over for new work; its streams go on.
    # Like token_timeout_s, it must exceed the longest step (a local prefill chunk).
    worker_gone_s: float = setting(10.0, "a worker that has not answered the router's polls "
                                         "(or whose engine loop has not gone round) this "
                                         "long is gone: its streams resume elsewhere")
    kv_weight: float = setting(4.0, "KV-aware routing: tokens of load one cached prompt "
                                    "token is worth (0: route by load alone)")
    kv_events: bool = setting(True, "KV-aware routing: workers tell the router what their "
                                    "prefix caches hold and evict (off: it estimates from "
                                    "what it sent where, and starts cold)")
    local_prefill_below_tokens: int = setting(
        64, "a decode worker prefills a prompt itself when at most this many of its tokens "
            "are not cached there (0: never)")
    # Set from the cluster's mode, not a setting of its own.
    aggregated: bool = dataclasses.field(default=False, metadata={"derived": True})

    def __post_init__(self) -> None:
        for name in ("lease_ms", "max_queue_wait_s", "first_token_timeout_s",
                     "token_timeout_s", "worker_gone_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"router.{name} must be > 0")
        if self.kv_weight < 0:
            raise ValueError("router.kv_weight must be >= 0")
        if self.max_http_connections < 1:
            raise ValueError("router.max_http_connections must be >= 1")
        for name in ("max_waiting_requests", "local_prefill_below_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"router.{name} must be >= 0")

    @property
    def resume_on_decode_failure(self) -> bool:
        return self.on_decode_failure is DecodeFailurePolicy.RESUME
