"""The engine's shared builders: precision, DDP options, compile, the CPU allocator."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import TINY, compose_config, load
from omegaconf import OmegaConf
from torch import nn

from polyscale.config import TrainerConfig
from polyscale.engine.build import wrap_model
from polyscale.engine.distributed import DistInfo
from polyscale.engine.fit import run_training
from polyscale.engine.runtime import autocast_factory, make_grad_scaler, tune_cpu_allocator
from polyscale.errors import ConfigError


def trainer_cfg(**kwargs):
    return OmegaConf.structured(TrainerConfig(**kwargs))


@pytest.mark.parametrize(
    ("overrides", "scaled"),
    [(["trainer.precision=bf16", "trainer.channels_last=true"], False), (["trainer.precision=fp16"], True)],
)
def test_mixed_precision_runs_train_on_cpu(tmp_path: Path, overrides: list[str], scaled: bool) -> None:
    cfg = compose_config("train", *TINY, "trainer.epochs=1", "trainer.limit_train_batches=2", *overrides)
    results = run_training(cfg, tmp_path)
    last = load(tmp_path / "checkpoints" / "last.pt")
    assert results["num_val_samples"] == 25 and last["global_step"] == 2
    assert (last["scaler"] is not None and last["scaler"]["scale"] > 0) if scaled else last["scaler"] is None
    assert all(t.dtype != torch.float16 for t in last["model"].values())  # weights stay fp32 under autocast


def test_autocast_and_scaler_follow_the_precision() -> None:
    cpu = torch.device("cpu")
    with autocast_factory("bf16", cpu)():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_factory("fp32", cpu)():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert make_grad_scaler("fp16", cpu) is not None and make_grad_scaler("bf16", cpu) is None
    with pytest.raises(ConfigError, match="trainer.precision='fp8' is unknown"):
        autocast_factory("fp8", cpu)


def test_sync_bn_on_cpu_ranks_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="trainer.sync_bn=true needs CUDA"):
        wrap_model(nn.BatchNorm2d(3), trainer_cfg(sync_bn=True), DistInfo(0, 0, 2), torch.device("cpu"))


@pytest.mark.slow
def test_compiled_training_saves_unprefixed_weights(tmp_path: Path) -> None:
    """torch.compile on the CPU (inductor needs a C++ compiler; about 30 s)."""
    cfg = compose_config(
        "train", *TINY, "trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.compile=true"
    )
    assert run_training(cfg, tmp_path)["num_val_samples"] == 25
    keys = list(load(tmp_path / "checkpoints" / "last.pt")["model"])
    assert keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_channels_last_run_and_resume(tmp_path: Path) -> None:
    gpu = [o for o in TINY if o != "trainer.device=cpu"] + ["trainer.device=cuda", "trainer.precision=bf16"]
    overrides = (*gpu, "trainer.channels_last=true", "trainer.epochs=2", "trainer.limit_train_batches=2")
    assert run_training(compose_config("train", *overrides, "trainer.stop_after_steps=3"), tmp_path) is None
    results = run_training(compose_config("train", *overrides, "trainer.resume=auto"), tmp_path)
    last = load(tmp_path / "checkpoints" / "last.pt")
    assert results["num_val_samples"] == 25 and last["global_step"] == 4 and last["rng"][0]["cuda"]
    assert all(t.device.type == "cpu" for t in last["model"].values())  # loaded with map_location=cpu


def test_cpu_allocator_tuning_applies_on_glibc() -> None:
    assert tune_cpu_allocator() is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
