"""Detection data: `build_detection_dataset` and the training / evaluation loaders of one rank.

Training batches are grouped by orientation (images with width >= height together, the others
together), as torchvision's GroupedBatchSampler does so that the detector's padded batch wastes little,
but drawn from the seeded `TrainSampler` order: the batches of an epoch are a function of (seed, epoch,
rank), the same for any `num_workers`, and `set_epoch(epoch, start_batch)` resumes mid-epoch exactly.
Each sample keeps its sample seed, under which the data set draws its flip (`SeededDataset`).
Evaluation uses exact contiguous shards (every image on one rank, no padding). Batches are
`(list of images, list of targets)`: detection images differ in size and are not stacked.

The loaders are those of classification (loader.py: worker-error passing, signal shield, bad-file mask
readable through `count_bad_files(loader)`), given a grouped order and the detection collate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from polyscale.data.builtin_detection import DEFAULT_CLASSES, BuiltinDetection
from polyscale.data.coco import CocoDetection, coco_paths
from polyscale.data.detection_options import DetectionDataOptions
from polyscale.data.detection_targets import collate_detection, orientation_groups
from polyscale.data.loader import EvalLoader, _Batches, _data_loader
from polyscale.data.sampler import SeededDataset, ShardSampler, TrainSampler
from polyscale.errors import ConfigError, DataError

__all__ = [
    "DetectionTrainLoader",
    "GroupedTrainSampler",
    "build_detection_dataset",
    "build_detection_train_loader",
    "build_detection_val_loader",
    "grouped_batches",
]

Key = tuple[int, int]  # (dataset index, sample seed)


def build_detection_dataset(split: str, **options: Any) -> Dataset:
    """The `split` ("train" | "val") of the detection set `name`; items (float32 (3, H, W) in [0, 1],
    target dict), see polyscale.data.detection_targets.

    `options` are `DetectionDataOptions` fields (the defaults are its own); an unknown name is a
    ConfigError listing the known ones. Files, annotations and categories are checked here, so mistakes
    fail before training. The data set keeps its options in `.options`.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    opts = DetectionDataOptions.from_kwargs(options)
    opts.validate()
    train = split == "train"
    if opts.name == "builtin_detection":
        return BuiltinDetection(
            split,
            num_images=opts.num_train_images if train else opts.num_val_images,
            image_size=opts.image_size,
            num_classes=DEFAULT_CLASSES if opts.num_classes is None else opts.num_classes,
            with_masks=opts.with_masks,
            hflip=opts.hflip and train,
            seed=0,
            options=opts,
        )
    ann_file, image_dir = coco_paths(opts, split)
    return CocoDetection(
        image_dir,
        ann_file,
        train=train,
        with_masks=opts.with_masks,
        hflip=opts.hflip and train,
        on_bad_file=opts.on_bad_file,
        num_classes=opts.num_classes,
        options=opts,
    )


def grouped_batches(indices: Tensor, seeds: Tensor, groups: Tensor, batch_size: int) -> list[list[Key]]:
    """`len(indices) // batch_size` batches of (index, seed), each from one group.

    Walks the order and emits a group's batch as soon as it holds `batch_size` samples. Leftovers of
    several groups can still add up to a batch that every rank must run (DDP needs equal step counts):
    the group with the most leftovers is topped up with its own first samples of the order, repeated
    (as torchvision's sampler does), so batches stay pure and the count is known before the epoch.
    """
    wanted = len(indices) // batch_size
    pending: dict[int, list[Key]] = {}
    seen: dict[int, list[Key]] = {}
    batches: list[list[Key]] = []
    for index, seed, group in zip(indices.tolist(), seeds.tolist(), groups[indices].tolist()):
        seen.setdefault(group, []).append((index, seed))
        buffer = pending.setdefault(group, [])
        buffer.append((index, seed))
        if len(buffer) == batch_size:
            batches.append(buffer)
            pending[group] = []
    while len(batches) < wanted:
        group = max(sorted(pending), key=lambda g: len(pending[g]))  # ties: the lower group id
        need = batch_size - len(pending[group])
        repeats = seen[group] * (need // len(seen[group]) + 1)
        batches.append(pending.pop(group) + repeats[:need])
    return batches


class GroupedTrainSampler(Sampler[Key]):
    """This rank's (index, seed) keys, batch after batch of `grouped_batches`; `len` counts keys."""

    def __init__(self, groups: Tensor, *, rank: int, world_size: int, seed: int, batch_size: int) -> None:
        self.order = TrainSampler(len(groups), rank=rank, world_size=world_size, seed=seed)
        self.groups, self.batch_size = groups, batch_size
        self.num_batches = self.order.num_samples // batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(
                f"start_batch {start_batch} is outside [0, {self.num_batches}] batches of an epoch"
            )
        self.order.set_epoch(epoch)  # the whole epoch: grouping must see the same order on resume
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[Key]:
        indices, seeds = self.order.rank_order()
        batches = grouped_batches(indices, seeds, self.groups, self.batch_size)
        return (key for batch in batches[self.start_batch :] for key in batch)

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size


