"""OLMo model configuration (OLMo-1, OLMo-2, OLMo-3), read from a Hugging Face ``config.json``.

The config validates itself once, at construction, so that every later stage (model
definition, loader, compiler, workers) can trust its fields.
"""

from __future__ import annotations

import dataclasses
import enum
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


class ModelFamily(enum.Enum):
    """The OLMo architectures served, by their Hugging Face ``model_type``."""

    OLMO = "olmo"    # OLMo-1: non-affine LayerNorm before attention and MLP
    OLMO2 = "olmo2"  # RMSNorm after attention and MLP outputs, RMSNorm over q and k
    OLMO3 = "olmo3"  # OLMo-2's block with sliding-window attention on most layers

    @property
    def post_norm(self) -> bool:
        """Whether blocks norm their outputs (OLMo-2/3) rather than their inputs (OLMo-1)."""
        return self is not ModelFamily.OLMO


class LayerType(enum.Enum):
    """An OLMo-3 layer's attention, as ``layer_types`` in config.json spells it."""

    FULL = "full_attention"
    SLIDING = "sliding_attention"


# RoPE scaling types TVM's rotary kernel (in the KV cache: OLMo-1) computes exactly as
# transformers does. "yarn" is not among them: transformers also scales cos/sin by an
# attention factor that TVM's kernel does not apply, so logits would silently differ.
CACHE_ROPE_TYPES = ("default", "linear", "llama3")
# OLMo-2/3 apply RoPE in the model (rope.py: transformers' own frequencies), which also
# does YaRN.
MODEL_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

REFUSED_MODEL_TYPES = {
    "olmoe": "OLMoE (mixture of experts) is not served: its routed experts need a kernel "
             "and a loader this server does not have yet",
}


class ConfigError(ValueError):
    """A config.json this project cannot serve, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class OLMoConfig:
    """Hyper-parameters of an OLMo causal language model (any family).

    ``rope_theta``/``rope_scaling`` are every layer's RoPE, except OLMo-3's sliding layers,
    which have their own (``sliding_rope_theta``/``sliding_rope_scaling``).
    """

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
    family: ModelFamily = ModelFamily.OLMO
    rms_norm_eps: float = 1e-5
    layer_types: tuple[LayerType, ...] = ()  # OLMo-3 only; empty: every layer is full
    sliding_window: int = 0                  # tokens a sliding layer attends to (self included)
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: dict[str, Any] | None = None
    # The context the RoPE scaling was computed for (YaRN needs it).
    max_position_embeddings: int = 0

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
        rope_types = MODEL_ROPE_TYPES if self.family.post_norm else CACHE_ROPE_TYPES
        fix("rope_scaling", _check_rope_scaling(self.rope_scaling, rope_types))
        if not self.max_position_embeddings:
            fix("max_position_embeddings", self.context_window_size)
        self._check_layer_types(rope_types)
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

    def _check_layer_types(self, rope_types: tuple[str, ...]) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.family is not ModelFamily.OLMO3:
            if self.layer_types or self.sliding_window:
                raise ConfigError("layer_types and sliding_window are OLMo-3 settings")
            return
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types names {len(self.layer_types)} layers but the model "
                              f"has {self.num_hidden_layers}")
        try:
            fix("layer_types", tuple(LayerType(t) for t in self.layer_types))
        except ValueError as e:
            raise ConfigError(f"layer_types: {e}; use 'full_attention' or "
                              "'sliding_attention'") from e
        if LayerType.SLIDING in self.layer_types:
            if not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
                raise ConfigError(f"sliding_window must be a positive integer, got "
                                  f"{self.sliding_window!r}")
        else:
            fix("sliding_window", 0)
        theta = self.sliding_rope_theta if self.sliding_rope_theta else self.rope_theta
        fix("sliding_rope_theta", float(theta))
        fix("sliding_rope_scaling", _check_rope_scaling(self.sliding_rope_scaling, rope_types))

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        """The layers that attend to the last ``sliding_window`` tokens only."""
        return tuple(i for i, t in enumerate(self.layer_types) if t is LayerType.SLIDING)

    def kv_kept_from(self, layer: int, prompt_tokens: int) -> int:
        """The first position of a prompt of ``prompt_tokens`` tokens whose K/V ``layer``
        reads again once the prompt is prefilled: 0, or a sliding layer's window start
        (the first decode step looks back ``sliding_window - 1`` positions)."""
        if layer not in self.sliding_layers:
            return 0
        return max(0, prompt_tokens - self.sliding_window)

    def layer_rope(self, layer: int) -> tuple[float, dict[str, Any] | None]:
        """The RoPE base and scaling of one layer."""
        if layer in self.sliding_layers:
            return self.sliding_rope_theta, self.sliding_rope_scaling
        return self.rope_theta, self.rope_scaling

    @property
    def activation(self) -> str:
        """The activation in the model's own spelling (silu, gelu, gelu_tanh, relu)."""
        return ACTIVATIONS[self.hidden_act]

    @property
    def rope_in_cache(self) -> bool:
        """Whether the KV cache's kernel applies RoPE (OLMo-1); OLMo-2/3 apply it in the
        model, after the q/k norms and per layer type."""
        return not self.family.post_norm

    @property
    def rope_scale(self) -> float:
        """Position multiplier for TVM's rotary kernel (linear scaling divides positions)."""
        if not self.rope_in_cache:
            return 1.0
        if self.rope_scaling and self.rope_scaling["rope_type"] == "linear":
            return 1.0 / float(self.rope_scaling["factor"])
        return 1.0

    @property
    def tvm_rope_scaling(self) -> dict[str, Any]:
        """The rope_scaling dict in the form TVM's rotary kernel reads (empty for none)."""
        if self.rope_in_cache and self.rope_scaling and self.rope_scaling["rope_type"] == "llama3":
            return dict(self.rope_scaling)
        return {}

    def fingerprint_fields(self) -> dict[str, Any]:
        """Every field that changes the compiled code or the meaning of the weights."""
        fields = dataclasses.asdict(self)
        fields["family"] = self.family.value
        fields["layer_types"] = [t.value for t in self.layer_types]
        return fields

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], **overrides: Any) -> OLMoConfig:
        """Map a Hugging Face OLMo config dict onto OLMoConfig, refusing what we cannot serve."""
        model_type = raw.get("model_type")
        if model_type in REFUSED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r}: {REFUSED_MODEL_TYPES[model_type]}")
        try:
            family = ModelFamily(model_type)
        except ValueError:
            raise ConfigError(
                f"model_type {model_type!r} is not supported: this server runs OLMo-1, OLMo-2 "
                "and OLMo-3 (model_type 'olmo', 'olmo2', 'olmo3')") from None
        missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads",
                               "num_hidden_layers", "intermediate_size") if k not in raw]
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        rope = _rope_from_hf(raw, family)
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
            **rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            context_window_size=int(context),
            prefill_chunk_size=int(raw.get("prefill_chunk_size") or 0),
            pipeline_parallel_stages=int(raw.get("pipeline_parallel_stages") or 1),
            clip_qkv=raw.get("clip_qkv"),
            attention_bias=bool(raw.get("attention_bias", False)),
            eos_token_id=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
            family=family,
            max_position_embeddings=int(context),
        )
        if family.post_norm:
            fields["rms_norm_eps"] = float(raw.get("rms_norm_eps", 1e-5))
        if family is ModelFamily.OLMO3:
            layers = raw["num_hidden_layers"]
            fields["layer_types"] = tuple(raw.get("layer_types") or (
                LayerType.FULL.value if (i + 1) % 4 == 0 else LayerType.SLIDING.value
                for i in range(layers if isinstance(layers, int) else 0)))
            window = raw.get("sliding_window", 4096)
            fields["sliding_window"] = window if window is not None else 0
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


