"""The cluster config file (YAML): model, instances per role, placement and policies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from olmo_model.kv_pages import CacheLimits

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


@dataclasses.dataclass
class ClusterConfig:
    model: str | None = None          # None: the built-in demo model
    dtype: str = DEFAULT_DTYPE
    target: str = DEFAULT_TARGET
    mode: str = "disaggregated"       # or "aggregated": decode workers prefill locally
    host: str = "127.0.0.1"           # where the router's public API binds
    port: int = 50051
    # Where workers bind. "0.0.0.0" binds every interface and advertises the node's IP.
    worker_host: str = "127.0.0.1"
    prefill: RoleConfig = dataclasses.field(default_factory=RoleConfig)
    decode: RoleConfig = dataclasses.field(default_factory=RoleConfig)
    # Each worker's KV cache: sequences and tokens it holds at once (None: CacheLimits').
    max_sequences: int | None = None
    max_total_tokens: int | None = None
    lease_ms: int = 30_000
    health_interval_s: float = 1.0
    # What happens to a request whose decode worker dies mid-stream.
    on_decode_failure: str = "resume"  # or "fail"

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "aggregated"):
            raise ClusterConfigError(f"mode must be 'disaggregated' or 'aggregated', got "
                                     f"{self.mode!r}")
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
        if self.decode.instances < 1:
            raise ClusterConfigError("at least one decode instance is needed")
        if self.mode == "disaggregated" and self.prefill.instances < 1:
            raise ClusterConfigError("disaggregated mode needs at least one prefill instance")

    @property
    def aggregated(self) -> bool:
        return self.mode == "aggregated"

    def worker_spec(self) -> WorkerSpec:
        """What every worker of this cluster builds its runner from."""
        limits = CacheLimits.sized(self.max_sequences, self.max_total_tokens)
        return WorkerSpec.of(self.model, self.dtype, self.target, limits)

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
    return kind(**raw)
