"""What every detection data set shares: the target format, the horizontal flip, the COCO index, collate.

An item is `(image, target)`: image float32 (3, H, W) in [0, 1] at its stored size (torchvision's
detectors normalise and resize in their own transform), target a dict with "boxes" float32 (N, 4) xyxy
in pixels, "labels" int64 (N,) in 1..K (0 is the background), "image_id" (the COCO image id, an int),
"area" float32 (N,) and "iscrowd" int64 (N,), plus "masks" uint8 (N, H, W) when masks are asked for.
A pixel (i, j) covers [j, j+1) x [i, i+1), so a mask's tight box is (min col, min row, max col + 1,
max row + 1), as pycocotools' `toBbox` measures it.

pycocotools is imported on first use, so `polyscale.data` imports (and classification runs) without it.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torch import Tensor

from polyscale.errors import ConfigError

__all__ = [
    "BAD_IMAGE_ID",
    "coco_index",
    "collate_detection",
    "empty_target",
    "hflip_item",
    "make_target",
    "mask_boxes",
    "orientation_groups",
    "pycocotools_module",
]

# Evaluation placeholder of an unreadable image: its target's image_id. The evaluator skips and counts
# such items (as classification's target -1) and leaves their image out of the COCO evaluation.
BAD_IMAGE_ID = -1


def pycocotools_module(name: str) -> Any:
    """`pycocotools.NAME`, or a ConfigError saying how to install it."""
    try:
        return __import__(f"pycocotools.{name}", fromlist=[name])
    except ImportError as exc:
        raise ConfigError(
            "The detection data sets read and evaluate COCO annotations with pycocotools, which is not "
            "installed; install it (pip install pycocotools)."
        ) from exc


def coco_index(dataset: dict[str, Any]) -> Any:
    """A pycocotools `COCO` over an annotation dict already in memory (no file, no pickle)."""
    coco = pycocotools_module("coco").COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def make_target(
    image_id: int,
    boxes: Tensor,
    labels: Tensor,
    area: Tensor,
    masks: Tensor | None = None,
) -> dict[str, Any]:
    """The target dict of one image; crowd regions never reach it, so "iscrowd" is all zeros (kept for
    code written against torchvision's references, which reads it)."""
    target: dict[str, Any] = {
        "boxes": boxes.to(torch.float32).reshape(-1, 4),  # (N, 4) xyxy
        "labels": labels.to(torch.int64),  # (N,)
        "image_id": int(image_id),
        "area": area.to(torch.float32),  # (N,)
        "iscrowd": torch.zeros(len(labels), dtype=torch.int64),  # (N,)
    }
    if masks is not None:
        target["masks"] = masks.to(torch.uint8)  # (N, H, W)
    return target


def empty_target(image_id: int, height: int, width: int, with_masks: bool) -> dict[str, Any]:
    """A target without objects (an image of background only, or an evaluation placeholder)."""
    masks = torch.zeros(0, height, width, dtype=torch.uint8) if with_masks else None
    none = torch.zeros(0)
    return make_target(image_id, torch.zeros(0, 4), none.long(), none, masks)


def hflip_item(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Mirror the image left-right and its boxes and masks with it (new tensors; inputs unchanged)."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes of binary masks (N, H, W) -> float32 (N, 4); every mask must be non-empty."""
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
    h, w = masks.shape[1:]
    first = lambda m: m.float().argmax(1)  # index of the first True
    last = lambda m, n: n - m.flip(1).float().argmax(1)  # one past the last True
    return torch.stack([first(cols), first(rows), last(cols, w), last(rows, h)], 1).float()


def orientation_groups(sizes: Tensor) -> Tensor:
    """Aspect-ratio group per image from (N, 2) (height, width): 0 when width >= height, else 1."""
    return (sizes[:, 1] < sizes[:, 0]).long()


Target = dict[str, Any]


def collate_detection(items: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """(list of images, list of targets): detection images differ in size, so nothing is stacked."""
    return [image for image, _ in items], [target for _, target in items]
