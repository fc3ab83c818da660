"""The cluster config: one typed, nested model of every setting, read from YAML and flags.

Its sections are the objects the code runs with, not copies mapped into them: ``cache``
is each worker's ``CacheLimits``, ``worker`` its ``WorkerOptions``, ``router`` the
router's ``RouterOptions``, ``planner`` the planner's ``PlannerConfig``, ``prefill`` and
``decode`` how many instances of each role run and what each asks Ray for. The model
settings (``model``, ``dtype``, ``target``), the serving ``mode`` and the security
settings sit at the top. cluster/settings.py derives every YAML key and flag from it.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from olmo_model.cache_limits import CacheLimits
from olmo_model.quantization import MODEL_DTYPES
from pipeline.options import WorkerOptions
from protos.auth import api_key, cluster_secret, new_secret
from protos.setting import setting
from protos.tracing import TracingOptions
from protos.vocabulary import Mode, Role
from router.options import RouterOptions

from .planner import Bounds, PlannerConfig
from .settings import ConfigError, build, merge, value_of

if TYPE_CHECKING:
    from .worker_spec import WorkerSpec

DEFAULT_DTYPE = "float32"
DEFAULT_TARGET = "llvm"

# The flat keys of the release before sections: read for one more release, with a
# warning naming the new key.
RENAMED_KEYS = {
    **{key: f"cache.{key}" for key in ("max_sequences", "max_total_tokens",
                                        "prefill_chunk_tokens")},
    **{key: f"worker.{key}" for key in ("prefix_cache", "kv_shared_memory", "kv_streaming",
                                         "kv_layer_groups")},
    "worker_host": "worker.host",
    **{key: f"router.{key}" for key in (
        "host", "port", "http_port", "lease_ms", "on_decode_failure", "kv_weight",
        "local_prefill_below_tokens", "max_waiting_requests", "max_queue_wait_s",
        "first_token_timeout_s", "token_timeout_s")},
    "max_prompt_bytes": "router.limits.max_prompt_bytes",
}


@dataclasses.dataclass
class RoleConfig:
    """How many instances of one role to run and what each asks Ray for."""

    instances: int = setting(1, "instances of this role")
    # Each stage is a worker over a contiguous layer range, placed together (one
    # placement-group bundle each). Prefill and decode may differ.
    stages: int = setting(1, "pipeline-parallel stages per instance")
    # A fixed port suits one instance per node (Kubernetes pods, with probes on it).
    port: int = setting(0, "the port each instance's gRPC server binds (0: a free one)")
    cpus: float = setting(1.0, "CPUs each stage asks Ray for")
    gpus: float = setting(0.0, "GPUs each stage asks Ray for")
    resources: dict[str, float] = dataclasses.field(default_factory=dict, metadata={
        "help": 'custom Ray resources, e.g. {"decode": 1}: only nodes started with that '
                "resource host this role"})
    min_instances: int = setting(1, "the planner keeps the role at least this large")
    max_instances: int | None = setting(None, "... and at most this large (null: instances)")

    def bounds(self) -> Bounds:
        return Bounds(self.min_instances,
                      self.instances if self.max_instances is None else self.max_instances)


@dataclasses.dataclass
class ClusterConfig:
    model: str | None = setting(None, "folder with config.json, *.safetensors and tokenizer.json "
                                      "(null: the built-in demo model)")
    dtype: str = setting(DEFAULT_DTYPE, "weights and KV cache dtype; q4f16/q8f16: 4-/8-bit "
                                         "group-quantized weights, float16 KV",
                          choices=MODEL_DTYPES)
    target: str = setting(DEFAULT_TARGET, "llvm (this CPU), cuda or cuda:sm_XX")
    mode: Mode = setting(Mode.DISAGGREGATED, "aggregated: decode workers prefill locally, no "
                                             "prefill workers, no K/V transfer")
    cache: CacheLimits = dataclasses.field(default_factory=CacheLimits)
    worker: WorkerOptions = dataclasses.field(default_factory=WorkerOptions)
    router: RouterOptions = dataclasses.field(default_factory=RouterOptions)
    prefill: RoleConfig = dataclasses.field(default_factory=RoleConfig)
    decode: RoleConfig = dataclasses.field(default_factory=RoleConfig)
    planner: PlannerConfig = dataclasses.field(default_factory=PlannerConfig)
    tracing: TracingOptions = dataclasses.field(default_factory=TracingOptions)
    health_interval_s: float = setting(1.0, "how often the Ray manager checks each worker's "
                                            "health")
    # Internal calls and the admin API carry the cluster secret: from $OLMO_CLUSTER_TOKEN,
    # else token_file (made with a new secret when missing), else a new one for this
    # cluster's life.
    token_file: str | None = setting(None, "the cluster secret's file, made if missing "
                                           "($OLMO_CLUSTER_TOKEN wins)")
    api_key_file: str | None = setting(None, "Generate requires the API key in this file "
                                             "($OLMO_API_KEY wins)")
    tls_cert: str | None = setting(None, "serve the public API over TLS: certificate chain (PEM)")
    tls_key: str | None = setting(None, "... and its private key (PEM)")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            setattr(self, field.name, value_of(hints[field.name], field,
                                               getattr(self, field.name), field.name))
        if self.health_interval_s <= 0:
            raise ConfigError("health_interval_s must be > 0")
        # The router's view of the mode follows the cluster's.
        self.router = dataclasses.replace(self.router, aggregated=self.aggregated)
        for role in Role:
            self._check_role(role)

    def _check_role(self, role: Role) -> None:
        spec: RoleConfig = getattr(self, role)
        if spec.instances < 0:
            raise ConfigError(f"{role}.instances must be >= 0")
        if spec.stages < 1:
            raise ConfigError(f"{role}.stages must be >= 1")
        if role is Role.PREFILL and self.aggregated:
            return  # runs none
        if min(spec.instances, spec.min_instances) < 1:
            raise ConfigError("at least one decode instance is needed" if role is Role.DECODE
                              else "disaggregated mode needs at least one prefill instance")
        bounds = spec.bounds()
        if not 0 <= bounds.low <= spec.instances <= bounds.high:
            raise ConfigError(f"{role}: need min_instances <= instances <= max_instances, "
                              f"got {bounds.low} <= {spec.instances} <= {bounds.high}")

    @property
    def aggregated(self) -> bool:
        return self.mode is Mode.AGGREGATED

    def cluster_secret(self) -> str:
        try:
            return cluster_secret(self.token_file, create=True) or new_secret()
        except (ValueError, OSError) as exc:  # too short, or a file others may read
            raise ConfigError(str(exc)) from exc

    def api_key(self) -> str | None:
        return api_key(self.api_key_file)

    def tls(self) -> tuple[bytes, bytes] | None:
        """(private key, certificate chain) for the public API, or None."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if not self.tls_cert:
            return None
        try:
            return Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the TLS key or certificate: {exc}") from exc

    def worker_spec(self) -> WorkerSpec:
        """What every worker of this cluster builds its runner from."""
        from .worker_spec import WorkerSpec  # loads TVM: the command line need not

        return WorkerSpec.of(self.model, self.dtype, self.target, self.cache, self.worker)

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "config",
                     overrides: dict[str, Any] | None = None) -> ClusterConfig:
        """A config from a YAML-shaped mapping with ``overrides`` (the same shape, e.g. from
        flags) laid over it; flat keys of the last release move to their sections with a
        warning."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must hold a mapping")
        return build(cls, merge(migrate(raw, where), overrides or {}))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None
                  ) -> ClusterConfig:
        return cls.from_mapping(read_yaml(path), str(path), overrides)


def read_yaml(path: str | Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read cluster config {path}: {exc}") from exc


def migrate(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``raw`` with each renamed flat key moved to where it lives now."""
    moved = copy.deepcopy({k: v for k, v in raw.items() if k not in RENAMED_KEYS})
    for old in [k for k in raw if k in RENAMED_KEYS]:
        new = RENAMED_KEYS[old]
        warnings.warn(f"{where}: config key {old!r} is now {new!r}; the old key is read "
                      "for one more release", FutureWarning, stacklevel=3)
        *sections, leaf = new.split(".")
        node = moved
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {section} must be a mapping")
        if leaf in node:
            raise ConfigError(f"{where}: both {old!r} and {new!r} are given; keep {new!r}")
        node[leaf] = raw[old]
    return moved
