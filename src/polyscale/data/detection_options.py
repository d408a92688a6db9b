"""`DetectionDataOptions`: every setting of the detection data sets and loaders, as one plain dataclass.

The detection counterpart of `DataOptions`: the library takes the fields as keyword arguments
(`build_detection_dataset("train", name="coco", root=...)`) and the config schema of detection runs
reuses the dataclass, so field names are config keys. Field types stay within what OmegaConf accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from polyscale.data.options import check_option_names
from polyscale.errors import ConfigError

__all__ = ["DETECTION_DATASETS", "DetectionDataOptions"]

DETECTION_DATASETS = ("builtin_detection", "coco")
_ON_BAD_FILE = ("skip", "error")


@dataclass
class DetectionDataOptions:
    """Detection data set and loader settings; `validate()` rejects values no data set can use."""

    name: str = "builtin_detection"  # builtin_detection | coco (any COCO-format set)
    # coco: `root` holds annotations/instances_{train,val}2017.json, train2017/, val2017/; the four
    # paths below override those (relative paths are taken under `root` when it is set).
    root: str | None = None
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    with_masks: bool = False  # decode instance masks (Mask R-CNN); other detectors skip the cost
    hflip: bool = True  # training: horizontal flip with probability 0.5
    # Passed by the engine to the detector's own transform (GeneralizedRCNNTransform), which resizes;
    # the data sets return images at their stored size.
    min_size: int = 800
    max_size: int = 1333
    batch_size: int = 16  # GLOBAL batch across all ranks
    val_batch_size: int | None = None  # global; None = batch_size
    num_workers: int = 2  # per rank
    pin_memory: bool = True
    persistent_workers: bool = True
    on_bad_file: str = "skip"  # skip (log + count) | error
    # builtin_detection: image side and set sizes
    image_size: int = 128
    num_train_images: int = 2000
    num_val_images: int = 200
    num_classes: int | None = None  # K without background; None = from the annotations (builtin: 6)
    aspect_ratio_group: bool = True  # training batches hold only landscape or only portrait images

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> DetectionDataOptions:
        """Options from keyword arguments; ConfigError for an unknown name, listing the known ones."""
        check_option_names(cls, options, "detection data")
        return cls(**options)

    def validate(self) -> None:
        """ConfigError for names, ranges and combinations no detection data set can use."""
        if self.name not in DETECTION_DATASETS:
            raise ConfigError(
                f"Unknown detection data set `name`={self.name!r}; choose one of "
                f"{', '.join(DETECTION_DATASETS)}."
            )
        if self.on_bad_file not in _ON_BAD_FILE:
            raise ConfigError(f"`on_bad_file`={self.on_bad_file!r} is not one of {', '.join(_ON_BAD_FILE)}.")
        if not 1 <= self.min_size <= self.max_size:
            raise ConfigError(
                f"`min_size`={self.min_size} and `max_size`={self.max_size} must satisfy "
                f"1 <= min_size <= max_size (the detector resizes the shorter side to min_size, capping "
                f"the longer at max_size)."
            )
        for key in ("batch_size", "val_batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"`{key}`={value} must be >= 1.")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(
                f"`num_classes`={self.num_classes} must be >= 1 (object classes, without the background) "
                f"or None to take it from the annotations."
            )
        if self.name == "builtin_detection":
            if self.image_size < 32:
                raise ConfigError(
                    f"The built-in detection set draws images of at least 32x32 "
                    f"(got `image_size`={self.image_size})."
                )
            for key in ("num_train_images", "num_val_images"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"`{key}`={getattr(self, key)} must be >= 1.")
