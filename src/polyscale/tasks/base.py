"""What a task is: the part of training that differs between, say, classification and detection.

The engine (engine/) owns everything every task shares: process set-up, the step loop, checkpoints and
exact resume, the run directory, logging, signals, evaluate.py's plumbing. A task supplies the rest
through the hooks of `Task`; it receives the composed config (the engine's) and hands plain arguments
to the data, model and operator code below it. Tasks sit below the engine and never import it: what they
need of the process (device, precision, reductions over ranks, progress bars) comes as a `Runtime`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

__all__ = ["BatchLoss", "Checkpoint", "DataBundle", "Runtime", "Task", "eval_batches"]

T = TypeVar("T")

# (model, batch) -> (loss of the micro-batch, its number of samples); the task moves the batch to the
# device, applies its batch-level augmentation and autocast, and computes the loss.
BatchLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]


class Runtime(Protocol):
    """What a task may use of the process the engine set up (engine.runtime.Runtime implements it)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def channels_last(self) -> bool: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def progress(
        self, iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it"
    ) -> Iterable[T]: ...


def eval_batches(loader: Iterable[T], runtime: Runtime, limit_batches: int | None, desc: str) -> Iterator[T]:
    """The validation batches of this rank, at most `limit_batches` of them, behind a progress bar."""
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if limit_batches is not None and total is not None:
        total = min(total, limit_batches)
    for i, batch in enumerate(runtime.progress(loader, desc=desc, total=total, unit="batch")):
        if limit_batches is not None and i >= limit_batches:
            return
        yield batch


@dataclass
class DataBundle:
    """A task's data sets and this rank's loaders."""

    train_set: Any
    val_set: Any
    train_loader: Any  # has len() and set_epoch(epoch, start_batch)
    val_loader: Any
    num_classes: int


@dataclass
class Checkpoint:
    """What evaluate.py hands a task."""

    load_model: Callable[[int], nn.Module]  # num_classes -> the network with the checkpoint's weights
    trained: dict[str, Any] | None  # the config stored in the checkpoint (None: a bare state dict)


class Task(ABC):
    """The hooks a task implements. One instance per run; `cfg` is the composed (train or eval) config.

    Metrics are plain dicts of numbers. `best_metric` (higher is better) picks best.pt; `result_keys`
    are the metrics results.json reports for the best and the final epoch (those present); every metrics
    dict also holds "num_samples" (validation items evaluated) and "bad_files" (validation files that
    could not be read).
    """

    name: str
    best_metric: str  # the default; `task.best_metric` in the config replaces it
    result_keys: tuple[str, ...]  # those present in the metrics are reported
    count_name: str = "num_val_samples"  # results.json's key for the number of validation items
    data_schema: type  # the config schema of its data sets (polyscale.config)

    def check(self, cfg: Any) -> None:  # noqa: B027 (optional hook)
        """Fail fast, before any data is read, on settings this task cannot use."""

    @abstractmethod
    def build_data(self, cfg: Any, runtime: Runtime, micro_batch: int) -> DataBundle:
        """Training and validation sets and this rank's loaders (`micro_batch` samples per step)."""

    @abstractmethod
    def build_model(self, cfg: Any, num_classes: int, runtime: Runtime) -> nn.Module:
        """The network on runtime.device, initialised (and loaded from `model.checkpoint_path` if set)."""

    @abstractmethod
    def batch_loss(self, cfg: Any, data: DataBundle, runtime: Runtime, micro_batch: int) -> BatchLoss:
        """The loss of one training micro-batch: (model, batch) -> (loss, batch size)."""

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        runtime: Runtime,
        *,
        expected_total: int | None = None,
        limit_batches: int | None = None,
        desc: str = "val",
    ) -> dict[str, float]:
        """Exact metrics over the sharded validation loader, identical on every rank."""

    @abstractmethod
    def evaluate_checkpoint(self, ckpt: Checkpoint, cfg: Any, eval_cfg: Any, runtime: Runtime) -> list[dict]:
        """evaluate.py's rows (e.g. one per test crop size), printed by rank 0. `cfg` holds the task,
        model, data and trainer sections, `eval_cfg` evaluate.py's `eval` section."""

    def train_record(self, batch_loss: BatchLoss) -> dict[str, float]:
        """Extra training fields of the epoch's record (e.g. each loss of a detector); a collective."""
        return {}

    def record(self, metrics: dict[str, float], prefix: str) -> dict[str, float]:
        """The metrics as metrics.jsonl / TensorBoard fields, e.g. {"val_top1": ...} for prefix "val"."""
        return {f"{prefix}_{key}": value for key, value in metrics.items() if key != "bad_files"}

    @abstractmethod
    def summary(self, record: dict[str, Any]) -> str:
        """The validation part of the epoch's log line, from its record ("" when not validated)."""
