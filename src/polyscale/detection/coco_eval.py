"""COCO evaluation of detector outputs: pycocotools' official AP for boxes and masks, over several ranks.

Usage, per rank: `update(outputs, image_ids)` for every validation batch, then `gather(all_gather_object)`
(one collective: every rank receives every rank's results), then `compute()`, which returns the same
metrics on every rank. Only the images seen are evaluated, so a partial pass (limit_val_batches) scores
what it saw instead of counting the unseen images' objects as missed.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from polyscale.errors import ConfigError, DataError

__all__ = ["IOU_TYPES", "METRIC_NAMES", "CocoEvaluator", "contiguous_category_map"]

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats[:6], in its order: AP over IoU .50:.05:.95, at .50, at .75, small / medium / large objects.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def contiguous_category_map(coco_gt: COCO) -> dict[int, int]:
    """Labels 1..K for the ground truth's categories in id order -> COCO category id (COCO: 80 of 1..90)."""
    return {label: cat for label, cat in enumerate(sorted(coco_gt.getCatIds()), start=1)}


@dataclass
class _ImageResult:
    """One image's detections in COCO units: compact while gathered, expanded to dicts only to score."""

    image_id: int
    boxes: np.ndarray  # (n, 4) float64, xywh in the original image's pixels
    scores: np.ndarray  # (n,)
    category_ids: np.ndarray  # (n,) int64
    rles: list[dict[str, Any]] | None  # n compressed RLEs (counts as str) when masks are evaluated


