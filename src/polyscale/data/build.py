"""`build_dataset`: the data set named by `name`, checked before training starts."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from polyscale.data.builtin import BuiltinDataset
from polyscale.data.folder import ImageFileDataset
from polyscale.data.layout import resolve_root, scan_split
from polyscale.data.memory import InMemoryImageDataset, SyntheticDataset, load_cifar
from polyscale.data.options import DataOptions
from polyscale.data.transforms import eval_sizes, folder_pipeline, memory_transform
from polyscale.errors import ConfigError, DataError

__all__ = ["build_dataset"]

_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def _check_class_count(opts: DataOptions, found: int) -> None:
    if opts.num_classes is not None and opts.num_classes != found:
        raise DataError(
            f"{opts.name} has {found} classes but `num_classes`={opts.num_classes}; "
            f"set `num_classes`={found} (or None)."
        )


def _in_memory(
    opts: DataOptions,
    split: str,
    images: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    crop_size: int | None,
) -> InMemoryImageDataset:
    transform = memory_transform(opts, split, images.shape[-1], crop_size)
    return InMemoryImageDataset(
        images,
        targets,
        len(classes),
        transform,
        classes,
        crop_size=None if split == "train" else crop_size,
        options=opts,
    )


def _builtin(opts: DataOptions, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    n = opts.num_train_samples if split == "train" else opts.num_val_samples
    assert opts.num_classes is not None  # validate() ensures it
    ds = BuiltinDataset(
        split, num_samples=n, image_size=opts.image_size, num_classes=opts.num_classes, seed=0
    )
    return ds.images, ds.targets, ds.classes  # (N, 3, H, W) uint8, (N,)


def build_dataset(split: str, *, crop_size: int | None = None, **options: Any) -> Dataset:
    """The `split` ("train" | "val") of the data set `name`; items (float (3, H, W) normalised, int target).

    `options` are `DataOptions` fields (name, root, num_classes, image_size, ...; the defaults are
    DataOptions'); an unknown name is a ConfigError listing the known ones. `crop_size` is the evaluation
    crop (None: image_size), resized from round(crop / crop_ratio). Folder layouts, class sets and CIFAR
    files are checked here, so mistakes fail before training. The data set keeps its options in
    `.options` (the loaders read the on-device augmentation settings from there).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    opts = DataOptions.from_kwargs(options)
    opts.validate()
    if crop_size is not None and crop_size < 1:
        raise ConfigError(f"The evaluation crop size must be >= 1, got crop_size={crop_size}.")
    train = split == "train"
    if opts.name == "synthetic":
        assert opts.num_classes is not None  # validate() ensures it
        size = opts.image_size if train else eval_sizes(opts.image_size, opts.crop_ratio, crop_size)[1]
        n = opts.num_train_samples if train else opts.num_val_samples
        return SyntheticDataset(n, size, opts.num_classes, seed=0, split=split, options=opts)
    if opts.name in _CIFAR_CLASSES:
        images, targets, classes = load_cifar(opts.name, opts.root, train)
        _check_class_count(opts, len(classes))
        return _in_memory(opts, split, images, targets, classes, crop_size)
    if opts.name == "builtin":
        return _in_memory(opts, split, *_builtin(opts, split), crop_size)
    # imagenet / imagefolder: train/<class>/*, val/<class>/*
    env = "IMAGENET_ROOT" if opts.name == "imagenet" else None
    what = "ImageNet" if opts.name == "imagenet" else "image-folder"
    root = resolve_root(opts.root, env, what, "train/<class>/<images> and val/<class>/<images>")
    classes, samples = scan_split(root, split, opts.num_classes)
    pipeline = folder_pipeline(opts, split, crop_size)
    return ImageFileDataset(
        root / split,
        classes,
        samples,
        pipeline,
        train=train,
        image_size=opts.image_size if train else eval_sizes(opts.image_size, opts.crop_ratio, crop_size)[1],
        on_bad_file=opts.on_bad_file,
        with_index=opts.decoder == "cuda",
        options=opts,
    )
