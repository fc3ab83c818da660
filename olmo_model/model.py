"""AI2's OLMo architectures in TVM Relax's ``nn`` frontend, shaped like MLC LLM's model files.

OLMo-1 norms each block's inputs with a non-affine LayerNorm and lets the KV cache apply
RoPE. OLMo-2 norms each block's outputs with RMSNorm (``h + norm(attn(h))``), norms the
whole q and k projections with RMSNorm before RoPE, and so applies RoPE itself
(rope.py); OLMo-3 adds sliding-window attention on the layers ``layer_types`` marks,
which the KV cache runs as ``mha_sliding`` layers, and RoPE per layer type.

One ``OLMoForCausalLM`` is one compiled module. With a full-model ``StageSpec`` it has
the whole function suite; a pipeline stage owns a layer range, its own KV cache over
those layers, the embedding only when it is the first stage, and the final norm and LM
head only when it is the last. Given a ``Quantization`` (q4f16, q8f16), every linear
layer and the embedding hold group-quantized weights instead (quantized_layers.py).
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from .config import LayerType, OLMoConfig
from .quantized_layers import Quantization, QuantizedEmbedding, QuantizedLinear
from .rope import RopeTable, rotate
from .stages import StageSpec, cache_layer_offset, prefill_layer_function

LAYER_NORM_EPS = 1e-5


def _activation(name: str, x: Tensor) -> Tensor:
    if name == "silu":
        return op.silu(x)
    if name == "gelu":
        return op.gelu(x)
    if name == "gelu_tanh":
        return op.gelu(x, approximate="tanh")
    if name == "relu":
        return op.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def _layer_norm(x: Tensor) -> Tensor:
    """OLMo's LayerNorm: no weight, no bias, computed in float32 as the reference does."""
    dtype = x.dtype
    if dtype != "float32":
        x = x.astype("float32")
    y = op.layer_norm(x, normalized_shape=x.shape[-1], weight=None, bias=None, eps=LAYER_NORM_EPS)
    return y.astype(dtype) if dtype != "float32" else y


class RMSNorm(nn.Module):
    """OLMo-2/3's RMSNorm with a weight, computed in float32 as the reference does."""

    def __init__(self, size: int, eps: float):
        self.weight = nn.Parameter((size,))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        weight = self.weight
        if dtype != "float32":
            x, weight = x.astype("float32"), weight.astype("float32")
        y = op.rms_norm(x, weight, axes=-1, epsilon=self.eps)
        return y.astype(dtype) if dtype != "float32" else y


# A pass's RoPE tables (cos, sin), by layer type; empty when the KV cache applies RoPE.
RopeTables = dict[LayerType, tuple[Tensor, Tensor]]


def _linear(in_features: int, out_features: int, quant: Quantization | None,
            bias: bool = False) -> nn.Module:
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return QuantizedLinear(in_features, out_features, quant, bias=bias)


class OLMoEmbedding(nn.Embedding):
    """Token embedding that can also act as the tied LM head."""

    def lm_head_forward(self, x: Tensor) -> Tensor:
        return op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")


class OLMoAttention(nn.Module):
    """Fused-QKV GQA attention through the paged KV cache, with OLMo's optional clamp."""

    def __init__(self, config: OLMoConfig, quant: Quantization | None,
                 layer_type: LayerType = LayerType.FULL):
        self.head_dim = config.head_dim
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.clip_qkv = config.clip_qkv
        self.layer_type = layer_type
        self.qk_norm = config.family.post_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.num_q_heads * self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, config.rms_norm_eps)
        self.qkv_proj = _linear(
            config.hidden_size,
            (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim,
            quant,
            bias=config.attention_bias,
        )
        self.o_proj = _linear(self.num_q_heads * self.head_dim, config.hidden_size, quant,
                              bias=config.attention_bias)

    def forward(self, hidden_states: Tensor, paged_kv_cache: PagedKVCache, cache_layer: int,
                rope: RopeTables):
        d, h_q, h_kv = self.head_dim, self.num_q_heads, self.num_kv_heads
        b, s, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)
        if self.clip_qkv is not None:
            qkv = qkv.maximum(-self.clip_qkv).minimum(self.clip_qkv)
        if self.qk_norm:  # over all heads of q, and of k, together
            q, k, v = op.split(qkv, [h_q * d, (h_q + h_kv) * d], axis=-1)
            qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        if rope:
            cos, sin = rope[self.layer_type]
            qkv = rotate(op.reshape(qkv, (b * s, h_q + 2 * h_kv, d)), cos, sin, h_q + h_kv)
        qkv = op.reshape(qkv, (b, s, h_q + 2 * h_kv, d))
        out = paged_kv_cache.attention_with_fused_qkv(cache_layer, qkv, h_q, sm_scale=d**-0.5)
        return self.o_proj(op.reshape(out, (b, s, h_q * d)))


