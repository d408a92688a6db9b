"""Image files with class labels that survive bad files (ImageNet, any `train/` + `val/` class tree).

A file that cannot be decoded (corrupt, truncated, empty, unreadable, not an image) is logged with its
path and marked in `bad_file_mask`, a tensor in shared memory: DataLoader workers get the same memory
whether they are forked or spawned, persistent or not, so the main process reads what every worker
marked (`polyscale.data.count_bad_files`). Training substitutes the next decodable file
(deterministic); evaluation returns the pipeline's placeholder with target -1, which the evaluator
skips and counts. `on_bad_file="error"` raises `DataError` instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from polyscale.data.options import DataOptions
from polyscale.data.transforms import Pipeline
from polyscale.errors import DataError

__all__ = ["ImageFileDataset", "ImageFiles"]

log = logging.getLogger(__name__)


class ImageFiles:
    """What a data set of image files under `root` shares: paths kept as one bytes array (`_files`,
    relative to `root`), `on_bad_file`, and the `bad_file_mask` unreadable files are marked in."""

    root: str
    _files: np.ndarray
    on_bad_file: str
    bad_file_mask: torch.Tensor
    SUBSTITUTED = "using the next readable image instead"  # what training does instead of a bad file
    SKIPPED = "skipped (target -1)"  # ... and evaluation

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._files[index]))

    def report_bad_file(self, index: int, exc: BaseException, *, substitute: bool) -> None:
        """Log file `index` as unreadable (once) and mark it, or raise DataError under on_bad_file=error."""
        path, reason = self.path(index), f"{type(exc).__name__}: {exc}"
        if self.on_bad_file == "error":
            raise DataError(
                f"Cannot read image file {path} ({reason}). `on_bad_file`=error stops at the first bad "
                "file: replace or delete it, or set `on_bad_file`=skip to log, count and skip them."
            ) from exc
        if not self.bad_file_mask[index]:
            self.bad_file_mask[index] = 1
            log.warning(
                "Bad image file %s (%s): %s", path, reason, self.SUBSTITUTED if substitute else self.SKIPPED
            )


class ImageFileDataset(ImageFiles, Dataset):
    """Items (pipeline output, class index) [+ file index when `with_index`]; see the module doc."""

    def __init__(
        self,
        split_dir: str | Path,
        classes: list[str],
        samples: list[tuple[str, int]],
        pipeline: Pipeline,
        *,
        train: bool,
        image_size: int,
        on_bad_file: str = "skip",
        with_index: bool = False,
        options: DataOptions | None = None,
    ) -> None:
        self.root = str(split_dir)
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.num_classes = len(classes)
        # Paths as one bytes array (relative to root), not 1.3M Python strings: forked workers touch
        # no per-item refcounts, so they do not copy the list page by page.
        prefix = os.path.join(self.root, "")
        if not all(p.startswith(prefix) for p, _ in samples):
            raise ValueError(f"sample paths must lie under {prefix}")
        self._files = np.array([os.fsencode(p[len(prefix) :]) for p, _ in samples])  # (slicing: no relpath)
        self.targets = np.array([t for _, t in samples], dtype=np.int64)
        self.pipeline = pipeline
        self.train, self.image_size, self.on_bad_file = train, image_size, on_bad_file
        self.with_index = with_index
        self.options = options  # the settings it was built with (the cuda decoder's device stage reads them)
        # Shared memory pickles as a handle to the same pages (torch.multiprocessing), so spawned workers
        # write into this very mask; forked ones inherit the mapping.
        self.bad_file_mask = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        for j in (k % n for k in range(index, index + n)) if self.train else (index,):
            if self.bad_file_mask[j]:
                continue  # known bad (an earlier epoch or another worker): same outcome, no retry
            try:
                image = self.pipeline.load(self.path(j))
            except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, RuntimeError, ...
                self.report_bad_file(j, exc, substitute=self.train)
                continue
            item = (self.pipeline.transform(image), int(self.targets[j]))
            return (*item, j) if self.with_index else item
        if not self.train:
            return (
                (self.pipeline.placeholder(), -1, index)
                if self.with_index
                else (self.pipeline.placeholder(), -1)
            )
        raise DataError(
            f"None of the {n} image files under {self.root} could be decoded (see the warnings above); "
            f"check that the files are images and readable."
        )
