"""Data sets and input pipelines (builtin, synthetic, cifar10, cifar100, imagenet, imagefolder).

Plain keyword arguments, no config objects: the options are the fields of `DataOptions`, and the
engine, which reads the config, passes them on. The engine uses `build_dataset` (checked data set of one
split), `build_train_loader` (seeded, rank-split, resumable training batches), `build_val_loader`
(exact evaluation shards) and `count_bad_files` / `bad_file_mask` (undecodable files met so far, by
any worker process). See docs/data.md.
"""

from polyscale.data.build import build_dataset
from polyscale.data.loader import (
    TrainLoader,
    bad_file_mask,
    build_train_loader,
    build_val_loader,
    count_bad_files,
)
from polyscale.data.options import DATASETS, DataOptions

__all__ = [
    "DATASETS",
    "DataOptions",
    "TrainLoader",
    "bad_file_mask",
    "build_dataset",
    "build_train_loader",
    "build_val_loader",
    "count_bad_files",
]