class OLMoFFN(nn.Module):
    """Gated feed-forward with fused gate/up projection and a configurable activation."""

    def __init__(self, config: OLMoConfig, quant: Quantization | None):
        self.intermediate_size = config.intermediate_size
        self.activation = config.activation
        self.gate_up_proj = _linear(config.hidden_size, 2 * config.intermediate_size, quant)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, quant)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        gate, up = op.split(gate_up, 2, axis=-1)
        return self.down_proj(_activation(self.activation, gate) * up)


class OLMoDecoderLayer(nn.Module):
    """OLMo-1's pre-norm transformer block with non-affine LayerNorms."""

    def __init__(self, config: OLMoConfig, quant: Quantization | None,
                 layer_type: LayerType = LayerType.FULL):
        self.self_attn = OLMoAttention(config, quant)
        self.mlp = OLMoFFN(config, quant)

    def forward(self, hidden_states: Tensor, paged_kv_cache: PagedKVCache, cache_layer: int,
                rope: RopeTables):
        hidden_states = hidden_states + self.self_attn(
            _layer_norm(hidden_states), paged_kv_cache, cache_layer, rope
        )
        return hidden_states + self.mlp(_layer_norm(hidden_states))


class OLMo2DecoderLayer(nn.Module):
    """OLMo-2/3's block: RMSNorm on the attention and MLP outputs, before the residual."""

    def __init__(self, config: OLMoConfig, quant: Quantization | None,
                 layer_type: LayerType = LayerType.FULL):
        self.self_attn = OLMoAttention(config, quant, layer_type)
        self.mlp = OLMoFFN(config, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: Tensor, paged_kv_cache: PagedKVCache, cache_layer: int,
                rope: RopeTables):
        attn = self.self_attn(hidden_states, paged_kv_cache, cache_layer, rope)
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        return hidden_states + self.post_feedforward_layernorm(self.mlp(hidden_states))


class OLMoModel(nn.Module):
    """Embedding (first stage), this stage's decoder layers, final norm (last stage)."""

    def __init__(self, config: OLMoConfig, stage: StageSpec, quant: Quantization | None):
        self.stage = stage
        if stage.is_first or (stage.is_last and config.tie_word_embeddings):
            self.embed_tokens = (
                OLMoEmbedding(config.vocab_size, config.hidden_size) if quant is None
                else QuantizedEmbedding(config.vocab_size, config.hidden_size, quant))
        self.cache_offset = cache_layer_offset(config, stage)
        block = OLMo2DecoderLayer if config.family.post_norm else OLMoDecoderLayer
        types = stage_layer_types(config, stage)
        self.layers = nn.ModuleList([block(config, quant, t) for t in types])
        if config.family.post_norm and stage.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # One RoPE table per distinct RoPE among this stage's layers (none: the cache's).
        self.rope: dict[LayerType, RopeTable] = {}
        if not config.rope_in_cache:
            for t in dict.fromkeys(types):
                layer = stage.layer_begin + types.index(t)
                self.rope[t] = RopeTable(*config.layer_rope(layer), config.head_dim,
                                         config.max_position_embeddings)

    def final_norm(self, hidden_states: Tensor) -> Tensor:
        return self.norm(hidden_states) if hasattr(self, "norm") else _layer_norm(hidden_states)

    def forward(self, hidden_states: Tensor, paged_kv_cache: PagedKVCache,
                layers: range | None = None) -> Tensor:
        """Run ``layers`` (local indices; all of them by default), and the final norm if
        they end the model."""
        layers = layers or range(len(self.layers))
        rope: RopeTables = {}
        if self.rope:
            b, s, _ = hidden_states.shape
            positions = paged_kv_cache.get_query_positions(b * s)
            rope = {t: table(positions) for t, table in self.rope.items()}
        # The stage-local cache numbers its layers from 0 (or 1: see cache_layer_offset).
        for layer in layers:
            hidden_states = self.layers[layer](hidden_states, paged_kv_cache,
                                               self.cache_offset + layer, rope)
        if self.stage.is_last and layers.stop == len(self.layers):
            hidden_states = self.final_norm(hidden_states)
        return hidden_states


