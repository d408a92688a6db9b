"""Checkpoint container: weights_only loading, atomic writes, RNG round trip, unwrapped state dicts, and
the failures a long run meets: empty / truncated / bit-flipped files, diverged weights, a full disk, temp
files of killed writes, file permissions."""

from __future__ import annotations

import os
import random
import re
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from process_helpers import run_python
from torch import nn

from polyscale.engine import checkpoint as ckpt_mod
from polyscale.engine.checkpoint import (
    check_finite,
    is_polyscale_checkpoint,
    load_checkpoint,
    model_state,
    remove_stale_temp_files,
    save_checkpoint,
    stored_config,
    trained_as,
    unwrap_model,
    weights_problem,
)
from polyscale.engine.runtime import capture_rng_state, restore_rng_state
from polyscale.errors import CheckpointError


def draws() -> tuple[list[float], list[float], list[float]]:
    """Consume every global RNG a training step may use (dropout, Mixup/CutMix, python)."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def tensor_data_offset(path: Path, tensor: torch.Tensor) -> int:
    """Offset in the file of the first byte of `tensor`'s data (torch.save stores it uncompressed)."""
    raw = tensor.numpy().tobytes()
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and archive.read(info) == raw:
                name_len, extra_len = struct.unpack(
                    "<HH", data[info.header_offset + 26 : info.header_offset + 30]
                )
                return info.header_offset + 30 + name_len + extra_len
    raise AssertionError("tensor not found in the archive")


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    path = save_checkpoint({"rng": [capture_rng_state()]}, tmp_path / "rng.pt")
    expected = draws()
    restore_rng_state(load_checkpoint(path)["rng"][0])  # weights_only=True inside
    assert draws() == expected


def test_checkpoint_is_a_plain_container_with_format_version_and_checksum(tmp_path: Path) -> None:
    model = nn.Linear(2, 3)
    path = save_checkpoint(
        {"model": model.state_dict(), "epoch": 4, "config": {"a": [1, None]}}, tmp_path / "c.pt"
    )
    loaded = torch.load(path, weights_only=True)
    assert loaded["format"] == "polyscale" and loaded["version"] == 1 and loaded["epoch"] == 4
    assert loaded["config"] == {"a": [1, None]} and torch.equal(loaded["model"]["weight"], model.weight)
    assert is_polyscale_checkpoint(loaded) and not is_polyscale_checkpoint(model.state_dict())
    assert loaded["checksum"]["algorithm"] == "sha256" and len(loaded["checksum"]["value"]) == 64


def test_checksum_survives_the_round_trip_of_a_real_training_state(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.99))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": [capture_rng_state()]}
    path = save_checkpoint(payload, tmp_path / "last.pt")
    loaded = load_checkpoint(path)  # verifies: optimizer ints keys, tuples, RNG lists all hash alike
    resaved = save_checkpoint(loaded, tmp_path / "copy.pt")  # a loaded container saves again
    assert load_checkpoint(resaved)["checksum"] == loaded["checksum"]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pt")

    def broken_save(obj, handle) -> None:
        handle.write(b"half a file")
        raise OSError("disk on fire")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(
        CheckpointError, match=re.escape(f"Cannot write checkpoint {path}: disk on fire. The previous")
    ):
        save_checkpoint({"epoch": 2}, path)

    def buggy_save(obj, handle) -> None:
        raise TypeError("cannot pickle 'generator' object")

    monkeypatch.setattr(ckpt_mod.torch, "save", buggy_save)
    with pytest.raises(TypeError):  # a programming error keeps its traceback
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


