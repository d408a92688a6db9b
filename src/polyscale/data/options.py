"""`DataOptions`: every setting of the data sets and input pipelines, as one plain dataclass.

The library takes these as keyword arguments (`build_dataset("train", name="cifar10", root=...)`);
the config schema of the `data` group reuses the dataclass, so the field names are also the config
keys. Field types stay within what OmegaConf accepts (str, int, float, bool, list, Optional).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from polyscale.errors import ConfigError

__all__ = ["DATASETS", "IN_MEMORY", "DataOptions", "check_option_names"]

DATASETS = ("builtin", "synthetic", "cifar10", "cifar100", "imagenet", "imagefolder")
IN_MEMORY = ("builtin", "cifar10", "cifar100")  # uint8 sets held whole in memory (gpu_augment)
_FOLDERS = ("imagenet", "imagefolder")
_CHOICES = {"decoder": ("pil", "torchvision", "cuda"), "on_bad_file": ("skip", "error")}


def check_option_names(cls: type, options: Mapping[str, Any], what: str) -> None:
    """ConfigError for keyword arguments that are no field of the options dataclass `cls`."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"Unknown {what} option(s) {', '.join(f'`{name}`' for name in unknown)}; "
            f"the {what} options are {', '.join(known)}."
        )


@dataclass
class DataOptions:
    """Data set and input pipeline settings; `validate()` rejects values no data set can use."""

    name: str = "builtin"  # builtin | synthetic | cifar10 | cifar100 | imagenet | imagefolder
    root: str | None = None  # data set folder; imagenet also reads $IMAGENET_ROOT, cifar $CIFAR_ROOT
    num_classes: int | None = 10  # None: take the class count from the folder (imagefolder)
    image_size: int = 32  # training crop (validation follows crop_ratio)
    crop_ratio: float = 0.875  # validation: resize shorter side to crop/ratio, center-crop `crop` (224/256)
    batch_size: int = 128  # GLOBAL batch across all ranks, as the papers state it
    val_batch_size: int | None = None  # global; None = batch_size
    num_workers: int = 2  # per rank
    pin_memory: bool = True
    persistent_workers: bool = True
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bilinear"
    hflip: bool = True
    random_crop_padding: int = 4  # CIFAR-style pad + random crop (cifar, builtin)
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop (imagenet-style)
    rrc_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    auto_augment: str | None = None  # timm policy string, e.g. rand-m9-mstd0.5 or original
    decoder: str = "pil"  # pil | torchvision | cuda (torchvision.io.decode_jpeg on the GPU)
    jpeg_draft: bool = True  # PIL: JPEG reduce-on-decode when the crop stays >= output size (speed)
    gpu_augment: bool = False  # in-memory sets: keep the whole set on the GPU and augment there
    on_bad_file: str = "skip"  # skip (log + count) | error
    # synthetic / builtin sizes
    num_train_samples: int = 5000
    num_val_samples: int = 1000

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> DataOptions:
        """Options from keyword arguments; sequences (an OmegaConf ListConfig too) become plain lists.

        ConfigError for a name that is not a field, listing the known ones.
        """
        check_option_names(cls, options, "data")
        return cls(**{key: _plain(value) for key, value in options.items()})

    def validate(self) -> None:
        """ConfigError for names, ranges and combinations no data set can use."""
        if self.name not in DATASETS:
            raise ConfigError(f"Unknown data set `name`={self.name!r}; choose one of {', '.join(DATASETS)}.")
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"`{key}`={getattr(self, key)!r} is not one of {', '.join(choices)}.")
        if self.image_size < 1 or not 0 < self.crop_ratio <= 1:
            raise ConfigError(
                f"`image_size`={self.image_size} must be >= 1 and `crop_ratio`={self.crop_ratio} in (0, 1] "
                f"(evaluation resizes to crop / crop_ratio, then center-crops)."
            )
        for key in ("rrc_scale", "rrc_ratio"):
            value = list(getattr(self, key))
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ConfigError(f"`{key}`={value} must be [low, high] with 0 < low <= high.")
        folder = self.name in _FOLDERS
        if not folder and self.decoder != "pil":
            raise ConfigError(
                f"`decoder`={self.decoder} decodes image files; {self.name} is held in memory. "
                f"Use `decoder`=pil (and `gpu_augment`=True to augment on the GPU)."
            )
        if self.gpu_augment and self.name not in IN_MEMORY:
            instead = " For image folders use `decoder`=cuda." if folder else ""
            raise ConfigError(
                f"`gpu_augment`=True keeps an in-memory set ({', '.join(IN_MEMORY)}) on the device and "
                f"augments it there; {self.name} is not one.{instead}"
            )
        if self.decoder == "cuda" and self.auto_augment:
            raise ConfigError(
                "`auto_augment` runs timm's PIL policies on the CPU and cannot follow `decoder`=cuda; "
                "use `decoder`=pil or torchvision with auto-augment."
            )
        if self.name in ("builtin", "synthetic"):
            if self.num_classes is None:
                raise ConfigError(f"`num_classes` must be set for the {self.name} data set.")
            for key in ("num_train_samples", "num_val_samples"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"`{key}`={getattr(self, key)} must be >= 1.")


def _plain(value: Any) -> Any:
    """Lists (and list-like config nodes) -> list; everything else unchanged."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        return value
    return list(value)
