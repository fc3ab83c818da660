"""OLMo-1 model configuration, read from a Hugging Face ``config.json``.

The config validates itself once, at construction, so that every later stage (model
definition, loader, compiler, workers) can trust its fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

# Activations OLMo checkpoints use, mapped to the name our model code understands.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}

# RoPE scaling types TVM's rotary kernel computes exactly as transformers does.
# "yarn" is left out on purpose: transformers also scales cos/sin by an attention
# factor that TVM's kernel does not apply, so logits would silently differ.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

SUPPORTED_MODEL_TYPES = ("olmo",)


class ConfigError(ValueError):
    """A config.json this project cannot serve, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class OLMoConfig:
    """Hyper-parameters of an OLMo-1 causal language model."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    rope_theta: float
    num_key_value_heads: int = 0
    head_dim: int = 0
    hidden_act: str = "silu"
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    context_window_size: int = 2048
    prefill_chunk_size: int = 0
    pipeline_parallel_stages: int = 1
    clip_qkv: float | None = None
    attention_bias: bool = False
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                     "intermediate_size", "context_window_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.num_key_value_heads:
            fix("num_key_value_heads", self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            fix("head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        fix("rope_theta", float(self.rope_theta))
        fix("rope_scaling", _check_rope_scaling(self.rope_scaling))
        if self.clip_qkv is not None:
            if not (isinstance(self.clip_qkv, (int, float)) and self.clip_qkv > 0):
                raise ConfigError(f"clip_qkv must be > 0 when set, got {self.clip_qkv!r}")
            fix("clip_qkv", float(self.clip_qkv))
        if self.prefill_chunk_size <= 0:
            fix("prefill_chunk_size", self.context_window_size)
        if not 1 <= self.pipeline_parallel_stages <= self.num_hidden_layers:
            raise ConfigError(
                f"pipeline_parallel_stages must be between 1 and num_hidden_layers "
                f"({self.num_hidden_layers}), got {self.pipeline_parallel_stages}"
            )

    @property
    def activation(self) -> str:
        """The activation in the model's own spelling (silu, gelu, gelu_tanh, relu)."""
        return ACTIVATIONS[self.hidden_act]

    @property
    def rope_scale(self) -> float:
        """Position multiplier for TVM's rotary kernel (linear scaling divides positions)."""
        if self.rope_scaling and self.rope_scaling["rope_type"] == "linear":
            return 1.0 / float(self.rope_scaling["factor"])
        return 1.0

    @property
    def tvm_rope_scaling(self) -> dict[str, Any]:
        """The rope_scaling dict in the form TVM's rotary kernel reads (empty for none)."""
        if self.rope_scaling and self.rope_scaling["rope_type"] == "llama3":
            return dict(self.rope_scaling)
        return {}

    def fingerprint_fields(self) -> dict[str, Any]:
        """Every field that changes the compiled code or the meaning of the weights."""
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], **overrides: Any) -> OLMoConfig:
        """Map a Hugging Face OLMo config dict onto OLMoConfig, refusing what we cannot serve."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported: this server runs OLMo-1 "
                f"(model_type 'olmo'); OLMo-2/3 ('olmo2', 'olmo3') and OLMoE ('olmoe') differ "
                "in normalization and routing"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads",
                               "num_hidden_layers", "intermediate_size") if k not in raw]
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        rope_theta, rope_scaling = _rope_from_hf(raw)
        context = raw.get("max_position_embeddings") or raw.get("max_sequence_length")
        if not context:
            raise ConfigError(
                "config.json names no context window (max_position_embeddings or "
                "max_sequence_length)"
            )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        fields: dict[str, Any] = dict(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_attention_heads=raw["num_attention_heads"],
            num_hidden_layers=raw["num_hidden_layers"],
            intermediate_size=raw["intermediate_size"],
            num_key_value_heads=raw.get("num_key_value_heads") or 0,
            head_dim=raw.get("head_dim") or 0,
            hidden_act=raw.get("hidden_act", "silu"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            context_window_size=int(context),
            prefill_chunk_size=int(raw.get("prefill_chunk_size") or 0),
            pipeline_parallel_stages=int(raw.get("pipeline_parallel_stages") or 1),
            clip_qkv=raw.get("clip_qkv"),
            attention_bias=bool(raw.get("attention_bias", False)),
            eos_token_id=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> OLMoConfig:
        """Read ``config.json`` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(raw, **overrides)


def _rope_from_hf(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Find rope_theta and rope scaling in either the old or the new (rope_parameters) layout."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta"))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = raw.get("rope_theta")
        scaling = raw.get("rope_scaling")
    if theta is None:
        raise ConfigError(
            "config.json sets no rope_theta (top level or in rope_parameters); refusing to guess "
            "10000, since a wrong base silently corrupts every position"
        )
    return theta, scaling or None


def _check_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    scaling.pop("type", None)
    scaling["rope_type"] = kind
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {kind!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if kind == "default":
        return None
    factor = scaling.get("factor")
    if not (isinstance(factor, (int, float)) and factor > 0 and math.isfinite(factor)):
        raise ConfigError(f"rope scaling {kind!r} needs a positive 'factor', got {factor!r}")
    if kind == "llama3":
        need = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        absent = [k for k in need if k not in scaling]
        if absent:
            raise ConfigError(f"llama3 rope scaling lacks {', '.join(absent)}")
    return scaling
