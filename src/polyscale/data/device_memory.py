"""In-memory sets kept whole on the device (`gpu_augment=True`): batched augmentation there.

CIFAR-10 is 150 MB as uint8: on a GPU, pad + random crop + flip of a whole batch are a few indexing
kernels, so an epoch is bound by the model, not by data-loader workers. The order and the
per-sample seeds come from the same `TrainSampler` as the worker path; crop offsets and flips are
read from bit fields of each sample's seed, so the stream depends on (seed, epoch, position) only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.nn import functional as nnf
from torchvision.transforms.v2 import functional as F

from polyscale.data.decode import Normalize255, interpolation_mode
from polyscale.data.memory import InMemoryImageDataset
from polyscale.data.sampler import TrainSampler

__all__ = ["DeviceTensorEvalLoader", "DeviceTensorTrainLoader", "random_crop_flip"]


def _bits(seeds: Tensor, shift: int, modulus: int) -> Tensor:
    """A value in [0, modulus) from 20 bits of each seed (seeds are uniform 62-bit integers)."""
    return ((seeds >> shift) & 0xFFFFF) % modulus


def random_crop_flip(images: Tensor, seeds: Tensor, size: int, padding: int, hflip: bool) -> Tensor:
    """Zero-pad, crop `size` squares at per-sample offsets, flip half: uint8 (B, 3, H, W) -> (B, 3, S, S)."""
    if padding:
        images = nnf.pad(images, (padding, padding, padding, padding))  # zeros, as RandomCrop(padding=p)
    n, _, height, width = images.shape
    top, left = _bits(seeds, 0, height - size + 1), _bits(seeds, 20, width - size + 1)  # (B,)
    ar = torch.arange(size, device=images.device)
    rows = (top[:, None] + ar)[:, None, :, None]  # (B, 1, S, 1)
    cols = (left[:, None] + ar)[:, None, None, :]  # (B, 1, 1, S)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(3, device=images.device)[None, :, None, None]
    out = images[batch, chan, rows, cols]  # (B, 3, S, S)
    if hflip:
        flip = _bits(seeds, 40, 2).bool()[:, None, None, None]
        out = torch.where(flip, out.flip(-1), out)
    return out


class DeviceTensorTrainLoader:
    """TrainLoader over an in-memory set copied to `device` once; see the module doc."""

    def __init__(
        self,
        dataset: InMemoryImageDataset,
        sampler: TrainSampler,
        batch_size: int,
        *,
        size: int,
        padding: int,
        hflip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
    ) -> None:
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)  # (N, 3, H, W) uint8
        self.targets = dataset.targets.to(self.device)  # (N,)
        self.sampler, self.batch_size = sampler, batch_size
        self.size, self.padding, self.hflip = size, padding, hflip
        self.normalize = Normalize255(mean, std).to(self.device)

    def __len__(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices, seeds = self.sampler.rank_order()
        indices, seeds = indices.to(self.device), seeds.to(self.device)
        for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):  # drop_last
            idx, sd = indices[start : start + self.batch_size], seeds[start : start + self.batch_size]
            images = random_crop_flip(self.images[idx], sd, self.size, self.padding, self.hflip)
            yield self.normalize(images), self.targets[idx]  # (B, 3, S, S) float, (B,)


class DeviceTensorEvalLoader:
    """Evaluation batches of one rank's contiguous shard of an in-memory set on `device`."""

    def __init__(
        self,
        dataset: InMemoryImageDataset,
        shard: range,
        batch_size: int,
        *,
        resize: int,
        crop: int,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
    ) -> None:
        self.device = torch.device(device)
        self.images = dataset.images[shard.start : shard.stop].to(self.device)  # (n, 3, H, W) uint8
        self.targets = dataset.targets[shard.start : shard.stop].to(self.device)
        self.batch_size, self.resize, self.crop = batch_size, resize, crop
        self.interp = interpolation_mode(interpolation)
        self.normalize = Normalize255(mean, std).to(self.device)

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.targets), self.batch_size):
            images = self.images[start : start + self.batch_size]
            if self.resize != images.shape[-1] or self.resize != images.shape[-2]:
                images = F.resize(images, [self.resize], interpolation=self.interp, antialias=True)
            if self.crop != images.shape[-1] or self.crop != images.shape[-2]:
                images = F.center_crop(images, [self.crop])
            yield self.normalize(images), self.targets[start : start + self.batch_size]
