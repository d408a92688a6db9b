"""Training engine, run in-process on tiny configs: exact resume, NaN handling, exact evaluation, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import RESUME_EXACT, TINY, assert_tensors_equal, compose_config, load
from torch import nn

from polyscale.engine.distributed import DistInfo
from polyscale.engine.fit import run_training
from polyscale.engine.runtime import Runtime, micro_batch_size
from polyscale.errors import ConfigError, DataError, NonFiniteLossError
from polyscale.tasks.classification import classification_metrics

CPU = Runtime(DistInfo(), torch.device("cpu"), "fp32", channels_last=False, show_progress=False)

EXACT = (*TINY, *RESUME_EXACT)


def train(run_dir: Path, *overrides: str) -> dict | None:
    return run_training(compose_config("train", *overrides), run_dir)


@pytest.mark.parametrize("stop_at", [2, 3])  # mid-epoch; after an epoch's last step, before its validation
def test_stopped_and_resumed_run_ends_with_identical_weights(tmp_path: Path, stop_at: int) -> None:
    reference = train(tmp_path / "a", *EXACT)
    assert train(tmp_path / "b", *EXACT, f"trainer.stop_after_steps={stop_at}") is None
    stopped = load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert (stopped["global_step"], stopped["epoch"], stopped["step_in_epoch"]) == (stop_at, 0, stop_at)
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = train(tmp_path / "b", *EXACT, "trainer.resume=auto")
    assert resumed == reference
    a, b = (load(tmp_path / run / "checkpoints" / "last.pt") for run in ("a", "b"))
    for key in (
        "model",
        "ema",
        "optimizer",
        "scheduler",
        "epoch",
        "global_step",
        "step_in_epoch",
        "best",
        "rng",
    ):
        assert_tensors_equal(a[key], b[key], key)
    assert not torch.equal(a["model"]["fc.weight"], a["ema"]["fc.weight"])  # the EMA is a different average
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and all("ema_top1" in line for line in lines)


def test_resume_is_exact_with_data_loader_workers(tmp_path: Path) -> None:
    overrides = [o for o in EXACT if not o.startswith("data.num_workers")] + ["data.num_workers=2"]
    train(tmp_path / "a", *overrides)
    train(tmp_path / "b", *overrides, "trainer.stop_after_steps=2")
    train(tmp_path / "b", *overrides, "trainer.resume=auto")
    a, b = (load(tmp_path / run / "checkpoints" / "last.pt") for run in ("a", "b"))
    assert_tensors_equal(a["model"], b["model"], "model")


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    results = train(
        tmp_path, *TINY, "trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.resume=auto"
    )
    assert results is not None and load(tmp_path / "checkpoints" / "last.pt")["global_step"] == 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    overrides = (*TINY, "trainer.epochs=2", "trainer.checkpoint_every_n_steps=1")
    train(tmp_path, *overrides, "trainer.stop_after_steps=2")  # two good steps, then a huge LR
    with pytest.raises(NonFiniteLossError) as info:
        train(tmp_path, *overrides, "trainer.resume=auto", "optim.lr=1e30")
    message = str(info.value)
    assert "NaN or inf at optimizer step" in message or "weights diverged by global step" in message
    last = load(tmp_path / "checkpoints" / "last.pt")
    assert last["global_step"] == 2 and "after global step 2" in message
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert "trainer.resume=PATH" in message and not (tmp_path / "results.json").exists()


def test_diverged_weights_are_never_written(tmp_path: Path) -> None:
    """With a huge LR the first step already blows the weights up (finite, 1e29): no checkpoint."""
    overrides = (*TINY, "trainer.epochs=2", "optim.lr=1e30", "trainer.checkpoint_every_n_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"weights diverged by global step 1 \(.* above 1e\+10"):
        train(tmp_path, *overrides, "trainer.log_every_n_steps=0")
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_gradient_accumulation_splits_the_global_batch(tmp_path: Path) -> None:
    assert micro_batch_size(256, world_size=8, accum_steps=2) == 16
    with pytest.raises(ConfigError, match="data.batch_size=100 is the global batch"):
        micro_batch_size(100, world_size=8, accum_steps=1)
    overrides = (*TINY, "trainer.epochs=1", "trainer.accum_steps=2", "trainer.clip_grad_norm=1.0")
    results = train(tmp_path, *overrides)
    last = load(tmp_path / "checkpoints" / "last.pt")
    assert last["global_step"] == 64 // 16 and results["num_val_samples"] == 25  # 4 steps of 2 x 8 samples


class FixedLogits(nn.Module):
    """Returns the batch itself as logits: accuracy is decided by the test data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _batches(rows: list[tuple[list[float], int]], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    logits = torch.tensor([r[0] for r in rows])
    targets = torch.tensor([r[1] for r in rows])
    return list(zip(logits.split(size), targets.split(size)))


def test_evaluate_counts_top1_top5_and_skips_bad_files() -> None:
    rows = [
        ([9, 8, 7, 6, 5, 4, 3], 0),  # top-1 hit
        ([9, 8, 7, 6, 5, 4, 3], 4),  # top-5 hit only
        ([9, 8, 7, 6, 5, 4, 3], 6),  # miss
        ([0, 0, 0, 0, 0, 0, 0], -1),  # an unreadable file: skipped and counted
    ]
    result = classification_metrics(FixedLogits(), _batches(rows, 3), CPU, expected_total=4)
    assert (result["num_samples"], result["bad_files"]) == (3, 1)
    assert result["top1"] == pytest.approx(100 / 3) and result["top5"] == pytest.approx(200 / 3)


def test_evaluate_refuses_a_loader_that_loses_samples() -> None:
    batches = _batches([([1.0, 0.0], 0)] * 5, 2)
    with pytest.raises(DataError, match="saw 5 samples and 0 bad files, but the validation set has 6"):
        classification_metrics(FixedLogits(), batches, CPU, expected_total=6)
    limited = classification_metrics(FixedLogits(), batches, CPU, expected_total=6, limit_batches=2)
    assert limited["num_samples"] == 4 and limited["top1"] == 100.0