# transformers' default base for OLMo-3 configs that name none.
OLMO3_DEFAULT_THETA = 500000.0


def _rope_from_hf(raw: dict[str, Any], family: ModelFamily) -> dict[str, Any]:
    """RoPE settings in either the old (rope_theta + rope_scaling) or the new
    (rope_parameters, keyed by layer type for OLMo-3) layout, as OLMoConfig fields.

    As transformers reads them: an OLMo-3 ``rope_scaling`` (or unkeyed
    ``rope_parameters``) applies to full-attention layers only, and sliding layers keep
    plain RoPE.
    """
    params = raw.get("rope_parameters")
    by_type = isinstance(params, dict) and any(t.value in params for t in LayerType)
    if by_type:
        full = dict(params.get(LayerType.FULL.value) or {})
        sliding = dict(params.get(LayerType.SLIDING.value) or {})
        theta = full.pop("rope_theta", raw.get("rope_theta"))
        sliding_theta = sliding.pop("rope_theta", theta)
        scaling = full
    else:
        if isinstance(params, dict):
            theta = params.get("rope_theta", raw.get("rope_theta"))
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        else:
            theta = raw.get("rope_theta")
            scaling = raw.get("rope_scaling")
        sliding_theta, sliding = theta, None
    if theta is None and family is ModelFamily.OLMO3:
        theta = sliding_theta = OLMO3_DEFAULT_THETA
    if theta is None:
        raise ConfigError(
            "config.json sets no rope_theta (top level or in rope_parameters); refusing to guess "
            "10000, since a wrong base silently corrupts every position"
        )
    fields: dict[str, Any] = {"rope_theta": theta, "rope_scaling": scaling or None}
    if family is ModelFamily.OLMO3:
        fields.update(sliding_rope_theta=sliding_theta, sliding_rope_scaling=sliding or None)
    return fields


def _check_rope_scaling(scaling: dict[str, Any] | None,
                        supported: tuple[str, ...]) -> dict[str, Any] | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    scaling.pop("type", None)
    scaling["rope_type"] = kind
    if kind not in supported:
        raise ConfigError(
            f"rope scaling type {kind!r} is not supported; supported: {', '.join(supported)}"
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
    if kind == "yarn" and "original_max_position_embeddings" not in scaling:
        raise ConfigError("yarn rope scaling lacks original_max_position_embeddings")
    return scaling
