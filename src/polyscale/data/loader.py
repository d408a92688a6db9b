"""Training and evaluation loaders for one rank, and the bad-file count of a run.

Training batches come from `TrainSampler` (seeded order + per-sample seeds, see sampler.py) through a
DataLoader over `SeededDataset`, so the augmented stream is the same for any `num_workers` and after a
mid-epoch resume; the DataLoader gets its own `torch.Generator`, so iterating never draws from the
global RNG. Evaluation uses exact contiguous shards: the per-rank counts sum to len(dataset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from polyscale.data.device_memory import DeviceTensorEvalLoader, DeviceTensorTrainLoader
from polyscale.data.folder import ImageFileDataset
from polyscale.data.gpu_decode import EncodedBatchDecoder, collate_encoded
from polyscale.data.memory import InMemoryImageDataset
from polyscale.data.sampler import SeededDataset, ShardSampler, TrainSampler, shard_range
from polyscale.data.transforms import eval_sizes
from polyscale.errors import ConfigError, DataError

__all__ = [
    "EvalLoader",
    "TrainLoader",
    "WorkerTrainLoader",
    "build_train_loader",
    "build_val_loader",
    "count_bad_files",
]

Batch = tuple[Tensor, Tensor]


class TrainLoader(Protocol):
    """What the trainer iterates: `len` = batches per epoch on this rank (full epoch, whatever the start)."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Batch]: ...


class _Batches:
    """A DataLoader plus an optional main-process stage (GPU decode) applied to every batch."""

    def __init__(self, loader: DataLoader, finish: Callable[[Any], Batch] | None) -> None:
        self.loader, self.finish = loader, finish

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self.loader)
        try:
            for batch in iterator:
                yield self.finish(batch) if self.finish is not None else batch
        except Exception:
            # Stop the workers now: left to the garbage collector (the traceback keeps the iterator in a
            # reference cycle), the DataLoader's shutdown waits 5 s per worker before killing it.
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None and not self.loader.persistent_workers:
                shutdown()
            raise


class WorkerTrainLoader(_Batches):
    """TrainLoader over DataLoader workers (CPU decode, or CPU read + GPU decode)."""

    def __init__(
        self,
        loader: DataLoader,
        sampler: TrainSampler,
        batch_size: int,
        finish: Callable[[Any], Batch] | None,
    ) -> None:
        super().__init__(loader, finish)
        self.sampler, self.batch_size = sampler, batch_size

    def __len__(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Epoch `epoch`'s order; skip its first `start_batch` batches (exact mid-epoch resume)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside [0, {len(self)}] batches of an epoch")
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)


class EvalLoader(_Batches):
    """Evaluation batches of one rank's shard; `len` = batches on this rank."""

    def __len__(self) -> int:
        return len(self.loader)


def _data_loader(
    dataset: Dataset,
    sampler: Sampler,
    batch_size: int,
    cfg: Any,
    device: torch.device,
    *,
    drop_last: bool,
    collate: Callable[[list[Any]], Any],
) -> DataLoader:
    workers = int(cfg.num_workers)
    if workers < 0:
        raise ConfigError(f"data.num_workers={workers} must be >= 0 (0 loads in the main process).")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=bool(cfg.pin_memory) and device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=bool(cfg.persistent_workers) and workers > 0,
        generator=torch.Generator(),  # worker base seeds from here, never from the global RNG
    )


def _decoder(
    dataset: Dataset, cfg: Any, device: torch.device, *, train: bool
) -> Callable[[Any], Batch] | None:
    """The main-process GPU decode stage when the dataset yields encoded samples, else None."""
    if isinstance(dataset, ImageFileDataset) and dataset.with_index:
        return EncodedBatchDecoder(
            dataset, device, dataset.image_size, cfg.interpolation, cfg.mean, cfg.std, train=train
        )
    return None


def build_train_loader(
    dataset: Dataset,
    cfg: Any,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    device: torch.device | str,
) -> TrainLoader:
    """Training batches of this rank (`batch_size`: per-rank micro-batch); incomplete batches dropped."""
    device = torch.device(device)
    if batch_size < 1:
        raise ConfigError(f"The per-rank batch size must be >= 1, got {batch_size}.")
    n = len(dataset)  # type: ignore[arg-type]
    sampler = TrainSampler(n, rank=rank, world_size=world_size, seed=seed)
    if sampler.num_samples < batch_size:
        raise DataError(
            f"The training set has {n} samples: {sampler.num_samples} per rank over {world_size} ranks, "
            f"fewer than one batch of {batch_size}. Use more samples or a smaller data.batch_size."
        )
    if cfg.gpu_augment:
        if not isinstance(dataset, InMemoryImageDataset):
            raise ConfigError(
                "data.gpu_augment=true keeps an in-memory set (cifar10, cifar100, builtin) on the device; "
                f"{type(dataset).__name__} is not one. For image folders use data.decoder=cuda."
            )
        return DeviceTensorTrainLoader(dataset, sampler, batch_size, cfg, device)
    finish = _decoder(dataset, cfg, device, train=True)
    loader = _data_loader(
        SeededDataset(dataset),
        sampler,
        batch_size,
        cfg,
        device,
        drop_last=True,
        collate=collate_encoded if finish else default_collate,
    )
    return WorkerTrainLoader(loader, sampler, batch_size, finish)


def build_val_loader(
    dataset: Dataset, cfg: Any, *, rank: int, world_size: int, batch_size: int, device: torch.device | str
) -> Iterable[Batch]:
    """Evaluation batches of this rank's exact shard (no padding, no duplicates); has `len`."""
    device = torch.device(device)
    if batch_size < 1:
        raise ConfigError(f"The per-rank evaluation batch size must be >= 1, got {batch_size}.")
    if cfg.gpu_augment and isinstance(dataset, InMemoryImageDataset):
        shard = shard_range(len(dataset), rank, world_size)
        resize, crop = eval_sizes(cfg, dataset.crop_size)
        return DeviceTensorEvalLoader(
            dataset, shard, batch_size, resize=resize, crop=crop, cfg=cfg, device=device
        )
    sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size)  # type: ignore[arg-type]
    finish = _decoder(dataset, cfg, device, train=False)
    loader = _data_loader(
        dataset,
        sampler,
        batch_size,
        cfg,
        device,
        drop_last=False,
        collate=collate_encoded if finish else default_collate,
    )
    return EvalLoader(loader, finish)


def count_bad_files(dataset: Any) -> int:
    """Distinct undecodable files met so far (by any worker); 0 for sets without files."""
    while getattr(dataset, "bad_file_mask", None) is None and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # unwrap Subset / SeededDataset
    mask = getattr(dataset, "bad_file_mask", None)
    return 0 if mask is None else int(mask.sum())
