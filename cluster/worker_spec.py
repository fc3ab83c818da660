"""What a worker builds its model runner from: one definition for every way a cluster starts
(the CLI's one-role commands, the in-process local cluster, Ray worker actors)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from olmo_model.artifact import compile_stages
from olmo_model.cache_limits import CacheLimits
from olmo_model.config import OLMoConfig
from olmo_model.demo import resolve_model_dir
from olmo_model.runtime import ModelRunner
from olmo_model.stages import StageSpec
from pipeline.options import WorkerOptions

from .cluster_config import DEFAULT_DTYPE, DEFAULT_TARGET


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    model_dir: Path
    dtype: str = DEFAULT_DTYPE
    target: str = DEFAULT_TARGET
    limits: CacheLimits = CacheLimits()
    options: WorkerOptions = WorkerOptions()

    @classmethod
    def of(cls, model: str | Path | None, dtype: str | None = None, target: str | None = None,
           limits: CacheLimits | None = None, options: WorkerOptions | None = None
           ) -> WorkerSpec:
        """None for any field means its default (for ``model``: the built-in demo model)."""
        return cls(Path(resolve_model_dir(model)).resolve(), dtype or DEFAULT_DTYPE,
                   target or DEFAULT_TARGET, limits or CacheLimits(), options or WorkerOptions())

    def config(self) -> OLMoConfig:
        return OLMoConfig.from_file(self.model_dir)

    def compile(self, stage_counts: Iterable[int]) -> None:
        """Compile (side by side, see ``compile_stages``) every library that instances of
        these numbers of stages load, unless cached."""
        config = self.config()
        layers = config.num_hidden_layers
        compile_stages(config, [StageSpec.of(layers, count, stage)
                                for count in sorted(set(stage_counts))
                                for stage in range(count)], self.dtype, self.target)

    def runner(self, stage: int = 0, num_stages: int = 1) -> ModelRunner:
        """Compile (or load from the cache) and load one stage of the model."""
        config = self.config()
        spec = StageSpec.of(config.num_hidden_layers, num_stages, stage)
        return ModelRunner.from_checkpoint(self.model_dir, stage=spec, dtype=self.dtype,
                                           target=self.target, limits=self.limits,
                                           config=config)
