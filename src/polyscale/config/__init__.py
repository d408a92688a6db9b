"""Structured config schemas: a mistyped key or a wrong type fails when Hydra composes the config.

`register_configs()` puts the schemas into Hydra's ConfigStore under the group `schema` (not under the
groups they describe, so they are no choice of `model=`, `data=`, ...); every YAML file of a group
lists its schema first (`- /schema/data@_here_`), so every file is validated against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from polyscale.config.data import DataConfig, DetectionDataConfig
from polyscale.config.detection import DetectorConfig
from polyscale.config.engine import EvalConfig, OptimConfig, ScheduleConfig, TrainerConfig
from polyscale.config.model import ConvConfig, ModelConfig

__all__ = [
    "ConvConfig",
    "DataConfig",
    "DetectionDataConfig",
    "DetectorConfig",
    "EvalConfig",
    "EvalRunConfig",
    "ModelConfig",
    "OptimConfig",
    "SCHEMAS",
    "ScheduleConfig",
    "TaskConfig",
    "TrainConfig",
    "TrainerConfig",
    "register_configs",
]


@dataclass
class TaskConfig:
    """What is trained (`task=NAME`): picks the data, model, loss and evaluator (polyscale.tasks)."""

    name: str = "classification"
    best_metric: str | None = None  # the metric that picks best.pt (null: the task's own, e.g. top1, bbox_AP)


@dataclass
class TrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # Each data set's YAML file brings its schema (DataConfig, or DetectionDataConfig for detection sets).
    data: Any = None
    detector: DetectorConfig = field(default_factory=DetectorConfig)  # task=detection only
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
    task: TaskConfig = field(default_factory=TaskConfig)  # the checkpoint's task unless given
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # data=NAME brings that set's schema; single keys (data.root=DIR) without a data=NAME change the
    # checkpoint's stored data section (evaluate.py passes them on as +data.KEY, see cli/common.py)
    data: Any = None
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # device, precision, limit_val_batches, ...
    seed: int = 0


def register_configs() -> None:
    """Register the schemas with Hydra (idempotent)."""
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(group="schema", name=name, node=node)


# schema/<name> in the ConfigStore; the YAML files of group <name> start with `- /schema/<name>@_here_`
SCHEMAS = {
    "train": TrainConfig,
    "eval": EvalRunConfig,
    "task": TaskConfig,
    "model": ModelConfig,
    "conv": ConvConfig,
    "data": DataConfig,
    "detection_data": DetectionDataConfig,
    "detector": DetectorConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "trainer": TrainerConfig,
}
