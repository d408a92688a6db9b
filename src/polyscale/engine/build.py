"""Config -> objects, at the edge: model, data loaders, loss / Mixup-CutMix, EMA, DDP wrapping.

The model and data code never see the config; these builders read it and pass plain arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polyscale.data import build_dataset, build_train_loader, build_val_loader
from polyscale.engine.distributed import DistInfo
from polyscale.engine.runtime import per_rank_val_batch
from polyscale.errors import ConfigError
from polyscale.models import build_model_from_config

__all__ = [
    "DataBundle",
    "build_data",
    "build_ema",
    "build_loss",
    "build_model",
    "check_model_config",
    "wrap_model",
]


@dataclass
class DataBundle:
    """The data sets and this rank's loaders."""

    train_set: Any
    val_set: Any
    train_loader: Any  # has len() and set_epoch(epoch, start_batch)
    val_loader: Any

    @property
    def num_classes(self) -> int:
        return int(self.train_set.num_classes)


def build_data(cfg: DictConfig, info: DistInfo, device: torch.device, micro_batch: int) -> DataBundle:
    """Train and validation sets and their per-rank loaders (train: seeded, resumable; val: exact shards)."""
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    train_loader = build_train_loader(
        train_set,
        cfg.data,
        rank=info.rank,
        world_size=info.world_size,
        batch_size=micro_batch,
        seed=cfg.seed,
        device=device,
    )
    val_loader = build_val_loader(
        val_set,
        cfg.data,
        rank=info.rank,
        world_size=info.world_size,
        batch_size=per_rank_val_batch(cfg.data, info.world_size),
        device=device,
    )
    return DataBundle(train_set, val_set, train_loader, val_loader)


def check_model_config(cfg_model: DictConfig, num_classes: int | None) -> None:
    """Build the model on the meta device (no memory, no weight init), so that an unknown model or conv name
    or a bad conv option fails in a second, before the data set is loaded."""
    probe = OmegaConf.merge(cfg_model, {"checkpoint_path": None})
    with torch.device("meta"):
        build_model_from_config(probe, num_classes=num_classes or 1000)


def build_model(
    cfg_model: DictConfig, num_classes: int, device: torch.device, *, channels_last: bool
) -> nn.Module:
    """The registered network for `cfg.model`, on `device`, with the data set's class count by default."""
    if cfg_model.num_classes is not None and cfg_model.num_classes < num_classes:
        raise ConfigError(
            f"model.num_classes={cfg_model.num_classes} is smaller than the data set's {num_classes} "
            "classes. "
            "Leave model.num_classes=null to use the data set's count."
        )
    model = build_model_from_config(cfg_model, num_classes=num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_loss(cfg_trainer: DictConfig, num_classes: int, micro_batch: int) -> tuple[nn.Module, Mixup | None]:
    """Cross-entropy with label smoothing, or timm's Mixup/CutMix with its soft-target cross-entropy."""
    if cfg_trainer.mixup_alpha <= 0 and cfg_trainer.cutmix_alpha <= 0:
        return nn.CrossEntropyLoss(label_smoothing=cfg_trainer.label_smoothing), None
    if micro_batch % 2:
        raise ConfigError(
            "Mixup/CutMix pairs samples within a batch and needs an even per-rank micro-batch "
            f"(got {micro_batch}). "
            "Change data.batch_size, the number of ranks or trainer.accum_steps."
        )
    # timm draws lambda and the mixing mode from numpy's global RNG, which the checkpoint saves per rank.
    mixup = Mixup(
        mixup_alpha=cfg_trainer.mixup_alpha,
        cutmix_alpha=cfg_trainer.cutmix_alpha,
        prob=cfg_trainer.mix_prob,
        label_smoothing=cfg_trainer.label_smoothing,
        num_classes=num_classes,
    )
    return SoftTargetCrossEntropy(), mixup


def build_ema(cfg_trainer: DictConfig, model: nn.Module) -> ModelEmaV3 | None:
    """timm's EMA of all weights and buffers (kept in the model's dtype and device), or None."""
    if not cfg_trainer.ema:
        return None
    return ModelEmaV3(model, decay=cfg_trainer.ema_decay, use_warmup=cfg_trainer.ema_warmup)


def wrap_model(
    model: nn.Module, cfg_trainer: DictConfig, info: DistInfo, device: torch.device
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
