"""The built-in detection set: shapes of the built-in classification set, several per image, no download.

Each image holds 1-4 objects on a textured background (a colour, a gradient, smooth blotches and pixel
noise). An object is one of the classification set's families (`builtin.FAMILIES`: disc, ring, square,
frame, plus, triangle, then the texture patches), drawn at a random position, rotation and colour, light
on the darker background; its class is its family, never its colour. Objects do not touch (at least two
pixels apart) and lie wholly inside the image, so each mask is the family's coverage >= 0.5 and its box
the mask's tight box, both exact. Sizes are drawn log-uniformly between 1/8 and 1/2 of the image side
(16-64 pixels at the default 128), which gives COCO's small and medium buckets at 128 pixels and large
objects from about 200 pixels on (COCO's buckets are absolute areas).

The default six classes are the solid shapes: they stay recognisable at 16 pixels, where the texture
patches (stripes, checkerboard, dots, target) alias, and a small detector learns them in minutes on a CPU.

Images are generated on access from (seed, split, index) with their own `torch.Generator` (the global
RNG is untouched; the training flip comes from the sampler's per-sample seed). The ground truth of the
whole split as a pycocotools COCO (`coco`) is generated on first use, so the evaluator of COCO serves it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from polyscale.data.builtin import FAMILIES
from polyscale.data.detection_options import DetectionDataOptions
from polyscale.data.detection_targets import (
    coco_index,
    empty_target,
    hflip_item,
    make_target,
    mask_boxes,
    pycocotools_module,
)
from polyscale.errors import ConfigError

__all__ = ["DEFAULT_CLASSES", "BuiltinDetection"]

DEFAULT_CLASSES = 6  # the solid shapes (see the module doc)
MAX_OBJECTS = 4
_MIN_EXTENT = 8  # pixels: smaller shapes lose their form at any image size
# Radius of the circle around each family's shape, in units of its size parameter (builtin.py's
# definitions): a square of half side 0.8 reaches 0.8 * sqrt(2) when rotated, a frame 0.88 * sqrt(2), a
# plus of arms 1 x 0.25 reaches hypot(1, 0.25), a triangle of inradius 0.55 its circumradius 1.1, a
# texture patch of half side 1 sqrt(2).
_REACH = {
    "disc": 1.0,
    "ring": 1.0,
    "square": 0.8 * math.sqrt(2),
    "frame": 0.88 * math.sqrt(2),
    "plus": math.hypot(1.0, 0.25),
    "triangle": 1.1,
    "stripes": math.sqrt(2),
    "checkerboard": math.sqrt(2),
    "dots": math.sqrt(2),
    "target": 1.0,
}
_PLACEMENT_TRIES = 30


def _scene_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed per image, so images never repeat across splits, indices or seeds."""
    digest = hashlib.sha256(f"polyscale-builtin-detection:{seed}:{split}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _rand(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _background(g: torch.Generator, size: int) -> Tensor:
    """Dark textured background, float (3, size, size) in about [0, 0.5]."""
    base = torch.rand(3, 1, 1, generator=g) * 0.35
    ramp = (torch.arange(size) + 0.5) / size - 0.5
    tilt = torch.randn(2, generator=g) * 0.1
    gradient = tilt[0] * ramp.view(1, 1, -1) + tilt[1] * ramp.view(1, -1, 1)
    # Smooth blotches: a coarse random grid upsampled, so the background has structure at object scale
    # (a detector must separate shapes from texture, not from a flat colour).
    coarse = torch.rand(1, 3, 6, 6, generator=g) - 0.5
    blotches = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0] * 0.16
    return base + gradient + blotches


def _place(g: torch.Generator, size: int, reach: float, placed: list[tuple[float, float, float]]) -> Any:
    """A centre for a shape whose circle has radius `reach`, inside the image and two pixels from every
    placed circle; None when no try fits."""
    for _ in range(_PLACEMENT_TRIES):
        cx, cy = _rand(g, reach + 1, size - reach - 1), _rand(g, reach + 1, size - reach - 1)
        if all(math.hypot(cx - x, cy - y) >= reach + r + 2 for x, y, r in placed):
            return cx, cy
    return None


