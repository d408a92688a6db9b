"""Checks of an image-folder tree (`root/train/<class>/*`, `root/val/<class>/*`) before training starts.

Every problem raises `DataError` saying what was found, what is expected and how to fix it, so a
mis-extracted ImageNet fails in seconds instead of after the first epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from polyscale.errors import DataError

__all__ = ["IMG_EXTENSIONS", "resolve_root", "scan_split"]

_SHOW = 5  # how many names an error message lists


def _preview(names: list[str]) -> str:
    """First few names, then a count: keeps messages about 1000 classes readable."""
    shown = ", ".join(names[:_SHOW])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _SHOW else shown


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def resolve_root(root: str | None, env_var: str | None, what: str, expected: str) -> Path:
    """`root`, else `$env_var`; it must be an existing folder."""
    value = root or (os.environ.get(env_var) if env_var else None)
    env_set = f" (or export {env_var}=/path/to/it)" if env_var else ""
    if not value:
        unset = f" and ${env_var} is not set" if env_var else ""
        raise DataError(
            f"No {what} folder given: data.root is null{unset}. Expected a folder holding {expected}; "
            f"set data.root=/path/to/it{env_set}."
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(
            f"The {what} folder {path} does not exist (or is not a folder). Expected a folder holding "
            f"{expected}; fix data.root{env_set}."
        )
    return path


def _class_dirs(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split, or a DataError describing what is there instead."""
    if not split_dir.is_dir():
        found = sorted(p.name for p in split_dir.parent.iterdir())
        raise DataError(
            f"Expected the folder {split_dir} with one sub-folder per class "
            f"({split_dir.name}/<class>/<image files>), but it does not exist; "
            f"{split_dir.parent} holds: {_preview(found) or 'nothing'}. "
            f"Point data.root at the folder that contains train/ and val/."
        )
    entries = list(os.scandir(split_dir))
    classes = sorted(e.name for e in entries if e.is_dir())
    loose = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
    if loose and not classes:
        raise DataError(
            f"{split_dir} holds {len(loose)} image files directly and no class folders "
            f"({_preview(loose)}); this is the layout of the raw ILSVRC2012 validation tarball. "
            f"Expected {split_dir.name}/<class>/<image files>: move every image into the folder of "
            f"its class (for ImageNet, sort val/ into val/<wnid>/ with the devkit's ground-truth labels, "
            f"e.g. the widely used valprep.sh), then retry."
        )
    if not classes:
        raise DataError(
            f"{split_dir} contains no class folders. Expected {split_dir.name}/<class>/<image files> "
            f"(extensions: {', '.join(IMG_EXTENSIONS)})."
        )
    return classes


def scan_split(root: Path, split: str, num_classes: int | None) -> tuple[list[str], list[tuple[str, int]]]:
    """Return (classes, [(path, class index)]) of `root/split`, checked against the other split.

    The class list comes from `train/` (from `val/` itself when there is no `train/`, e.g. an
    evaluation-only copy); the other split, when present, must have exactly the same classes.
    """
    split_dir = root / split
    own = _class_dirs(split_dir)
    other_name = "val" if split == "train" else "train"
    other = _class_dirs(root / other_name) if (root / other_name).is_dir() else None
    classes = own if split == "train" or other is None else other
    if other is not None and set(own) != set(other):
        train_set, val_set = (set(own), set(other)) if split == "train" else (set(other), set(own))
        missing, extra = sorted(train_set - val_set), sorted(val_set - train_set)
        raise DataError(
            f"The class folders of {root / 'val'} differ from those of {root / 'train'}: "
            f"missing in val/: [{_preview(missing)}]; not in train/: [{_preview(extra)}]. "
            f"The class list comes from train/; make val/ hold the same class folders."
        )
    if num_classes is not None and len(classes) != num_classes:
        source = root / "train" if split == "train" or other is not None else split_dir
        raise DataError(
            f"Found {len(classes)} class folders in {source} "
            f"but data.num_classes={num_classes}. Set data.num_classes={len(classes)} "
            f"(or null to take it from the folder), or point data.root at the full data set."
        )
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = [0] * len(classes)
    for _, target in samples:
        counts[target] += 1
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if empty:
        raise DataError(
            f"{len(empty)} class folders in {split_dir} contain no image files: {_preview(empty)}. "
            f"Every class needs at least one image (extensions: {', '.join(IMG_EXTENSIONS)}); "
            f"add the missing images or remove the class from both train/ and val/."
        )
    return classes, samples
