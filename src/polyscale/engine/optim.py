"""Optimizer and learning-rate schedule builders.

The schedule is a `LambdaLR` over the optimizer step (not the epoch), so a cosine decays smoothly within
epochs (PSConv §4.1: "decaying to zero on a half cosine") and warm-up may last a fraction of an epoch.
Its factor is a pure function of the step; the checkpoint stores the step, and resuming recomputes the
curve from the config.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from polyscale.errors import ConfigError

__all__ = ["build_optimizer", "build_scheduler", "lr_factor_fn"]


def build_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """SGD with momentum from `cfg.optim`; `no_decay_norm_bias` exempts 1-d parameters from weight decay."""
    if cfg.name != "sgd":
        raise ConfigError(f"optim.name={cfg.name!r} is not supported; polyscale trains with optim.name=sgd.")
    if cfg.lr <= 0 or cfg.weight_decay < 0 or not 0 <= cfg.momentum < 1:
        raise ConfigError(
            f"Invalid SGD settings lr={cfg.lr}, momentum={cfg.momentum}, weight_decay={cfg.weight_decay}: "
            "need lr > 0, 0 <= momentum < 1 and weight_decay >= 0."
        )
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0.")
    if cfg.no_decay_norm_bias:
        # timm puts every parameter with ndim <= 1 (norm weights, biases) into a weight-decay-free group.
        params = param_groups_weight_decay(model, weight_decay=cfg.weight_decay)
    else:
        params = [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}
        ]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor_fn(
    cfg: DictConfig, *, base_lr: float, steps_per_epoch: int, epochs: int
) -> Callable[[int], float]:
    """Multiplier of the base LR as a function of the number of optimizer steps already taken.

    cosine: half cosine from 1 down to min_lr / base_lr, reached at the last step.
    step: gamma ** (number of milestones <= current epoch).
    Both start with an optional linear warm-up from warmup_start_factor to 1 over warmup_steps optimizer
    steps, or else warmup_epochs epochs.
    """
    total = steps_per_epoch * epochs
    warmup_steps = getattr(cfg, "warmup_steps", 0) or 0
    warmup = warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)
    if warmup_steps < 0 or (warmup_steps and warmup >= total):
        raise ConfigError(
            f"schedule.warmup_steps={warmup_steps} must be >= 0 and shorter than the run's {total} steps "
            f"({epochs} epochs of {steps_per_epoch})."
        )
    if cfg.name not in ("cosine", "step"):
        raise ConfigError(f"schedule.name={cfg.name!r} is unknown: use schedule=cosine or schedule=step.")
    if cfg.warmup_epochs < 0 or (warmup > 0 and warmup >= total):
        raise ConfigError(
            f"schedule.warmup_epochs={cfg.warmup_epochs} must be >= 0 and shorter than "
            f"trainer.epochs={epochs}."
        )
    if cfg.name == "step" and list(cfg.milestones) != sorted(cfg.milestones):
        raise ConfigError(f"schedule.milestones={list(cfg.milestones)} must be in increasing order.")
    floor = cfg.min_lr / base_lr
    milestones = list(cfg.milestones)

    def factor(step: int) -> float:
        if step < warmup:
            return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / warmup
        if cfg.name == "step":
            return cfg.gamma ** bisect.bisect_right(milestones, step // steps_per_epoch)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: DictConfig, *, steps_per_epoch: int, epochs: int
) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step (call `scheduler.step()` after `optimizer.step()`)."""
    base_lr = optimizer.param_groups[0]["lr"]
    return LambdaLR(
        optimizer, lr_factor_fn(cfg, base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=epochs)
    )
