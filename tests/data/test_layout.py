"""Every bad-input case gives a DataError / ConfigError that says what was found and how to fix it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from data_helpers import write_cifar, write_jpeg_tree
from PIL import Image

from polyscale.data import build_dataset
from polyscale.errors import ConfigError, DataError


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return write_jpeg_tree(tmp_path / "data", per_class=2, val_per_class=1, awkward=False)


def test_missing_root_names_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    with pytest.raises(
        DataError, match=r"root is None and \$IMAGENET_ROOT is not set.*train/<class>.*set root=/path/to/it"
    ):
        build_dataset("train", name="imagenet", num_classes=3)


def test_env_var_is_the_fallback_root(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGENET_ROOT", str(tree))
    ds = build_dataset("val", name="imagenet", num_classes=3, image_size=16)
    assert len(ds) == 3 and ds.num_classes == 3


def test_nonexistent_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere does not exist.*fix root"):
        build_dataset("train", name="imagefolder", root=str(tmp_path / "nowhere"), num_classes=None)


def test_missing_split_folder_lists_what_is_there(tree: Path) -> None:
    shutil.rmtree(tree / "val")
    (tree / "README.txt").write_text("hi")
    with pytest.raises(DataError, match=r"val/<class>/<image files>.*does not exist.*README.txt, train"):
        build_dataset("val", name="imagefolder", root=str(tree), num_classes=None)


def test_flat_val_folder_is_recognised_as_the_raw_tarball(tree: Path) -> None:
    for path in list((tree / "val").rglob("*.JPEG")):
        path.rename(tree / "val" / f"ILSVRC2012_val_{path.parent.name}_{path.name}")
    for folder in (tree / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(
        DataError, match=r"3 image files directly and no class folders.*raw ILSVRC2012.*valprep"
    ):
        build_dataset("val", name="imagenet", root=str(tree), num_classes=3)


def test_empty_class_folder(tree: Path) -> None:
    (tree / "train" / "c3").mkdir()
    (tree / "val" / "c3").mkdir()
    (tree / "train" / "c3" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"1 class folders in .*train contain no image files: c3"):
        build_dataset("train", name="imagefolder", root=str(tree), num_classes=None)


@pytest.mark.parametrize("split", ["train", "val"])
def test_class_sets_must_match(tree: Path, split: str) -> None:
    (tree / "val" / "c2").rename(tree / "val" / "c9")
    with pytest.raises(DataError, match=r"missing in val/: \[c2\]; not in train/: \[c9\]"):
        build_dataset(split, name="imagefolder", root=str(tree), num_classes=None)


def test_class_count_must_match_config(tree: Path) -> None:
    with pytest.raises(DataError, match=r"Found 3 class folders .* num_classes=1000. Set num_classes=3"):
        build_dataset("train", name="imagenet", root=str(tree), num_classes=1000)


def test_val_only_copy_takes_classes_from_val(tree: Path) -> None:
    shutil.rmtree(tree / "train")
    ds = build_dataset("val", name="imagefolder", root=str(tree), num_classes=None, image_size=16)
    assert ds.classes == ["c0", "c1", "c2"] and len(ds) == 3


def test_image_in_unlisted_format_is_still_found(tree: Path) -> None:
    Image.new("RGB", (20, 20)).save(tree / "train" / "c0" / "extra.bmp")
    ds = build_dataset("train", name="imagefolder", root=str(tree), num_classes=None, image_size=16)
    assert len(ds) == 7


def test_cifar_missing_folder_says_where_to_put_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar-10-batches-py/ with data_batch_1.*cifar-10-python.tar.gz"):
        build_dataset("train", name="cifar10", root=str(tmp_path))


def test_cifar_missing_file_is_named(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(DataError, match=r"cifar100 files missing in .*cifar-100-python: test\."):
        build_dataset("val", name="cifar100", root=str(tmp_path), num_classes=100)


def test_cifar_unreadable_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(
        DataError, match=r"Cannot read the CIFAR pickle .*data_batch_3.*re-extract cifar-10-python"
    ):
        build_dataset("train", name="cifar10", root=str(tmp_path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "mnist"}, r"Unknown data set name='mnist'"),
        (
            {"name": "synthetic", "decoder": "opencv"},
            r"decoder='opencv' is not one of pil, torchvision, cuda",
        ),
        (
            {"name": "synthetic", "on_bad_file": "ignore"},
            r"on_bad_file='ignore' is not one of skip, error",
        ),
        ({"name": "synthetic", "crop_ratio": 1.2}, r"crop_ratio=1.2 in \(0, 1\]"),
        ({"name": "synthetic", "rrc_scale": [1.0, 0.08]}, r"rrc_scale=\[1.0, 0.08\] must be \[low, high\]"),
        (
            {"name": "cifar10", "decoder": "cuda"},
            r"decoder=cuda decodes image files; cifar10 is held in memory",
        ),
        (
            {"name": "imagenet", "gpu_augment": True},
            r"keeps an in-memory set .* imagenet is not one. For image folders use decoder=cuda",
        ),
        (
            {"name": "synthetic", "gpu_augment": True},
            r"gpu_augment=True keeps an in-memory set .* synthetic is not",
        ),
        ({"name": "builtin", "num_train_samples": 0}, r"num_train_samples=0 must be >= 1"),
        ({"name": "builtin", "num_classes": 11}, r"has 10 classes, but num_classes=11"),
        (
            {"name": "synthetic", "batchsize": 8, "crop": 2},
            r"Unknown data option\(s\) batchsize, crop; .* batch_size",
        ),
        (
            {"name": "imagenet", "decoder": "cuda", "auto_augment": "rand-m9"},
            r"cannot follow decoder=cuda",
        ),
        ({"name": "synthetic", "num_classes": None}, r"num_classes must be set"),
        ({"name": "synthetic", "interpolation": "cubic"}, None),  # synthetic ignores interpolation
    ],
)
def test_bad_config_values(overrides: dict, message: str | None) -> None:
    opts = {"num_train_samples": 4, "num_val_samples": 4, "image_size": 8, **overrides}
    if message is None:
        assert len(build_dataset("val", **opts)) == 4
        return
    with pytest.raises(ConfigError, match=message) as info:
        build_dataset("train", **opts)
    raw = info.value.args[0]  # plain argument names, marked: no config keys, no Hydra syntax
    assert "data." not in raw and "data=" not in raw and "null" not in raw and "=true" not in raw
    assert "`" in raw


def test_bad_interpolation_and_auto_augment_policy(tree: Path) -> None:
    opts = dict(name="imagefolder", root=str(tree), num_classes=None)
    with pytest.raises(ConfigError, match=r"Unknown interpolation='cubic'.*bicubic"):
        build_dataset("train", **opts, interpolation="cubic")
    with pytest.raises(ConfigError, match=r"'randaug-strong' is not a timm augmentation policy"):
        build_dataset("train", **opts, auto_augment="randaug-strong")


def test_split_name_is_checked() -> None:
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        build_dataset("test", name="synthetic")
