"""The cluster config file (YAML): model, instances per role, placement and policies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from olmo_model.kv_pages import CacheLimits
from olmo_model.quantization import MODEL_DTYPES
from pipeline.options import WorkerOptions
from protos.auth import api_key, cluster_secret, new_secret
from router.service import RouterOptions

from .planner import Bounds, PlannerConfig
from .worker_spec import DEFAULT_DTYPE, DEFAULT_TARGET, WorkerSpec


class ClusterConfigError(ValueError):
    pass


@dataclasses.dataclass
class RoleConfig:
    """How many instances of one role to run and what each asks Ray for."""

    instances: int = 1
    # Pipeline-parallel stages per instance: each a worker over a contiguous layer range,
    # placed together (one placement-group bundle each). Prefill and decode may differ.
    stages: int = 1
    # The port each instance's gRPC server binds; 0 picks a free one. A fixed port suits
    # one instance per node (Kubernetes pods, with probes on that port).
    port: int = 0
    cpus: float = 1.0
    gpus: float = 0.0
    # Custom Ray resources, e.g. {"decode": 1} so that only nodes started with
    # `--resources '{"decode": 4}'` host decode workers.
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    # The planner keeps the role within these (None: ``instances``, so it only adds
    # instances where a maximum is given).
    min_instances: int = 1
    max_instances: int | None = None

    def bounds(self) -> Bounds:
        return Bounds(self.min_instances,
                      self.instances if self.max_instances is None else self.max_instances)


@dataclasses.dataclass
class ClusterConfig:
    model: str | None = None          # None: the built-in demo model
    dtype: str = DEFAULT_DTYPE
    target: str = DEFAULT_TARGET
    mode: str = "disaggregated"       # or "aggregated": decode workers prefill locally
    host: str = "127.0.0.1"           # where the router's public APIs bind
    port: int = 50051                 # the gRPC Generate API
    http_port: int = 8000             # the OpenAI-compatible API and /metrics; -1: none
    # Where workers bind: "node" the address Ray knows their node by (127.0.0.1 in a local
    # cluster), "0.0.0.0" every interface (advertising the node's address), or an address.
    worker_host: str = "node"
    prefill: RoleConfig = dataclasses.field(default_factory=RoleConfig)
    decode: RoleConfig = dataclasses.field(default_factory=RoleConfig)
    # Each worker's KV cache: sequences and tokens it holds at once (None: CacheLimits').
    max_sequences: int | None = None
    max_total_tokens: int | None = None
    # Prompt tokens per forward pass. A decode worker prefilling locally (aggregated
    # mode, short uncached prompts) runs one such chunk between decode steps, so this
    # bounds how long a new prompt pauses the streams already running there.
    prefill_chunk_tokens: int | None = None
    lease_ms: int = 30_000
    health_interval_s: float = 1.0
    # Prefix caching: workers keep finished sequences, and a prompt forks from the longest
    # cached prefix (computing and shipping only the rest). The router weighs a worker's
    # likely cached prefix of a prompt against its load (kv_weight tokens of load per
    # cached token; 0: load alone), and a decode worker prefills a prompt itself when at
    # most local_prefill_below_tokens of it are not cached (0: never).
    prefix_cache: bool = True
    # K/V pushes between workers on one host go through shared memory, not the stream.
    kv_shared_memory: bool = True
    # A prompt longer than prefill_chunk_tokens has each chunk's K/V pushed while the
    # next chunk computes (off: all of it after the last chunk).
    kv_streaming: bool = True
    # Within one prefill pass, each of this many groups of layers pushes its K/V while
    # the next group computes (1: after the pass).
    kv_layer_groups: int = 4
    kv_weight: float | None = None
    local_prefill_below_tokens: int | None = None
    # What happens to a request whose decode worker dies mid-stream.
    on_decode_failure: str = "resume"  # or "fail"
    # The router's admission and liveness bounds (None: RouterOptions' defaults). Requests
    # no decode worker can take yet wait in line, at most max_waiting_requests of them,
    # each at most max_queue_wait_s; a token stream silent for first_token_timeout_s
    # (before its first token) or token_timeout_s (after) is cut and resumed elsewhere.
    max_waiting_requests: int | None = None
    max_queue_wait_s: float | None = None
    first_token_timeout_s: float | None = None
    token_timeout_s: float | None = None
    max_prompt_bytes: int | None = None
    # Security. Internal calls and the admin API carry the cluster secret: from
    # $OLMO_CLUSTER_TOKEN, else token_file (created with a new secret when missing), else
    # a new one for this cluster's life. api_key_file: Generate requires this key;
    # tls_cert/tls_key (PEM): the public API serves TLS.
    token_file: str | None = None
    api_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # Scales prefill and decode instances to keep TTFT and inter-token latency on target
    # (cluster/planner.py; off by default).
    planner: PlannerConfig = dataclasses.field(default_factory=PlannerConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "aggregated"):
            raise ClusterConfigError(f"mode must be 'disaggregated' or 'aggregated', got "
                                     f"{self.mode!r}")
        if self.dtype not in MODEL_DTYPES:
            raise ClusterConfigError(f"dtype must be one of {', '.join(MODEL_DTYPES)}, got "
                                     f"{self.dtype!r}")
        if self.on_decode_failure not in ("resume", "fail"):
            raise ClusterConfigError("on_decode_failure must be 'resume' or 'fail'")
        for role in ("prefill", "decode"):
            value = getattr(self, role)
            if isinstance(value, dict):
                value = _build(RoleConfig, value, role)
                setattr(self, role, value)
            if value.instances < 0:
                raise ClusterConfigError(f"{role}.instances must be >= 0")
            if value.stages < 1:
                raise ClusterConfigError(f"{role}.stages must be >= 1")
            if role == "prefill" and self.mode == "aggregated":
                continue  # runs none
            if min(value.instances, value.min_instances) < 1:
                raise ClusterConfigError("at least one decode instance is needed"
                                         if role == "decode" else
                                         "disaggregated mode needs at least one prefill "
                                         "instance")
            bounds = value.bounds()
            if not 0 <= bounds.low <= value.instances <= bounds.high:
                raise ClusterConfigError(
                    f"{role}: need min_instances <= instances <= max_instances, got "
                    f"{bounds.low} <= {value.instances} <= {bounds.high}")
        if isinstance(self.planner, dict):
            self.planner = _build(PlannerConfig, self.planner, "planner")
        if self.kv_weight is not None and self.kv_weight < 0:
            raise ClusterConfigError("kv_weight must be >= 0")
        if self.local_prefill_below_tokens is not None and self.local_prefill_below_tokens < 0:
            raise ClusterConfigError("local_prefill_below_tokens must be >= 0")
        for name in ("max_sequences", "max_total_tokens", "prefill_chunk_tokens",
                     "kv_layer_groups"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ClusterConfigError(f"{name} must be >= 1")

    @property
    def aggregated(self) -> bool:
        return self.mode == "aggregated"

    def router_options(self) -> RouterOptions:
        defaults = RouterOptions()
        limits = defaults.limits
        if self.max_prompt_bytes is not None:
            limits = dataclasses.replace(limits, max_prompt_bytes=self.max_prompt_bytes)
        given = {"max_waiting": self.max_waiting_requests,
                 "max_queue_wait_s": self.max_queue_wait_s,
                 "first_token_timeout_s": self.first_token_timeout_s,
                 "token_timeout_s": self.token_timeout_s,
                 "kv_weight": self.kv_weight,
                 "local_prefill_below": self.local_prefill_below_tokens}
        return dataclasses.replace(
            defaults, aggregated=self.aggregated, lease_ms=self.lease_ms, limits=limits,
            resume_on_decode_failure=self.on_decode_failure == "resume",
            **{k: v for k, v in given.items() if v is not None})

    def cluster_secret(self) -> str:
        return cluster_secret(self.token_file, create=True) or new_secret()

    def api_key(self) -> str | None:
        return api_key(self.api_key_file)

    def tls(self) -> tuple[bytes, bytes] | None:
        """(private key, certificate chain) for the public API, or None."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ClusterConfigError("tls_cert and tls_key go together")
        if not self.tls_cert:
            return None
        try:
            return Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes()
        except OSError as exc:
            raise ClusterConfigError(f"cannot read the TLS key or certificate: {exc}") from exc

    def worker_spec(self) -> WorkerSpec:
        """What every worker of this cluster builds its runner from."""
        limits = CacheLimits.sized(self.max_sequences, self.max_total_tokens,
                                   self.prefill_chunk_tokens)
        return WorkerSpec.of(self.model, self.dtype, self.target, limits,
                             WorkerOptions(self.prefix_cache, self.kv_shared_memory,
                                           self.kv_streaming, self.kv_layer_groups))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ClusterConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ClusterConfigError(f"cannot read cluster config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ClusterConfigError(f"{path} must hold a mapping")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return _build(cls, raw, str(path))


def _build(kind: type, raw: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ClusterConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
    try:
        return kind(**raw)
    except ValueError as exc:  # a nested config's own check
        if isinstance(exc, ClusterConfigError):
            raise
        raise ClusterConfigError(f"{where}: {exc}") from exc
