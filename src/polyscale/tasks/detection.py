"""Object detection: torchvision's detectors over the zoo's backbones (polyscale.detection), COCO-format
data (polyscale.data's detection sets), the sum of the detector's losses, exact COCO evaluation with
pycocotools; best.pt follows the validation box AP (`task.best_metric=segm_AP` for masks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from polyscale.config import DetectionDataConfig
from polyscale.data import (
    BAD_IMAGE_ID,
    build_detection_dataset,
    build_detection_train_loader,
    build_detection_val_loader,
)
from polyscale.detection import create_detector
from polyscale.errors import ConfigError, DataError
from polyscale.models import get_model_spec
from polyscale.tasks.arguments import (
    build_split_loaders,
    config_keys,
    data_arguments,
    model_arguments,
    plain,
    val_loader,
)
from polyscale.tasks.base import Checkpoint, DataBundle, Runtime, Task, eval_batches

__all__ = ["TASK", "DetectionLoss", "DetectionTask", "detection_metrics"]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_LOSS_PREFIX = "loss_"
# create_detector's arguments that come from other sections than `detector` (kind is detector=NAME)
_DETECTOR_KEYS = {
    "kind": "detector",
    "backbone": "model",
    "conv": "model/conv",
    "backbone_checkpoint": "model.checkpoint_path",
    "min_size": "data.min_size",
    "max_size": "data.max_size",
}


def _to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device) -> tuple:
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


class _ScoredLoader:
    """The validation loader with the COCO evaluator of its data set (what `evaluate` needs)."""

    def __init__(self, loader: Any, evaluator: Any) -> None:
        self.loader, self.evaluator = loader, evaluator

    def __iter__(self) -> Any:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


class DetectionLoss:
    """(model, (images, targets)) -> (sum of the detector's losses, batch size). Each loss is also summed
    on the device (no host sync per step) for the epoch's record (`pop_means`)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._sums: dict[str, torch.Tensor] = {}
        self._batches = 0

    def __call__(self, model: nn.Module, batch: tuple[list, list]) -> tuple[torch.Tensor, int]:
        images, targets = _to_device(*batch, self.runtime.device)
        with self.runtime.autocast():
            losses = model(images, targets)  # {"classification": ..., "bbox_regression": ...} etc.
        for name, value in losses.items():
            total = self._sums.get(name)
            self._sums[name] = value.detach().float() if total is None else total + value.detach().float()
        self._batches += 1
        return sum(losses.values()), len(images)

    def pop_means(self) -> dict[str, float]:
        """Mean of each loss over the micro-batches since the last call, over all ranks."""
        if not self._sums:
            return {}
        names = sorted(self._sums)
        stacked = torch.stack([self._sums[n] for n in names] + [torch.tensor(float(self._batches))])
        totals = self.runtime.all_reduce_sum(stacked.double().to(self.runtime.device)).tolist()
        self._sums, self._batches = {}, 0
        return {f"{_LOSS_PREFIX}{n}": s / max(totals[-1], 1) for n, s in zip(names, totals)}


@torch.no_grad()
def detection_metrics(
    model: nn.Module,
    loader: Iterable[tuple[list, list]],
    runtime: Runtime,
    evaluator: Any,
    *,
    expected_total: int | None = None,
    limit_batches: int | None = None,
    desc: str = "val",
) -> dict[str, float]:
    """COCO metrics of `model` over the sharded loader: detections gathered from every rank, scored once
    with pycocotools; unreadable images (image_id -1) are skipped and counted ("bad_files")."""
    model.eval()
    evaluator.reset()
    bad = 0
    for images, targets in eval_batches(loader, runtime, limit_batches, desc):
        keep = [j for j, t in enumerate(targets) if int(t["image_id"]) != BAD_IMAGE_ID]
        bad += len(targets) - len(keep)
        if not keep:
            continue
        images = [images[j].to(runtime.device, non_blocking=True) for j in keep]
        with runtime.autocast():
            outputs = model(images)
        evaluator.update(outputs, [int(targets[j]["image_id"]) for j in keep])
    evaluator.gather(runtime.all_gather_object)
    bad = int(runtime.all_reduce_sum(torch.tensor([bad], dtype=torch.float64, device=runtime.device)).item())
    if not evaluator.image_ids:
        raise DataError("The validation set yielded no readable images: check data.root and data.val_images.")
    expected = expected_total - bad if limit_batches is None and expected_total is not None else None
    metrics = evaluator.compute(expected_images=expected)
    metrics["num_samples"] = metrics.pop("num_images")
    metrics["bad_files"] = bad
    return metrics


class DetectionTask(Task):
    name = "detection"
    data_schema = DetectionDataConfig
    best_metric = "bbox_AP"
    result_keys = tuple(f"{kind}_{m}" for kind in ("bbox", "segm") for m in METRICS)
    count_name = "num_val_images"

    def check(self, cfg: Any) -> None:
        """Unknown detector, backbone or option names fail here, before any data is read."""
        kwargs = self._detector_arguments(cfg, num_classes=1)
        with config_keys(self._keys), torch.device("meta"):
            create_detector(**{**kwargs, "backbone_checkpoint": None})

    @staticmethod
    def _keys(name: str) -> str:
        """The config key of a create_detector argument (for error messages)."""
        return _DETECTOR_KEYS.get(name, f"detector.{name}")

    def _detector_arguments(self, cfg: Any, num_classes: int) -> dict[str, Any]:
        model = model_arguments(cfg.model, num_classes)
        det = plain(cfg.detector)
        options = dict(det.pop("options") or {})
        kind = det.pop("name")
        pretrained = model["checkpoint_path"] is not None  # the papers fine-tune; from scratch all trains
        if det["trainable_stages"] is None:
            det["trainable_stages"] = 3 if pretrained else get_model_spec(model["name"]).num_stages + 1
        if det["frozen_bn"] is None:
            det["frozen_bn"] = pretrained
        return {
            "kind": kind,
            "backbone": model["name"],
            "num_classes": num_classes,
            "conv": model["conv"],
            "backbone_checkpoint": model["checkpoint_path"],
            "min_size": cfg.data.min_size,
            "max_size": cfg.data.max_size,
            **{k: v for k, v in det.items() if v is not None},
            **options,
        }

    @staticmethod
    def _data_arguments(cfg: Any) -> dict[str, Any]:
        """The data section; Mask R-CNN always gets the masks it trains on."""
        return data_arguments(cfg.data, with_masks=cfg.data.with_masks or cfg.detector.name == "mask_rcnn")

    def build_data(self, cfg: Any, runtime: Runtime, micro_batch: int) -> DataBundle:
        loaders = (build_detection_train_loader, build_detection_val_loader)
        train_set, val_set, train_loader, val_loader = build_split_loaders(
            cfg, runtime, micro_batch, self._data_arguments(cfg), build_detection_dataset, loaders
        )
        val_loader = _ScoredLoader(val_loader, self._evaluator(val_set, cfg))
        return DataBundle(train_set, val_set, train_loader, val_loader, int(train_set.num_classes))

    def build_model(self, cfg: Any, num_classes: int, runtime: Runtime) -> nn.Module:
        """The detector; a classification checkpoint in model.checkpoint_path initialises its backbone."""
        if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes} differs from the data set's {num_classes} object "
                "classes; leave model.num_classes=null for detection (the backbone has no classifier)."
            )
        with config_keys(self._keys):
            model = create_detector(**self._detector_arguments(cfg, num_classes))
        model = model.to(runtime.device)
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def batch_loss(self, cfg: Any, data: DataBundle, runtime: Runtime, micro_batch: int) -> DetectionLoss:
        return DetectionLoss(runtime)

    def _evaluator(self, dataset: Any, cfg: Any) -> Any:
        from polyscale.detection import CocoEvaluator

        iou_types = ("bbox", "segm") if cfg.detector.name == "mask_rcnn" else ("bbox",)
        return CocoEvaluator(dataset.coco, dataset.label_to_category, iou_types)

    def evaluate(self, model: nn.Module, loader: Any, runtime: Runtime, **kwargs: Any) -> dict[str, float]:
        """`loader` is build_data's validation loader, which carries its evaluator (kwargs: Task's)."""
        return detection_metrics(model, loader, runtime, loader.evaluator, **kwargs)

    def train_record(self, batch_loss: Any) -> dict[str, float]:
        return batch_loss.pop_means()

    def summary(self, record: dict[str, Any]) -> str:
        line = ""
        for prefix in ("val", "ema"):
            if f"{prefix}_bbox_AP" in record:
                ap, ap50 = record[f"{prefix}_bbox_AP"], record[f"{prefix}_bbox_AP50"]
                line += f"  {prefix} box AP {ap:.1f} AP50 {ap50:.1f}"
            if f"{prefix}_segm_AP" in record:
                line += f" mask AP {record[f'{prefix}_segm_AP']:.1f}"
        return line

    def evaluate_checkpoint(self, ckpt: Checkpoint, cfg: Any, eval_cfg: Any, runtime: Runtime) -> list[dict]:
        """One row: the COCO metrics of the validation set (eval.crop_sizes do not apply: the detector's
        transform resizes to data.min_size / data.max_size)."""
        with config_keys("data."):
            dataset = build_detection_dataset("val", **self._data_arguments(cfg))
        model = ckpt.load_model(int(dataset.num_classes))
        m = detection_metrics(
            model,
            val_loader(build_detection_val_loader, dataset, cfg.data, runtime),
            runtime,
            self._evaluator(dataset, cfg),
            expected_total=len(dataset),
            limit_batches=cfg.trainer.limit_val_batches,
            desc="eval",
        )
        row = {k: v for k, v in m.items() if k in self.result_keys}
        row.update(num_images=m["num_samples"], bad_files=m["bad_files"])
        if runtime.rank == 0:
            parts = [f"{k} {v:.1f}" for k, v in row.items() if k in self.result_keys]
            print(
                f"{'  '.join(parts)}  ({row['num_images']} images, {row['bad_files']} bad files)", flush=True
            )
        return [row]


TASK = DetectionTask()
