"""Image classification: class-labelled image sets, the model zoo's classifiers, cross-entropy (or timm's
Mixup/CutMix with soft targets), exact top-1 / top-5 evaluation; best.pt follows the validation top-1.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from polyscale.config import DataConfig
from polyscale.data import build_dataset, build_train_loader, build_val_loader
from polyscale.errors import ConfigError, DataError
from polyscale.models import create_model
from polyscale.ops.dynamic_psconv import DynamicPSConv2d, large_fraction_penalty, mean_large_fraction
from polyscale.tasks import arguments as args_of
from polyscale.tasks.arguments import MODEL_KEYS, config_keys, data_arguments, model_arguments
from polyscale.tasks.base import Checkpoint, DataBundle, Runtime, Task, eval_batches

__all__ = ["TASK", "ClassificationLoss", "ClassificationTask", "classification_metrics"]

log = logging.getLogger("polyscale.classification")


def _large_fraction_settings(cfg: Any) -> tuple[float, float]:
    """(target, weight) of dynamic PSConv's regulariser from model.conv (absent keys: off)."""
    conv = cfg.model.conv
    return float(conv.get("large_fraction_target", 0.5)), float(conv.get("large_fraction_weight", 0.0))


class ClassificationLoss:
    """(model, (images, targets)) -> (loss, batch size): to the device, Mixup/CutMix, autocast, loss.

    With `large_fraction_weight` > 0 the loss also pulls every DynamicPSConv2d layer's share of large-rate
    kernels towards `large_fraction_target` (ops.dynamic_psconv.large_fraction_penalty, outside autocast).
    """

    def __init__(
        self,
        runtime: Runtime,
        loss_fn: nn.Module,
        mixup: Mixup | None,
        *,
        large_fraction_target: float = 0.5,
        large_fraction_weight: float = 0.0,
    ) -> None:
        self.runtime, self.loss_fn, self.mixup = runtime, loss_fn, mixup
        self.large_fraction_target, self.large_fraction_weight = large_fraction_target, large_fraction_weight

    def __call__(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        images, targets = batch
        images = images.to(self.runtime.device, non_blocking=True)
        if self.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(self.runtime.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.runtime.autocast():
            loss = self.loss_fn(model(images), targets)
        if self.large_fraction_weight > 0:
            penalty = large_fraction_penalty(model, self.large_fraction_target)
            loss = loss + self.large_fraction_weight * penalty
        return loss, images.shape[0]


@torch.no_grad()
def classification_metrics(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    runtime: Runtime,
    *,
    expected_total: int | None = None,
    limit_batches: int | None = None,
    desc: str = "val",
) -> dict[str, float]:
    """Exact accuracy over a sharded loader: per-rank sums of hits and counts, all-reduced once.

    Targets of -1 mark unreadable files: they are skipped and counted. Without `limit_batches`, the count
    plus the bad files must equal `expected_total` (the data set size): every sample seen exactly once.
    Returns top1, top5 (percent; top-k with k = min(5, classes)), loss, num_samples, bad_files.
    """
    model.eval()
    device = runtime.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # hits@1, hits@5, count, loss, bad
    for images, targets in eval_batches(loader, runtime, limit_batches, desc):
        images = images.to(device, non_blocking=True)
        if runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        valid = targets >= 0
        with runtime.autocast():
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
    hits1, hits5, count, loss, bad = runtime.all_reduce_sum(sums).tolist()
    if limit_batches is None and expected_total is not None and int(count + bad) != expected_total:
        raise DataError(
            f"Evaluation saw {int(count)} samples and {int(bad)} bad files, but the validation set has "
            f"{expected_total}: the validation loader drops or duplicates samples across ranks. It must "
            "shard exactly (each sample on one rank, no padding); see polyscale.data.build_val_loader."
        )
    if count == 0:
        raise DataError(
            "The validation set yielded no readable samples: check data.root and data.on_bad_file."
        )
    return {
        "top1": 100.0 * hits1 / count,
        "top5": 100.0 * hits5 / count,
        "loss": loss / count,
        "num_samples": int(count),
        "bad_files": int(bad),
    }


class ClassificationTask(Task):
    name = "classification"
    data_schema = DataConfig
    best_metric = "top1"
    result_keys = ("top1", "top5")
    _built: weakref.ref[nn.Module] | None = None  # the network build_model made last (train_record reads it)

    def check(self, cfg: Any) -> None:
        """Build the model on the meta device (no memory, no weight init), so that an unknown model or conv
        name or a bad conv option fails in a second, before the data set is loaded."""
        kwargs = model_arguments(cfg.model, cfg.data.num_classes or 1000)
        with config_keys(MODEL_KEYS), torch.device("meta"):
            model = create_model(**{**kwargs, "checkpoint_path": None})
        target, weight = _large_fraction_settings(cfg)
        if weight < 0 or not 0 <= target <= 1:
            raise ConfigError(
                f"model.conv.large_fraction_weight={weight} must be >= 0 and "
                f"model.conv.large_fraction_target={target} in [0, 1] (the share of large-rate kernels "
                "that the regulariser pulls towards)."
            )
        if weight > 0 and not any(isinstance(m, DynamicPSConv2d) for m in model.modules()):
            raise ConfigError(
                f"model.conv.large_fraction_weight={weight} regularises dynamic PSConv masks, but "
                f"model={cfg.model.name} with model/conv={cfg.model.conv.name} has none: use "
                "model/conv=dynamic_psconv or model.conv.large_fraction_weight=0."
            )

    def build_data(self, cfg: Any, runtime: Runtime, micro_batch: int) -> DataBundle:
        """Train and validation sets and their per-rank loaders (train: seeded, resumable; val: exact)."""
        loaders = (build_train_loader, build_val_loader)
        train_set, val_set, train_loader, val_loader = args_of.build_split_loaders(
            cfg, runtime, micro_batch, data_arguments(cfg.data), build_dataset, loaders
        )
        return DataBundle(train_set, val_set, train_loader, val_loader, int(train_set.num_classes))

    def build_model(self, cfg: Any, num_classes: int, runtime: Runtime) -> nn.Module:
        """The registered network of `cfg.model`, with the data set's class count by default."""
        if cfg.model.num_classes is not None and cfg.model.num_classes < num_classes:
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes} is smaller than the data set's {num_classes} "
                "classes. Leave model.num_classes=null to use the data set's count."
            )
        with config_keys(MODEL_KEYS):
            model = create_model(**model_arguments(cfg.model, num_classes)).to(runtime.device)
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._built = weakref.ref(model)  # for train_record (the engine builds the model, then the loss)
        return model

    def batch_loss(
        self, cfg: Any, data: DataBundle, runtime: Runtime, micro_batch: int
    ) -> ClassificationLoss:
        """Cross-entropy with label smoothing, or timm's Mixup/CutMix with its soft-target cross-entropy."""
        tcfg = cfg.trainer
        target, weight = _large_fraction_settings(cfg)
        regulariser = {"large_fraction_target": target, "large_fraction_weight": weight}
        if tcfg.mixup_alpha <= 0 and tcfg.cutmix_alpha <= 0:
            return ClassificationLoss(
                runtime, nn.CrossEntropyLoss(label_smoothing=tcfg.label_smoothing), None, **regulariser
            )
        if micro_batch % 2:
            raise ConfigError(
                "Mixup/CutMix pairs samples within a batch and needs an even per-rank micro-batch "
                f"(got {micro_batch}). Change data.batch_size, the number of ranks or trainer.accum_steps."
            )
        # timm draws lambda and the mixing mode from numpy's global RNG, which the checkpoint saves per rank.
        mixup = Mixup(
            mixup_alpha=tcfg.mixup_alpha,
            cutmix_alpha=tcfg.cutmix_alpha,
            prob=tcfg.mix_prob,
            label_smoothing=tcfg.label_smoothing,
            num_classes=data.num_classes,
        )
        return ClassificationLoss(runtime, SoftTargetCrossEntropy(), mixup, **regulariser)

    evaluate = staticmethod(classification_metrics)

    def train_record(self, batch_loss: Any) -> dict[str, float]:
        """`large_fraction`: the mean share of large-rate kernels over the network's DynamicPSConv2d layers
        at the epoch's end (the masks validation uses); nothing for networks without such layers."""
        model = self._built() if self._built is not None else None
        fraction = mean_large_fraction(model) if model is not None else None
        return {} if fraction is None else {"large_fraction": fraction}

    def record(self, metrics: dict[str, float], prefix: str) -> dict[str, float]:
        names = {"top1": "top1", "top5": "top5", "loss": "loss", "num_samples": "samples"}
        return {f"{prefix}_{names[k]}": v for k, v in metrics.items() if k in names}

    def summary(self, record: dict[str, Any]) -> str:
        line = ""
        if "val_top1" in record:
            line += f"  val top-1 {record['val_top1']:.2f}%  top-5 {record['val_top5']:.2f}%"
            line += f"  ({record['val_samples']} samples)"
        if "ema_top1" in record:
            line += f"  ema top-1 {record['ema_top1']:.2f}%"
        if "large_fraction" in record:
            line += f"  large-rate share {record['large_fraction']:.3f}"
        return line

    def evaluate_checkpoint(self, ckpt: Checkpoint, cfg: Any, eval_cfg: Any, runtime: Runtime) -> list[dict]:
        """Top-1 / top-5 at every eval.crop_sizes (default: data.image_size), one row each; when a crop
        differs from the checkpoint's training crop, the row and the log say so."""
        trained_crop = ((ckpt.trained or {}).get("data") or {}).get("image_size")
        model = None
        rows = []
        for crop in list(eval_cfg.crop_sizes) or [None]:  # None: the data config's image_size
            with config_keys("data."):
                dataset = build_dataset("val", crop_size=crop, **data_arguments(cfg.data))
            model = model or ckpt.load_model(int(dataset.num_classes))
            size = crop if crop is not None else cfg.data.image_size
            if trained_crop is not None and size != trained_crop and runtime.rank == 0:
                log.warning(
                    "Evaluating at %d px crops; the network was trained on %d px crops (data.image_size of "
                    "the checkpoint). Accuracy at another resolution is a different measurement.",
                    size,
                    trained_crop,
                )
            m = self.evaluate(
                model,
                args_of.val_loader(build_val_loader, dataset, cfg.data, runtime),
                runtime,
                expected_total=len(dataset),
                limit_batches=cfg.trainer.limit_val_batches,
                desc=f"eval {size}px",
            )
            row = {"crop_size": size, "top1": m["top1"], "top5": m["top5"], "num_samples": m["num_samples"]}
            row.update(bad_files=m["bad_files"], train_crop_size=trained_crop)
            rows.append(row)
            if runtime.rank == 0:
                note = f" (trained at {trained_crop} px)" if trained_crop not in (None, size) else ""
                print(
                    f"crop {size}{note}: top-1 {m['top1']:.2f}% (error {100 - m['top1']:.2f}%)  top-5 "
                    f"{m['top5']:.2f}% (error {100 - m['top5']:.2f}%)  {m['num_samples']} samples, "
                    f"{m['bad_files']} bad files",
                    flush=True,
                )
        return rows


TASK = ClassificationTask()
