"""LR schedules (per-iteration cosine, step, warm-up) and the optimizer's weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from polyscale.config import OptimConfig, ScheduleConfig
from polyscale.engine.optim import build_optimizer, build_scheduler, lr_factor_fn
from polyscale.errors import ConfigError


def schedule(**kwargs) -> ScheduleConfig:
    return OmegaConf.structured(ScheduleConfig(**kwargs))


def lrs_of(cfg, *, steps_per_epoch: int, epochs: int, lr: float = 0.1) -> list[float]:
    """The LR used by every optimizer step of a whole run, read from a real LambdaLR."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)
    used = []
    for _ in range(steps_per_epoch * epochs):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_cosine_is_a_half_cosine_stepped_per_iteration() -> None:
    used = lrs_of(schedule(name="cosine", min_lr=0.001), steps_per_epoch=5, epochs=4)
    total = 20
    expected = [0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[0] == pytest.approx(0.1) and len(set(used[:5])) == 5  # changes within an epoch


def test_cosine_reaches_min_lr_after_the_last_step() -> None:
    factor = lr_factor_fn(schedule(name="cosine", min_lr=0.0), base_lr=0.1, steps_per_epoch=10, epochs=3)
    assert (
        factor(0) == 1.0 and factor(15) == pytest.approx(0.5) and factor(30) == pytest.approx(0.0, abs=1e-15)
    )


def test_step_multiplies_by_gamma_at_epoch_milestones() -> None:
    used = lrs_of(schedule(name="step", milestones=[1, 3], gamma=0.1), steps_per_epoch=2, epochs=4)
    assert used == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001])


def test_fractional_linear_warmup_then_cosine() -> None:
    cfg = schedule(name="cosine", warmup_epochs=0.5, warmup_start_factor=0.2)
    used = lrs_of(cfg, steps_per_epoch=8, epochs=2)  # 4 warm-up steps of 16
    assert used[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert used[5] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 12)))


def test_warmup_also_precedes_the_step_schedule() -> None:
    used = lrs_of(schedule(name="step", milestones=[1], warmup_epochs=1), steps_per_epoch=2, epochs=2)
    assert used == pytest.approx([0.0, 0.05, 0.01, 0.01])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "linear"}, "schedule.name='linear' is unknown"),
        ({"name": "step", "milestones": [3, 1]}, "increasing order"),
        ({"warmup_epochs": 5.0}, "shorter than trainer.epochs=2"),
    ],
)
def test_bad_schedules_are_config_errors(kwargs, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lr_factor_fn(schedule(**kwargs), base_lr=0.1, steps_per_epoch=3, epochs=2)


def test_no_decay_norm_bias_puts_1d_parameters_in_a_zero_decay_group() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    cfg = OmegaConf.structured(OptimConfig(lr=0.2, weight_decay=5e-4, nesterov=True, no_decay_norm_bias=True))
    optimizer = build_optimizer(model, cfg)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert {decay[id(p)] for p in (model[0].weight, model[3].weight)} == {5e-4}
    assert {decay[id(p)] for p in (model[0].bias, model[1].weight, model[1].bias, model[3].bias)} == {0.0}
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["lr"] == 0.2 for g in optimizer.param_groups)


def test_default_optimizer_decays_every_parameter() -> None:
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, OmegaConf.structured(OptimConfig(weight_decay=1e-4)))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4]
    assert len(optimizer.param_groups[0]["params"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "adam"}, "optim.name='adam' is not supported"),
        ({"lr": -1.0}, "need lr > 0"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov=true needs optim.momentum > 0"),
    ],
)
def test_bad_optimizer_settings_are_config_errors(kwargs, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_optimizer(nn.Linear(2, 2), OmegaConf.structured(OptimConfig(**kwargs)))
