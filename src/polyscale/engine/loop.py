"""The step loop every task shares: `train_one_epoch` over a small `TrainState` (torchvision-references
style), with gradient accumulation, AMP loss scaling, clipping, the non-finite-loss stop, EMA, step
checkpoints and stop requests (signals, `trainer.stop_after_steps`).

What a step computes is the task's business: `StepSettings.batch_loss(model, batch)` returns the loss of
one micro-batch and its size (tasks/). `fit` (engine/fit.py) builds the pieces from the config and calls
this; it takes plain objects, so the benchmark and the tests drive it directly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polyscale.engine.distributed import all_reduce_min, all_reduce_sum, world_size
from polyscale.engine.progress import progress
from polyscale.engine.run_dir import RunRecorder
from polyscale.errors import NonFiniteLossError

__all__ = ["BatchLoss", "EpochStats", "StepSettings", "TrainState", "train_one_epoch"]

_NO_BAD_STEP = 2**62  # sentinel: no non-finite loss seen

# (model, batch) -> (loss of the micro-batch, its number of samples): the task's (tasks.base.BatchLoss)
BatchLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]


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
    best: dict[str, Any] = field(default_factory=dict)  # the task's metrics of the best validation + epoch
    # loss sum, samples and seconds of epoch `epoch` so far (all ranks), so that an epoch resumed from a
    # step checkpoint reports its whole loss and speed, not just the part after the resume
    epoch_progress: dict[str, float] = field(default_factory=dict)

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
            "epoch_progress": dict(self.epoch_progress),
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
        self.epoch_progress = dict(ckpt.get("epoch_progress") or {})


@dataclass
class StepSettings:
    """How each optimizer step of training runs (from cfg.trainer and the task)."""

    device: torch.device
    batch_loss: BatchLoss
    steps: int  # optimizer steps per epoch
    accum_steps: int = 1
    clip_grad_norm: float | None = None
    log_every: int = 50
    checkpoint_every: int = 0  # also call on_checkpoint every N optimizer steps
    stop_after_steps: int | None = None  # stop once global_step reaches this (preemption tests)
    stop_requested: Callable[[], str | None] | None = None  # checked after every step (signals)
    progress: bool = True


@dataclass
class EpochStats:
    loss: float  # mean training loss per sample over this epoch's steps (all ranks)
    samples: int  # samples seen by all ranks
    seconds: float
    stopped: str | None = None  # why the epoch stopped early (a signal name, "stop_after_steps"), or None

    @property
    def images_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


class _LossTracker:
    """Loss sums and the first non-finite step, kept on the device so that steps never wait for the host;
    read at sync points only (logging, checkpoints, epoch end)."""

    def __init__(self, device: torch.device, resumed: dict[str, float]) -> None:
        # a resumed epoch starts from the stored totals (on rank 0 only: sums are all-reduced)
        first = world_size() == 1 or torch.distributed.get_rank() == 0
        carried = resumed if first else {}
        self.epoch_sum = torch.tensor(carried.get("loss_sum", 0.0), dtype=torch.float64, device=device)
        self.epoch_samples = int(carried.get("samples", 0))
        self.seconds_before = float(resumed.get("seconds", 0.0))  # the same on every rank
        self.interval_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=device)
        self.interval_samples = 0
        self.start = self.interval_start = time.perf_counter()

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
                f"Last good checkpoint: {last_good}. Lower optim.lr, add warm-up (schedule.warmup_epochs), "
                "clip gradients (trainer.clip_grad_norm) or use trainer.precision=bf16 instead of fp16, "
                "then continue from that checkpoint with trainer.resume=PATH (changed optim and schedule "
                "settings apply from the resumed step on)."
            )

    def pop_interval(self) -> tuple[float, float]:
        """(mean loss on this rank, images/s of all ranks) since the previous call."""
        now = time.perf_counter()
        mean = float(self.interval_sum) / max(self.interval_samples, 1)
        rate = self.interval_samples * world_size() / max(now - self.interval_start, 1e-9)
        self.interval_sum.zero_()
        self.interval_samples, self.interval_start = 0, now
        return mean, rate

    def totals(self) -> dict[str, float]:
        """The epoch so far over all ranks: loss sum, samples, seconds (a collective)."""
        count = torch.tensor(float(self.epoch_samples), dtype=torch.float64, device=self.epoch_sum.device)
        total, samples = all_reduce_sum(torch.stack([self.epoch_sum, count])).tolist()
        seconds = self.seconds_before + time.perf_counter() - self.start
        return {"loss_sum": total, "samples": samples, "seconds": seconds}


def _micro_step(
    state: TrainState, settings: StepSettings, batch: Any, sync: bool
) -> tuple[torch.Tensor, int]:
    """Forward and backward of one micro-batch; DDP all-reduces gradients only when `sync`."""
    with contextlib.nullcontext() if sync or state.ddp is None else state.ddp.no_sync():
        loss, size = settings.batch_loss(state.train_model, batch)
        scaled = loss / settings.accum_steps
        (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
    return loss, size


def train_one_epoch(
    state: TrainState,
    loader: Iterable[Any],
    settings: StepSettings,
    *,
    recorder: RunRecorder | None = None,
    on_checkpoint: Callable[[], None] | None = None,
    last_good: Callable[[], str] = lambda: "none",
) -> EpochStats:
    """Run optimizer steps `state.step_in_epoch .. settings.steps` of epoch `state.epoch`.

    `loader` must already be positioned at micro-batch `state.step_in_epoch * accum_steps` (mid-epoch
    resume). `on_checkpoint` (called on every rank) writes last.pt; `last_good` describes the newest one.
    A stop request (settings.stop_requested, stop_after_steps) ends the epoch after the current step,
    with a checkpoint, and is reported in `EpochStats.stopped`.
    """
    state.train_model.train()
    micro_batches = iter(loader)
    tracker = _LossTracker(settings.device, state.epoch_progress if state.step_in_epoch else {})
    stopped: str | None = None
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
            loss, size = _micro_step(
                state, settings, next(micro_batches), sync=micro == settings.accum_steps - 1
            )
            tracker.add(loss, size, state.global_step + 1)
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
        if settings.stop_requested is not None:
            stopped = settings.stop_requested()
        if settings.stop_after_steps is not None and state.global_step == settings.stop_after_steps:
            stopped = stopped or "trainer.stop_after_steps"
        # (the epoch's end writes its own checkpoint, after validation, unless the run stops here)
        checkpoint_due = settings.checkpoint_every and state.global_step % settings.checkpoint_every == 0
        checkpoint_due = checkpoint_due and state.step_in_epoch < settings.steps
        if (checkpoint_due or stopped) and on_checkpoint is not None:
            tracker.check_finite(state, last_good())  # never checkpoint weights that saw a NaN
            state.epoch_progress = tracker.totals()
            on_checkpoint()
        if stopped:
            break
    if hasattr(bar, "close"):
        bar.close()
    tracker.check_finite(state, last_good())
    totals = tracker.totals()
    state.epoch_progress = totals
    loss = totals["loss_sum"] / max(totals["samples"], 1)
    return EpochStats(loss=loss, samples=int(totals["samples"]), seconds=totals["seconds"], stopped=stopped)


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
