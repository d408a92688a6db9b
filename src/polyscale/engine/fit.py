"""`run_training`: set up the process, let the task build its pieces, resume if asked, loop over epochs,
record the run. The same for every task (polyscale.tasks)."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from polyscale.data import bad_file_mask
from polyscale.engine.build import build_ema, wrap_model
from polyscale.engine.checkpoint import (
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    weights_problem,
)
from polyscale.engine.checks import check_values
from polyscale.engine.distributed import all_gather_object, all_reduce_max, broadcast_buffers
from polyscale.engine.loop import StepSettings, TrainState, train_one_epoch
from polyscale.engine.optim import build_optimizer, build_scheduler
from polyscale.engine.resume import check_resumable, resolve_resume, restore
from polyscale.engine.run_dir import RunRecorder, collect_environment
from polyscale.engine.run_lock import lock_run_dir
from polyscale.engine.runtime import (
    Runtime,
    capture_rng_state,
    make_grad_scaler,
    micro_batch_size,
    seed_everything,
    start_process,
)
from polyscale.engine.signals import STOP_SIGNALS, StopSignals, resume_command, stop_exit_code, stop_requested
from polyscale.errors import ConfigError, NonFiniteLossError
from polyscale.tasks import DataBundle, Task, get_task

__all__ = ["run_training"]

STOP_SIGNAL_NAMES = {s.name for s in STOP_SIGNALS}

log = logging.getLogger("polyscale.train")


def _steps_per_epoch(cfg: DictConfig, data: DataBundle) -> int:
    steps = len(data.train_loader) // cfg.trainer.accum_steps
    if cfg.trainer.limit_train_batches is not None:
        steps = min(steps, cfg.trainer.limit_train_batches)
    if steps < 1:
        raise ConfigError(
            f"The training set ({len(data.train_set)} samples) gives no full optimizer step of "
            f"data.batch_size={cfg.data.batch_size}. Lower data.batch_size or use more training samples."
        )
    return steps


def _build_state(cfg: DictConfig, task: Task, data: DataBundle, runtime: Runtime, steps: int) -> TrainState:
    """Model, optimizer, schedule, grad scaler and EMA; identical initial weights on every rank."""
    tcfg = cfg.trainer
    seed_everything(cfg.seed)
    model = task.build_model(cfg, data.num_classes, runtime)
    optimizer = build_optimizer(model, cfg.optim)
    return TrainState(
        model=model,
        train_model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.schedule, steps_per_epoch=steps, epochs=tcfg.epochs),
        scaler=make_grad_scaler(tcfg.precision, runtime.device),
        ema=build_ema(tcfg, model),
    )


class _Checkpoints:
    """Writes best.pt and last.pt (rank 0) with every rank's RNG state; remembers the last good one.

    A checkpoint is written only with finite, undiverged weights, so last.pt is always a state to continue
    from; best.pt is written before last.pt, so results.json never names a best epoch whose file is missing.
    """

    def __init__(
        self, state: TrainState, runtime: Runtime, folder: Path, cfg: DictConfig, resumed: Path | None
    ):
        self.state, self.info, self.folder = state, runtime.info, folder
        self.config = OmegaConf.to_container(cfg, resolve=True)
        at = f" (after global step {state.global_step})"
        self.last_good = f"{resumed}{at}" if resumed else "none written yet"

    def write(self, metrics: dict[str, Any], *, best: bool = False) -> None:
        problem = _diverged(self.state)
        if problem is not None:
            raise NonFiniteLossError(
                f"The weights diverged by global step {self.state.global_step} ({problem}); no checkpoint "
                f"was written. Last good checkpoint: {self.last_good}. Lower optim.lr, add warm-up "
                "(schedule.warmup_epochs) or clip gradients (trainer.clip_grad_norm), then continue from "
                "that checkpoint with trainer.resume=PATH (changed optim and schedule settings apply)."
            )
        rng = all_gather_object(capture_rng_state())  # a collective: every rank calls write()
        if self.info.is_main:
            payload = {**self.state.state_dict(), "rng": rng, "config": self.config, "metrics": metrics}
            if best:
                save_checkpoint(payload, self.folder / "best.pt")
            save_checkpoint(payload, self.folder / "last.pt")
        self.last_good = f"{self.folder / 'last.pt'} (after global step {self.state.global_step})"


def _diverged(state: TrainState) -> str | None:
    """What makes the state unfit to continue from: a non-finite tensor anywhere, or a diverged parameter.
    (BatchNorm statistics may legitimately be large on unnormalised inputs; only their finiteness counts.)"""
    models = {"model": state.model} | ({"ema": state.ema.module} if state.ema is not None else {})
    for prefix, module in models.items():
        params = {f"{prefix}.{n}": p for n, p in module.named_parameters()}
        buffers = {f"{prefix}.{n}": b for n, b in module.named_buffers()}
        problem = weights_problem(params) or weights_problem(buffers, limit=math.inf)
        if problem is not None:
            return problem
    return None


def _bad_train_files(data: DataBundle, device: torch.device) -> int:
    """Distinct unreadable training files met so far by any rank or worker (a collective)."""
    mask = bad_file_mask(data.train_set)
    if mask is None:
        return 0
    return int(all_reduce_max(mask.to(device=device, dtype=torch.int32)).sum())


def _validate(
    task: Task, state: TrainState, eval_model: torch.nn.Module, data: DataBundle, runtime: Runtime, tcfg: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate the main (and EMA) weights; returns the record fields and the metrics best.pt tracks."""
    broadcast_buffers(state.model)  # every rank evaluates (and rank 0 saves) rank 0's BN statistics
    kwargs = {"expected_total": len(data.val_set), "limit_batches": tcfg.limit_val_batches}
    main = task.evaluate(eval_model, data.val_loader, runtime, desc=f"val {state.epoch + 1}", **kwargs)
    record, tracked = task.record(main, "val"), main
    if state.ema is not None:
        broadcast_buffers(state.ema.module)
        ema = task.evaluate(
            state.ema.module, data.val_loader, runtime, desc=f"val ema {state.epoch + 1}", **kwargs
        )
        record.update(task.record(ema, "ema"))
        if tcfg.best_on_ema:
            tracked = {**ema, "num_samples": main["num_samples"], "bad_files": main["bad_files"]}
    return record, tracked


