"""Samplers: a seeded, rank-split training order with per-sample augmentation seeds, and exact shards.

Training (`TrainSampler`): epoch e's order is a permutation drawn from (seed, e), cut to a multiple of
the world size and dealt round-robin to the ranks, like `DistributedSampler(drop_last=True)`. Each
position p of that global order also gets a sample seed drawn from (seed, e); `SeededDataset` seeds
torch / random / numpy with it before loading the sample. The augmented stream therefore depends on
(seed, epoch, position) only: not on the number of workers, nor on where a resumed epoch restarts.

Evaluation (`ShardSampler`): contiguous shards, every index on exactly one rank, no padding.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = ["SeededDataset", "ShardSampler", "TrainSampler", "epoch_order", "shard_range"]

_SEED_BOUND = 2**62


def epoch_order(n: int, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
    """(permutation of range(n), one sample seed per position), both int64 (n,), from (seed, epoch)."""
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator().manual_seed(int(mixed))
    perm = torch.randperm(n, generator=g)
    seeds = torch.randint(0, _SEED_BOUND, (n,), generator=g)
    return perm, seeds


class TrainSampler(Sampler[tuple[int, int]]):
    """Yields (dataset index, sample seed) for this rank; `set_epoch` picks the epoch and a start."""

    def __init__(self, num_items: int, *, rank: int, world_size: int, seed: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.num_items, self.rank, self.world_size, self.seed = num_items, rank, world_size, seed
        self.num_samples = num_items // world_size  # per rank; the tail of the order is dropped
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch `epoch`'s order, skipping this rank's first `start` samples (mid-epoch resume)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is outside [0, {self.num_samples}] samples of this rank")
        self.epoch, self.start = epoch, start

    def rank_order(self) -> tuple[Tensor, Tensor]:
        """(indices, sample seeds) of this rank for the current epoch, from `start` on; int64 (m,)."""
        perm, seeds = epoch_order(self.num_items, self.seed, self.epoch)
        positions = torch.arange(self.rank, self.num_samples * self.world_size, self.world_size)
        positions = positions[self.start :]
        return perm[positions], seeds[positions]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self.rank_order()
        return zip(indices.tolist(), seeds.tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous shard; the shards of all ranks partition range(num_items)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    return range(rank * num_items // world_size, (rank + 1) * num_items // world_size)


class ShardSampler(Sampler[int]):
    """Evaluation order of one rank: its contiguous shard, in order."""

    def __init__(self, num_items: int, *, rank: int, world_size: int) -> None:
        self.indices = shard_range(num_items, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_all(seed: int) -> None:
    # The CPU generator only: torch.manual_seed would also reseed (and initialise) CUDA.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore torch's CPU, python's and numpy's global RNG states on exit."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class SeededDataset(Dataset):
    """`dataset[index]` under global RNGs seeded with the sample seed: key = (index, sample seed).

    In a worker process the seeding is all that is needed. In the main process (num_workers=0) the
    caller's RNG states are restored afterwards, so iterating never consumes the training RNG.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A whole batch (DataLoader's batched fetch): the caller's RNG states are saved and restored
        once per batch, not per sample (numpy's get/set_state alone cost ~90 us per sample)."""
        guard = contextlib.nullcontext() if get_worker_info() is not None else _preserved_rng()
        samples = []
        with guard:
            for index, seed in keys:
                _seed_all(seed)
                samples.append(self.dataset[index])
        return samples
