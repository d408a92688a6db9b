"""Detection loaders: orientation-grouped, seeded and resumable training batches; exact evaluation shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from coco_helpers import write_coco_set, write_oriented_set

from polyscale.data import (
    BAD_IMAGE_ID,
    build_detection_dataset,
    build_detection_train_loader,
    build_detection_val_loader,
    count_bad_files,
)
from polyscale.data.detection import grouped_batches
from polyscale.errors import DataError

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"
)

ORIENTATIONS = "LPLLPSPPLLSPLPLLPPLSPL"  # 22 images: 12 of width >= height (L, S), 10 portrait (P)
LOADER = dict(rank=0, world_size=1, device="cpu", num_workers=0)


@pytest.fixture(scope="module")
def oriented(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("oriented")
    write_oriented_set(root, ORIENTATIONS)
    return root


def _dataset(root: Path, split: str = "train", **kw):
    ann, images = str(root / "ann.json"), str(root / "images")
    paths = dict(train_ann=ann, train_images=images, val_ann=ann, val_images=images)
    return build_detection_dataset(split, name="coco", **paths, **kw)


def _portrait(image: torch.Tensor) -> bool:
    return image.shape[-1] < image.shape[-2]


def _same(a: list, b: list) -> bool:
    """Two epochs of batches are identical: images, boxes, labels, image ids."""
    for (ia, ta), (ib, tb) in zip(a, b, strict=True):
        for x, y, s, t in zip(ia, ib, ta, tb, strict=True):
            if not (
                torch.equal(x, y) and torch.equal(s["boxes"], t["boxes"]) and s["image_id"] == t["image_id"]
            ):
                return False
            if not torch.equal(s["labels"], t["labels"]):
                return False
    return True


@pytest.mark.parametrize(("n", "batch"), [(22, 3), (23, 4), (7, 2), (5, 5), (9, 1)])
def test_grouped_batches_are_pure_and_their_count_fixed(n: int, batch: int) -> None:
    g = torch.Generator().manual_seed(n * 10 + batch)
    for trial in range(20):
        groups = torch.randint(0, 2, (n,), generator=g)
        indices = torch.randperm(n, generator=g)
        seeds = indices * 100 + trial  # a seed per position; here tied to its index to check pairing
        batches = grouped_batches(indices, seeds, groups, batch)
        assert len(batches) == n // batch and all(len(b) == batch for b in batches)
        assert all(len({int(groups[i]) for i, _ in b}) == 1 for b in batches)  # one orientation per batch
        keys = [k for b in batches for k in b]
        assert all(seed == index * 100 + trial for index, seed in keys)  # each index keeps its seed
        # only the one topped-up batch may repeat samples, and only samples of its own group
        repeats = len(keys) - len(set(keys))
        assert repeats < batch
    one_group = grouped_batches(indices, seeds, torch.zeros(n, dtype=torch.long), batch)
    order = list(zip(indices.tolist(), seeds.tolist()))
    assert one_group == [order[i * batch : (i + 1) * batch] for i in range(n // batch)]  # plain chunks


def test_train_batches_hold_one_orientation(oriented: Path) -> None:
    loader = build_detection_train_loader(_dataset(oriented), batch_size=3, seed=0, **LOADER)
    assert len(loader) == 22 // 3
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, targets in batches:
            assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
            assert len({_portrait(x) for x in images}) == 1
            for x, t in zip(images, targets):
                assert x.dtype == torch.float32 and t["boxes"].shape == (1, 4)
                assert (ORIENTATIONS[t["image_id"] - 1] == "P") == _portrait(x)  # the image it names


def test_grouping_can_be_turned_off(oriented: Path) -> None:
    loader = build_detection_train_loader(
        _dataset(oriented, aspect_ratio_group=False), batch_size=4, seed=0, **LOADER
    )
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 5 and any(len({_portrait(x) for x in images}) == 2 for images, _ in batches)


def test_train_stream_is_the_same_for_0_and_2_workers(oriented: Path) -> None:
    ds = _dataset(oriented, hflip=True)
    epochs = {}
    for workers in (0, 2):
        loader = build_detection_train_loader(ds, batch_size=3, seed=5, **{**LOADER, "num_workers": workers})
        epochs[workers] = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            epochs[workers].append(list(loader))
    assert all(_same(a, b) for a, b in zip(epochs[0], epochs[2]))
    assert not _same(epochs[0][0], epochs[0][1])  # epochs differ
    plain = build_detection_train_loader(_dataset(oriented, hflip=False), batch_size=3, seed=5, **LOADER)
    plain.set_epoch(0)
    unflipped = list(plain)
    flips = [
        bool(torch.equal(x, y.flip(-1)))
        for (images, _), (plain_images, _) in zip(epochs[0][0], unflipped)
        for x, y in zip(images, plain_images)
    ]
    assert 0 < sum(flips) < len(flips)  # the same order, each sample flipped or not by its seed


def test_mid_epoch_resume_yields_the_remaining_batches(oriented: Path) -> None:
    ds = _dataset(oriented, hflip=True)
    loader = build_detection_train_loader(ds, batch_size=2, seed=3, **LOADER)
    loader.set_epoch(4)
    full = list(loader)
    assert len(full) == len(loader) == 11
    for start in (0, 1, 6, 11):
        fresh = build_detection_train_loader(ds, batch_size=2, seed=3, **LOADER)  # as after a restart
        fresh.set_epoch(4, start_batch=start)
        assert len(fresh) == 11  # batches of the whole epoch, whatever the start
        assert _same(list(fresh), full[start:])
    with pytest.raises(ValueError, match="start_batch 12 is outside"):
        loader.set_epoch(4, start_batch=12)


def test_two_ranks_split_the_training_images(oriented: Path) -> None:
    ds = _dataset(oriented)
    seen = []
    for rank in range(2):
        loader = build_detection_train_loader(
            ds, rank=rank, world_size=2, batch_size=2, seed=1, device="cpu", num_workers=0
        )
        loader.set_epoch(2)
        assert len(loader) == 11 // 2
        seen.append({t["image_id"] for _, targets in loader for t in targets})
    assert not seen[0] & seen[1]  # a rank's top-up repeats only its own images


def test_too_few_images_for_a_batch(oriented: Path) -> None:
    with pytest.raises(DataError, match=r"22 images: 7 per rank over 3 ranks, fewer than one batch of 8"):
        build_detection_train_loader(
            _dataset(oriented), rank=0, world_size=3, batch_size=8, seed=0, device="cpu", num_workers=0
        )


@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_shards_partition_the_set(oriented: Path, world: int) -> None:
    ds = _dataset(oriented, "val")
    ids = []
    for rank in range(world):
        loader = build_detection_val_loader(
            ds, rank=rank, world_size=world, batch_size=4, device="cpu", num_workers=0
        )
        got = list(loader)
        assert len(got) == len(loader)
        ids += [t["image_id"] for _, targets in got for t in targets]
    assert sorted(ids) == list(range(1, 23)) and len(ids) == 22  # every image once, no padding


def test_val_loader_marks_bad_images_for_the_evaluator(tmp_path: Path) -> None:
    write_coco_set(tmp_path)
    ds = _dataset(tmp_path, "val", with_masks=True)
    loader = build_detection_val_loader(
        ds, rank=0, world_size=1, batch_size=3, device="cpu", num_workers=2, persistent_workers=False
    )
    targets = [t for _, batch in loader for t in batch]
    assert [t["image_id"] for t in targets] == [10, 20, 30, 40, BAD_IMAGE_ID, BAD_IMAGE_ID, 70]
    assert count_bad_files(loader) == 2  # marked by the worker processes, read here


def test_worker_errors_arrive_as_themselves(tmp_path: Path) -> None:
    write_coco_set(tmp_path)
    ds = _dataset(tmp_path, on_bad_file="error")
    loader = build_detection_train_loader(
        ds, batch_size=6, seed=0, **{**LOADER, "num_workers": 2, "persistent_workers": False}
    )
    loader.set_epoch(0)
    with pytest.raises(DataError, match=r"^Cannot read image file .*00[56]0.jpg"):
        list(loader)


def test_builtin_detection_loader() -> None:
    ds = build_detection_dataset(
        "train", name="builtin_detection", num_train_images=10, image_size=64, with_masks=True
    )
    loader = build_detection_train_loader(ds, batch_size=4, seed=0, **LOADER)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    images, targets = batches[0]
    assert [x.shape for x in images] == [(3, 64, 64)] * 4
    assert all(t["masks"].shape[1:] == (64, 64) and len(t["masks"]) == len(t["boxes"]) >= 1 for t in targets)
    val = build_detection_dataset("val", name="builtin_detection", num_val_images=5, image_size=64)
    ids = [t["image_id"] for _, ts in build_detection_val_loader(val, batch_size=2, **{**LOADER}) for t in ts]
    assert ids == [1, 2, 3, 4, 5] and sorted(val.coco.getImgIds()) == ids
