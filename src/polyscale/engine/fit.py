"""`run_training`: build everything from the config, resume if asked, loop over epochs, record the run."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from polyscale.engine.build import (
    DataBundle,
    build_data,
    build_ema,
    build_loss,
    build_model,
    check_model_config,
    wrap_model,
)
from polyscale.engine.checkpoint import (
    capture_rng_state,
    is_polyscale_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from polyscale.engine.distributed import (
    DistInfo,
    all_gather_object,
    broadcast_buffers,
    init_distributed,
    resolve_device,
)
from polyscale.engine.optim import build_optimizer, build_scheduler
from polyscale.engine.run_dir import RunRecorder, collect_environment
from polyscale.engine.runtime import (
    autocast_factory,
    configure_determinism,
    make_grad_scaler,
    micro_batch_size,
    seed_everything,
    tune_cpu_allocator,
)
from polyscale.engine.trainer import EvalResult, StepSettings, TrainState, evaluate, train_one_epoch
from polyscale.errors import CheckpointError, ConfigError
from polyscale.models import load_model_weights

__all__ = ["resolve_resume", "run_training"]

log = logging.getLogger("polyscale.train")


def resolve_resume(spec: str | None, run_dir: Path) -> Path | None:
    """`auto`: the run directory's last.pt if it exists (else start fresh); a path: that file."""
    if spec is None:
        return None
    if spec == "auto":
        path = run_dir / "checkpoints" / "last.pt"
        if path.is_file():
            return path
        log.info("trainer.resume=auto: no checkpoint at %s, starting a fresh run.", path)
        return None
    path = Path(spec)
    if not path.is_file():
        raise CheckpointError(
            f"trainer.resume={spec} does not exist. Pass the path of a last.pt written by a polyscale run, "
            "or trainer.resume=auto with hydra.run.dir=RUN_DIR to continue that run."
        )
    return path


def _restore(state: TrainState, path: Path, info: DistInfo, seed: int) -> None:
    """Load model, optimizer, schedule, scaler, EMA, counters and this rank's RNG from `path`."""
    ckpt = load_checkpoint(path)
    if not is_polyscale_checkpoint(ckpt):
        raise CheckpointError(
            f"{path} is a bare state dict, not a polyscale checkpoint, so it cannot continue a run. To start "
            f"from its weights, use model.checkpoint_path={path} instead of trainer.resume."
        )
    load_model_weights(state.model, ckpt["model"], strict=True)
    try:
        state.load_state_dict(ckpt)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} does not fit this run's optimizer / schedule / EMA settings ({err}). Resume with the "
            "configuration the checkpoint was written with (its config is stored in the checkpoint)."
        ) from err
    rng = ckpt.get("rng") or []
    if len(rng) == info.world_size:
        restore_rng_state(rng[info.rank])
    else:
        log.warning(
            "%s was written by %d rank(s), this run has %d: RNG states re-seeded, the resume is not exact.",
            path,
            len(rng),
            info.world_size,
        )
        seed_everything(seed + info.rank + state.global_step)
    log.info("Resumed from %s at global step %d (epoch %d).", path, state.global_step, state.epoch + 1)


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


def _build_state(cfg: DictConfig, data: DataBundle, device: torch.device, steps: int) -> TrainState:
    """Model, optimizer, schedule, grad scaler and EMA; identical initial weights on every rank."""
    tcfg = cfg.trainer
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data.num_classes, device, channels_last=tcfg.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    return TrainState(
        model=model,
        train_model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.schedule, steps_per_epoch=steps, epochs=tcfg.epochs),
        scaler=make_grad_scaler(tcfg.precision, device),
        ema=build_ema(tcfg, model),
    )


class _Checkpoints:
    """Writes last.pt / best.pt (rank 0) with every rank's RNG state; remembers the last good one."""

    def __init__(
        self, state: TrainState, info: DistInfo, folder: Path, cfg: DictConfig, resumed: Path | None
    ):
        self.state, self.info, self.folder = state, info, folder
        self.config = OmegaConf.to_container(cfg, resolve=True)
        at = f" (after global step {state.global_step})"
        self.last_good = f"{resumed}{at}" if resumed else "none written yet"

    def write(self, metrics: dict[str, Any], *, best: bool = False) -> None:
        rng = all_gather_object(capture_rng_state())  # a collective: every rank calls write()
        if self.info.is_main:
            payload = {**self.state.state_dict(), "rng": rng, "config": self.config, "metrics": metrics}
            save_checkpoint(payload, self.folder / "last.pt")
            if best:
                save_checkpoint(payload, self.folder / "best.pt")
        self.last_good = f"{self.folder / 'last.pt'} (after global step {self.state.global_step})"


def _validate(
    state: TrainState, eval_model: torch.nn.Module, data: DataBundle, settings: StepSettings, tcfg: DictConfig
) -> tuple[dict[str, Any], EvalResult]:
    """Evaluate the main (and EMA) weights; returns the metrics record and the result best.pt tracks."""
    broadcast_buffers(state.model)  # every rank evaluates (and rank 0 saves) rank 0's BN statistics
    kwargs = {"expected_total": len(data.val_set), "limit_batches": tcfg.limit_val_batches}
    start = time.perf_counter()
    main = evaluate(eval_model, data.val_loader, settings, desc=f"val {state.epoch + 1}", **kwargs)
    record = {"val_top1": main.top1, "val_top5": main.top5, "val_loss": main.loss}
    record.update(val_samples=main.num_samples, bad_files=main.bad_files)
    tracked = main
    if state.ema is not None:
        broadcast_buffers(state.ema.module)
        ema = evaluate(
            state.ema.module, data.val_loader, settings, desc=f"val ema {state.epoch + 1}", **kwargs
        )
        record.update(ema_top1=ema.top1, ema_top5=ema.top5, ema_loss=ema.loss)
        if tcfg.best_on_ema:
            tracked = EvalResult(ema.top1, ema.top5, ema.loss, main.num_samples, main.bad_files)
    record["val_time_s"] = time.perf_counter() - start
    return record, tracked


