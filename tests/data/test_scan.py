"""The folder scan: symbolic links are followed but every real folder is entered once, and files that
are not loaded are reported."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_helpers import write_animated_gif, write_jpeg_tree
from PIL import Image

from polyscale.data import build_dataset
from polyscale.errors import DataError

PER_CLASS = 2  # training images per class of the generated tree


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: a scan that loops would never return."""

    def expire(signum, frame):
        raise TimeoutError(f"still scanning after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return write_jpeg_tree(tmp_path / "data", per_class=PER_CLASS, val_per_class=1, awkward=False)


def _scan(root: Path, split: str = "train"):
    with deadline(15):
        return build_dataset(split, name="imagefolder", root=str(root), num_classes=None, image_size=16)


def _counts(ds) -> dict[str, int]:
    counts = Counter(int(t) for t in ds.targets)
    return {name: counts[i] for i, name in enumerate(ds.classes)}


def test_two_folders_linking_to_each_other_are_scanned_once(tree: Path, caplog) -> None:
    (tree / "train/c0/to_c1").symlink_to("../c1", target_is_directory=True)
    (tree / "train/c1/to_c0").symlink_to("../c0", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="polyscale.data"):
        ds = _scan(tree)
    assert _counts(ds) == {"c0": PER_CLASS, "c1": PER_CLASS, "c2": PER_CLASS}
    assert len({ds.path(i) for i in range(len(ds))}) == len(ds) == 3 * PER_CLASS
    assert "Skipped 2 linked folder(s)" in caplog.text
    assert "c0/to_c1 -> ../c1" in caplog.text and "c1/to_c0 -> ../c0" in caplog.text


@pytest.mark.parametrize("target", [".", "..", "../..", "../../.."])
def test_link_to_itself_or_above_adds_nothing(tree: Path, target: str, caplog) -> None:
    (tree / "train/c0/loop").symlink_to(target, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="polyscale.data"):
        ds = _scan(tree)
    assert _counts(ds) == {"c0": PER_CLASS, "c1": PER_CLASS, "c2": PER_CLASS}  # not multiplied, no val/
    assert f"c0/loop -> {target}" in caplog.text


def test_branching_self_links_finish_at_once(tree: Path, caplog) -> None:
    """Two links to `.` in one folder: following them blindly visits 2**40 paths (until ELOOP)."""
    for name in ("x", "y"):
        (tree / "train/c0" / name).symlink_to(".", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="polyscale.data"):
        ds = _scan(tree)
    assert _counts(ds) == {"c0": PER_CLASS, "c1": PER_CLASS, "c2": PER_CLASS}
    assert "Skipped 2 linked folder(s)" in caplog.text


def test_link_into_another_class_leaves_that_folder_to_its_class(tree: Path, caplog) -> None:
    """A link sorting before the real folder must not claim it (real folders are scanned first)."""
    sub = tree / "train/c1/sub"
    sub.mkdir()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(sub / "x.png")
    (tree / "train/c0/a_link").symlink_to("../c1/sub", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="polyscale.data"):
        ds = _scan(tree)
    assert _counts(ds) == {"c0": PER_CLASS, "c1": PER_CLASS + 1, "c2": PER_CLASS}
    assert "c0/a_link -> ../c1/sub" in caplog.text


def test_linked_class_folder_outside_the_tree_and_linked_files_are_followed(
    tree: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere" / "c3"
    outside.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(outside / f"{i}.png")
    (outside / "nested").mkdir()
    Image.new("RGB", (20, 20)).save(outside / "nested" / "deep.png")
    for split in ("train", "val"):
        (tree / split / "c3").symlink_to(outside, target_is_directory=True)
    (tree / "train/c0/linked.png").symlink_to(outside / "0.png")
    ds = _scan(tree)
    assert _counts(ds) == {"c0": PER_CLASS + 1, "c1": PER_CLASS, "c2": PER_CLASS, "c3": 4}
    assert ds.path(len(ds) - 1).endswith("train/c3/nested/deep.png")  # torchvision's order kept
    assert ds[len(ds) - 1][0].shape == (3, 16, 16)


def test_two_class_folders_that_are_one_folder_are_an_error(tree: Path) -> None:
    for split in ("train", "val"):
        (tree / split / "c9").symlink_to("c1", target_is_directory=True)
    with pytest.raises(DataError, match=r"class folders c1 and c9 of .*train are the same folder"):
        _scan(tree)


@pytest.mark.parametrize("target", [".", ".."])
def test_class_folder_linking_to_the_split_or_above_is_an_error(tree: Path, target: str) -> None:
    for split in ("train", "val"):
        (tree / split / "c9").symlink_to(target, target_is_directory=True)
    with pytest.raises(
        DataError, match=r"class folder c9 of .*train leads to .* a folder above it \(a link loop\)"
    ):
        _scan(tree)


def test_files_that_are_not_loaded_are_reported(tree: Path, caplog) -> None:
    (tree / "train/c0/notes.txt").write_text("labels were checked by hand")
    (tree / "train/c1/vector.svg").write_text("<svg/>")
    (tree / "train/README").write_text("training images")  # next to the class folders
    write_animated_gif(tree / "train/c2/anim.GIF", [(200, 0, 0), (0, 200, 0)])  # loaded (first frame)
    folder_named_like_an_image = tree / "train/c2/album.jpg"
    folder_named_like_an_image.mkdir()
    Image.new("RGB", (20, 20)).save(folder_named_like_an_image / "inside.png")
    with caplog.at_level(logging.WARNING, logger="polyscale.data"):
        ds = _scan(tree)
    assert _counts(ds) == {"c0": PER_CLASS, "c1": PER_CLASS, "c2": PER_CLASS + 2}
    assert "album.jpg/inside.png" in {os.path.relpath(ds.path(i), tree / "train/c2") for i in range(len(ds))}
    assert "Ignored 3 file(s)" in caplog.text
    for name in ("c0/notes.txt", "c1/vector.svg", "README"):
        assert name in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polyscale.data"):
        _scan(tree, "val")
    assert "Ignored" not in caplog.text and "Skipped" not in caplog.text  # a clean split says nothing