class CocoEvaluator:
    """Accumulates one rank's detections and scores all ranks' with COCOeval.

    Args:
        coco_gt: the ground truth (pycocotools COCO of the validation annotations).
        label_to_category: detector label -> COCO category id: a mapping, or a sequence of K ids for labels
            1..K (label l -> sequence[l - 1]; `contiguous_category_map` builds COCO's).
        iou_types: "bbox" and/or "segm" (segm needs the "masks" of Mask R-CNN's outputs).
        verbose: print pycocotools' own tables; otherwise they are kept in `summary_text`.
    """

    def __init__(
        self,
        coco_gt: COCO,
        label_to_category: Mapping[int, int] | Sequence[int],
        iou_types: Sequence[str] = ("bbox",),
        *,
        verbose: bool = False,
    ) -> None:
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ConfigError(f"`iou_types`={list(iou_types)}: use one or both of {', '.join(IOU_TYPES)}.")
        if not isinstance(label_to_category, Mapping):
            label_to_category = dict(enumerate(label_to_category, start=1))
        unknown = sorted(set(label_to_category.values()) - set(coco_gt.getCatIds()))
        if unknown:
            raise ConfigError(
                f"`label_to_category` maps to category ids {unknown} that the ground truth does not have."
            )
        self.coco_gt = coco_gt
        self.label_to_category = {int(k): int(v) for k, v in label_to_category.items()}
        self.iou_types = tuple(iou_types)
        self.verbose = verbose
        self.summary_text: dict[str, str] = {}
        self._results: list[_ImageResult] = []

    def reset(self) -> None:
        """Forget the results: ready for the next validation pass."""
        self._results = []

    def update(self, outputs: Sequence[Mapping[str, Tensor]], image_ids: Sequence[int] | Tensor) -> None:
        """Add one batch: the detector's eval outputs (boxes xyxy in original pixels, scores, labels, and
        masks (N, 1, H, W) probabilities for "segm") and the COCO ids of the same images."""
        ids = image_ids.tolist() if isinstance(image_ids, Tensor) else list(image_ids)
        if len(ids) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs for {len(ids)} image ids")
        for image_id, out in zip(ids, outputs):
            boxes = out["boxes"].detach().float().cpu().numpy().astype(np.float64)  # (n, 4) xyxy
            boxes[:, 2:] -= boxes[:, :2]  # -> xywh
            labels = out["labels"].detach().cpu().tolist()
            try:
                cats = np.array([self.label_to_category[label] for label in labels], dtype=np.int64)
            except KeyError as err:
                raise ConfigError(
                    f"The detector returned label {err.args[0]}, which `label_to_category` does not map; "
                    "map every label 1..num_classes to a COCO category id."
                ) from None
            rles = None
            if "segm" in self.iou_types:
                if "masks" not in out:
                    raise ConfigError(
                        "`iou_types` includes segm but the outputs have no masks (use mask_rcnn)."
                    )
                rles = self._encode_masks(out["masks"])
            scores = out["scores"].detach().float().cpu().numpy().astype(np.float64)
            self._results.append(_ImageResult(int(image_id), boxes, scores, cats, rles))

    @staticmethod
    def _encode_masks(masks: Tensor) -> list[dict[str, Any]]:
        """(N, 1, H, W) (Mask R-CNN's) or (N, H, W) probabilities -> N compressed RLEs of mask > 0.5."""
        probs = masks.detach()
        probs = probs[:, 0] if probs.dim() == 4 else probs
        binary = (probs > 0.5).cpu().numpy().astype(np.uint8)  # (N, H, W)
        if len(binary) == 0:
            return []
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # wants (H, W, N), Fortran
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # str pickles and serialises as JSON
        return rles

    def gather(self, all_gather_object: Callable[[Any], list[Any]]) -> None:
        """Replace this rank's results by all ranks' (in rank order); a collective every rank must call.

        `all_gather_object(obj)` returns every rank's `obj` (polyscale.engine.distributed has one; a
        single process may pass `lambda obj: [obj]` or skip this step).
        """
        parts = all_gather_object(self._results)
        self._results = [r for part in parts for r in part]

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images added (after `gather`: by all ranks), in the order they came."""
        return [r.image_id for r in self._results]

    def compute(self, expected_images: int | None = None) -> dict[str, float]:
        """COCO metrics in percent (`bbox_AP`, `bbox_AP50`, ..., `segm_APl`) and `num_images`.

        Evaluates the images added so far (call `gather` first when distributed). With `expected_images`
        (the validation set's size on a full pass) the count must match: every image scored exactly once.
        A metric pycocotools leaves undefined (no ground-truth object of that size among the evaluated
        images) is -1, as pycocotools prints it.
        """
        ids = self.image_ids
        if len(set(ids)) != len(ids):
            dup = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
            raise DataError(
                f"Evaluation saw images {dup} more than once: the validation loader duplicates samples "
                "across ranks (padding sampler?). It must shard exactly (each image on one rank)."
            )
        if expected_images is not None and len(ids) != expected_images:
            raise DataError(
                f"Evaluation saw {len(ids)} images, but the validation set has {expected_images}: the "
                "validation loader drops or duplicates images across ranks. It must shard exactly (each "
                "image on one rank, no padding)."
            )
        if not ids:
            raise DataError("Evaluation saw no images: the validation loader yielded nothing.")
        missing = sorted(set(ids) - set(self.coco_gt.getImgIds()))
        if missing:
            raise DataError(
                f"Image ids {missing[:5]} are not in the ground-truth annotations: the data set and the "
                "annotation file do not belong together."
            )
        metrics: dict[str, float] = {}
        for iou_type in self.iou_types:
            stats = self._evaluate(iou_type, sorted(ids))
            for name, value in zip(METRIC_NAMES, stats):
                metrics[f"{iou_type}_{name}"] = 100.0 * value if value >= 0 else -1.0
        metrics["num_images"] = len(ids)
        return metrics

    def _evaluate(self, iou_type: str, image_ids: list[int]) -> list[float]:
        """COCOeval's evaluate / accumulate / summarize on `image_ids`, its printing kept unless verbose."""
        out = io.StringIO()
        with contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(out):
            coco_dt = self._results_as_coco(iou_type)
            evaluator = COCOeval(self.coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        self.summary_text[iou_type] = out.getvalue()
        return [float(s) for s in evaluator.stats[: len(METRIC_NAMES)]]

    def _results_as_coco(self, iou_type: str) -> COCO:
        """The results as a COCO object, as `COCO.loadRes` builds it, but also for no detections at all
        (loadRes fails on an empty list; an empty result set must score AP 0)."""
        anns: list[dict[str, Any]] = []
        for r in self._results:
            for k in range(len(r.scores)):
                ann = {
                    "image_id": r.image_id,
                    "category_id": int(r.category_ids[k]),
                    "score": float(r.scores[k]),
                }
                if iou_type == "bbox":
                    ann["bbox"] = r.boxes[k].tolist()
                    ann["area"] = float(r.boxes[k, 2] * r.boxes[k, 3])
                else:
                    assert r.rles is not None
                    ann["segmentation"] = r.rles[k]
                    ann["area"] = float(mask_util.area(r.rles[k]))
                    ann["bbox"] = mask_util.toBbox(r.rles[k]).tolist()
                ann["id"] = len(anns) + 1  # COCOeval matches by id; 0 is not a valid one
                ann["iscrowd"] = 0
                anns.append(ann)
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": list(self.coco_gt.dataset["images"]),
            "categories": list(self.coco_gt.dataset["categories"]),
            "annotations": anns,
        }
        coco_dt.createIndex()
        return coco_dt
