"""Data sets and input pipelines behind `data=NAME` (builtin, synthetic, cifar10, cifar100, imagenet,
imagefolder).

The engine uses four functions: `build_dataset` (checked data set of one split), `build_train_loader`
(seeded, rank-split, resumable training batches), `build_val_loader` (exact evaluation shards) and
`count_bad_files` (undecodable files met so far). See docs/data.md.
"""

from polyscale.data.build import DATASETS, build_dataset
from polyscale.data.loader import TrainLoader, build_train_loader, build_val_loader, count_bad_files

__all__ = [
    "DATASETS",
    "TrainLoader",
    "build_dataset",
    "build_train_loader",
    "build_val_loader",
    "count_bad_files",
]
