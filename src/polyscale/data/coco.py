"""COCO-format detection sets: COCO 2017, or a user's own set in the same json format.

The annotation file is read with `json` (never pickle) and checked before training (coco_json.py): a
missing file or image folder, a file that is not COCO json, annotations naming categories or images the
file does not list each raise a one-paragraph `DataError`. Category ids become contiguous labels 1..K in
id order (0 is the background, torchvision's convention); `label_to_category` maps them back for
evaluation. Per-object data lives in flat numpy arrays (boxes, labels, areas, json-encoded segments), so
forked workers share it instead of copying Python objects page by page; the pycocotools index (`coco`)
is built at construction for evaluation and on first use for training.

Objects: crowd regions (iscrowd=1) are left out of every item's target (as torchvision's references
do) but stay in `coco`, the ground truth that COCOeval reads, where they mark regions in which
detections are neither right nor wrong. Boxes (xywh in the file) become xyxy, clipped to the image;
zero or negative width or height before or after clipping is a degenerate box: dropped from the
targets, counted in `degenerate_boxes`. Evaluation keeps every image. Training keeps images without
annotations as negatives (a user's set often holds background images on purpose, to cut false
positives, and the detectors take empty targets) but leaves out images whose annotations are all crowd
regions or degenerate boxes: something is there that the targets cannot describe, and training on the
image as background would teach the detector to miss it.

Unreadable images (missing, corrupt, truncated, or a size other than the file states) are logged once,
marked in `bad_file_mask` (shared memory, as for the classification sets) and replaced in training by
the next readable image of the same orientation (deterministic; the aspect-ratio groups stay pure). In
evaluation they yield a zero image whose target has image_id -1 (`BAD_IMAGE_ID`) and no objects; the
evaluator skips and counts those. `on_bad_file="error"` raises `DataError` instead.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polyscale.data.coco_json import (
    bboxes,
    categories,
    check_references,
    check_segmentations,
    clip_boxes,
    coco_paths,
    column,
    complete_annotations,
    ground_truth,
    listing,
    pack_segmentations,
    read_coco_json,
)
from polyscale.data.decode import open_rgb, pil_to_chw
from polyscale.data.detection_options import DetectionDataOptions
from polyscale.data.detection_targets import (
    BAD_IMAGE_ID,
    coco_index,
    empty_target,
    hflip_item,
    make_target,
    orientation_groups,
    pycocotools_module,
)
from polyscale.data.folder import ImageFiles
from polyscale.errors import DataError

__all__ = ["CocoDetection", "coco_paths"]

log = logging.getLogger(__name__)

_PROBE = 20  # images checked on disk at construction: none found means a wrong image folder


class CocoDetection(ImageFiles, Dataset):
    """Items (float32 image (3, H, W) in [0, 1], target dict); see the module doc and detection_targets."""

    SKIPPED = "skipped (image_id -1)"

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        *,
        train: bool,
        with_masks: bool = False,
        hflip: bool = False,
        on_bad_file: str = "skip",
        num_classes: int | None = None,
        options: DetectionDataOptions | None = None,
    ) -> None:
        self.root, ann_path = str(image_dir), Path(ann_file)
        self.train, self.with_masks, self.hflip, self.on_bad_file = train, with_masks, hflip, on_bad_file
        self.options = options
        data = read_coco_json(ann_path)
        images, anns, cats = data["images"], data["annotations"], data["categories"]
        cat_ids, names = categories(cats, ann_path)
        self.num_classes = len(cat_ids)
        if num_classes is not None and num_classes != self.num_classes:
            raise DataError(
                f"{ann_path} lists {self.num_classes} categories but `num_classes`={num_classes}; "
                f"set `num_classes`={self.num_classes} (or None)."
            )
        self.classes = names  # classes[label - 1] is the name of label
        self.label_to_category = {label: int(c) for label, c in enumerate(cat_ids, start=1)}
        self.category_to_label = {c: label for label, c in self.label_to_category.items()}

        image_id, width, height = column(images, ("id", "width", "height"), ann_path, "images")
        if len(set(image_id.tolist())) != len(images):
            raise DataError(f"{ann_path} lists some image id more than once in 'images'; ids must be unique.")
        order = np.argsort(image_id, kind="stable")  # images in id order: a deterministic index
        file_names = [images[i].get("file_name") for i in order]
        if not all(isinstance(f, str) for f in file_names):
            raise DataError(f"{ann_path}: every entry of 'images' needs a 'file_name' (its path).")
        all_ids, all_h, all_w = image_id[order].astype(np.int64), height[order], width[order]

        ann_image, ann_cat = column(anns, ("image_id", "category_id"), ann_path, "annotations")
        boxes = bboxes(anns, ann_path)  # (M, 4) xywh
        check_references(ann_image, ann_cat, all_ids, cat_ids, ann_path)
        complete_annotations(anns, boxes, ann_path)
        pos = np.searchsorted(all_ids, ann_image.astype(np.int64))  # image position of each annotation
        crowd = np.array([bool(a["iscrowd"]) for a in anns], dtype=bool)
        xyxy, valid = clip_boxes(boxes, all_w[pos], all_h[pos])
        self.degenerate_boxes = int((~crowd & ~valid).sum())

        # Flat per-object arrays sorted by image, with offsets: forked workers read numpy buffers instead
        # of touching (and so copying) the refcounts of a million Python objects.
        idx = np.flatnonzero(~crowd & valid)
        idx = idx[np.argsort(pos[idx], kind="stable")]
        self._boxes = xyxy[idx].astype(np.float32)  # (M', 4) xyxy
        self._labels = np.array([self.category_to_label[int(c)] for c in ann_cat[idx]], dtype=np.int64)
        self._area = np.array([anns[i]["area"] for i in idx.tolist()], dtype=np.float32).reshape(-1)
        self._offsets = np.concatenate([[0], np.cumsum(np.bincount(pos[idx], minlength=len(all_ids)))])
        if with_masks:
            check_segmentations(anns, idx, pos, all_h, all_w, ann_path)
            self._segments, self._segment_offsets = pack_segmentations([anns[i] for i in idx.tolist()])

        if train:  # negatives yes; images holding only crowd regions or degenerate boxes no (module doc)
            has_any = np.bincount(pos, minlength=len(all_ids)) > 0
            select = np.flatnonzero(~has_any | (np.diff(self._offsets) > 0))
        else:
            select = np.arange(len(all_ids))
        self._positions = select
        self.image_ids = all_ids[select]  # (N,) COCO image id of each item
        self.image_sizes = torch.from_numpy(np.stack([all_h[select], all_w[select]], 1).astype(np.int64))
        self._groups = orientation_groups(self.image_sizes)
        self._files = np.array([os.fsencode(file_names[p]) for p in select])  # one bytes array, no list
        self._ann_path = ann_path
        # The evaluation ground truth (all images, crowd regions included): indexed now for evaluation,
        # on first use for training, whose loaders never need it (COCO train's index holds ~2 GB of
        # Python objects that every forked worker would slowly copy).
        self._coco = None if train else coco_index(data)
        self.bad_file_mask = torch.zeros(len(select), dtype=torch.uint8).share_memory_()
        self._check_images_present(ann_path)
        log.info(
            "COCO %s: %d images (%d left out of training), %d objects, %d crowd regions, %d degenerate "
            "boxes dropped, %d classes",
            ann_path,
            len(select),
            len(all_ids) - len(select),
            len(idx),
            int(crowd.sum()),
            self.degenerate_boxes,
            self.num_classes,
        )
        if self.degenerate_boxes:
            log.warning(
                "%s: dropped %d degenerate box(es) (zero or negative width or height, or outside the image "
                "after clipping)",
                ann_path,
                self.degenerate_boxes,
            )

    def _check_images_present(self, ann_path: Path) -> None:
        """A folder holding none of the first images listed is the wrong folder, not a few bad files."""
        probe = range(min(len(self), _PROBE))
        if len(probe) and not any(os.path.exists(self.path(i)) for i in probe):
            raise DataError(
                f"The image folder {self.root} holds none of the first {len(probe)} images that {ann_path} "
                f"lists (e.g. {os.fsdecode(self._files[0])}); it holds: {listing(Path(self.root))}. Point "
                f"`{'train' if self.train else 'val'}_images` at the folder the annotation file describes."
            )

    # -- items ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._positions)

    def _candidates(self, index: int) -> Iterator[int]:
        """Training: `index`, then the following images of its orientation, then any (cyclic)."""
        n, group = len(self), self._groups[index]
        order = lambda: ((index + k) % n for k in range(n))
        same = (j for j in order() if self._groups[j] == group)
        return itertools.chain(same, (j for j in order() if self._groups[j] != group))

    def _load(self, index: int) -> Tensor:
        img = open_rgb(self.path(index))
        height, width = self.image_sizes[index].tolist()
        if img.size != (width, height):
            raise ValueError(f"decoded size {img.width}x{img.height}, the annotations say {width}x{height}")
        return pil_to_chw(img).contiguous().float().div_(255.0)  # (3, H, W)

    def _masks(self, start: int, end: int, height: int, width: int) -> Tensor:
        mask_utils = pycocotools_module("mask")
        masks = np.zeros((end - start, height, width), dtype=np.uint8)
        for k in range(end - start):
            a, b = self._segment_offsets[start + k], self._segment_offsets[start + k + 1]
            seg = json.loads(self._segments[a:b].tobytes())
            if isinstance(seg, list):  # polygons; fewer than 3 points cover nothing
                polygons = [p for p in seg if len(p) >= 6]
                if not polygons:
                    continue
                rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
            elif isinstance(seg["counts"], list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(seg, height, width)
            else:  # compressed RLE
                rle = seg
            masks[k] = mask_utils.decode(rle)
        return torch.from_numpy(masks)  # (N, H, W)

    def target(self, index: int) -> dict[str, Any]:
        """The target of item `index` (no image read, no flip)."""
        p = self._positions[index]
        start, end = int(self._offsets[p]), int(self._offsets[p + 1])
        height, width = self.image_sizes[index].tolist()
        if start == end:
            return empty_target(int(self.image_ids[index]), height, width, self.with_masks)
        return make_target(
            int(self.image_ids[index]),
            torch.tensor(self._boxes[start:end]),  # copies: consumers may edit targets in place
            torch.tensor(self._labels[start:end]),
            torch.tensor(self._area[start:end]),
            self._masks(start, end, height, width) if self.with_masks else None,
        )

    @property
    def coco(self) -> Any:
        """pycocotools COCO of the whole annotation file, crowd regions included (COCOeval's ground truth)."""
        if self._coco is None:
            self._coco = ground_truth(self._ann_path)
        return self._coco

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers read items, never the ground truth: do not pickle the index for each of them.
        return {**self.__dict__, "_coco": None}

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        flip = self.train and self.hflip and bool(torch.rand(()) < 0.5)  # from the sample seed (sampler.py)
        for j in self._candidates(index) if self.train else (index,):
            if self.bad_file_mask[j]:
                continue  # known bad (an earlier epoch or another worker): same outcome, no retry
            try:
                image = self._load(j)
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
                self.report_bad_file(j, exc, substitute=self.train)
                continue
            item = (image, self.target(j))
            return hflip_item(*item) if flip else item
        if not self.train:
            height, width = self.image_sizes[index].tolist()
            return torch.zeros(3, height, width), empty_target(BAD_IMAGE_ID, height, width, self.with_masks)
        raise DataError(
            f"None of the {len(self)} images under {self.root} could be read (see the warnings above); "
            f"check that the files are images and readable."
        )