def stage_layer_types(config: OLMoConfig, stage: StageSpec) -> list[LayerType]:
    """Each of a stage's layers' attention (all full but for OLMo-3's sliding layers)."""
    return [config.layer_types[i] if config.layer_types else LayerType.FULL
            for i in stage.layers]


class OLMoForCausalLM(nn.Module):
    """The compiled surface: embed, forward passes over the paged KV cache, logits."""

    def __init__(self, config: OLMoConfig, stage: StageSpec | None = None,
                 quant: Quantization | None = None):
        self.config = config
        self.stage = stage or StageSpec.full(config.num_hidden_layers)
        self.model = OLMoModel(config, self.stage, quant)
        if self.stage.is_last and not config.tie_word_embeddings:
            self.lm_head = (
                nn.Linear(config.hidden_size, config.vocab_size, bias=False) if quant is None
                else QuantizedLinear(config.hidden_size, config.vocab_size, quant,
                                     out_dtype="float32"))
        self.dtype = "float32"
        self.target: Target | None = None
        # One prefill function per layer, so that a prefill worker can ship each group of
        # layers' K/V while the next group computes. The kernels are those of the whole
        # stage's functions, so they cost almost no compile time.
        for layer in range(self.stage.num_local_layers):
            setattr(self, prefill_layer_function(layer),
                    functools.partial(self._prefill_layer, layer))

    def to(self, dtype: str | None = None) -> None:
        super().to(dtype=dtype)
        if dtype is not None:
            self.dtype = dtype

    # --- token embedding and LM head -------------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def get_logits(self, hidden_states: Tensor) -> Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.lm_head_forward(hidden_states)
        logits = self.lm_head(hidden_states)
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def batch_select_last_hidden_states(self, hidden_states: Tensor, logit_positions: Tensor):
        return op.take(hidden_states, logit_positions, axis=0)

    # --- forward passes that stop at hidden states (every stage has these) ------------

    def _forward(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self.model(input_embeds, paged_kv_cache), paged_kv_cache

    def prefill_to_last_hidden_states(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._forward(input_embed, paged_kv_cache)

    def decode_to_last_hidden_states(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._forward(input_embed, paged_kv_cache)

    def batch_prefill_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        return self._forward(input_embeds, paged_kv_cache)

    def batch_decode_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        return self._forward(input_embeds, paged_kv_cache)

    def batch_verify_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        return self._forward(input_embeds, paged_kv_cache)

    def batch_forward_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache):
        return self._forward(input_embeds, paged_kv_cache)

    def _prefill_layer(self, layer: int, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        """``batch_prefill_to_last_hidden_states`` for one local layer (the stage's last
        one also final-norms on the last stage)."""
        return self.model(input_embeds, paged_kv_cache, range(layer, layer + 1)), paged_kv_cache

    # --- forward passes that end in logits (full model only) --------------------------

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        def last_token(x: te.Tensor):
            b, s, d = x.shape
            return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_token")

        hidden_states = self.model(input_embed, paged_kv_cache)
        hidden_states = op.tensor_expr_op(last_token, name_hint="last_token", args=[hidden_states])
        return self.get_logits(hidden_states), paged_kv_cache

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self.get_logits(self.model(input_embed, paged_kv_cache)), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache):
        hidden_states = self.model(input_embeds, paged_kv_cache)
        b, s, h = hidden_states.shape
        last = op.take(op.reshape(hidden_states, (b * s, h)), logit_positions, axis=0)
        logits = self.get_logits(op.reshape(last, (1, logit_positions.shape[0], h)))
        return logits, paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self.get_logits(self.model(input_embeds, paged_kv_cache)), paged_kv_cache

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self.get_logits(self.model(input_embeds, paged_kv_cache)), paged_kv_cache

    # --- the stage-local paged KV cache ----------------------------------------------

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        c = self.config
        n = self.stage.num_local_layers
        types = stage_layer_types(c, self.stage)
        sliding = LayerType.SLIDING in types
        offset = cache_layer_offset(c, self.stage)
        n += offset
        return TIRPagedKVCache(
            # TVM's per-layer sliding window: a sliding layer's attention reads only the
            # last ``sliding_window`` positions of a sequence.
            attn_kind=(["mha"] * offset
                       + ["mha_sliding" if t is LayerType.SLIDING else "mha" for t in types]
                       if sliding else "mha"),
            layer_sliding_window_size=c.sliding_window if sliding else 1024,
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, n]),
            num_hidden_layers=n,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL if c.rope_in_cache else RopeMode.NONE,
            rope_scale=c.rope_scale,
            rope_theta=c.rope_theta,
            rope_scaling=c.tvm_rope_scaling,
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    # --- the compiled surface, declared in one place ----------------------------------

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, dtype = self.config.hidden_size, self.dtype
        packed = {"$": {"param_mode": "packed", "effect_mode": "none"}}
        cache = nn.spec.Object(object_type=PagedKVCache)

        def embeds(*shape: Any) -> nn.spec.Tensor:
            return nn.spec.Tensor([*shape, h], dtype)

        spec: dict[str, dict[str, Any]] = {}
        if self.stage.is_first:
            spec["embed"] = {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), **packed}
        for name, shape in (
            ("prefill_to_last_hidden_states", (1, "seq_len")),
            ("decode_to_last_hidden_states", (1, 1)),
            ("batch_prefill_to_last_hidden_states", (1, "seq_len")),
            ("batch_decode_to_last_hidden_states", ("batch_size", 1)),
            ("batch_verify_to_last_hidden_states", (1, "seq_len")),
            ("batch_forward_to_last_hidden_states", (1, "seq_len")),
        ):
            arg = "input_embed" if name.startswith(("prefill", "decode")) else "input_embeds"
            spec[name] = {arg: embeds(*shape), "paged_kv_cache": cache, **packed}
        for layer in range(self.stage.num_local_layers):
            spec[prefill_layer_function(layer)] = {"input_embeds": embeds(1, "seq_len"),
                                                   "paged_kv_cache": cache, **packed}
        if self.stage.is_last:
            spec["get_logits"] = {"hidden_states": embeds("seq_len"), **packed}
            spec["batch_select_last_hidden_states"] = {
                "hidden_states": embeds("seq_len"),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                **packed,
            }
        if self.stage.is_full_model:
            spec["prefill"] = {"input_embed": embeds(1, "seq_len"), "paged_kv_cache": cache,
                               **packed}
            spec["decode"] = {"input_embed": embeds(1, 1), "paged_kv_cache": cache, **packed}
            spec["batch_prefill"] = {
                "input_embeds": embeds(1, "seq_len"),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": cache,
                **packed,
            }
            spec["batch_decode"] = {"input_embeds": embeds("batch_size", 1),
                                    "paged_kv_cache": cache, **packed}
            spec["batch_verify"] = {"input_embeds": embeds(1, "seq_len"),
                                    "paged_kv_cache": cache, **packed}
        spec["create_paged_kv_cache"] = {
            "max_batch_size": int,
            "max_total_seq_len": int,
            "prefill_chunk_size": int,
            "page_size": int,
            "support_sliding_window": int,
            "$": {"param_mode": "none", "effect_mode": "none"},
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)
