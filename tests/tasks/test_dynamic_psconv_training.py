"""Dynamic PSConv (PSConv section 4.2) in training: a tiny ResNet-20 with model/conv=dynamic_psconv trains
on the built-in set with its mean large-rate share in every epoch record, the optional regulariser is in
the loss and checked up front, and a stopped run resumes to the same weights, gates and records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_helpers import RESUME_EXACT, TINY, assert_tensors_equal, compose_config, load
from torch import nn

from polyscale.engine.distributed import DistInfo
from polyscale.engine.fit import run_training
from polyscale.engine.runtime import Runtime
from polyscale.errors import ConfigError
from polyscale.models import create_model
from polyscale.ops.dynamic_psconv import DynamicPSConv2d, large_fraction_penalty
from polyscale.tasks.classification import TASK, ClassificationLoss

CPU = Runtime(DistInfo(), torch.device("cpu"), "fp32", channels_last=False, show_progress=False)
DYNAMIC = (*TINY, "model/conv=dynamic_psconv")
# every source of randomness a resume must restore, with the dynamic conv, its gates started from
# all-small and pulled by the regulariser
EXACT = (
    *DYNAMIC,
    "model.conv.init=small",
    "model.conv.large_fraction_weight=200",  # a strong pull, visible within 6 steps
    "model.conv.large_fraction_target=0.5",
    *RESUME_EXACT,
)


@pytest.fixture(autouse=True)
def _restore_torch_flags() -> Iterator[None]:
    """trainer.deterministic switches torch's global deterministic mode on; switch it back."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


def train(run_dir: Path, *overrides: str) -> dict | None:
    return run_training(compose_config("train", *overrides), run_dir)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resnet20_with_dynamic_psconv_trains_and_records_its_large_fraction(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="polyscale")
    results = train(tmp_path, *DYNAMIC, "trainer.epochs=2", "optim.lr=0.1")
    assert results is not None and results["num_val_samples"] == 25
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    model = load(tmp_path / "checkpoints" / "last.pt")["model"]
    gates = [v for k, v in model.items() if k.endswith("gate_logits")]
    assert len(gates) == 18  # every 3x3 conv of ResNet-20's blocks
    assert any(not torch.equal(g.abs(), torch.full_like(g, 2.0)) for g in gates)  # the gates learned
    net = create_model("resnet20", conv="dynamic_psconv", num_classes=10)
    net.load_state_dict(model)
    layers = [m for m in net.modules() if isinstance(m, DynamicPSConv2d)]
    share = sum(m.large_fraction() for m in layers) / len(layers)
    assert records[1]["large_fraction"] == pytest.approx(share) and 0 <= share <= 1
    assert "large-rate share" in caplog.text


def test_other_conv_types_record_no_large_fraction(tmp_path: Path) -> None:
    train(tmp_path, *TINY, "trainer.epochs=1", "trainer.limit_train_batches=1")
    assert "large_fraction" not in _records(tmp_path)[0]


@pytest.mark.parametrize("stop_at", [2, 3])  # mid-epoch; after an epoch's last step, before its validation
def test_stopped_and_resumed_run_ends_with_identical_weights_gates_and_records(
    tmp_path: Path, stop_at: int
) -> None:
    reference = train(tmp_path / "a", *EXACT)
    assert train(tmp_path / "b", *EXACT, f"trainer.stop_after_steps={stop_at}") is None
    assert train(tmp_path / "b", *EXACT, "trainer.resume=auto") == reference
    a, b = (load(tmp_path / run / "checkpoints" / "last.pt") for run in ("a", "b"))
    for key in ("model", "ema", "optimizer", "scheduler", "epoch", "global_step", "best", "rng"):
        assert_tensors_equal(a[key], b[key], key)
    assert any(k.endswith("gate_logits") for k in a["model"])
    fractions = [[r["large_fraction"] for r in _records(tmp_path / run)] for run in ("a", "b")]
    assert fractions[0] == fractions[1] and len(fractions[0]) == 2
    # the regulariser pulls the all-small start (F_0's four gates at logit -2) towards the large rate
    finest = [v[-4:] for k, v in a["model"].items() if k.endswith("gate_logits")]
    assert all(bool((f > -2.0 + 0.05).all()) for f in finest)


def test_regulariser_adds_its_weighted_penalty_to_the_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DynamicPSConv2d(3, 4), nn.Flatten(), nn.LazyLinear(3))
    batch = (torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1]))
    plain, _ = ClassificationLoss(CPU, nn.CrossEntropyLoss(), None)(model, batch)
    loss = ClassificationLoss(
        CPU, nn.CrossEntropyLoss(), None, large_fraction_target=0.1, large_fraction_weight=2.0
    )
    regularised, size = loss(model, batch)
    assert size == 5
    expected = plain + 2.0 * large_fraction_penalty(model, 0.1)
    torch.testing.assert_close(regularised, expected)
    assert regularised.item() == pytest.approx(plain.item() + 2.0 * (0.5 - 0.1) ** 2)
    cfg = compose_config("train", *DYNAMIC, "model.conv.large_fraction_weight=0.3")
    built = TASK.batch_loss(cfg, None, CPU, micro_batch=8)
    assert (built.large_fraction_target, built.large_fraction_weight) == (0.5, 0.3)


def test_regulariser_settings_are_checked_before_the_data() -> None:
    TASK.check(compose_config("train", *DYNAMIC, "model.conv.large_fraction_weight=0.1"))
    with pytest.raises(ConfigError, match=r"large_fraction_weight=0.1 regularises .* model/conv=psconv"):
        TASK.check(
            compose_config("train", *TINY, "model=ps_resnet20", "model.conv.large_fraction_weight=0.1")
        )
    with pytest.raises(ConfigError, match=r"model.conv.large_fraction_target=1.5 in \[0, 1\]"):
        TASK.check(compose_config("train", *DYNAMIC, "model.conv.large_fraction_target=1.5"))
    with pytest.raises(ConfigError, match=r"model.conv.rates must be two positive integers"):
        TASK.check(compose_config("train", *DYNAMIC, "model.conv.rates=[2,1]"))
