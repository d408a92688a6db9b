"""The run directory: resolved config, environment, TensorBoard events, metrics.jsonl, results.json.

Only rank 0 writes (a `RunRecorder` built with `enabled=False` is a no-op), so a torchrun job leaves
one set of files however many ranks it has. Layout::

    RUN_DIR/config.yaml        resolved config (also in the checkpoints, as plain data)
    RUN_DIR/env.json           package versions, git commit, devices, command line, world size
    RUN_DIR/tensorboard/       loss, lr, top-1/top-5, images/s, epoch time
    RUN_DIR/metrics.jsonl      one JSON line per epoch
    RUN_DIR/checkpoints/       last.pt, best.pt
    RUN_DIR/results.json       best and final top-1/top-5 with their epochs
    RUN_DIR/.lock              held by the process training in the directory (engine/run_lock.py)
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["RunRecorder", "collect_environment"]

_PACKAGES = (
    "polyscale",
    "torch",
    "torchvision",
    "timm",
    "hydra-core",
    "omegaconf",
    "numpy",
    "pillow",
    "tensorboard",
)


def _git_commit() -> dict[str, Any]:
    """Commit and dirty flag of the checkout that holds the polyscale sources (None outside git)."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(dirty)}


def collect_environment(*, world_size: int, device: torch.device) -> dict[str, Any]:
    """What is needed to reproduce a run: versions, commit, hardware and the exact command."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda_devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "time": datetime.now().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git": _git_commit(),
        "world_size": world_size,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cuda_devices": cuda_devices,
        "torchrun": {
            k: v for k, v in os.environ.items() if k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
        },
    }


class RunRecorder:
    """Writes the run directory's records; every method is a no-op when `enabled` is False (rank > 0)."""

    def __init__(
        self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = True, purge_step: int | None = None
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # imported on rank 0 only (slow import)

                # purge_step drops events a resumed run is about to write again.
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def write_config(self, cfg: DictConfig) -> None:
        if self.enabled:
            OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)

    def write_environment(self, env: dict[str, Any]) -> None:
        if self.enabled:
            _write_json(self.run_dir / "env.json", env)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """TensorBoard scalars, e.g. {"train/loss": 0.3, "train/lr": 0.1}."""
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def epoch_metrics(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (and flush TensorBoard, so both advance together)."""
        if self.enabled:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self._writer is not None:
                self._writer.flush()

    def write_results(self, results: dict[str, Any]) -> None:
        if self.enabled:
            _write_json(self.run_dir / "results.json", results)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temp file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
