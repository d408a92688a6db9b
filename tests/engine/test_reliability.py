"""Defects found by using the framework as a new user would: bad values, changed settings on resume,
another network's checkpoint, bad training files, evaluation at the wrong crop, schema names."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import TINY, compose_config, load, run_in_process

from polyscale.engine.fit import run_training

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from data_helpers import write_jpeg_tree  # noqa: E402

TRAIN = (*TINY, "trainer.epochs=1")


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("trainer.epochs=0", "trainer.epochs=0 is out of range: it must be >= 1"),
        ("trainer.epochs=-1", "trainer.epochs=-1 is out of range"),
        (
            "trainer.limit_train_batches=0",
            "trainer.limit_train_batches=0 is out of range: it must be >= 1 or null",
        ),
        ("trainer.limit_train_batches=-3", "trainer.limit_train_batches=-3 is out of range"),
        (
            "trainer.limit_val_batches=0",
            "trainer.limit_val_batches=0 is out of range: it must be >= 1 or null",
        ),
        ("data.batch_size=0", "data.batch_size=0 is out of range: it must be >= 1"),
        ("data.num_workers=-1", "data.num_workers=-1 is out of range: it must be >= 0"),
        ("trainer.clip_grad_norm=0", "trainer.clip_grad_norm=0.0 is out of range"),
        ("trainer.ema_decay=1.5", "trainer.ema_decay=1.5 is out of range"),
        ("trainer.label_smoothing=1.0", "trainer.label_smoothing=1.0 is out of range"),
        ("model.drop_rate=2", "model.drop_rate=2.0 is out of range"),
    ],
)
def test_out_of_range_values_stop_at_start_naming_the_key(tmp_path: Path, override: str, phrase: str) -> None:
    code, output = run_in_process("train.py", *TRAIN, override, f"hydra.run.dir={tmp_path}")
    assert code == 2 and phrase in output and "Traceback" not in output, output
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained (no epoch lost)


def test_nan_advice_works_resume_with_a_lower_lr_applies_it(tmp_path: Path) -> None:
    steps = ("trainer.limit_train_batches=2",)
    assert run_training(compose_config("train", *TINY, *steps, "trainer.epochs=1"), tmp_path) is not None
    code, output = run_in_process(
        "train.py", *TINY, *steps, "trainer.epochs=3", "trainer.resume=auto", "optim.lr=1e8",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    last = tmp_path / "checkpoints" / "last.pt"
    assert code == 2 and f"Last good checkpoint: {last} (after global step 2)" in output, output
    assert "trainer.resume=PATH" in output and "Traceback" not in output
    assert load(last)["global_step"] == 2  # the diverged epoch wrote nothing
    code, output = run_in_process(
        "train.py", *TINY, *steps, "trainer.epochs=3", f"trainer.resume={last}", "optim.lr=0.05",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert code == 0, output
    assert "optim.lr: 0.1 -> 0.05" in output and "trainer.epochs: 1 -> 3" in output
    lines = _lines(tmp_path)
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    # the cosine over 3 epochs of 2 steps from the NEW base LR: after 4 of 6 steps, 0.05 * (1 + cos(2 pi/3))/2
    assert lines[1]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(2 * math.pi / 3)))
    assert all(math.isfinite(line["train_loss"]) for line in lines)


def test_resume_of_another_network_is_refused_and_evaluation_warns(tmp_path: Path) -> None:
    run_training(compose_config("train", *TRAIN, "trainer.limit_train_batches=1"), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    code, output = run_in_process(
        "train.py", *TRAIN, "model=ps_resnet20", "trainer.epochs=2", "trainer.resume=auto",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert code == 2 and "trained as model=resnet20" in output and "model=ps_resnet20" in output, output
    assert f"model.checkpoint_path={last}" in output and "<mapping>" not in output
    code, output = run_in_process(
        "evaluate.py", f"checkpoint={last}", "model=ps_resnet20", f"hydra.run.dir={tmp_path / 'eval'}"
    )
    assert (
        code == 0 and "was trained as model=resnet20" in output and "evaluated as model=ps_resnet20" in output
    )


def test_epoch_resumed_at_its_last_step_keeps_its_loss_and_speed(tmp_path: Path) -> None:
    overrides = (*TINY, "trainer.epochs=2", "trainer.limit_train_batches=3", "trainer.deterministic=true")
    run_training(compose_config("train", *overrides), tmp_path / "a")
    assert (
        run_training(compose_config("train", *overrides, "trainer.stop_after_steps=3"), tmp_path / "b")
        is None
    )
    run_training(compose_config("train", *overrides, "trainer.resume=auto"), tmp_path / "b")
    a, b = _lines(tmp_path / "a"), _lines(tmp_path / "b")
    assert b[0]["train_loss"] == a[0]["train_loss"] and b[0]["images_per_s"] > 0


def test_schemas_are_no_choices_of_the_groups(tmp_path: Path) -> None:
    code, output = run_in_process("train.py", "--help")
    assert code == 0 and "builtin" in output and "_schema" not in output, output
    code, output = run_in_process("train.py", *TRAIN, "data=data_schema", f"hydra.run.dir={tmp_path}")
    assert code == 1 and "Could not find 'data/data_schema'" in output


def test_renamed_pyconv_groups_key_names_the_new_one(tmp_path: Path) -> None:
    code, output = run_in_process(
        "train.py", *TRAIN, "model=pyconvresnet50", "model.conv.groups=[[1,4,8,16],[1,4,8],[1,4],[1]]",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert code == 2 and "model.conv.pyramid_groups" in output and "Traceback" not in output, output


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory) -> Path:
    root = write_jpeg_tree(tmp_path_factory.mktemp("tree") / "data")
    good = (root / "train/c0/00.JPEG").read_bytes()
    (root / "train/c1/zz_truncated.JPEG").write_bytes(good[: len(good) // 2])  # a second bad train file
    return root


FOLDER = (
    "model=resnet20",
    "data=imagefolder",
    "data.image_size=28",
    "data.batch_size=4",
    "data.pin_memory=false",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.epochs=1",
)


def test_bad_training_files_are_counted_across_workers(tmp_path: Path, jpeg_tree: Path) -> None:
    cfg = compose_config("train", *FOLDER, f"data.root={jpeg_tree}", "data.num_workers=2")
    results = run_training(cfg, tmp_path)
    assert (results["bad_files_train"], results["bad_files_val"], results["bad_files"]) == (2, 1, 3)
    line = _lines(tmp_path)[0]
    assert (line["bad_files_train"], line["bad_files_val"]) == (2, 1)


def test_evaluate_with_the_stored_data_group_keeps_the_training_crop(tmp_path: Path, jpeg_tree: Path) -> None:
    run_training(compose_config("train", *FOLDER, f"data.root={jpeg_tree}", "data.num_workers=0"), tmp_path)
    best = tmp_path / "checkpoints" / "best.pt"
    out = tmp_path / "eval.json"
    args = (f"checkpoint={best}", "data=imagefolder", f"data.root={jpeg_tree}", f"eval.output={out}")
    code, output = run_in_process("evaluate.py", *args, f"hydra.run.dir={tmp_path / 'e1'}")
    assert code == 0, output
    row = json.loads(out.read_text())["results"][0]
    assert row["crop_size"] == 28 and row["train_crop_size"] == 28 and "trained on" not in output
    code, output = run_in_process(
        "evaluate.py", *args, "eval.crop_sizes=[32]", f"hydra.run.dir={tmp_path / 'e2'}"
    )
    row = json.loads(out.read_text())["results"][0]
    assert code == 0 and row["crop_size"] == 32 and row["train_crop_size"] == 28
    assert "the network was trained on 28 px crops" in output, output
    assert torch.load(best, weights_only=True)["config"]["data"]["image_size"] == 28
