"""Body of train.py: train with the composed config in Hydra's run directory."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from polyscale.cli.common import report_user_errors
from polyscale.engine.fit import run_training

__all__ = ["run"]


def run(cfg: DictConfig) -> None:
    """Train; user errors print their message and exit with code 2."""
    with report_user_errors():
        run_training(cfg, HydraConfig.get().runtime.output_dir)