def run_training(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Train as `cfg` says, writing the run directory (rank 0). Returns results.json's content, or None
    when the run stopped early (a signal, `trainer.stop_after_steps`) or had nothing left to train."""
    check_values(cfg)
    task = get_task(cfg.task.name)
    tcfg, run_dir = cfg.trainer, Path(run_dir)
    runtime = start_process(tcfg, cfg.seed)
    with lock_run_dir(run_dir, enabled=runtime.info.is_main):
        if runtime.info.is_main:
            for path in remove_stale_temp_files(run_dir / "checkpoints"):
                log.info("Removed %s, left by an interrupted checkpoint write.", path)
        return _fit(cfg, task, runtime, run_dir)


def _fit(cfg: DictConfig, task: Task, runtime: Runtime, run_dir: Path) -> dict[str, Any] | None:
    tcfg, info, device = cfg.trainer, runtime.info, runtime.device
    micro = micro_batch_size(cfg.data.batch_size, info.world_size, tcfg.accum_steps)
    task.check(cfg)  # fail fast, before loading data
    resume_path = resolve_resume(tcfg.resume, run_dir)
    ckpt = load_checkpoint(resume_path) if resume_path is not None else None
    if ckpt is not None:
        check_resumable(ckpt, cfg, resume_path)  # before the data is read
    data = task.build_data(cfg, runtime, micro)
    steps = _steps_per_epoch(cfg, data)
    state = _build_state(cfg, task, data, runtime, steps)
    batch_loss = task.batch_loss(cfg, data, runtime, micro)
    seed_everything(cfg.seed + info.rank)  # per-rank stream for dropout, Mixup/CutMix
    if ckpt is not None:
        restore(state, ckpt, resume_path, cfg, info)
    state.train_model, state.ddp = wrap_model(state.model, tcfg, info, device)
    eval_model = torch.compile(state.model) if tcfg.compile else state.model
    # TensorBoard events up to the checkpoint's step were written before it was saved; later ones are redone.
    purge = state.global_step + 1 if resume_path else None
    recorder = RunRecorder(run_dir, enabled=info.is_main, tensorboard=tcfg.tensorboard, purge_step=purge)
    recorder.write_config(cfg)
    recorder.write_environment(collect_environment(world_size=info.world_size, device=device))
    checkpoints = _Checkpoints(state, runtime, recorder.checkpoint_dir, cfg, resume_path)
    log.info(
        "Training %s (%s) on %s: %d rank(s), device %s, global batch %d (%d per rank x %d accumulation), "
        "%d steps/epoch, %d epochs, run dir %s",
        *(cfg.model.name, task.name, cfg.data.name, info.world_size, device, cfg.data.batch_size, micro),
        *(tcfg.accum_steps, steps, tcfg.epochs, run_dir),
    )
    settings = StepSettings(
        device=device,
        batch_loss=batch_loss,
        steps=steps,
        accum_steps=tcfg.accum_steps,
        clip_grad_norm=tcfg.clip_grad_norm,
        log_every=tcfg.log_every_n_steps,
        checkpoint_every=tcfg.checkpoint_every_n_steps,
        stop_after_steps=tcfg.stop_after_steps,
        progress=runtime.show_progress,
    )
    final: dict[str, Any] | None = None
    bad_train = bad_val = 0
    best_metric = cfg.task.best_metric or task.best_metric
    # (installed before the loaders start their workers, which inherit the handlers)
    with StopSignals(announce=info.is_main) as signals, contextlib.closing(recorder):
        settings.stop_requested = lambda: stop_requested(signals)
        while state.epoch < tcfg.epochs:
            data.train_loader.set_epoch(state.epoch, start_batch=state.step_in_epoch * tcfg.accum_steps)
            stats = train_one_epoch(
                state,
                data.train_loader,
                settings,
                recorder=recorder,
                on_checkpoint=lambda: checkpoints.write({"partial_epoch": True}),
                last_good=lambda: checkpoints.last_good,
            )
            if stats.stopped:
                _report_stop(stats.stopped, state, run_dir)
                return None
            record: dict[str, Any] = {"epoch": state.epoch + 1, "global_step": state.global_step}
            record.update(train_loss=stats.loss, lr=state.optimizer.param_groups[0]["lr"])
            record.update(images_per_s=stats.images_per_s, epoch_time_s=stats.seconds)
            record.update(task.train_record(batch_loss))
            bad_train = _bad_train_files(data, device)
            is_best = False
            if (state.epoch + 1) % tcfg.val_every_n_epochs == 0 or state.epoch + 1 == tcfg.epochs:
                val_record, tracked = _validate(task, state, eval_model, data, runtime, tcfg)
                record.update(val_record)
                bad_val = tracked["bad_files"]
                reported = {k: tracked[k] for k in task.result_keys if k in tracked}
                final = {**reported, "epoch": state.epoch + 1, "num_samples": tracked["num_samples"]}
                best_value = state.best.get(best_metric)
                is_best = best_value is None or tracked[best_metric] > best_value
                if is_best:
                    state.best = {**reported, "epoch": state.epoch + 1}
            if bad_train or bad_val:
                record.update(bad_files_train=bad_train, bad_files_val=bad_val)
            state.epoch, state.step_in_epoch, state.epoch_progress = state.epoch + 1, 0, {}
            checkpoints.write(record, best=is_best)
            recorder.epoch_metrics(record)
            epoch_scalars = {f"epoch/{k}": float(v) for k, v in record.items() if k != "epoch"}
            recorder.scalars(epoch_scalars, state.global_step)
            log.info(_summary(task, record, tcfg.epochs))
    if final is None:
        log.info("Nothing left to train: the checkpoint had already finished %d epochs.", tcfg.epochs)
        return None
    results = {
        "best": dict(state.best),
        "final": {k: v for k, v in final.items() if k != "num_samples"},
        task.count_name: final["num_samples"],
        "bad_files": bad_train + bad_val,
        "bad_files_train": bad_train,
        "bad_files_val": bad_val,
    }
    recorder.write_results(results)
    metric = best_metric
    log.info(
        "Best val %s %.2f (epoch %d); final %.2f. Results: %s",
        *(metric, state.best[metric], state.best["epoch"], final[metric], run_dir / "results.json"),
    )
    return results


def _report_stop(reason: str, state: TrainState, run_dir: Path) -> None:
    """One line: why the run stopped, where its checkpoint is, and the command that continues it. A stop
    by signal then ends the process with `stop_exit_code` (the run has not finished)."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # called without Hydra (tests, notebooks)
        overrides = []
    log.info(
        "Stopped by %s after global step %d (epoch %d); wrote %s. Continue with: %s",
        *(reason, state.global_step, state.epoch + 1, run_dir / "checkpoints" / "last.pt"),
        resume_command(run_dir, overrides),
    )
    if reason in STOP_SIGNAL_NAMES:
        raise SystemExit(stop_exit_code(reason))


def _summary(task: Task, record: dict[str, Any], epochs: int) -> str:
    """One line per epoch: loss, the task's validation metrics, bad files, LR, throughput, time."""
    line = f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}" + task.summary(record)
    if record.get("bad_files_train") or record.get("bad_files_val"):
        line += f"  bad files: {record['bad_files_train']} train, {record['bad_files_val']} val"
    line += f"  lr {record['lr']:.4g}  {record['images_per_s']:.0f} img/s  {record['epoch_time_s']:.1f} s"
    return line
