"""Schemas of the `data` config group: the data package's own option dataclasses (`DataOptions` for
classification sets, `DetectionDataOptions` for detection sets), so the config keys are the keyword
arguments of `polyscale.data` (one definition of every field, its type and its default)."""

from __future__ import annotations

from dataclasses import dataclass

from polyscale.data.detection_options import DetectionDataOptions
from polyscale.data.options import DataOptions

__all__ = ["DataConfig", "DetectionDataConfig"]


@dataclass
class DataConfig(DataOptions):
    """Data set and input pipeline (`data=NAME`); the fields are documented in polyscale.data.DataOptions."""


@dataclass
class DetectionDataConfig(DetectionDataOptions):
    """Detection data set and loaders (`data=coco`, `data=builtin_detection`); fields documented in
    polyscale.data.DetectionDataOptions."""
