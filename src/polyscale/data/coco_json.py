"""Reading and checking COCO-format annotation files (json, never pickle), before any training step.

Each problem is a one-paragraph `DataError` naming the file, what it found and how to fix it: a missing
root, annotation file or image folder, a file that is not json or not COCO's layout, malformed entries,
annotations naming categories or images the file does not list, segmentations unusable as masks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from polyscale.data.detection_options import DetectionDataOptions
from polyscale.data.detection_targets import coco_index
from polyscale.errors import DataError

__all__ = [
    "bboxes",
    "categories",
    "check_references",
    "check_segmentations",
    "clip_boxes",
    "coco_paths",
    "column",
    "complete_annotations",
    "ground_truth",
    "listing",
    "pack_segmentations",
    "preview",
    "read_coco_json",
]

log = logging.getLogger(__name__)

_SHOW = 5  # how many ids / names a message lists


def preview(items: list[Any]) -> str:
    shown = ", ".join(str(x) for x in items[:_SHOW])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > _SHOW else shown


def listing(folder: Path) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError:
        return "nothing readable"
    return preview(names) or "nothing"


def coco_paths(opts: DetectionDataOptions, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of `split`: `{split}_ann` / `{split}_images` when set (relative
    ones under `root`), else COCO 2017's `root/annotations/instances_{split}2017.json` and
    `root/{split}2017/`. DataError when a root, file or folder is missing."""
    ann_key, img_key = f"{split}_ann", f"{split}_images"
    ann, images = getattr(opts, ann_key), getattr(opts, img_key)
    root = Path(opts.root).expanduser() if opts.root else None
    if root is None and (ann is None or images is None):
        raise DataError(
            f"No COCO data given: `root` is None and `{ann_key}` / `{img_key}` are not both set. Set "
            f"`root`=/path/to/coco (holding annotations/instances_{split}2017.json and {split}2017/), or "
            f"point `{ann_key}` at a COCO-format annotation file and `{img_key}` at its image folder."
        )
    if root is not None and not root.is_dir():
        raise DataError(
            f"The COCO folder {root} does not exist (or is not a folder). Expected a folder holding "
            f"annotations/instances_{split}2017.json and {split}2017/; fix `root`."
        )
    under = lambda value: root / value if root is not None and not Path(value).is_absolute() else Path(value)
    ann_path = under(Path(ann).expanduser()) if ann else root / "annotations" / f"instances_{split}2017.json"
    img_path = under(Path(images).expanduser()) if images else root / f"{split}2017"
    if not ann_path.is_file():
        parent = ann_path.parent
        if parent.is_dir():
            holds = f"{parent} holds: {listing(parent)}"
        else:
            holds = f"{parent} does not exist" + (f" ({root} holds: {listing(root)})" if root else "")
        how = f"set `{ann_key}`" if ann else f"set `{ann_key}`=/path/to/annotations.json or fix `root`"
        raise DataError(f"The {split} annotation file {ann_path} does not exist; {holds}. To fix it, {how}.")
    if not img_path.is_dir():
        holds = f"; {img_path.parent} holds: {listing(img_path.parent)}" if img_path.parent.is_dir() else ""
        how = f"set `{img_key}`" if images else f"set `{img_key}`=/path/to/images or fix `root`"
        raise DataError(
            f"The {split} image folder {img_path} does not exist (or is not a folder){holds}. "
            f"To fix it, {how}."
        )
    return ann_path, img_path


def read_coco_json(path: Path) -> dict[str, Any]:
    """The annotation dict of a COCO-format json file; DataError when it is not one."""
    expected = (
        "a COCO-format json object with the lists 'images' (id, file_name, width, height), 'annotations' "
        "(id, image_id, category_id, bbox [x, y, width, height], iscrowd, segmentation) and 'categories' "
        "(id, name)"
    )
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DataError(f"{path} is not json ({exc}); expected {expected}.") from exc
    except OSError as exc:
        raise DataError(f"Cannot read the annotation file {path} ({exc}).") from exc
    keys = ("images", "annotations", "categories")
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    wrong = [k for k in keys if k not in missing and not isinstance(data[k], list)]
    if missing or wrong:
        what = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(wrong)} that are not lists"
        raise DataError(f"{path} is json but not COCO annotations: it {what}; expected {expected}.")
    return data


def column(entries: list[dict[str, Any]], keys: tuple[str, ...], path: Path, what: str) -> list[np.ndarray]:
    """One float64 array per key over `entries`, or a DataError naming the first malformed entry."""
    try:
        return [np.array([e[k] for e in entries], dtype=np.float64) for k in keys]
    except (KeyError, TypeError, ValueError) as exc:
        bad = next((e for e in entries if not isinstance(e, dict) or not all(k in e for k in keys)), None)
        raise DataError(
            f"{path} is not COCO annotations: every entry of '{what}' needs {', '.join(keys)} "
            f"(as numbers){f'; this one does not: {bad}' if bad is not None else f' ({exc})'}."
        ) from exc


