"""COCO-format sets for the detection data tests, generated: small JPEGs and an annotation json, with the
masks and boxes that were drawn, to compare items against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [(3, "three"), (5, "five"), (7, "seven"), (9, "nine")]  # 9 is used by no annotation
LABEL_OF = {3: 1, 5: 2, 7: 3, 9: 4}


def smooth_jpeg(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    up = np.kron(coarse, np.ones((8, 8, 1), np.float32))[:height, :width]
    Image.fromarray(up.astype(np.uint8)).save(path, quality=95)


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of 0s."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def ellipse(height: int, width: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    ys, xs = np.mgrid[:height, :width] + 0.5
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).astype(np.uint8)


def rect(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def tight_xyxy(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def write_coco_set(root: Path) -> dict[int, list[dict[str, Any]]]:
    """root/images/*.jpg + root/ann.json; returns, per image id, the objects a target must hold
    (category, xyxy box, mask) in annotation order.

    Images (id: width x height): 10: 64x48 polygon + uncompressed-RLE objects; 20: 40x56 compressed RLE +
    a crowd region; 30: 48x48 no annotations; 40: 56x40 a zero-width box, a box wholly right of the image
    (degenerate after clipping), a box reaching past the bottom edge (clipped); 50: corrupt file; 60:
    missing file; 70: 48x32 a crowd region only.
    """
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    sizes = {10: (64, 48), 20: (40, 56), 30: (48, 48), 40: (56, 40), 50: (32, 32), 60: (32, 32), 70: (48, 32)}
    for k, (image_id, (w, h)) in enumerate(sizes.items()):
        if image_id not in (50, 60):
            smooth_jpeg(images_dir / f"{image_id:04d}.jpg", w, h, seed=k)
    (images_dir / "0050.jpg").write_bytes(b"not a jpeg at all" * 10)

    expected: dict[int, list[dict[str, Any]]] = {i: [] for i in sizes}
    anns: list[dict[str, Any]] = []

    def add(
        image_id: int,
        cat: int,
        bbox: list[float],
        seg: Any,
        *,
        crowd: int = 0,
        keep: bool = True,
        mask: np.ndarray | None = None,
        xyxy: list[float] | None = None,
    ) -> None:
        anns.append(
            {
                "id": 100 + len(anns),
                "image_id": image_id,
                "category_id": cat,
                "bbox": bbox,
                "area": float(bbox[2] * bbox[3]),
                "iscrowd": crowd,
                "segmentation": seg,
            }
        )
        if keep:
            box = xyxy or [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]
            expected[image_id].append({"category": cat, "box": box, "mask": mask})

    # 10: polygon rectangle (pycocotools fills [x0, x1) x [y0, y1) for these corners) + uncompressed RLE
    poly = rect(48, 64, 4, 6, 20, 18)
    add(10, 7, [4, 6, 16, 12], [[4, 6, 20, 6, 20, 18, 4, 18]], mask=poly)
    blob = ellipse(48, 64, 40, 30, 12, 9)
    x0, y0, x1, y1 = tight_xyxy(blob)
    add(10, 3, [x0, y0, x1 - x0, y1 - y0], uncompressed_rle(blob), mask=blob)
    # 20: compressed RLE + a crowd region (uncompressed RLE, as COCO stores crowds)
    disc = ellipse(56, 40, 20, 20, 10, 10)
    x0, y0, x1, y1 = tight_xyxy(disc)
    add(20, 7, [x0, y0, x1 - x0, y1 - y0], compressed_rle(disc), mask=disc)
    crowd = rect(56, 40, 0, 40, 40, 56)
    add(20, 3, [0, 40, 40, 16], uncompressed_rle(crowd), crowd=1, keep=False)
    # 40: degenerate (zero width), outside the image, clipped at the bottom
    add(40, 3, [10, 10, 0, 5], [[10, 10, 11, 10, 11, 15]], keep=False)
    add(40, 3, [60, 5, 8, 8], [[60, 5, 68, 5, 68, 13]], keep=False)
    clipped = rect(40, 56, 30, 30, 50, 40)
    add(40, 5, [30, 30, 20, 15], [[30, 30, 50, 30, 50, 45, 30, 45]], mask=clipped, xyxy=[30, 30, 50, 40])
    # 50 / 60: bad files with an object each; 70: crowd only
    add(50, 5, [2, 2, 10, 10], [[2, 2, 12, 2, 12, 12, 2, 12]], mask=rect(32, 32, 2, 2, 12, 12))
    add(60, 5, [2, 2, 10, 10], [[2, 2, 12, 2, 12, 12, 2, 12]], mask=rect(32, 32, 2, 2, 12, 12))
    add(70, 3, [0, 0, 48, 16], uncompressed_rle(rect(32, 48, 0, 0, 48, 16)), crowd=1, keep=False)

    data = {
        "info": {"description": "polyscale test set"},
        # listed out of id order: the data set indexes images by id
        "images": [
            {"id": i, "file_name": f"{i:04d}.jpg", "width": w, "height": h}
            for i, (w, h) in sorted(sizes.items(), key=lambda kv: -kv[0])
        ],
        "annotations": anns,
        "categories": [{"id": c, "name": n, "supercategory": "x"} for c, n in CATEGORIES],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return expected


def write_oriented_set(root: Path, orientations: str) -> Path:
    """A clean COCO set with one image per letter of `orientations` (L: 24x16, P: 16x24, S: 20x20) and
    one box each (category 1); image id = position + 1. Returns the annotation file."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    shape = {"L": (24, 16), "P": (16, 24), "S": (20, 20)}
    images, anns = [], []
    for i, o in enumerate(orientations):
        w, h = shape[o]
        smooth_jpeg(images_dir / f"{i}.jpg", w, h, seed=i)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": w, "height": h})
        anns.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [1, 2, 8, 6],
                "area": 48.0,
                "iscrowd": 0,
                "segmentation": [[1, 2, 9, 2, 9, 8, 1, 8]],
            }
        )
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"
