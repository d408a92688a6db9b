"""Training and evaluation pipelines, built from `DataOptions`.

Two families, as in the papers: ImageNet-style for image folders (RandomResizedCrop + flip
[+ timm AutoAugment/RandAugment]; resize the shorter side to crop / crop_ratio + center crop) and
CIFAR-style for in-memory sets (pad + random crop + flip; identity at evaluation). Every pipeline
ends with per-channel standardisation, so items are float (3, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from torchvision.transforms import v2

from polyscale.data.decode import (
    Normalize255,
    RandomResizedCropDecode,
    ResizeCenterCropDecode,
    decode_rgb_tensor,
    interpolation_mode,
    pil_resample,
)
from polyscale.data.gpu_decode import EncodedTrainLoad, EncodedValLoad, placeholder_encoded
from polyscale.data.options import DataOptions
from polyscale.errors import ConfigError

__all__ = ["Pipeline", "eval_sizes", "folder_pipeline", "memory_transform", "timm_auto_augment"]


@dataclass(frozen=True)
class Pipeline:
    """How an image file becomes a training/evaluation item.

    `load(path)` decodes (and for the fused paths crops): any exception it raises marks a bad file.
    `transform(image)` augments and normalises. `placeholder()` is returned instead of an image for a
    bad file in evaluation.
    """

    load: Callable[[str], Any]
    transform: Callable[[Any], Any]
    placeholder: Callable[[], Any]


def eval_sizes(image_size: int, crop_ratio: float, crop_size: int | None) -> tuple[int, int]:
    """(resize, crop) of evaluation: crop = crop_size or image_size, resize = round(crop / crop_ratio)."""
    crop = crop_size or image_size
    return round(crop / crop_ratio), crop


def timm_auto_augment(policy: str, image_size: int, mean: Sequence[float], interpolation: str) -> Any:
    """timm's AutoAugment / RandAugment / AugMix on PIL images, from a policy string ('rand-m9-mstd0.5')."""
    hparams: dict[str, Any] = {
        "translate_const": int(image_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        "interpolation": pil_resample(interpolation),
    }
    try:
        if policy.startswith("rand"):
            return rand_augment_transform(policy, hparams)
        if policy.startswith("augmix"):
            return augment_and_mix_transform(policy, {**hparams, "translate_pct": 0.3})
        return auto_augment_transform(policy, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as exc:
        raise ConfigError(
            f"`auto_augment`={policy!r} is not a timm augmentation policy ({exc}). Use e.g. "
            f"'rand-m9-mstd0.5-inc1' (RandAugment), 'original' or 'v0' (AutoAugment), 'augmix-m5-w4-d2'."
        ) from exc


def _pil_augment(opts: DataOptions, size: int) -> list[Callable[[Any], Any]]:
    """Auto-augment on a tensor image: to PIL, timm policy, back to a uint8 tensor."""
    if not opts.auto_augment:
        return []
    aa = timm_auto_augment(opts.auto_augment, size, opts.mean, opts.interpolation)
    return [v2.ToPILImage(), aa, v2.PILToTensor()]


def _flip(opts: DataOptions) -> list[Callable[[Any], Any]]:
    return [v2.RandomHorizontalFlip()] if opts.hflip else []


def folder_pipeline(opts: DataOptions, split: str, crop_size: int | None = None) -> Pipeline:
    """ImageNet-style pipeline for files, for `opts.decoder` pil | torchvision | cuda."""
    normalize = Normalize255(opts.mean, opts.std)
    interp = interpolation_mode(opts.interpolation)
    resize, crop = eval_sizes(opts.image_size, opts.crop_ratio, crop_size)
    size = opts.image_size if split == "train" else crop
    zeros = partial(torch.zeros, 3, size, size)  # (partial, not a closure: pickles for spawn workers)

    if opts.decoder == "cuda":
        # Workers read bytes and draw crop boxes from the header; decode + crop run on the device.
        if split == "train":
            load: Callable[[str], Any] = EncodedTrainLoad(opts.rrc_scale, opts.rrc_ratio, opts.hflip)
        else:
            load = EncodedValLoad(resize, crop)
        return Pipeline(load, _identity, partial(placeholder_encoded, size))
    if opts.decoder == "pil":
        if split == "train":
            load = RandomResizedCropDecode(
                size, opts.rrc_scale, opts.rrc_ratio, opts.interpolation, draft=opts.jpeg_draft
            )
            steps = _flip(opts) + _pil_augment(opts, size)
        else:
            load = ResizeCenterCropDecode(resize, crop, opts.interpolation, draft=opts.jpeg_draft)
            steps = []
        return Pipeline(load, v2.Compose([*steps, normalize]), zeros)
    # torchvision.io decode to a uint8 tensor, then tensor transforms.
    if split == "train":
        crop_op = v2.RandomResizedCrop(
            size, opts.rrc_scale, opts.rrc_ratio, interpolation=interp, antialias=True
        )
        steps = [crop_op, *_flip(opts), *_pil_augment(opts, size)]
    else:
        steps = [v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(crop)]
    return Pipeline(decode_rgb_tensor, v2.Compose([*steps, normalize]), zeros)


def memory_transform(
    opts: DataOptions, split: str, native_size: int, crop_size: int | None = None
) -> v2.Compose:
    """CIFAR-style transform of a uint8 (3, H, W) tensor of an in-memory set."""
    normalize = Normalize255(opts.mean, opts.std)
    interp = interpolation_mode(opts.interpolation)
    if split == "train":
        steps: list[Callable[[Any], Any]] = []
        if opts.random_crop_padding > 0 or opts.image_size != native_size:
            steps.append(v2.RandomCrop(opts.image_size, padding=opts.random_crop_padding or None))
        steps += _flip(opts) + _pil_augment(opts, opts.image_size)
        return v2.Compose([*steps, normalize])
    resize, crop = eval_sizes(opts.image_size, opts.crop_ratio, crop_size)
    steps = []
    if resize != native_size:
        steps.append(v2.Resize(resize, interpolation=interp, antialias=True))
    if crop != resize:
        steps.append(v2.CenterCrop(crop))
    return v2.Compose([*steps, normalize])


def _identity(x: Any) -> Any:
    return x
