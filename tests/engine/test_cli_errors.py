"""Bad input to train.py / evaluate.py: one paragraph naming the problem and the fix, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import TINY, run_in_process

from polyscale.models import create_model

TRAIN = (*TINY, "trainer.epochs=1")


@pytest.mark.parametrize(
    ("overrides", "code", "phrases"),
    [
        (["trainer.epoch=3"], 1, ["Key 'epoch' not in 'TrainerConfig'", "+trainer.epoch=3"]),
        (["trainer.epochs=abc"], 1, ["'abc'", "could not be converted to Integer", "trainer.epochs"]),
        (["model=no_such_net"], 1, ["Could not find 'model/no_such_net'", "resnet20"]),
        (["model.name=no_such_net"], 2, ["Unknown model 'no_such_net'", "Set model to one of"]),
        (["model/conv=no_such_conv"], 1, ["Could not find 'model/conv/no_such_conv'", "psconv"]),
        (["model.conv.name=no_such_conv"], 2, ["no_such_conv", "psconv"]),
        (["model=ps_resnet20", "model.conv.impl=triton"], 2, ["impl must be None", "'depthwise'"]),
        (["data.name=no_such_data"], 2, ["data.name='no_such_data'", "imagenet"]),
        (["data=imagefolder", "data.root=/no/such/folder"], 2, ["/no/such/folder", "data.root"]),
        (["data.batch_size=15", "trainer.accum_steps=2"], 2, ["data.batch_size=15 is the global batch"]),
        (["optim.lr=1e30"], 2, ["NaN or inf", "Last good checkpoint", "Lower optim.lr"]),
    ],
)
def test_train_reports_bad_input(tmp_path: Path, overrides: list[str], code: int, phrases: list[str]) -> None:
    exit_code, output = run_in_process("train.py", *TRAIN, *overrides, f"hydra.run.dir={tmp_path}")
    assert exit_code == code, output
    for phrase in phrases:
        assert phrase in output, output
    assert "Traceback" not in output


def test_empty_data_root_is_reported(tmp_path: Path) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    exit_code, output = run_in_process(
        "train.py",
        *TRAIN,
        "data=imagefolder",
        f"data.root={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert exit_code == 2 and "DataError" in output and str(tmp_path / "data") in output
    assert "Traceback" not in output


@pytest.fixture(scope="module")
def bare_resnet20(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "resnet20.pt"
    torch.save(create_model("resnet20", num_classes=10).state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (["model=resnet56"], ["does not fit the model", "model=resnet56", "resnet20"]),
        ([], ["bare state dict", "model=NAME"]),
        (["model=resnet20", "eval.use_ema=true"], ["eval.use_ema=true", "bare state dict"]),
    ],
)
def test_evaluate_reports_checkpoints_that_do_not_fit(
    tmp_path: Path, bare_resnet20: Path, args, phrases
) -> None:
    exit_code, output = run_in_process(
        "evaluate.py", f"checkpoint={bare_resnet20}", *args, *TINY[1:], f"hydra.run.dir={tmp_path}"
    )
    assert exit_code == 2, output
    for phrase in phrases:
        assert phrase in output, output
    assert "Traceback" not in output


def test_resume_from_a_checkpoint_of_another_model_is_reported(tmp_path: Path, bare_resnet20: Path) -> None:
    exit_code, output = run_in_process(
        "train.py", *TRAIN, f"trainer.resume={bare_resnet20}", f"hydra.run.dir={tmp_path}"
    )
    assert exit_code == 2 and "bare state dict, not a polyscale checkpoint" in output
    assert f"model.checkpoint_path={bare_resnet20}" in output


def test_evaluate_reports_a_missing_checkpoint(tmp_path: Path) -> None:
    exit_code, output = run_in_process(
        "evaluate.py", f"checkpoint={tmp_path / 'nope.pt'}", f"hydra.run.dir={tmp_path}"
    )
    assert exit_code == 2 and "nope.pt does not exist" in output and "Traceback" not in output
