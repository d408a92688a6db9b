"""Samplers and loaders: epoch coverage across ranks, exact evaluation shards, a reproducible stream."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from polyscale.data import DataOptions, build_dataset, build_train_loader, build_val_loader, count_bad_files
from polyscale.data.memory import InMemoryImageDataset
from polyscale.data.sampler import TrainSampler, epoch_order
from polyscale.data.transforms import memory_transform
from polyscale.errors import DataError

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)


def _mem_opts(**kw) -> DataOptions:
    return DataOptions(**{"name": "builtin", "image_size": 8, "crop_ratio": 1.0, **kw})


def _indexed_set(n: int, opts: DataOptions) -> InMemoryImageDataset:
    """Tiny in-memory set whose target is the sample index (so batches show which samples came)."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    return InMemoryImageDataset(images, torch.arange(n), n, memory_transform(opts, "val", 8))


LOADER = dict(rank=0, world_size=1, device="cpu", num_workers=0)


@pytest.mark.parametrize(("n", "world"), [(12, 2), (11, 2), (10, 3)])
def test_train_sampler_deals_each_sample_once_per_epoch(n: int, world: int) -> None:
    per_rank = []
    for rank in range(world):
        sampler = TrainSampler(n, rank=rank, world_size=world, seed=7)
        sampler.set_epoch(3)
        per_rank.append([index for index, _ in sampler])
    seen = [i for indices in per_rank for i in indices]
    assert all(len(indices) == n // world for indices in per_rank)
    assert len(set(seen)) == len(seen) == (n // world) * world  # no duplicates; only the tail dropped
    assert set(seen) <= set(range(n))


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    perm, seeds = epoch_order(50, seed=1, epoch=2)
    assert torch.equal(perm, epoch_order(50, 1, 2)[0]) and torch.equal(seeds, epoch_order(50, 1, 2)[1])
    assert not torch.equal(perm, epoch_order(50, 1, 3)[0]) and not torch.equal(perm, epoch_order(50, 2, 2)[0])
    assert sorted(perm.tolist()) == list(range(50)) and len(set(seeds.tolist())) == 50


def test_two_rank_loaders_cover_the_epoch() -> None:
    ds = _indexed_set(20, _mem_opts(random_crop_padding=0, hflip=False))
    seen = []
    for rank in range(2):
        loader = build_train_loader(
            ds, rank=rank, world_size=2, batch_size=3, seed=0, device="cpu", num_workers=0
        )
        loader.set_epoch(1)
        assert len(loader) == 3  # 10 samples per rank, batches of 3, last one dropped
        batches = list(loader)
        assert len(batches) == 3 and all(x.shape == (3, 3, 8, 8) for x, _ in batches)
        seen += [int(t) for _, y in batches for t in y]
    assert len(seen) == len(set(seen)) == 18


@pytest.mark.parametrize("n", [10, 7])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_shards_count_each_sample_once(n: int, world: int) -> None:
    ds = _indexed_set(n, _mem_opts())
    seen, total_batches = [], 0
    for rank in range(world):
        loader = build_val_loader(ds, rank=rank, world_size=world, batch_size=2, device="cpu", num_workers=0)
        batches = list(loader)
        assert len(loader) == len(batches)
        total_batches += len(batches)
        seen += [int(t) for _, y in batches for t in y]
    assert sorted(seen) == list(range(n))


def test_too_small_training_set_is_an_error() -> None:
    with pytest.raises(
        DataError, match=r"fewer than one batch of 8. Use more samples or a smaller batch_size"
    ):
        build_train_loader(
            _indexed_set(10, _mem_opts()), rank=0, world_size=2, batch_size=8, seed=0, device="cpu"
        )


def _stream(loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, start)
    return list(loader)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_stream_is_independent_of_workers_and_resume(clean_tree: Path) -> None:
    """RandomResizedCrop + flip + RandAugment (torch, random and numpy draws), real worker processes."""
    ds = build_dataset(
        "train",
        name="imagefolder",
        root=str(clean_tree),
        num_classes=3,
        image_size=16,
        auto_augment="rand-m9-n3",
    )

    def loader(num_workers: int):
        return build_train_loader(
            ds, rank=0, world_size=1, batch_size=4, seed=5, device="cpu", num_workers=num_workers
        )

    main, workers = loader(0), loader(2)  # persistent workers (the default)
    epoch1 = _stream(main, 1)
    assert len(epoch1) == len(main) == 4 and epoch1[0][0].shape == (4, 3, 16, 16)
    assert _same(epoch1, _stream(workers, 1))
    assert _same(epoch1[2:], _stream(workers, 1, start=2))  # persistent workers, resumed mid-epoch
    assert _same(epoch1[1:], _stream(main, 1, start=1))
    assert not torch.equal(epoch1[0][0], _stream(main, 2)[0][0])  # another epoch, another stream
    assert count_bad_files(ds) == 0


def test_iterating_never_touches_the_global_rngs() -> None:
    opts = _mem_opts(random_crop_padding=2, hflip=True)
    ds = _indexed_set(12, opts)
    ds.transform = memory_transform(opts, "train", 8)
    loader = build_train_loader(ds, batch_size=4, seed=0, **LOADER)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    for _ in loader:
        pass
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])


def test_set_epoch_checks_start_batch() -> None:
    loader = build_train_loader(_indexed_set(12, _mem_opts()), batch_size=4, seed=0, **LOADER)
    with pytest.raises(ValueError, match=r"start_batch 4 is outside \[0, 3\]"):
        loader.set_epoch(0, start_batch=4)
