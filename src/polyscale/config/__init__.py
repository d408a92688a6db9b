"""Structured config schemas: a mistyped key or a wrong type fails when Hydra composes the config.

`register_configs()` puts the schemas into Hydra's ConfigStore; `configs/train.yaml` and
`configs/eval.yaml` list them first in their defaults so every YAML file is validated against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from polyscale.config.data import DataConfig
from polyscale.config.engine import EvalConfig, OptimConfig, ScheduleConfig, TrainerConfig
from polyscale.config.model import ConvConfig, ModelConfig

__all__ = [
    "ConvConfig",
    "DataConfig",
    "EvalConfig",
    "EvalRunConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainerConfig",
    "register_configs",
]


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    experiment_name: str | None = None  # set by experiment presets (table / row)
    notes: Any = None  # free-form (experiment presets put the published numbers here)


@dataclass
class EvalRunConfig:
    """evaluate.py's config. `model` and `data` come from the config stored in the checkpoint; only what the
    command line sets (`model=NAME`, `data=NAME`, `data.root=...`, ...) replaces the stored values."""

    checkpoint: str | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # device, precision, limit_val_batches, ...
    seed: int = 0


def register_configs() -> None:
    """Register the schemas with Hydra (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="model/conv", name="conv_schema", node=ConvConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="schedule", name="schedule_schema", node=ScheduleConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
