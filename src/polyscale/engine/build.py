"""Config -> the engine's objects shared by every task: EMA of the weights, DDP / torch.compile wrapping.

What differs per task (data, model, loss, evaluator) is built by the task (polyscale.tasks).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polyscale.engine.distributed import DistInfo
from polyscale.errors import ConfigError

__all__ = ["build_ema", "wrap_model"]


def build_ema(cfg_trainer: Any, model: nn.Module) -> ModelEmaV3 | None:
    """timm's EMA of all weights and buffers (kept in the model's dtype and device), or None."""
    if not cfg_trainer.ema:
        return None
    return ModelEmaV3(model, decay=cfg_trainer.ema_decay, use_warmup=cfg_trainer.ema_warmup)


def wrap_model(
    model: nn.Module, cfg_trainer: Any, info: DistInfo, device: torch.device
) -> tuple[nn.Module, DistributedDataParallel | None]:
    """DDP (when distributed) and torch.compile around `model`: returns (module to train, DDP or None).

    SyncBatchNorm replaces BatchNorm in place beforehand, so `model` (the module that is saved) and
    the wrappers share parameters and buffers.
    """
    ddp = None
    train_model = model
    if info.distributed:
        if cfg_trainer.sync_bn:
            if device.type != "cuda":
                raise ConfigError(
                    "trainer.sync_bn=true needs CUDA devices (NCCL); set trainer.sync_bn=false on CPU."
                )
            # convert_sync_batchnorm returns a new root only when the root itself is a BatchNorm.
            model_bn = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if model_bn is not model:
                raise ConfigError(
                    "trainer.sync_bn=true cannot convert a model whose root module is a BatchNorm."
                )
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids)
        train_model = ddp
    if cfg_trainer.compile:
        # compile(DDP(model)) lets DDPOptimizer split graphs at gradient-bucket boundaries.
        train_model = torch.compile(train_model)
    return train_model, ddp