def draw_scene(
    seed: int, split: str, index: int, size: int, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One image: (uint8 image (3, S, S), bool masks (N, S, S), labels int64 (N,) in 1..K)."""
    g = torch.Generator().manual_seed(_scene_seed(seed, split, index))
    image = _background(g, size)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # (S, S)
    placed: list[tuple[float, float, float]] = []
    masks, labels = [], []
    for _ in range(int(torch.randint(1, MAX_OBJECTS + 1, (), generator=g))):
        label = int(torch.randint(num_classes, (), generator=g))
        name, family = FAMILIES[label]
        extent = max(_MIN_EXTENT, size * math.exp(_rand(g, math.log(1 / 8), math.log(1 / 2))))  # diameter
        reach = extent / 2
        radius = reach / _REACH[name]  # the family's size parameter, in pixels
        angle, freq = _rand(g, 0, 2 * math.pi), _rand(g, 4.0, 7.0) * math.pi / 2
        colour = 0.55 + torch.rand(3, 1, 1, generator=g) * 0.45  # light on dark: fixed contrast sign
        centre = _place(g, size, reach + 1, placed)  # +1: the anti-aliased edge
        if centre is None:
            continue
        dx, dy = (xs - centre[0]) / radius, (ys - centre[1]) / radius
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        coverage = family(u, v, torch.tensor(freq), torch.tensor(1.0 / radius))  # (S, S) in [0, 1]
        mask = coverage >= 0.5
        if not mask.any():
            continue
        placed.append((centre[0], centre[1], reach + 1))
        image = image * (1 - coverage) + colour * coverage
        masks.append(mask)
        labels.append(label + 1)
    image = image + torch.randn(3, size, size, generator=g) * _rand(g, 0.01, 0.04)
    image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    stacked = torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)
    return image, stacked, torch.tensor(labels, dtype=torch.int64)


class BuiltinDetection(Dataset):
    """Items (float32 image (3, S, S) in [0, 1], target dict) as `CocoDetection`'s; see the module doc."""

    def __init__(
        self,
        split: str,
        *,
        num_images: int,
        image_size: int = 128,
        num_classes: int = DEFAULT_CLASSES,
        with_masks: bool = False,
        hflip: bool = False,
        seed: int = 0,
        options: DetectionDataOptions | None = None,
    ) -> None:
        if not 1 <= num_classes <= len(FAMILIES):
            raise ConfigError(
                f"The built-in detection set has {len(FAMILIES)} classes, but `num_classes`={num_classes} "
                f"was asked for. Set `num_classes` between 1 and {len(FAMILIES)} (None: {DEFAULT_CLASSES})."
            )
        if num_images < 1 or image_size < 32:
            raise ConfigError(
                f"The built-in detection set needs at least one image of at least 32x32 "
                f"(got {num_images} images of `image_size`={image_size})."
            )
        self.split, self.seed, self.size, self.num_images = split, seed, image_size, num_images
        self.train = split == "train"
        self.with_masks, self.hflip, self.options = with_masks, hflip, options
        self.num_classes = num_classes
        self.classes = [name for name, _ in FAMILIES[:num_classes]]
        self.label_to_category = {label: label for label in range(1, num_classes + 1)}
        self.image_ids = np.arange(1, num_images + 1)  # COCO-style ids from 1
        self.image_sizes = torch.full((num_images, 2), image_size, dtype=torch.int64)  # (N, 2) h, w
        self.bad_file_mask = None  # nothing is read from files
        self.degenerate_boxes = 0
        self._coco: Any = None

    def __len__(self) -> int:
        return self.num_images

    def scene(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """(uint8 image (3, S, S), bool masks (N, S, S), labels (N,)) of item `index`."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} is outside the {self.num_images} images")
        return draw_scene(self.seed, self.split, index, self.size, self.num_classes)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        flip = self.train and self.hflip and bool(torch.rand(()) < 0.5)  # from the sample seed (sampler.py)
        image, masks, labels = self.scene(index)
        image_id = int(self.image_ids[index])
        if len(labels):
            area = masks.flatten(1).sum(1)
            target = make_target(
                image_id, mask_boxes(masks), labels, area, masks if self.with_masks else None
            )
        else:
            target = empty_target(image_id, self.size, self.size, self.with_masks)
        item = (image.float().div_(255.0), target)
        return hflip_item(*item) if flip else item

    @property
    def coco(self) -> Any:
        """The ground truth of the whole split (pycocotools COCO, masks as compressed RLE); built on first
        use (it draws every image once) and kept."""
        if self._coco is None:
            self._coco = coco_index(self.coco_dict())
        return self._coco

    def coco_dict(self) -> dict[str, Any]:
        """The split's annotations in COCO's json layout (ids, xywh boxes, mask areas, RLE masks)."""
        mask_utils = pycocotools_module("mask")
        images, annotations = [], []
        for index in range(self.num_images):
            _, masks, labels = self.scene(index)
            image_id = int(self.image_ids[index])
            images.append(
                {"id": image_id, "width": self.size, "height": self.size, "file_name": f"{index}.png"}
            )
            boxes = mask_boxes(masks)
            for mask, label, (x1, y1, x2, y2) in zip(masks, labels.tolist(), boxes.tolist()):
                rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": self.label_to_category[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": float(mask.sum()),
                        "iscrowd": 0,
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    }
                )
        categories = [{"id": self.label_to_category[i + 1], "name": n} for i, n in enumerate(self.classes)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def __getstate__(self) -> dict[str, Any]:
        # Workers regenerate images and never need the ground truth: do not ship it to spawned workers.
        return {**self.__dict__, "_coco": None}
