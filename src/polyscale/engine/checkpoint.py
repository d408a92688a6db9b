"""Our checkpoint container: a plain dict that loads with `torch.load(weights_only=True)`.

Layout (version 1): `{"format": "polyscale", "version": 1, "model": state dict (unwrapped), "ema": state
dict | None, "optimizer", "scheduler", "scaler", "epoch", "global_step", "step_in_epoch", "rng": [one
entry per rank], "config": plain resolved config, "metrics": {...}}`. `epoch` counts finished epochs and
`step_in_epoch` the optimizer steps already done in epoch `epoch`, so a resume continues mid-epoch.
RNG states are stored as tensors, lists and numbers only, because weights_only refuses numpy objects.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polyscale.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "capture_rng_state",
    "is_polyscale_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "unwrap_model",
]

CHECKPOINT_FORMAT = "polyscale"
CHECKPOINT_VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers.

    Saving the unwrapped module keeps `module.` and `_orig_mod.` prefixes out of the state dict.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def capture_rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states as weights_only-loadable data."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write `payload` atomically: temp file in the same folder, flush + fsync, rename, fsync the folder.

    A crash (or preemption) while saving leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def is_polyscale_checkpoint(obj: Any) -> bool:
    """True for our container, False for a bare state dict or a foreign file."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file (ours or a bare state dict) with `weights_only=True`.

    Raises CheckpointError naming the file when it is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Check the path (absolute, or relative to {Path.cwd()})."
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types (pickle, zip, weights_only UnpicklingError)
        raise CheckpointError(
            f"Cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0]} "
            "The file is truncated, not a PyTorch checkpoint, or holds objects other than tensors and plain "
            "data; re-save it as a state dict (torch.save(model.state_dict(), path))."
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(obj).__name__}, not a dict (state dict or ours)."
        )
    if is_polyscale_checkpoint(obj) and obj.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format version {obj['version']}, newer than this polyscale "
            f"(reads up to {CHECKPOINT_VERSION}). Upgrade polyscale."
        )
    return obj