def run_training(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Train as `cfg` says, writing the run directory (rank 0). Returns results.json's content, or None
    when `trainer.stop_after_steps` stopped the run early."""
    run_dir, info, tcfg = Path(run_dir), init_distributed(), cfg.trainer
    device = resolve_device(tcfg.device, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        tune_cpu_allocator()
    configure_determinism(tcfg.deterministic, device)
    micro = micro_batch_size(cfg.data.batch_size, info.world_size, tcfg.accum_steps)
    check_model_config(cfg.model, cfg.data.num_classes)  # fail fast, before loading data
    data = build_data(cfg, info, device, micro)
    steps = _steps_per_epoch(cfg, data)
    state = _build_state(cfg, data, device, steps)
    loss_fn, mixup = build_loss(tcfg, data.num_classes, micro)
    seed_everything(cfg.seed + info.rank)  # per-rank stream for dropout, Mixup/CutMix
    resume_path = resolve_resume(tcfg.resume, run_dir)
    if resume_path is not None:
        _restore(state, resume_path, info, cfg.seed)
    state.train_model, state.ddp = wrap_model(state.model, tcfg, info, device)
    eval_model = torch.compile(state.model) if tcfg.compile else state.model
    settings = StepSettings(
        device=device,
        loss_fn=loss_fn,
        steps=steps,
        autocast=autocast_factory(tcfg.precision, device),
        accum_steps=tcfg.accum_steps,
        clip_grad_norm=tcfg.clip_grad_norm,
        channels_last=tcfg.channels_last,
        mixup=mixup,
        log_every=tcfg.log_every_n_steps,
        checkpoint_every=tcfg.checkpoint_every_n_steps,
        stop_after_steps=tcfg.stop_after_steps,
        progress=tcfg.progress and info.is_main,
    )
    # TensorBoard events up to the checkpoint's step were written before it was saved; later ones are redone.
    purge = state.global_step + 1 if resume_path else None
    recorder = RunRecorder(run_dir, enabled=info.is_main, tensorboard=tcfg.tensorboard, purge_step=purge)
    recorder.write_config(cfg)
    recorder.write_environment(collect_environment(world_size=info.world_size, device=device))
    checkpoints = _Checkpoints(state, info, recorder.checkpoint_dir, cfg, resume_path)
    log.info(
        "Training %s on %s: %d rank(s), device %s, global batch %d (%d per rank x %d accumulation), "
        "%d steps/epoch, %d epochs, run dir %s",
        *(cfg.model.name, cfg.data.name, info.world_size, device, cfg.data.batch_size, micro),
        *(tcfg.accum_steps, steps, tcfg.epochs, run_dir),
    )
    final: dict[str, Any] | None = None
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
            log.info("Stopped after global step %d (trainer.stop_after_steps).", state.global_step)
            recorder.close()
            return None
        record: dict[str, Any] = {"epoch": state.epoch + 1, "global_step": state.global_step}
        record.update(train_loss=stats.loss, lr=state.optimizer.param_groups[0]["lr"])
        record.update(images_per_s=stats.images_per_s, epoch_time_s=stats.seconds)
        is_best = False
        if (state.epoch + 1) % tcfg.val_every_n_epochs == 0 or state.epoch + 1 == tcfg.epochs:
            val_record, tracked = _validate(state, eval_model, data, settings, tcfg)
            record.update(val_record)
            final = {"top1": tracked.top1, "top5": tracked.top5, "epoch": state.epoch + 1}
            final.update(num_val_samples=tracked.num_samples, bad_files=tracked.bad_files)
            is_best = not state.best or tracked.top1 > state.best["top1"]
            if is_best:
                state.best = {"top1": tracked.top1, "top5": tracked.top5, "epoch": state.epoch + 1}
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        checkpoints.write(record, best=is_best)
        recorder.epoch_metrics(record)
        recorder.scalars(
            {f"epoch/{k}": float(v) for k, v in record.items() if k != "epoch"}, state.global_step
        )
        log.info(_summary(record, tcfg.epochs))
    recorder.close()
    if final is None:
        log.info("Nothing left to train: the checkpoint had already finished %d epochs.", tcfg.epochs)
        return None
    results = {
        "best": dict(state.best),
        "final": {k: final[k] for k in ("top1", "top5", "epoch")},
        "num_val_samples": final["num_val_samples"],
        "bad_files": final["bad_files"],
    }
    recorder.write_results(results)
    log.info(
        "Best val top-1 %.2f%% (epoch %d); final %.2f%%. Results: %s",
        *(state.best["top1"], state.best["epoch"], final["top1"], run_dir / "results.json"),
    )
    return results


def _summary(record: dict[str, Any], epochs: int) -> str:
    """One line per epoch: loss, accuracy (and EMA), LR, throughput, time."""
    line = f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}"
    if "val_top1" in record:
        line += f"  val top-1 {record['val_top1']:.2f}%  top-5 {record['val_top5']:.2f}%"
        line += f"  ({record['val_samples']} samples)"
    if "ema_top1" in record:
        line += f"  ema top-1 {record['ema_top1']:.2f}%"
    line += f"  lr {record['lr']:.4g}  {record['images_per_s']:.0f} img/s  {record['epoch_time_s']:.1f} s"
    return line
