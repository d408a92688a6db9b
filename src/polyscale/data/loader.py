"""Training and evaluation loaders for one rank, and the bad-file count of a data set.

Training batches come from `TrainSampler` (seeded order + per-sample seeds, see sampler.py) through a
DataLoader over `SeededDataset`, so the augmented stream is the same for any `num_workers` and after a
mid-epoch resume; the DataLoader gets its own `torch.Generator`, so iterating never draws from the
global RNG. Evaluation uses exact contiguous shards: the per-rank counts sum to len(dataset).

A `PolyscaleError` (a bad file under on_bad_file=error, ...) raised in a worker process reaches the
caller as itself, the same type and one-paragraph message as without workers: the worker hands it over
in place of the batch (`_CarryErrors`) instead of letting torch wrap it in a worker traceback.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from polyscale.data.device_memory import DeviceTensorEvalLoader, DeviceTensorTrainLoader
from polyscale.data.folder import ImageFileDataset
from polyscale.data.gpu_decode import EncodedBatchDecoder, collate_encoded
from polyscale.data.memory import InMemoryImageDataset
from polyscale.data.options import DataOptions
from polyscale.data.sampler import SeededDataset, ShardSampler, TrainSampler, shard_range
from polyscale.data.transforms import eval_sizes
from polyscale.errors import ConfigError, DataError, PolyscaleError

__all__ = [
    "EvalLoader",
    "TrainLoader",
    "WorkerTrainLoader",
    "bad_file_mask",
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


class _WorkerError:
    """A user error raised in a worker, sent to the main process in place of the batch it spoiled."""

    def __init__(self, error: PolyscaleError) -> None:
        self.error = error


class _CarryErrors(Dataset):
    """`dataset`, whose PolyscaleErrors in a worker process become a `_WorkerError` instead of a batch.

    torch would send the error's type and formatted traceback, and the main process would raise a new
    error whose message is "Caught DataError in DataLoader worker process 0. Original Traceback ...".
    The exception object itself pickles (type and message), so it travels through the result queue.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        return self.dataset[key]

    def __getitems__(self, keys: list[Any]) -> list[Any] | _WorkerError:
        fetch = getattr(self.dataset, "__getitems__", None)
        try:
            return fetch(keys) if fetch is not None else [self.dataset[k] for k in keys]
        except PolyscaleError as error:
            if get_worker_info() is None:
                raise  # main process: nothing wraps it
            return _WorkerError(error)


