"""Shared helpers of the engine, config and end-to-end tests: tiny runs, config composition, CLI calls."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from polyscale.cli import prepare_launch

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"

# A run that takes about a second on 2 CPU cores: ResNet-20 on 16x16 built-in images.
TINY = (
    "model=resnet20",
    "data=builtin",
    "data.image_size=16",
    "data.num_train_samples=64",
    "data.num_val_samples=25",
    "data.batch_size=16",
    "data.num_workers=0",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.log_every_n_steps=1",
)
# Every source of randomness a resume must restore: dropout (torch), Mixup/CutMix (numpy), the EMA,
# momentum buffers, the cosine schedule and the data order / augmentation of a half-done epoch.
# Appended to a run's overrides (TINY or a variant of it).
RESUME_EXACT = (
    "trainer.epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.deterministic=true",
    "trainer.ema=true",
    "trainer.ema_decay=0.5",
    "trainer.mixup_alpha=0.4",
    "trainer.cutmix_alpha=1.0",
    "trainer.mix_prob=0.8",
    "model.drop_rate=0.3",
    "optim.lr=0.05",
)


def compose_config(name: str, *overrides: str) -> DictConfig:
    """Compose configs/NAME.yaml as the entry points do (schemas and resolver registered)."""
    prepare_launch([])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def subprocess_env() -> dict[str, str]:
    """Environment of CLI subprocesses: one thread per process (2-core CI), quiet warnings."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    return env | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python ARGS...` in the repository root, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_process(script: str, *args: str) -> tuple[int, str]:
    """Run train.py / evaluate.py as `__main__` in this process; returns (exit code, stdout + stderr).

    The same code path as the command line (Hydra's error printing included) without the import cost
    of a new interpreter.
    """
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, *args]
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = argv
    return int(code or 0), out.getvalue()


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_tensors_equal(a: Any, b: Any, where: str = "") -> None:
    """Recursive torch.equal over nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}: {set(a) ^ set(b)}"
        for key in a:
            assert_tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
