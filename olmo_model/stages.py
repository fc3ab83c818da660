"""The one layer-to-stage map every part of the system uses.

A pipeline stage owns a contiguous range of decoder layers. MLC LLM derives the
parameter-to-stage map and the KV cache's ``layer_partition`` separately, and they
disagree when the layers do not divide evenly; here both come from ``layer_partition``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import OLMoConfig


def layer_partition(num_layers: int, num_stages: int) -> list[int]:
    """Stage boundaries as an indptr: stage s owns layers [p[s], p[s+1]).

    Uneven splits give the extra layers to the earliest stages (5 layers over 3 stages:
    2, 2, 1), since the last stage also carries the LM head.
    """
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return bounds


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """Which layers one compiled module owns, and whether it embeds or produces logits."""

    stage: int
    num_stages: int
    layer_begin: int
    layer_end: int
    num_layers: int

    @property
    def is_first(self) -> bool:
        return self.layer_begin == 0

    @property
    def is_last(self) -> bool:
        return self.layer_end == self.num_layers

    @property
    def is_full_model(self) -> bool:
        return self.is_first and self.is_last

    @property
    def num_local_layers(self) -> int:
        return self.layer_end - self.layer_begin

    @property
    def layers(self) -> range:
        return range(self.layer_begin, self.layer_end)

    @classmethod
    def of(cls, num_layers: int, num_stages: int, stage: int) -> StageSpec:
        bounds = layer_partition(num_layers, num_stages)
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} is out of range for {num_stages} stages")
        return cls(stage, num_stages, bounds[stage], bounds[stage + 1], num_layers)

    @classmethod
    def full(cls, num_layers: int) -> StageSpec:
        return cls.of(num_layers, 1, 0)


def prefill_layer_function(local_layer: int) -> str:
    """The compiled function that prefills one of a stage's layers (its local index)."""
    return f"batch_prefill_layer{local_layer}_to_hidden_states"


def stage_specs(num_layers: int, num_stages: int) -> list[StageSpec]:
    return [StageSpec.of(num_layers, num_stages, s) for s in range(num_stages)]


def cache_layer_offset(config: OLMoConfig, stage: StageSpec) -> int:
    """Layers in front of a stage's own in its KV cache: one unused full-attention layer
    when the stage's first layer is a sliding-window one, since reading K/V back out of
    TVM's cache starts at cache layer 0 and works on full-attention layers only
    (kv_pages.py)."""
    return 1 if stage.layer_begin in config.sliding_layers else 0
