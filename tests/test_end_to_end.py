"""`python train.py` (the default run, reduced) and `python evaluate.py` on its best checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent / "engine"))
from engine_helpers import REPO, load, run_cli  # noqa: E402

CHECKPOINT_KEYS = {
    "format",
    "version",
    "checksum",
    "epoch_progress",
    "model",
    "ema",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "global_step",
    "step_in_epoch",
    "best",
    "rng",
    "config",
    "metrics",
}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, str]:
    """The default configuration with fewer samples and epochs; returns (run dir, console output)."""
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    done = run_cli(
        "train.py",
        "data.num_train_samples=256",
        "data.num_val_samples=101",
        "trainer.epochs=2",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run_dir}",
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, done.stdout + done.stderr


def test_default_run_writes_the_run_directory(default_run: tuple[Path, str]) -> None:
    run_dir, output = default_run
    assert "epoch 1/2  train loss" in output and "epoch 2/2  train loss" in output  # one summary line each
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == {
        "best",
        "final",
        "num_val_samples",
        "bad_files",
        "bad_files_train",
        "bad_files_val",
    }
    assert set(results["best"]) == set(results["final"]) == {"top1", "top5", "epoch"}
    assert results["num_val_samples"] == 101 and results["bad_files"] == 0 and results["final"]["epoch"] == 2
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    for key in ("train_loss", "lr", "images_per_s", "epoch_time_s", "val_top1", "val_top5", "val_samples"):
        assert all(key in line for line in lines), key
    best_epoch = max(lines, key=lambda line: line["val_top1"])  # first of equals, like the trainer
    assert (results["best"]["top1"], results["best"]["epoch"]) == (
        best_epoch["val_top1"],
        best_epoch["epoch"],
    )
    assert results["final"]["top1"] == lines[-1]["val_top1"] and lines[-1]["lr"] == 0.0  # cosine to zero

    last = load(run_dir / "checkpoints" / "last.pt")  # weights_only=True
    assert set(last) == CHECKPOINT_KEYS and (last["epoch"], last["step_in_epoch"]) == (2, 0)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    assert last["config"] == OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert load(run_dir / "checkpoints" / "best.pt")["epoch"] == results["best"]["epoch"]

    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 1 and env["packages"]["torch"] == metadata.version("torch")
    assert {"command", "git", "packages", "device", "python"} <= set(env) and "train.py" in env["command"][1]
    (events,) = (run_dir / "tensorboard").iterdir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "epoch/val_top1",
        "epoch/val_top5",
        "epoch/images_per_s",
        "epoch/epoch_time_s",
    } <= tags


def test_evaluate_reproduces_the_best_accuracy(default_run: tuple[Path, str]) -> None:
    run_dir, _ = default_run
    results = json.loads((run_dir / "results.json").read_text())
    size = OmegaConf.load(run_dir / "config.yaml").data.image_size
    output = run_dir / "eval.json"
    done = run_cli(
        "evaluate.py",
        f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
        f"eval.crop_sizes=[{size},{size + 8}]",
        f"eval.output={output}",
        f"hydra.run.dir={run_dir / 'eval'}",
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")
    assert [r["crop_size"] for r in report["results"]] == [size, size + 8]
    keys = {"crop_size", "top1", "top5", "num_samples", "bad_files", "train_crop_size"}
    assert all(set(r) == keys for r in report["results"])
    assert [r["train_crop_size"] for r in report["results"]] == [size, size]
    first = report["results"][0]
    assert (first["top1"], first["top5"], first["num_samples"]) == (
        results["best"]["top1"],
        results["best"]["top5"],
        results["num_val_samples"],
    )
    assert f"crop {size}: top-1 {first['top1']:.2f}% (error {100 - first['top1']:.2f}%)" in done.stdout
    assert f"crop {size + 8} (trained at {size} px)" in done.stdout


def timed_default_run(run_dir: Path, *args: str) -> tuple[dict, float, str]:
    """`python train.py ARGS` as a user types it (all cores: no OMP_NUM_THREADS=1): (results, seconds,
    stderr)."""
    start = time.monotonic()
    command = [sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(
        command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text()), time.monotonic() - start, done.stderr


@pytest.mark.slow
def test_plain_default_run_reaches_90_percent_within_3_minutes(tmp_path: Path) -> None:
    """The README's first command, unchanged: `python train.py` on 2 CPU cores."""
    results, elapsed, _ = timed_default_run(tmp_path)
    assert results["best"]["top1"] >= 90.0 and elapsed < 180, (results, elapsed)


@pytest.mark.slow
def test_default_detection_run_reaches_70_box_ap50_within_10_minutes(tmp_path: Path) -> None:
    """The README's detection command, unchanged: `python train.py task=detection` on 2 CPU cores."""
    results, elapsed, stderr = timed_default_run(tmp_path, "task=detection")
    assert results["best"]["bbox_AP50"] >= 70.0 and elapsed < 600, (results, elapsed)
    assert "train 1:" in stderr  # progress bars


@pytest.mark.slow
def test_default_detection_run_with_the_sepc_lite_head_learns_as_well(tmp_path: Path) -> None:
    """SEPC's light head (PConv + iBN tower, deformable extra convs) on the default detection run: the
    same bar as the plain head (box AP50 >= 70 within 10 minutes on 2 CPU cores)."""
    results, elapsed, _ = timed_default_run(tmp_path, "task=detection", "detector.head=sepc_lite")
    assert results["best"]["bbox_AP50"] >= 70.0 and elapsed < 600, (results, elapsed)
