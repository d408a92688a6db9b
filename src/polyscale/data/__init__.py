"""Data sets and input pipelines: classification (builtin, synthetic, cifar10, cifar100, imagenet,
imagefolder) and detection (coco and any COCO-format set, builtin_detection).

Plain keyword arguments, no config objects: the options are the fields of `DataOptions`, and the
engine, which reads the config, passes them on. The engine uses `build_dataset` (checked data set of one
split), `build_train_loader` (seeded, rank-split, resumable training batches), `build_val_loader`
(exact evaluation shards) and `count_bad_files` / `bad_file_mask` (undecodable files met so far, by
any worker process); detection has `build_detection_dataset` and its two loaders (`DetectionDataOptions`).
See docs/data.md.
"""

from polyscale.data.build import build_dataset
from polyscale.data.detection import (
    build_detection_dataset,
    build_detection_train_loader,
    build_detection_val_loader,
)
from polyscale.data.detection_options import DETECTION_DATASETS, DetectionDataOptions
from polyscale.data.detection_targets import BAD_IMAGE_ID
from polyscale.data.loader import (
    TrainLoader,
    bad_file_mask,
    build_train_loader,
    build_val_loader,
    count_bad_files,
)
from polyscale.data.options import DATASETS, DataOptions

__all__ = [
    "BAD_IMAGE_ID",
    "DATASETS",
    "DETECTION_DATASETS",
    "DataOptions",
    "DetectionDataOptions",
    "TrainLoader",
    "bad_file_mask",
    "build_dataset",
    "build_detection_dataset",
    "build_detection_train_loader",
    "build_detection_val_loader",
    "build_train_loader",
    "build_val_loader",
    "count_bad_files",
]