class _Collate:
    """`collate` for real batches; a `_WorkerError` passes through (a class: pickles for spawn workers)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any] | _WorkerError) -> Any:
        return items if isinstance(items, _WorkerError) else self.collate(items)


class _Batches:
    """A DataLoader plus an optional main-process stage (GPU decode) applied to every batch."""

    def __init__(self, loader: DataLoader, finish: Callable[[Any], Batch] | None) -> None:
        self.loader, self.finish = loader, finish

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self.loader)
        try:
            for batch in iterator:
                if isinstance(batch, _WorkerError):
                    raise batch.error
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
    device: torch.device,
    *,
    drop_last: bool,
    collate: Callable[[list[Any]], Any],
    num_workers: int = 2,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """The worker options of both loaders: `num_workers` processes (0: the main process), pinned memory
    for a CUDA device, `persistent_workers` kept between epochs, started with `multiprocessing_context`
    ("fork", "spawn", "forkserver"; None: Python's default)."""
    if num_workers < 0:
        raise ConfigError(f"`num_workers`={num_workers} must be >= 0 (0 loads in the main process).")
    return DataLoader(
        _CarryErrors(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_Collate(collate),
        pin_memory=pin_memory and device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        generator=torch.Generator(),  # worker base seeds from here, never from the global RNG
        worker_init_fn=shield_data_worker,
    )


def _options(dataset: Dataset) -> DataOptions:
    """The options `dataset` was built with (defaults for a data set built by hand)."""
    opts = getattr(dataset, "options", None)
    return opts if isinstance(opts, DataOptions) else DataOptions()


def _decoder(dataset: Dataset, device: torch.device, *, train: bool) -> Callable[[Any], Batch] | None:
    """The main-process GPU decode stage when the dataset yields encoded samples, else None."""
    if isinstance(dataset, ImageFileDataset) and dataset.with_index:
        opts = _options(dataset)
        return EncodedBatchDecoder(
            dataset, device, dataset.image_size, opts.interpolation, opts.mean, opts.std, train=train
        )
    return None


def _on_device(dataset: Dataset) -> bool:
    """Whether `dataset` was built to be augmented on the device (`gpu_augment`)."""
    return isinstance(dataset, InMemoryImageDataset) and _options(dataset).gpu_augment


def build_train_loader(
    dataset: Dataset,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    **workers: Any,
) -> TrainLoader:
    """Training batches of this rank; incomplete batches dropped.

    `batch_size` is the per-rank batch (the global batch / world size). A data set built with
    `gpu_augment=True` is copied to `device` once and augmented there (the worker options then do not
    apply); otherwise DataLoader workers load it. `workers`: num_workers (default 2), pin_memory,
    persistent_workers, multiprocessing_context (see `_data_loader`).
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ConfigError(f"The per-rank batch size must be >= 1, got {batch_size}.")
    n = len(dataset)  # type: ignore[arg-type]
    sampler = TrainSampler(n, rank=rank, world_size=world_size, seed=seed)
    if sampler.num_samples < batch_size:
        raise DataError(
            f"The training set has {n} samples: {sampler.num_samples} per rank over {world_size} ranks, "
            f"fewer than one batch of {batch_size}. Use more samples or a smaller `batch_size`."
        )
    if _on_device(dataset):
        opts = _options(dataset)
        return DeviceTensorTrainLoader(
            dataset,  # type: ignore[arg-type]
            sampler,
            batch_size,
            size=opts.image_size,
            padding=opts.random_crop_padding,
            hflip=opts.hflip,
            mean=opts.mean,
            std=opts.std,
            device=device,
        )
    finish = _decoder(dataset, device, train=True)
    loader = _data_loader(
        SeededDataset(dataset),
        sampler,
        batch_size,
        device,
        drop_last=True,
        collate=collate_encoded if finish else default_collate,
        **workers,
    )
    return WorkerTrainLoader(loader, sampler, batch_size, finish)


def build_val_loader(
    dataset: Dataset,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    device: torch.device | str,
    **workers: Any,
) -> Iterable[Batch]:
    """Evaluation batches of this rank's exact shard (no padding, no duplicates); has `len`.

    `batch_size` is the per-rank batch. A `gpu_augment` set is evaluated from a copy on `device`;
    `workers` as for `build_train_loader`.
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ConfigError(f"The per-rank evaluation batch size must be >= 1, got {batch_size}.")
    if _on_device(dataset):
        assert isinstance(dataset, InMemoryImageDataset)
        opts = _options(dataset)
        resize, crop = eval_sizes(opts.image_size, opts.crop_ratio, dataset.crop_size)
        return DeviceTensorEvalLoader(
            dataset,
            shard_range(len(dataset), rank, world_size),
            batch_size,
            resize=resize,
            crop=crop,
            interpolation=opts.interpolation,
            mean=opts.mean,
            std=opts.std,
            device=device,
        )
    sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size)  # type: ignore[arg-type]
    finish = _decoder(dataset, device, train=False)
    loader = _data_loader(
        dataset,
        sampler,
        batch_size,
        device,
        drop_last=False,
        collate=collate_encoded if finish else default_collate,
        **workers,
    )
    return EvalLoader(loader, finish)


def _files_dataset(dataset: Any) -> Any:
    """The data set holding the bad-file mask, under Subset / SeededDataset wrappers and this module's
    loaders (`.loader`, a DataLoader, whose `.dataset` is wrapped in turn)."""
    while getattr(dataset, "bad_file_mask", None) is None:
        inner = getattr(dataset, "dataset", None)
        inner = inner if inner is not None else getattr(dataset, "loader", None)
        if inner is None:
            break
        dataset = inner
    return dataset


def bad_file_mask(dataset: Any) -> Tensor | None:
    """uint8 (N,) over the files of `dataset` (1: found undecodable so far, by any process); None for
    sets without files. The tensor lives in shared memory: what worker processes mark shows here.
    `dataset` may also be a Subset / SeededDataset of it or a loader of this module over it."""
    return getattr(_files_dataset(dataset), "bad_file_mask", None)


def count_bad_files(dataset: Any) -> int:
    """Distinct undecodable files met so far (by any worker); 0 for sets without files."""
    mask = bad_file_mask(dataset)
    return 0 if mask is None else int(mask.sum())


def shield_data_worker(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: keep data workers alive through the stop signals meant for their
    training process, while their parent can still end them with SIGTERM.

    SLURM signals every process of a job step and torchrun each rank's whole process group, and
    PyTorch's workers die on a SIGTERM from anyone but their parent, after which the rank fails with
    "DataLoader worker exited unexpectedly" before it can write its checkpoint. Here the stop signals are
    blocked in the worker and a thread takes them: SIGTERM from the parent (the DataLoader's shutdown)
    ends the worker as before, any other is dropped. (Processes the worker starts inherit the blocked
    signals.)
    """
    del worker_id  # same for every worker
    blocked = {signal.SIGTERM, signal.SIGUSR1}  # the training process's stop signals
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # threads started from here on inherit the mask

    def take_signals() -> None:
        while True:
            info = signal.sigwaitinfo(blocked)
            if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
                os._exit(0)  # what PyTorch's own worker handler does for its parent's SIGTERM

    threading.Thread(target=take_signals, name="stop-signal-shield", daemon=True).start()
