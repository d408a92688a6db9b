"""Training engine: `run_training` (fit.py) and `evaluate_checkpoint` (evaluation.py) on top of
`train_one_epoch` / `evaluate` / `TrainState` (trainer.py), checkpoints, torchrun set-up and run records.

See docs/training.md.
"""

from polyscale.engine.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from polyscale.engine.evaluation import evaluate_checkpoint
from polyscale.engine.fit import run_training
from polyscale.engine.trainer import EvalResult, StepSettings, TrainState, evaluate, train_one_epoch

__all__ = [
    "EvalResult",
    "StepSettings",
    "TrainState",
    "evaluate",
    "evaluate_checkpoint",
    "load_checkpoint",
    "run_training",
    "save_checkpoint",
    "train_one_epoch",
    "unwrap_model",
]
