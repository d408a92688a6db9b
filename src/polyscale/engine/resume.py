"""Continuing a run from a checkpoint: which file, whether it fits this run, and restoring it exactly.

Settings a user may change on resume (the LR after a NaN, the schedule, the number of epochs, ...)
are applied from the resumed step on and listed in the log; settings that cannot be honoured without
breaking the run (another network, another batch size in the middle of an epoch, another parameter
grouping of the optimizer) are refused with a message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from polyscale.engine.checkpoint import (
    is_polyscale_checkpoint,
    model_state,
    stored_config,
    trained_as,
)
from polyscale.engine.distributed import DistInfo
from polyscale.engine.loop import TrainState
from polyscale.engine.optim import build_optimizer
from polyscale.engine.runtime import restore_rng_state, seed_everything
from polyscale.errors import CheckpointError
from polyscale.models import load_model_weights

__all__ = ["changed_settings", "check_resumable", "resolve_resume", "restore"]

log = logging.getLogger("polyscale.train")

# Sections whose changes apply on resume (each is re-read from the config when the run is built).
_APPLIED = ("optim", "schedule", "trainer", "data", "model")
# Keys that never count as a change (where and how the run executes, not what it computes).
_IGNORED = {
    "trainer.resume",
    "trainer.stop_after_steps",
    "trainer.progress",
    "trainer.tensorboard",
    "trainer.device",
    "data.root",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "model.checkpoint_path",
}


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


def _flat(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def changed_settings(stored: dict[str, Any], cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint's value, this run's value)} over the sections a resume re-reads."""
    now = OmegaConf.to_container(cfg, resolve=True)
    old = dict(_flat({k: stored.get(k) for k in _APPLIED if isinstance(stored.get(k), dict)}))
    new = dict(_flat({k: now.get(k) for k in _APPLIED}))
    return {
        key: (old.get(key), value)
        for key, value in new.items()
        if key not in _IGNORED and key in old and old[key] != value
    }


def check_resumable(ckpt: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """CheckpointError when `ckpt` cannot continue this run (checked before any data is read)."""
    if not is_polyscale_checkpoint(ckpt):
        raise CheckpointError(
            f"{path} is a bare state dict, not a polyscale checkpoint, so it cannot continue a run. To start "
            f"from its weights, use model.checkpoint_path={path} instead of trainer.resume."
        )
    stored = stored_config(ckpt)
    was = trained_as(ckpt)
    conv_now = cfg.model.conv.name
    now = f"model={cfg.model.name} model/conv={conv_now}"
    model_then = (stored.get("model") or {}).get("name")
    conv_then = ((stored.get("model") or {}).get("conv") or {}).get("name")
    if model_then is not None and (model_then != cfg.model.name or (conv_then and conv_then != conv_now)):
        raise CheckpointError(
            f"{path} was trained as {was}, but this run builds {now}. A run continues with the network it "
            f"started with: resume with {was}, or start a new run from its weights with "
            f"model.checkpoint_path={path} (no trainer.resume)."
        )
    task_then = (stored.get("task") or {}).get("name", "classification")
    if task_then != cfg.task.name:
        raise CheckpointError(
            f"{path} is a checkpoint of task={task_then}; this run is task={cfg.task.name}. Resume with "
            f"task={task_then}."
        )
    changes = changed_settings(stored, cfg)
    if "data.batch_size" in changes and ckpt.get("step_in_epoch", 0):
        old, new = changes["data.batch_size"]
        raise CheckpointError(
            f"{path} was written in the middle of an epoch with data.batch_size={old}; with {new} its "
            f"position in the epoch no longer exists. Resume with data.batch_size={old}, or change the "
            "batch size from a checkpoint written at the end of an epoch."
        )
    if "optim.no_decay_norm_bias" in changes:
        old, new = changes["optim.no_decay_norm_bias"]
        raise CheckpointError(
            f"{path} was written with optim.no_decay_norm_bias={old}; its optimizer state holds another "
            f"grouping of the parameters than {new} gives. Resume with optim.no_decay_norm_bias={old}."
        )


def _apply_optimizer_settings(state: TrainState, cfg: DictConfig) -> None:
    """Make the restored optimizer and schedule follow this run's optim settings from the current step.

    The optimizer's state dict restores the checkpoint's hyperparameters and LambdaLR its base LRs; both
    are reset from the config here (the LR factor of the schedule is always recomputed from the config).
    With unchanged settings this sets the values they already have.
    """
    fresh = build_optimizer(state.model, cfg.optim)
    scheduler = state.scheduler
    for group, new in zip(state.optimizer.param_groups, fresh.param_groups):
        group.update({k: v for k, v in new.items() if k != "params"})
        group["initial_lr"] = new["lr"]
    scheduler.base_lrs = [group["initial_lr"] for group in state.optimizer.param_groups]
    for group, base, factor in zip(state.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def restore(state: TrainState, ckpt: dict[str, Any], path: Path, cfg: DictConfig, info: DistInfo) -> None:
    """Load model, optimizer, schedule, scaler, EMA, counters and this rank's RNG from `ckpt` (read from
    `path`), then apply this run's optimization settings and log what changed."""
    fix = (
        "Fix: resume with the model settings the checkpoint was trained with (stored in it), or start a "
        f"new run from its weights with model.checkpoint_path={path} instead of trainer.resume."
    )
    weights, was = model_state(ckpt, source=path), trained_as(ckpt)
    load_model_weights(state.model, weights, name=str(path), trained_as=was, fix=fix)
    try:
        state.load_state_dict(ckpt)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} does not fit this run's optimizer / schedule / EMA settings ({err}). Resume with the "
            "configuration the checkpoint was written with (its config is stored in the checkpoint)."
        ) from err
    _apply_optimizer_settings(state, cfg)
    changes = changed_settings(stored_config(ckpt), cfg)
    if changes and info.is_main:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changes.items()))
        log.warning(
            "Resuming with settings changed since the checkpoint, applied from step %d on: %s",
            state.global_step,
            listed,
        )
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
        seed_everything(cfg.seed + info.rank + state.global_step)
    log.info("Resumed from %s at global step %d (epoch %d).", path, state.global_step, state.epoch + 1)