class DetectionTrainLoader(_Batches):
    """TrainLoader of detection batches: `len` = batches per epoch on this rank (whatever the start)."""

    def __init__(self, loader: DataLoader, sampler: GroupedTrainSampler) -> None:
        super().__init__(loader, None)
        self.sampler = sampler

    def __len__(self) -> int:
        return self.sampler.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Epoch `epoch`'s batches; skip its first `start_batch` (exact mid-epoch resume)."""
        self.sampler.set_epoch(epoch, start_batch)


def _groups(dataset: Dataset) -> Tensor:
    """Aspect-ratio group per image (0: width >= height), or all 0 when grouping is off."""
    opts = getattr(dataset, "options", None)
    sizes = getattr(dataset, "image_sizes", None)
    n = len(dataset)  # type: ignore[arg-type]
    if sizes is None or (isinstance(opts, DetectionDataOptions) and not opts.aspect_ratio_group):
        return torch.zeros(n, dtype=torch.int64)
    return orientation_groups(sizes)


def build_detection_train_loader(
    dataset: Dataset, *, rank: int, world_size: int, batch_size: int, seed: int, device: Any, **workers: Any
) -> DetectionTrainLoader:
    """Training batches of this rank, grouped by orientation when the data set's options say
    `aspect_ratio_group` (the default); incomplete batches dropped.

    `batch_size` is the per-rank batch (the global batch / world size). `workers`: num_workers (default
    2), pin_memory, persistent_workers, multiprocessing_context (as for `build_train_loader`).
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ConfigError(f"The per-rank batch size must be >= 1, got {batch_size}.")
    sampler = GroupedTrainSampler(
        _groups(dataset), rank=rank, world_size=world_size, seed=seed, batch_size=batch_size
    )
    if sampler.num_batches < 1:
        n = len(dataset)  # type: ignore[arg-type]
        raise DataError(
            f"The training set has {n} images: {sampler.order.num_samples} per rank over {world_size} "
            f"ranks, fewer than one batch of {batch_size}. Use more images or a smaller `batch_size`."
        )
    # The grouped order is already cut into batches: the DataLoader's consecutive chunks are those batches.
    seeded = SeededDataset(dataset)
    loader = _data_loader(
        seeded, sampler, batch_size, device, drop_last=True, collate=collate_detection, **workers
    )
    return DetectionTrainLoader(loader, sampler)


def build_detection_val_loader(
    dataset: Dataset,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    device: torch.device | str,
    **workers: Any,
) -> Iterable[tuple[list[Tensor], list[dict[str, Any]]]]:
    """Evaluation batches of this rank's exact shard (no padding, no duplicates); has `len`.

    Unreadable images come as a zero image whose target has image_id -1 (`BAD_IMAGE_ID`); the
    evaluator skips and counts them. `batch_size` is per rank; `workers` as for the training loader.
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ConfigError(f"The per-rank evaluation batch size must be >= 1, got {batch_size}.")
    sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size)  # type: ignore[arg-type]
    loader = _data_loader(
        dataset, sampler, batch_size, device, drop_last=False, collate=collate_detection, **workers
    )
    return EvalLoader(loader, None)
