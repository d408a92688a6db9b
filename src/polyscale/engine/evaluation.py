"""`evaluate_checkpoint`, evaluate.py's work: rebuild a checkpoint's network and let its task evaluate it.

The task, model, detector and data configs come from the config stored in our checkpoints. The command
line changes them: naming a group option (`model=NAME`, `model/conv=NAME`, `data=NAME`, `detector=NAME`)
other than the stored one replaces that part of the stored config, while naming the stored one keeps the
stored values (so `data=imagefolder data.root=DIR` evaluates at the crop the run was trained with);
a key (`data.root=...`, `model.drop_rate=...`) replaces one value. Bare state dicts carry no config, so
they need `model=NAME` (and usually `data=NAME`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from polyscale.config import TrainConfig
from polyscale.engine.checkpoint import (
    is_polyscale_checkpoint,
    load_checkpoint,
    model_state,
    stored_config,
    trained_as,
)
from polyscale.engine.runtime import start_process
from polyscale.errors import CheckpointError, ConfigError, one_line
from polyscale.models import load_model_weights
from polyscale.tasks import Checkpoint, Runtime, Task, get_task

__all__ = ["effective_config", "evaluate_checkpoint"]

log = logging.getLogger("polyscale.evaluate")
_SECTIONS = ("task", "model", "data", "detector")
# group choice on the command line -> (its config section, the key holding the option's name)
_GROUPS = {"model": ("model", "model.name"), "data": ("data", "data.name")}
_GROUPS["model/conv"] = ("model.conv", "model.conv.name")
_GROUPS["detector"] = ("detector", "detector.name")


def effective_config(cfg: DictConfig, ckpt: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The task, model and data config to evaluate with: the checkpoint's, updated by the command line's."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    chosen = {o.key_or_group for o in parsed}
    base = OmegaConf.structured(TrainConfig)
    stored = (ckpt.get("config") or {}) if is_polyscale_checkpoint(ckpt) else None
    if stored is not None:
        try:
            base = OmegaConf.merge(base, {k: stored[k] for k in _SECTIONS if k in stored})
        except OmegaConfBaseException as err:
            raise CheckpointError(
                f"The config stored in checkpoint {cfg.checkpoint} does not fit this polyscale version "
                f"({one_line(err)}). Pass the model and data explicitly: model=NAME data=NAME."
            ) from err
    else:
        if not chosen & {"model", "model.name"}:
            raise ConfigError(
                f"{cfg.checkpoint} is a bare state dict with no stored config, so the model is unknown. "
                "Name it on the command line: python evaluate.py checkpoint=PATH model=NAME data=NAME ..."
            )
        base.model, base.data = cfg.model, cfg.data if cfg.data is not None else {}
    for group, (section, name_key) in _GROUPS.items():  # another option replaces the whole section
        if group in chosen and OmegaConf.select(base, name_key) != OmegaConf.select(cfg, name_key):
            OmegaConf.update(base, section, OmegaConf.select(cfg, section), merge=False)
    for override in parsed:  # single keys replace single values
        key = override.key_or_group
        if key.startswith(("model.", "data.", "task.", "detector.")):
            OmegaConf.update(base, key, OmegaConf.select(cfg, key), merge=False)
    base.model.checkpoint_path = None  # the weights come from the checkpoint being evaluated
    task = base.task.name
    if stored is not None and (stored.get("task") or {}).get("name", "classification") != task:
        raise CheckpointError(
            f"{cfg.checkpoint} is a checkpoint of task={stored['task']['name']}, not task={task}: evaluate "
            "it without changing task.name."
        )
    # the data section's schema fills keys that older checkpoints lack and checks the rest
    try:
        base.data = OmegaConf.merge(OmegaConf.structured(get_task(task).data_schema), base.data)
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"{cfg.checkpoint} is a checkpoint of task={task}, and data.name={base.data.name} is no data set "
            f"of that task. Evaluate it on a {task} data set; to start a new task's run "
            f"from its network, use it as a backbone: python train.py task=NAME "
            f"model.checkpoint_path={cfg.checkpoint}"
        ) from err
    return base


def _loader(task: Task, run_cfg: DictConfig, runtime: Runtime, ckpt: dict[str, Any], cfg: DictConfig) -> Any:
    """A function num_classes -> the network of `run_cfg` with the checkpoint's weights."""
    path = str(cfg.checkpoint)
    ours = is_polyscale_checkpoint(ckpt)
    weights = model_state(ckpt, use_ema=cfg.eval.use_ema, source=path) if ours else ckpt
    was = trained_as(ckpt) if is_polyscale_checkpoint(ckpt) else None
    now = f"model={run_cfg.model.name} model/conv={run_cfg.model.conv.name}"
    if was is not None and was.split() != now.split()[: len(was.split())] and runtime.rank == 0:
        log.warning(
            "%s was trained as %s but is evaluated as %s (named on the command line). The weights fit both "
            "networks' shapes, so they load; drop the model override to evaluate the network it was "
            "trained as.",
            path,
            was,
            now,
        )

    def load(num_classes: int) -> nn.Module:
        model = task.build_model(run_cfg, num_classes, runtime)
        fix = (
            "Fix: evaluate with the network the checkpoint was trained as (model=NAME, model/conv=TYPE, "
            "model.num_classes=N on the command line)."
        )
        load_model_weights(model, weights, strict=True, name=path, trained_as=was, fix=fix)
        return model

    return load


def evaluate_checkpoint(
    cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` as its task says; rank 0 writes and returns the JSON report."""
    if not cfg.checkpoint:
        raise ConfigError(
            "evaluate.py needs a checkpoint: python evaluate.py checkpoint=RUN_DIR/checkpoints/best.pt"
        )
    tcfg = cfg.trainer
    runtime = start_process(tcfg, cfg.seed)
    ckpt = load_checkpoint(cfg.checkpoint)
    if cfg.eval.use_ema and not is_polyscale_checkpoint(ckpt):
        raise ConfigError(
            f"eval.use_ema=true needs a polyscale checkpoint; {cfg.checkpoint} is a bare state dict."
        )
    run_cfg = effective_config(cfg, ckpt, overrides)
    run_cfg.trainer = cfg.trainer
    task = get_task(run_cfg.task.name)
    task.check(run_cfg)  # fail fast, before loading data
    stored = stored_config(ckpt) if is_polyscale_checkpoint(ckpt) else None
    load = _loader(task, run_cfg, runtime, ckpt, cfg)
    rows = task.evaluate_checkpoint(Checkpoint(load, stored), run_cfg, cfg.eval, runtime)
    report = {"checkpoint": str(cfg.checkpoint), "results": rows}
    if runtime.rank == 0:
        output = Path(cfg.eval.output) if cfg.eval.output else Path(run_dir) / "eval.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        log.info("Wrote %s", output)
    return report
