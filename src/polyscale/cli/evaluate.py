"""Body of evaluate.py: evaluate a checkpoint with the composed config and the command line's overrides."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from polyscale.cli.common import report_user_errors
from polyscale.engine.evaluation import evaluate_checkpoint

__all__ = ["run"]


def run(cfg: DictConfig) -> None:
    """Evaluate; user errors print their message and exit with code 2."""
    hydra_cfg = HydraConfig.get()
    with report_user_errors():
        evaluate_checkpoint(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))