def complete_annotations(anns: list[dict[str, Any]], boxes: np.ndarray, path: Path) -> None:
    """Fill in what pycocotools and COCOeval read but user files often omit: `iscrowd` (0), `area` (the
    box's), and ids 1..M when some are missing or repeated (COCOeval matches by id, and nothing outside
    this in-memory copy refers to them)."""
    for a, (_, _, w, h) in zip(anns, boxes.tolist()):
        a.setdefault("iscrowd", 0)
        if a.get("area") is None:
            a["area"] = max(w, 0.0) * max(h, 0.0)
    ids = [a.get("id") for a in anns]
    if None in ids or len(set(ids)) != len(ids):
        log.warning("%s: annotation ids missing or repeated; numbering them 1..%d", path, len(anns))
        for i, a in enumerate(anns):
            a["id"] = i + 1


def pack_segmentations(anns: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The `segmentation` of each annotation as json text in one uint8 buffer, and the (M + 1,) offsets:
    workers decode one object at a time from a flat array instead of holding a million Python lists."""
    texts = [json.dumps(a["segmentation"], separators=(",", ":")).encode() for a in anns]
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    return np.frombuffer(b"".join(texts), dtype=np.uint8), offsets


def ground_truth(path: Path) -> Any:
    """The pycocotools COCO of an annotation file, as the data set reads it (missing ids, iscrowd and
    areas filled in)."""
    data = read_coco_json(path)
    anns = data["annotations"]
    complete_annotations(anns, bboxes(anns, path), path)
    return coco_index(data)


def clip_boxes(xywh: np.ndarray, width: np.ndarray, height: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xyxy boxes clipped to their images (M, 4), and which are valid: positive width and height before
    and after clipping (NaN coordinates compare False, so they are invalid too)."""
    x1, y1 = xywh[:, 0].clip(0, width), xywh[:, 1].clip(0, height)
    x2, y2 = (xywh[:, 0] + xywh[:, 2]).clip(0, width), (xywh[:, 1] + xywh[:, 3]).clip(0, height)
    with np.errstate(invalid="ignore"):
        valid = (xywh[:, 2] > 0) & (xywh[:, 3] > 0) & (x2 > x1) & (y2 > y1)
    return np.stack([x1, y1, x2, y2], 1), valid


def categories(cats: list[Any], path: Path) -> tuple[list[int], list[str]]:
    """Category ids in ascending order (label = position + 1) and their names."""
    if not cats:
        raise DataError(f"{path} lists no 'categories'; a COCO file names every object category there.")
    (ids,) = column(cats, ("id",), path, "categories")
    if len(set(ids.tolist())) != len(ids):
        raise DataError(f"{path} lists some category id more than once in 'categories'.")
    order = np.argsort(ids, kind="stable")
    return [int(ids[i]) for i in order], [str(cats[i].get("name", int(ids[i]))) for i in order]


def bboxes(anns: list[Any], path: Path) -> np.ndarray:
    """(M, 4) float64 xywh of every annotation, or a DataError naming the first without a valid bbox."""
    try:
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), -1)
        if boxes.shape[1] == 4 or not anns:
            return boxes.reshape(-1, 4)
    except (KeyError, TypeError, ValueError):
        pass  # named below
    bad = next((a for a in anns if not isinstance(a, dict) or len(np.ravel(a.get("bbox", []))) != 4), None)
    raise DataError(
        f"{path} is not COCO annotations: every annotation needs 'bbox' [x, y, width, height] (numbers)"
        f"{f'; this one does not: {bad!r:.200}' if bad is not None else ''}."
    )


def check_references(
    ann_image: np.ndarray, ann_cat: np.ndarray, image_ids: np.ndarray, cat_ids: list[int], path: Path
) -> None:
    unknown_cats = sorted(set(ann_cat.astype(np.int64).tolist()) - set(cat_ids))
    if unknown_cats:
        count = int(np.isin(ann_cat, unknown_cats).sum())
        raise DataError(
            f"{path}: {count} annotation(s) use category id(s) {preview(unknown_cats)} that "
            f"'categories' does not list (it lists {preview(cat_ids)}). Add those categories to "
            f"'categories' or remove their annotations."
        )
    unknown_images = sorted(set(ann_image.astype(np.int64).tolist()) - set(image_ids.tolist()))
    if unknown_images:
        raise DataError(
            f"{path}: annotations refer to image id(s) {preview(unknown_images)} that 'images' does not "
            f"list. Add those images to 'images' or remove their annotations."
        )


def check_segmentations(
    anns: list[Any], idx: np.ndarray, pos: np.ndarray, heights: np.ndarray, widths: np.ndarray, path: Path
) -> None:
    """Every kept object needs a polygon list or an RLE of its image's size (`with_masks`)."""
    for i in idx.tolist():
        seg = anns[i].get("segmentation")
        size = [int(heights[pos[i]]), int(widths[pos[i]])]
        ok = isinstance(seg, list) or (
            isinstance(seg, dict) and "counts" in seg and list(seg.get("size", [])) == size
        )
        if not ok:
            raise DataError(
                f"{path}: `with_masks`=True needs a 'segmentation' (polygons, or an RLE of the image's "
                f"size {size[0]}x{size[1]}) on every object; annotation id {anns[i].get('id')} has "
                f"{seg!r:.80}. Fix the file or set `with_masks`=False."
            )
