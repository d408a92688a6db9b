"""Scan of an image-folder tree (`root/train/<class>/*`, `root/val/<class>/*`), checked before training.

Every layout problem raises `DataError` saying what was found, what is expected and how to fix it, so a
mis-extracted ImageNet fails in seconds instead of after the first epoch.

The scan follows symbolic links to folders (ImageNet copies are often assembled from links) but enters
every real folder once: a link that leads back to a class folder, to a folder already scanned or above
the split (a loop) is skipped, and one warning names the skipped links. Files whose extension is not
an image extension are not loaded; one warning per split gives their count and a few names.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from polyscale.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "resolve_root", "scan_split"]

log = logging.getLogger(__name__)

# torchvision's list plus GIF (its first frame is used); compared in lower case.
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif")
_SHOW = 5  # how many names a message lists


def _preview(names: list[str]) -> str:
    """First few names, then a count: keeps messages about 1000 classes readable."""
    shown = ", ".join(names[:_SHOW])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _SHOW else shown


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Whether `entry` is a folder or a link to one; False for a broken link or a link loop (which
    DirEntry.is_dir raises for)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def resolve_root(root: str | None, env_var: str | None, what: str, expected: str) -> Path:
    """`root`, else `$env_var`; it must be an existing folder."""
    value = root or (os.environ.get(env_var) if env_var else None)
    env_set = f" (or export {env_var}=/path/to/it)" if env_var else ""
    if not value:
        unset = f" and ${env_var} is not set" if env_var else ""
        raise DataError(
            f"No {what} folder given: `root` is None{unset}. Expected a folder holding {expected}; "
            f"set `root`=/path/to/it{env_set}."
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(
            f"The {what} folder {path} does not exist (or is not a folder). Expected a folder holding "
            f"{expected}; fix `root`{env_set}."
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
            f"Point `root` at the folder that contains train/ and val/."
        )
    entries = _list(str(split_dir))
    classes = sorted(e.name for e in entries if _is_dir(e))
    loose = sorted(e.name for e in entries if not _is_dir(e) and _is_image(e.name))
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
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})."
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
            f"but `num_classes`={num_classes}. Set `num_classes`={len(classes)} "
            f"(or None to take it from the folder), or point `root` at the full data set."
        )
    samples = _scan_files(split_dir, classes)
    counts = [0] * len(classes)
    for _, target in samples:
        counts[target] += 1
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if empty:
        raise DataError(
            f"{len(empty)} class folders in {split_dir} contain no image files: {_preview(empty)}. "
            f"Every class needs at least one image (extensions: {', '.join(IMAGE_EXTENSIONS)}); "
            f"add the missing images or remove the class from both train/ and val/."
        )
    return classes, samples


def _identity(path: str) -> tuple[int, int]:
    """(device, inode) of the folder `path` leads to: the same for every link to it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _describe(path: str, base: Path) -> str:
    """`path` relative to `base`, with its link target when it is a symbolic link."""
    rel = os.path.relpath(path, base)
    return f"{rel} -> {os.readlink(path)}" if os.path.islink(path) else rel


def _list(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        raise DataError(
            f"Cannot list the folder {folder} ({type(exc).__name__}: {exc.strerror or exc}); "
            f"make it readable (and searchable) by this user, or remove it from the data set."
        ) from exc


def _scan_files(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """[(path, class index)] of the image files under each class folder, in torchvision's order.

    Real sub-folders are scanned before any linked one, so a link to a folder of the tree never claims
    it; a linked folder is entered only if no path so far led to it. Folders above the split (a link to
    `..`) count as visited, so a link never pulls the other split or other classes in.
    """
    classes_at = [str(split_dir / name) for name in classes]
    seen: set[tuple[int, int]] = set()
    real = os.path.realpath(split_dir)
    while True:  # the split folder and every folder above it
        seen.add(_identity(real))
        parent = os.path.dirname(real)
        if parent == real:
            break
        real = parent
    owner: dict[tuple[int, int], str] = {}
    for name, path in zip(classes, classes_at):
        key = _identity(path)
        if key in seen:
            raise DataError(
                f"The class folder {name} of {split_dir} leads to {os.path.realpath(path)}, the split folder "
                f"or a folder above it (a link loop); make it a folder of images or a link to one."
            )
        if key in owner:
            raise DataError(
                f"The class folders {owner[key]} and {name} of {split_dir} are the same folder "
                f"({os.path.realpath(path)}, reached through a link); every class needs a folder of its own."
            )
        owner[key] = name
    seen |= set(owner)

    folders: list[list[tuple[str, list[str]]]] = [[] for _ in classes]  # per class: (folder, files)
    links: deque[tuple[str, int]] = deque()  # linked folders, entered after all real ones
    skipped: list[str] = []
    ignored: list[str] = []

    def scan_tree(top: str, label: int) -> None:
        """Files of `top` and of its real sub-folders; linked sub-folders are queued."""
        stack = [top]
        while stack:
            folder = stack.pop()
            files = []
            for entry in _list(folder):
                if _is_dir(entry):  # follows a link
                    if entry.is_symlink():
                        links.append((entry.path, label))
                        continue
                    key = _identity(entry.path)
                    if key in seen:  # a bind mount of a folder already scanned
                        skipped.append(entry.path)
                        continue
                    seen.add(key)
                    stack.append(entry.path)
                elif _is_image(entry.name):
                    files.append(entry.path)  # a broken link too: reported as a bad file when loaded
                else:
                    ignored.append(entry.path)
            folders[label].append((folder, files))

    for label, path in enumerate(classes_at):
        scan_tree(path, label)
    while links:
        path, label = links.popleft()
        key = _identity(path)
        if key in seen:
            skipped.append(path)
            continue
        seen.add(key)
        scan_tree(path, label)

    ignored += [e.path for e in _list(str(split_dir)) if not _is_dir(e)]  # loose files next to the classes
    if skipped:
        log.warning(
            "Skipped %d linked folder(s) under %s that lead to a folder already scanned (a loop, a link to "
            "a class folder or a second link to one folder); their images are counted once: %s",
            len(skipped),
            split_dir,
            _preview(sorted(_describe(p, split_dir) for p in skipped)),
        )
    if ignored:
        log.warning(
            "Ignored %d file(s) under %s that are not images of a class folder (extensions: %s): %s",
            len(ignored),
            split_dir,
            " ".join(IMAGE_EXTENSIONS),
            _preview(sorted(os.path.relpath(p, split_dir) for p in ignored)),
        )
    # torchvision's make_dataset order: per class, folders sorted by path, files sorted by name.
    return [
        (f, label) for label, per_class in enumerate(folders) for _, files in sorted(per_class) for f in files
    ]
