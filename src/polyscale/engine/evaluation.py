"""evaluate.py's work: rebuild the model of a checkpoint, evaluate it exactly at one or more crop sizes.

The model and data configs come from the config stored in our checkpoints. Command-line overrides win:
a group choice (`model=NAME`, `model/conv=NAME`, `data=NAME`) replaces that part of the stored config,
a key (`data.root=...`, `model.drop_rate=...`) replaces one value. Bare state dicts carry no config, so
they need `model=NAME` (and usually `data=NAME`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polyscale.config import TrainConfig
from polyscale.data import build_dataset, build_val_loader
from polyscale.engine.build import build_model, check_model_config
from polyscale.engine.checkpoint import is_polyscale_checkpoint, load_checkpoint
from polyscale.engine.distributed import init_distributed, resolve_device
from polyscale.engine.runtime import (
    autocast_factory,
    configure_determinism,
    per_rank_val_batch,
    seed_everything,
    tune_cpu_allocator,
)
from polyscale.engine.trainer import StepSettings, evaluate
from polyscale.errors import CheckpointError, ConfigError
from polyscale.models import load_model_weights

__all__ = ["effective_config", "evaluate_checkpoint"]

log = logging.getLogger("polyscale.evaluate")
_GROUPS = ("model", "data")


def effective_config(cfg: DictConfig, ckpt: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The model and data config to evaluate with: the checkpoint's, updated by the command line's."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    chosen = {o.key_or_group for o in parsed}
    base = OmegaConf.structured(TrainConfig)
    if is_polyscale_checkpoint(ckpt):
        stored = ckpt.get("config") or {}
        try:
            base = OmegaConf.merge(base, {k: stored[k] for k in _GROUPS if k in stored})
        except OmegaConfBaseException as err:
            raise CheckpointError(
                f"The config stored in checkpoint {cfg.checkpoint} does not fit this polyscale version "
                f"({str(err).splitlines()[0]}). Pass the model and data explicitly: model=NAME data=NAME."
            ) from err
    else:
        if not chosen & {"model", "model.name"}:
            raise ConfigError(
                f"{cfg.checkpoint} is a bare state dict with no stored config, so the model is unknown. "
                "Name it on the command line: python evaluate.py checkpoint=PATH model=NAME data=NAME ..."
            )
        base.model, base.data = cfg.model, cfg.data
    for key in ("model", "data", "model/conv"):  # group choices replace whole sections
        if key in chosen:
            OmegaConf.update(
                base, key.replace("/", "."), OmegaConf.select(cfg, key.replace("/", ".")), merge=False
            )
    for override in parsed:  # single keys replace single values
        key = override.key_or_group
        if key.startswith(("model.", "data.")):
            OmegaConf.update(base, key, OmegaConf.select(cfg, key), merge=False)
    base.model.checkpoint_path = None  # the weights come from the checkpoint being evaluated
    return base


def evaluate_checkpoint(
    cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` at every `cfg.eval.crop_sizes`; rank 0 writes and returns the JSON report."""
    if not cfg.checkpoint:
        raise ConfigError(
            "evaluate.py needs a checkpoint: python evaluate.py checkpoint=RUN_DIR/checkpoints/best.pt"
        )
    info = init_distributed()
    device = resolve_device(cfg.trainer.device, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        tune_cpu_allocator()
    configure_determinism(cfg.trainer.deterministic, device)
    seed_everything(cfg.seed)
    ckpt = load_checkpoint(cfg.checkpoint)
    if cfg.eval.use_ema and not is_polyscale_checkpoint(ckpt):
        raise ConfigError(
            f"eval.use_ema=true needs a polyscale checkpoint; {cfg.checkpoint} is a bare state dict."
        )
    run_cfg = effective_config(cfg, ckpt, overrides)
    data_cfg = run_cfg.data
    check_model_config(run_cfg.model, data_cfg.num_classes)  # fail fast, before loading data
    crops = list(cfg.eval.crop_sizes) or [None]  # None: the data config's image_size
    first = build_dataset(data_cfg, "val", crop_size=crops[0])
    num_classes = int(first.num_classes)
    model = build_model(run_cfg.model, num_classes, device, channels_last=cfg.trainer.channels_last)
    # By path, so that mismatch errors name the file.
    load_model_weights(model, cfg.checkpoint, strict=True, use_ema=cfg.eval.use_ema)
    settings = StepSettings(
        device=device,
        loss_fn=torch.nn.CrossEntropyLoss(),
        steps=0,
        autocast=autocast_factory(cfg.trainer.precision, device),
        channels_last=cfg.trainer.channels_last,
        progress=cfg.trainer.progress and info.is_main,
    )
    results = []
    for i, crop in enumerate(crops):
        dataset = first if i == 0 else build_dataset(data_cfg, "val", crop_size=crop)
        loader = build_val_loader(
            dataset,
            data_cfg,
            rank=info.rank,
            world_size=info.world_size,
            batch_size=per_rank_val_batch(data_cfg, info.world_size),
            device=device,
        )
        size = crop if crop is not None else data_cfg.image_size
        r = evaluate(
            model,
            loader,
            settings,
            expected_total=len(dataset),
            limit_batches=cfg.trainer.limit_val_batches,
            desc=f"eval {size}px",
        )
        results.append({"crop_size": size, "top1": r.top1, "top5": r.top5, "num_samples": r.num_samples})
        if info.is_main:
            print(
                f"crop {size}: top-1 {r.top1:.2f}% (error {100 - r.top1:.2f}%)  top-5 {r.top5:.2f}% "
                f"(error {100 - r.top5:.2f}%)  {r.num_samples} samples, {r.bad_files} bad files",
                flush=True,
            )
    report = {"checkpoint": str(cfg.checkpoint), "results": results}
    if info.is_main:
        output = Path(cfg.eval.output) if cfg.eval.output else Path(run_dir) / "eval.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        log.info("Wrote %s", output)
    return report