def test_empty_and_truncated_files_give_one_paragraph_naming_the_path(tmp_path: Path) -> None:
    save_checkpoint({"epoch": 1}, tmp_path / "best.pt")  # named as the alternative
    empty = tmp_path / "last.pt"
    empty.write_bytes(b"")  # what a kill during a non-atomic copy leaves
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(empty)
    message = str(caught.value)
    assert message.startswith(f"Checkpoint {empty} is empty (0 bytes)") and "\n" not in message
    assert f"Use {tmp_path / 'best.pt'}" in message
    whole = save_checkpoint({"model": nn.Linear(64, 64).state_dict()}, tmp_path / "whole.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(truncated)
    message = str(caught.value)
    assert message.startswith(f"Cannot read checkpoint {truncated} ({len(whole) // 2} bytes)")
    assert "truncated" in message and "\n" not in message


def test_a_flipped_bit_in_the_weights_is_reported_as_corruption(tmp_path: Path) -> None:
    weight = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4)
    path = save_checkpoint({"model": {"fc.weight": weight}, "epoch": 3}, tmp_path / "last.pt")
    save_checkpoint({"model": {"fc.weight": weight}, "epoch": 2}, tmp_path / "best.pt")
    data = bytearray(path.read_bytes())
    data[tensor_data_offset(path, weight) + 4 * 5] ^= 0x01  # lowest mantissa bit of weight[1, 1]
    path.write_bytes(bytes(data))
    silently = torch.load(path, weights_only=True)["model"]["fc.weight"]  # torch itself does not notice
    assert torch.isfinite(silently).all() and not torch.equal(silently, weight)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert f"Checkpoint {path} is corrupt: its contents changed after it was written" in message
    assert f"Use {tmp_path / 'best.pt'}" in message and "\n" not in message
    assert load_checkpoint(path, verify=False)["epoch"] == 3  # for inspection tools


def test_checkpoints_written_before_checksums_still_load(tmp_path: Path) -> None:
    old = tmp_path / "old.pt"
    state = nn.Linear(2, 2).state_dict()
    torch.save({"format": "polyscale", "version": 1, "model": state, "ema": None, "epoch": 5}, old)
    loaded = load_checkpoint(old)
    assert loaded["epoch"] == 5 and torch.equal(loaded["model"]["weight"], state["weight"])


def test_bare_state_dicts_with_nan_name_the_tensor(tmp_path: Path) -> None:
    state = {"conv.weight": torch.ones(3), "fc.weight": torch.tensor([1.0, float("nan"), 2.0])}
    path = tmp_path / "bare.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(
        CheckpointError, match=r"bare\.pt holds unusable weights: state_dict\.fc\.weight holds NaN"
    ):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"^here holds unusable weights: fc\.weight holds NaN \(1 of 3"):
        check_finite(state, "here")
    check_finite({"conv.weight": torch.ones(3), "steps": torch.tensor(7)}, "fine")


def test_weights_problem_finds_non_finite_and_diverged_tensors() -> None:
    healthy = nn.BatchNorm2d(3).state_dict() | {"w": torch.full((2,), 1e3)}
    assert weights_problem(healthy) is None
    assert (
        weights_problem({"w": torch.tensor([1.0, 1e26])})
        == "w has |x| up to 1e+26, above 1e+10: the run diverged"
    )
    assert weights_problem({"w": torch.tensor([-1e26])}).startswith("w has |x| up to 1e+26")
    assert (
        weights_problem({"a": torch.ones(2), "b": torch.tensor([float("inf")])})
        == "b holds inf (1 of 1 values)"
    )
    assert (
        weights_problem({"a": torch.tensor([float("nan")], dtype=torch.bfloat16)})
        == "a holds NaN (1 of 1 values)"
    )
    assert weights_problem({"w": torch.tensor([5.0])}, limit=1.0).startswith("w has |x| up to 5")
    assert weights_problem({"n": torch.tensor(2**62), "e": torch.empty(0)}) is None  # integers, empty


