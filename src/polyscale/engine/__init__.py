"""The engine every task shares: `run_training` (fit.py) and `evaluate_checkpoint` (evaluation.py) on
top of the step loop (`train_one_epoch`, `TrainState`: loop.py), process set-up (runtime.py), resume
(resume.py), checkpoints (checkpoint.py), the run directory (run_dir.py) and signals (signals.py).
What differs per task lives in polyscale.tasks. See docs/architecture.md and docs/training.md.
"""

from polyscale.engine.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from polyscale.engine.evaluation import evaluate_checkpoint
from polyscale.engine.fit import run_training
from polyscale.engine.loop import StepSettings, TrainState, train_one_epoch

__all__ = [
    "StepSettings",
    "TrainState",
    "evaluate_checkpoint",
    "load_checkpoint",
    "run_training",
    "save_checkpoint",
    "train_one_epoch",
    "unwrap_model",
]
