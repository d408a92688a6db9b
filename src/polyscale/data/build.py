"""`build_dataset`: the data set named by `data.name`, checked before training starts."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from polyscale.data.folder import ImageFileDataset
from polyscale.data.layout import resolve_root, scan_split
from polyscale.data.memory import InMemoryImageDataset, SyntheticDataset, load_cifar
from polyscale.data.transforms import eval_sizes, folder_pipeline, memory_transform
from polyscale.errors import ConfigError, DataError

__all__ = ["DATASETS", "build_dataset", "check_config"]

DATASETS = ("builtin", "synthetic", "cifar10", "cifar100", "imagenet", "imagefolder")
_CHOICES = {"decoder": ("pil", "torchvision", "cuda"), "on_bad_file": ("skip", "error")}
_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def _pair(cfg: Any, key: str) -> None:
    value = list(getattr(cfg, key))
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ConfigError(f"data.{key}={value} must be [low, high] with 0 < low <= high.")


def check_config(cfg: Any) -> None:
    """ConfigError for values no data set can use (names, ranges, combinations)."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"Unknown data set data.name={cfg.name!r}; choose one of {', '.join(DATASETS)}.")
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"data.{key}={getattr(cfg, key)!r} is not one of {', '.join(choices)}.")
    if cfg.image_size < 1 or not 0 < cfg.crop_ratio <= 1:
        raise ConfigError(
            f"data.image_size={cfg.image_size} must be >= 1 and data.crop_ratio={cfg.crop_ratio} in (0, 1] "
            f"(evaluation resizes to crop / crop_ratio, then center-crops)."
        )
    _pair(cfg, "rrc_scale")
    _pair(cfg, "rrc_ratio")
    folder = cfg.name in ("imagenet", "imagefolder")
    if not folder and cfg.decoder != "pil":
        raise ConfigError(
            f"data.decoder={cfg.decoder} decodes image files; {cfg.name} is held in memory. "
            f"Use data.decoder=pil (and data.gpu_augment=true to augment on the GPU)."
        )
    if folder and cfg.gpu_augment:
        raise ConfigError(
            "data.gpu_augment=true applies to in-memory sets (cifar10, cifar100, builtin); "
            "for image folders use data.decoder=cuda."
        )
    if cfg.decoder == "cuda" and cfg.auto_augment:
        raise ConfigError(
            "data.auto_augment runs timm's PIL policies on the CPU and cannot follow data.decoder=cuda; "
            "use data.decoder=pil or torchvision with auto-augment."
        )
    if cfg.num_classes is None and cfg.name in ("builtin", "synthetic"):
        raise ConfigError(f"data.num_classes must be set for data.name={cfg.name}.")


def _check_class_count(cfg: Any, found: int) -> None:
    if cfg.num_classes is not None and cfg.num_classes != found:
        raise DataError(
            f"{cfg.name} has {found} classes but data.num_classes={cfg.num_classes}; "
            f"set data.num_classes={found} (or null)."
        )


def _in_memory(
    cfg: Any,
    split: str,
    images: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    crop_size: int | None,
) -> InMemoryImageDataset:
    transform = memory_transform(cfg, split, images.shape[-1], crop_size)
    return InMemoryImageDataset(
        images, targets, len(classes), transform, classes, crop_size=None if split == "train" else crop_size
    )


def _builtin(cfg: Any, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    try:
        from polyscale.data.builtin import BuiltinDataset
    except ImportError as exc:  # written by the engine work; absent in a partial checkout
        raise ConfigError("The built-in data set (polyscale.data.builtin) is not available.") from exc
    n = cfg.num_train_samples if split == "train" else cfg.num_val_samples
    ds = BuiltinDataset(split, num_samples=n, image_size=cfg.image_size, num_classes=cfg.num_classes, seed=0)
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([image for image, _ in items])  # (N, 3, H, W) uint8
    targets = torch.tensor([target for _, target in items])
    return images, targets, list(getattr(ds, "classes", [str(i) for i in range(cfg.num_classes)]))


def build_dataset(cfg: Any, split: str, *, crop_size: int | None = None) -> Dataset:
    """The `split` ("train" | "val") of data set `cfg.name`; items (float (3, H, W) normalised, int target).

    `crop_size` is the evaluation crop (None: cfg.image_size), resized from round(crop / crop_ratio).
    Folder layouts, class sets and CIFAR files are checked here, so mistakes fail before training.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    check_config(cfg)
    if crop_size is not None and crop_size < 1:
        raise ConfigError(f"The evaluation crop size must be >= 1, got {crop_size}.")
    train = split == "train"
    if cfg.name == "synthetic":
        size = cfg.image_size if train else eval_sizes(cfg, crop_size)[1]
        n = cfg.num_train_samples if train else cfg.num_val_samples
        return SyntheticDataset(n, size, cfg.num_classes, seed=0, split=split)
    if cfg.name in _CIFAR_CLASSES:
        images, targets, classes = load_cifar(cfg.name, cfg.root, train)
        _check_class_count(cfg, len(classes))
        return _in_memory(cfg, split, images, targets, classes, crop_size)
    if cfg.name == "builtin":
        return _in_memory(cfg, split, *_builtin(cfg, split), crop_size)
    # imagenet / imagefolder: train/<class>/*, val/<class>/*
    env = "IMAGENET_ROOT" if cfg.name == "imagenet" else None
    what = "ImageNet" if cfg.name == "imagenet" else "image-folder"
    root = resolve_root(cfg.root, env, what, "train/<class>/<images> and val/<class>/<images>")
    classes, samples = scan_split(root, split, cfg.num_classes)
    pipeline = folder_pipeline(cfg, split, crop_size)
    return ImageFileDataset(
        root / split,
        classes,
        samples,
        pipeline,
        train=train,
        image_size=cfg.image_size if train else eval_sizes(cfg, crop_size)[1],
        on_bad_file=cfg.on_bad_file,
        with_index=cfg.decoder == "cuda",
    )
