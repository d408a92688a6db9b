"""One training epoch and exact evaluation, around a small `TrainState` (torchvision-references style).

`fit` (engine/fit.py) builds the pieces from the config and calls these; they take plain objects, so
the benchmark and the tests drive them directly.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polyscale.engine.distributed import all_reduce_min, all_reduce_sum, world_size
from polyscale.engine.progress import progress
from polyscale.engine.run_dir import RunRecorder
from polyscale.errors import DataError, NonFiniteLossError

__all__ = ["EvalResult", "StepSettings", "TrainState", "evaluate", "train_one_epoch"]

_NO_BAD_STEP = 2**62  # sentinel: no non-finite loss seen


@dataclass
class TrainState:
    """Everything a resume restores. `model` is the plain module that is saved; `train_model` wraps it."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    ema: nn.Module | None = None  # timm ModelEmaV3; its .module holds the averaged weights
    ddp: DistributedDataParallel | None = None  # for no_sync() during gradient accumulation
    epoch: int = 0  # finished epochs
    global_step: int = 0  # optimizer steps since the start
    step_in_epoch: int = 0  # optimizer steps done in epoch `epoch`
    best: dict[str, Any] = field(default_factory=dict)  # {"top1", "top5", "epoch"} of the best validation

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "step_in_epoch": self.step_in_epoch,
            "best": dict(self.best),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore from our checkpoint (the model weights are loaded by the caller, with clear errors)."""
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.step_in_epoch = ckpt["step_in_epoch"]
        self.best = dict(ckpt.get("best") or {})


@dataclass
class StepSettings:
    """How each optimizer step runs (from cfg.trainer)."""

    device: torch.device
    loss_fn: nn.Module
    steps: int  # optimizer steps per epoch
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    accum_steps: int = 1
    clip_grad_norm: float | None = None
    channels_last: bool = False
    mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    log_every: int = 50
    checkpoint_every: int = 0  # also call on_checkpoint every N optimizer steps
    stop_after_steps: int | None = None  # stop once global_step reaches this (preemption tests)
    progress: bool = True


@dataclass
class EpochStats:
    loss: float  # mean training loss per sample over this epoch's steps (all ranks)
    samples: int  # samples seen by all ranks
    seconds: float
    stopped: bool  # stop_after_steps was reached

    @property
    def images_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def _to_device(
    images: torch.Tensor, targets: torch.Tensor, settings: StepSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(settings.device, non_blocking=True)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(settings.device, non_blocking=True)


class _LossTracker:
    """Loss sums and the first non-finite step, kept on the device so that steps never wait for the host;
    read at sync points only (logging, checkpoints, epoch end)."""

    def __init__(self, device: torch.device) -> None:
        self.epoch_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of per-sample losses
        self.interval_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=device)
        self.epoch_samples = self.interval_samples = 0
        self.interval_start = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: int, step: int) -> None:
        loss = loss.detach()
        self.epoch_sum += loss.double() * batch
        self.interval_sum += loss.double() * batch
        self.epoch_samples += batch
        self.interval_samples += batch
        new_bad = ~torch.isfinite(loss) & (self.first_bad == _NO_BAD_STEP)
        self.first_bad = torch.where(new_bad, step, self.first_bad)

    def check_finite(self, state: TrainState, last_good: str) -> None:
        """Raise on every rank if any rank saw a non-finite loss (one small all-reduce)."""
        bad_step = int(all_reduce_min(self.first_bad.clone()))
        if bad_step != _NO_BAD_STEP:
            raise NonFiniteLossError(
                f"The training loss became NaN or inf at optimizer step {bad_step} "
                f"(epoch {state.epoch + 1}); training stopped and no checkpoint was written after it. "
                "Last good checkpoint: "
                f"{last_good}. Lower optim.lr, add warm-up (schedule.warmup_epochs), clip gradients "
                "(trainer.clip_grad_norm) or use trainer.precision=bf16 instead of fp16, then continue "
                "with trainer.resume=PATH of that checkpoint."
            )

    def pop_interval(self) -> tuple[float, float]:
        """(mean loss on this rank, images/s of all ranks) since the previous call."""
        now = time.perf_counter()
        mean = float(self.interval_sum) / max(self.interval_samples, 1)
        rate = self.interval_samples * world_size() / max(now - self.interval_start, 1e-9)
        self.interval_sum.zero_()
        self.interval_samples, self.interval_start = 0, now
        return mean, rate

    def epoch_mean(self) -> tuple[float, int]:
        """(mean loss per sample, samples) over all ranks."""
        count = torch.tensor(float(self.epoch_samples), dtype=torch.float64, device=self.epoch_sum.device)
        total, samples = all_reduce_sum(torch.stack([self.epoch_sum, count])).tolist()
        return total / max(samples, 1), int(samples)


def _micro_step(
    state: TrainState, settings: StepSettings, images: torch.Tensor, targets: torch.Tensor, sync: bool
) -> torch.Tensor:
    """Forward and backward of one micro-batch; DDP all-reduces gradients only when `sync`."""
    images, targets = _to_device(images, targets, settings)
    if settings.mixup is not None:
        images, targets = settings.mixup(images, targets)
    with contextlib.nullcontext() if sync or state.ddp is None else state.ddp.no_sync():
        with settings.autocast():
            loss = settings.loss_fn(state.train_model(images), targets)
        scaled = loss / settings.accum_steps
        (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
    return loss


def train_one_epoch(
    state: TrainState,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: StepSettings,
    *,
    recorder: RunRecorder | None = None,
    on_checkpoint: Callable[[], None] | None = None,
    last_good: Callable[[], str] = lambda: "none",
) -> EpochStats:
    """Run optimizer steps `state.step_in_epoch .. settings.steps` of epoch `state.epoch`.

    `loader` must already be positioned at micro-batch `state.step_in_epoch * accum_steps` (mid-epoch
    resume). `on_checkpoint` (called on every rank) writes last.pt; `last_good` describes the newest one.
    """
    state.train_model.train()
    micro_batches = iter(loader)
    tracker = _LossTracker(settings.device)
    start, stopped = time.perf_counter(), False
    bar = progress(
        range(state.step_in_epoch, settings.steps),
        desc=f"train {state.epoch + 1}",
        total=settings.steps,
        initial=state.step_in_epoch,
        enabled=settings.progress,
        unit="step",
    )
    for _ in bar:
        for micro in range(settings.accum_steps):
            images, targets = next(micro_batches)
            loss = _micro_step(state, settings, images, targets, sync=micro == settings.accum_steps - 1)
            tracker.add(loss, images.shape[0], state.global_step + 1)
        _optimizer_step(state, settings)
        state.global_step += 1
        state.step_in_epoch += 1
        if settings.log_every and state.global_step % settings.log_every == 0:
            tracker.check_finite(state, last_good())
            mean_loss, rate = tracker.pop_interval()
            lr = state.optimizer.param_groups[0]["lr"]
            if recorder is not None:
                scalars = {"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": rate}
                recorder.scalars(scalars, state.global_step)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}", refresh=False)
        checkpoint_due = settings.checkpoint_every and state.global_step % settings.checkpoint_every == 0
        stopped = settings.stop_after_steps is not None and state.global_step == settings.stop_after_steps
        if (checkpoint_due or stopped) and on_checkpoint is not None:
            tracker.check_finite(state, last_good())  # never checkpoint weights that saw a NaN
            on_checkpoint()
        if stopped:
            break
    if hasattr(bar, "close"):
        bar.close()
    tracker.check_finite(state, last_good())
    loss, samples = tracker.epoch_mean()
    return EpochStats(loss=loss, samples=samples, seconds=time.perf_counter() - start, stopped=stopped)


def _optimizer_step(state: TrainState, settings: StepSettings) -> None:
    """Clip (after unscaling), step, zero the gradients, advance the LR schedule and the EMA."""
    optimizer, scaler = state.optimizer, state.scaler
    if settings.clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), settings.clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update(state.model, step=state.global_step + 1)


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    loss: float
    num_samples: int  # counted over all ranks, bad files excluded
    bad_files: int


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: StepSettings,
    *,
    expected_total: int | None = None,
    limit_batches: int | None = None,
    desc: str = "val",
) -> EvalResult:
    """Exact accuracy over a sharded loader: per-rank sums of hits and counts, all-reduced once.

    Targets of -1 mark unreadable files: they are skipped and counted. Without `limit_batches`, the count
    plus the bad files must equal `expected_total` (the data set size): every sample seen exactly once.
    """
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=settings.device)  # hits@1, hits@5, count, loss, bad
    batches = itertools.islice(loader, limit_batches) if limit_batches is not None else loader
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if limit_batches is not None and total is not None:
        total = min(total, limit_batches)
    for images, targets in progress(batches, desc=desc, total=total, enabled=settings.progress, unit="batch"):
        images, targets = _to_device(images, targets, settings)
        valid = targets >= 0
        with settings.autocast():
            logits = model(images)
        logits, kept = logits.float()[valid], targets[valid]
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == kept[:, None]  # (n, k)
        sums += torch.stack(
            [
                hits[:, 0].sum(),
                hits.any(dim=1).sum(),
                valid.sum(),
                F.cross_entropy(logits, kept, reduction="sum"),
                (~valid).sum(),
            ]
        ).double()
    hits1, hits5, count, loss, bad = all_reduce_sum(sums).tolist()
    if limit_batches is None and expected_total is not None and int(count + bad) != expected_total:
        raise DataError(
            f"Evaluation saw {int(count)} samples and {int(bad)} bad files, but the validation set has "
            f"{expected_total}: the validation loader drops or duplicates samples across ranks. It must "
            "shard "
            "exactly (each sample on one rank, no padding); see polyscale.data.build_val_loader."
        )
    if count == 0:
        raise DataError(
            "The validation set yielded no readable samples: check data.root and data.on_bad_file."
        )
    return EvalResult(100.0 * hits1 / count, 100.0 * hits5 / count, loss / count, int(count), int(bad))
