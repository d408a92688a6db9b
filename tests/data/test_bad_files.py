"""Bad image files: counted across worker processes, truncated files never pass as images, and a user
error raised in a worker reaches the caller as its own one-paragraph message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_helpers import write_jpeg_tree
from PIL import ImageFile

from polyscale.data import bad_file_mask, build_dataset, build_train_loader, build_val_loader, count_bad_files
from polyscale.errors import DataError

CORRUPT, TRUNCATED = "train/c1/corrupt.JPEG", "train/c2/truncated.JPEG"


@pytest.fixture(scope="module")
def bad_train_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 good JPEGs per class in train/ and val/, plus a corrupt and a truncated JPEG in train/ (14 files)."""
    root = write_jpeg_tree(tmp_path_factory.mktemp("bad_train"), per_class=4, awkward=False)
    (root / CORRUPT).write_bytes(b"not a JPEG " * 40)
    good = (root / "train/c2/00.JPEG").read_bytes()
    (root / TRUNCATED).write_bytes(good[: len(good) // 2])
    return root


def _opts(root: Path, **kw) -> dict:
    return {"name": "imagefolder", "root": str(root), "num_classes": 3, "image_size": 16, **kw}


def _index(ds, rel: str) -> int:
    return next(i for i in range(len(ds)) if ds.path(i).endswith(rel.split("/", 1)[1]))


@pytest.mark.parametrize(
    ("num_workers", "context", "persistent"),
    [(0, None, False), (2, "fork", False), (2, "spawn", True)],
)
def test_training_epoch_counts_each_bad_file_once(
    bad_train_tree: Path, num_workers: int, context: str | None, persistent: bool
) -> None:
    """Every worker (forked or spawned, persistent or not) marks the shared mask the caller reads."""
    ds = build_dataset("train", **_opts(bad_train_tree))
    assert len(ds) == 14
    loader = build_train_loader(
        ds,
        rank=0,
        world_size=1,
        batch_size=7,  # 14 files, no incomplete batch dropped: every file is loaded once
        seed=0,
        device="cpu",
        num_workers=num_workers,
        persistent_workers=persistent,
        multiprocessing_context=context,
    )
    loader.set_epoch(0)
    targets = torch.cat([y for _, y in loader])
    assert targets.shape == (14,) and int(targets.min()) >= 0  # bad files replaced in training
    mask = bad_file_mask(loader)  # through the loader and sampler wrappers
    assert mask is not None and mask.dtype == torch.uint8 and mask.shape == (14,)
    assert sorted(mask.nonzero().flatten().tolist()) == sorted([_index(ds, CORRUPT), _index(ds, TRUNCATED)])
    assert count_bad_files(ds) == 2 and bad_file_mask(ds) is mask
    assert bad_file_mask(torch.utils.data.Subset(ds, [0])) is mask
    loader.set_epoch(1)
    list(loader)
    assert count_bad_files(ds) == 2  # distinct files: a second epoch adds nothing


def _train_as_val(root: Path, tmp_path: Path) -> Path:
    """A root whose val/ is `root`'s train/ (with the bad files): evaluated without substitution."""
    for split in ("train", "val"):
        (tmp_path / split).symlink_to(root / "train", target_is_directory=True)
    return tmp_path


@pytest.mark.parametrize("decoder", ["pil", "torchvision", "cuda"])
def test_truncated_file_is_bad_even_if_pil_is_told_to_load_truncated_images(
    bad_train_tree: Path, decoder: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With LOAD_TRUNCATED_IMAGES on, PIL fills a truncated JPEG's missing part with grey and raises
    nothing; the loaders must still count it as bad (and leave the setting as they found it)."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    train = build_dataset("train", **_opts(bad_train_tree, decoder=decoder))
    torch.manual_seed(0)
    train[_index(train, TRUNCATED)]
    assert bad_file_mask(train)[_index(train, TRUNCATED)] == 1
    val = build_dataset("val", **_opts(_train_as_val(bad_train_tree, tmp_path), decoder=decoder))
    loader = build_val_loader(val, rank=0, world_size=1, batch_size=5, device="cpu", num_workers=0)
    targets = torch.cat([y for _, y in loader])
    assert targets[_index(val, TRUNCATED)] == -1 and targets[_index(val, CORRUPT)] == -1
    assert int((targets == -1).sum()) == 2 and count_bad_files(val) == 2
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def _first_error(make_loader) -> DataError:
    with pytest.raises(DataError) as info:
        for _ in make_loader():
            pass
    return info.value


@pytest.mark.parametrize("split", ["train", "val"])
def test_worker_data_error_is_the_original_paragraph(
    bad_train_tree: Path, split: str, tmp_path: Path
) -> None:
    """on_bad_file=error with 2 workers: the caller gets the DataError itself, not torch's
    'Caught DataError in DataLoader worker process 0 ... Original Traceback' wrapper."""
    root = _train_as_val(bad_train_tree, tmp_path) if split == "val" else bad_train_tree
    ds = build_dataset(split, **_opts(root, on_bad_file="error"))
    paragraphs = set()
    for rel in (CORRUPT, TRUNCATED):  # what each bad file raises without workers
        with pytest.raises(DataError) as direct:
            ds[_index(ds, rel)]
        paragraphs.add(str(direct.value))
    kw = dict(rank=0, world_size=1, batch_size=7, device="cpu", num_workers=2, persistent_workers=False)
    if split == "train":
        error = _first_error(lambda: build_train_loader(ds, seed=0, **kw))
    else:
        error = _first_error(lambda: build_val_loader(ds, **kw))
    assert type(error) is DataError
    assert str(error) in paragraphs and "\n" not in str(error)
    assert "Traceback" not in str(error) and "worker process" not in str(error)
    assert "`on_bad_file`=error" in error.args[0]  # still marked for the engine's config-key rendering
