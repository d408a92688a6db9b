"""Checkpoint container: weights_only loading, atomic writes, RNG round trip, unwrapped state dicts."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from polyscale.engine import checkpoint as ckpt_mod
from polyscale.engine.checkpoint import (
    capture_rng_state,
    is_polyscale_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from polyscale.errors import CheckpointError


def draws() -> tuple[list[float], list[float], list[float]]:
    """Consume every global RNG a training step may use (dropout, Mixup/CutMix, python)."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    path = save_checkpoint({"rng": [capture_rng_state()]}, tmp_path / "rng.pt")
    expected = draws()
    restore_rng_state(load_checkpoint(path)["rng"][0])  # weights_only=True inside
    assert draws() == expected


def test_checkpoint_is_a_plain_container_with_format_and_version(tmp_path: Path) -> None:
    model = nn.Linear(2, 3)
    path = save_checkpoint(
        {"model": model.state_dict(), "epoch": 4, "config": {"a": [1, None]}}, tmp_path / "c.pt"
    )
    loaded = torch.load(path, weights_only=True)
    assert loaded["format"] == "polyscale" and loaded["version"] == 1 and loaded["epoch"] == 4
    assert loaded["config"] == {"a": [1, None]} and torch.equal(loaded["model"]["weight"], model.weight)
    assert is_polyscale_checkpoint(loaded) and not is_polyscale_checkpoint(model.state_dict())


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pt")

    def broken_save(obj, handle) -> None:
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_unwrap_model_removes_compile_wrapper_prefixes() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    compiled = torch.compile(model)  # wraps lazily; nothing is compiled until called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap_model(compiled) is model and list(unwrap_model(compiled).state_dict()) == [
        "0.weight",
        "0.bias",
    ]


def test_missing_and_unreadable_checkpoints_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read checkpoint"):
        load_checkpoint(garbage)
    newer = save_checkpoint({"version": 99}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="newer than this polyscale"):
        load_checkpoint(newer)