def test_model_state_trained_as_and_stored_config_read_our_container(tmp_path: Path) -> None:
    config = {"model": {"name": "ps_resnet50", "conv": {"name": "psconv"}}, "seed": 1}
    weights = {"w": torch.ones(1)}
    path = save_checkpoint({"model": weights, "ema": None, "config": config}, tmp_path / "last.pt")
    ckpt = load_checkpoint(path)
    assert model_state(ckpt)["w"].equal(weights["w"])
    assert trained_as(ckpt) == "model=ps_resnet50 model/conv=psconv" and stored_config(ckpt) == config
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"{path} has no EMA weights: the run that wrote it trained with trainer.ema=false"),
    ):
        model_state(ckpt, use_ema=True, source=path)
    with pytest.raises(CheckpointError, match="not a polyscale training checkpoint"):
        model_state(weights, source="bare.pt")
    assert trained_as(weights) is None and stored_config(weights) == {}
    assert trained_as({"format": "polyscale", "config": {"model": {"name": "resnet20"}}}) == "model=resnet20"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_permissions_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        path = save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_full_disk_gives_one_paragraph_and_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = save_checkpoint({"model": {"w": torch.zeros(10)}}, tmp_path / "last.pt")
    before = path.read_bytes()
    temps: list[Path] = []

    def temp_on_a_full_disk(target: Path) -> tuple[int, Path]:
        tmp = target.with_name(f".{target.name}.fulldisk.tmp")
        tmp.write_bytes(b"")  # the real temp file, which must be removed
        temps.append(tmp)
        return os.open("/dev/full", os.O_WRONLY), tmp  # every write: ENOSPC

    monkeypatch.setattr(ckpt_mod, "_create_temp", temp_on_a_full_disk)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint({"model": {"w": torch.ones(250_000)}}, path)  # 1 MB of weights
    message = str(caught.value)
    assert message.startswith(f"Cannot write checkpoint {path}: No space left on device (ENOSPC). ")
    assert "It needs about 1.0 MB; " in message and " is free on the file system of " in message
    assert (
        "The previous last.pt is intact and the partial file was removed." in message and "\n" not in message
    )
    assert path.read_bytes() == before and temps and not temps[0].exists()


def test_file_size_limit_gives_the_paragraph_without_a_traceback(tmp_path: Path) -> None:
    path = save_checkpoint({"model": {"w": torch.zeros(10)}}, tmp_path / "last.pt")
    before = path.read_bytes()
    child = run_python(
        f"""
        import resource, signal, sys, torch
        from polyscale.engine.checkpoint import save_checkpoint
        from polyscale.errors import CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            save_checkpoint({{"model": {{"w": torch.ones(250_000)}}}}, {str(path)!r})
        except CheckpointError as err:  # what train.py's error handler does
            print(err, file=sys.stderr)
            sys.exit(2)
        """
    )
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2 and "Traceback" not in err, err
    assert err.startswith(f"Cannot write checkpoint {path}: File too large (EFBIG). It needs about 1.0 MB")
    assert "The previous last.pt is intact" in err and len(err.strip().splitlines()) == 1
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_temp_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    path = save_checkpoint({"epoch": 1}, folder / "last.pt")
    before = path.read_bytes()
    child = run_python(
        f"""
        import sys, time, torch
        from polyscale.engine.checkpoint import save_checkpoint

        def slow_save(obj, handle):  # half the file is on disk when the kill arrives
            handle.write(b"x" * 1_000_000)
            handle.flush()
            print("writing", flush=True)
            time.sleep(60)

        torch.save = slow_save
        save_checkpoint({{"epoch": 2}}, {str(path)!r})
        """
    )
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    (stale,) = folder.glob(".last.pt.*.tmp")
    keep = [folder / ".notes.tmp", folder / "last.pt.tmp", folder / ".last.pt.short.tmp", folder / "best.pt"]
    for other in keep:
        other.write_text("not ours")
    assert remove_stale_temp_files(folder) == [stale]
    assert not stale.exists() and all(p.exists() for p in keep) and path.read_bytes() == before
    assert remove_stale_temp_files(folder) == [] and remove_stale_temp_files(tmp_path / "absent") == []
