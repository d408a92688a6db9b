"""In-memory data sets: CIFAR-10/100 (torchvision's python pickle batches), the built-in set, synthetic.

CIFAR and the built-in set become one `InMemoryImageDataset` (uint8 images (N, 3, H, W) + targets), so
the CPU transform and the on-device augmentation (`data.gpu_augment`) treat them alike.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from polyscale.data.layout import resolve_root
from polyscale.errors import DataError

__all__ = ["InMemoryImageDataset", "SyntheticDataset", "load_cifar"]


class InMemoryImageDataset(Dataset):
    """uint8 images (N, 3, H, W) and int64 targets (N,); items (transform(image), target)."""

    bad_file_mask = None  # nothing to decode, nothing can be bad

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        num_classes: int,
        transform: Callable[[Tensor], Tensor],
        classes: list[str] | None = None,
        crop_size: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.targets = images, targets.long()
        self.num_classes, self.transform = num_classes, transform
        self.classes = classes or [str(i) for i in range(num_classes)]
        self.crop_size = crop_size  # evaluation crop the transform was built for (None: data.image_size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])


# torchvision checks the md5 of every file on each start (170 MB of hashing) and rejects regenerated
# or re-pickled files; existence is checked here instead, and unreadable files fail when unpickled.
class _Cifar10(CIFAR10):
    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _Cifar100(CIFAR100):
    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


_CIFAR = {
    "cifar10": (_Cifar10, "cifar-10-python.tar.gz"),
    "cifar100": (_Cifar100, "cifar-100-python.tar.gz"),
}


def load_cifar(name: str, root: str | None, train: bool) -> tuple[Tensor, Tensor, list[str]]:
    """(images uint8 (N, 3, 32, 32), targets int64 (N,), class names) of CIFAR-10/100."""
    cls, archive = _CIFAR[name]
    files = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    how = (
        f"{cls.base_folder}/ with {', '.join(files)} (torchvision's python version: download {archive} "
        f"from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there; nothing is downloaded here)"
    )
    path = resolve_root(root, "CIFAR_ROOT", name, how)
    if path.name == cls.base_folder and not (path / cls.base_folder).is_dir():
        path = path.parent  # data.root points at the extracted folder itself
    folder = Path(path) / cls.base_folder
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{name} files missing in {folder}: {', '.join(missing)}. Expected {path} to hold {how}; "
            f"set data.root (or $CIFAR_ROOT) to the folder that contains {cls.base_folder}/."
        )
    try:
        ds = cls(str(path), train=train, download=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
        raise DataError(
            f"Cannot read the {name} pickles in {folder} ({type(exc).__name__}: {exc}); "
            f"re-extract {archive} there."
        ) from exc
    images = (
        torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    )  # (N, 3, 32, 32)
    return images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)


class SyntheticDataset(Dataset):
    """Fixed random images (standard normal, i.e. already standardised) and labels, for benchmarks.

    Item i is a pure function of (seed, split, i): generated on access from its own generator, so the
    set takes no memory and never touches the global RNG.
    """

    bad_file_mask = None

    def __init__(
        self, num_samples: int, image_size: int, num_classes: int, *, seed: int = 0, split: str = "train"
    ):
        if num_samples < 1 or image_size < 1 or num_classes < 1:
            raise ValueError(
                f"synthetic data needs num_samples, image_size, num_classes >= 1; "
                f"got {num_samples}, {image_size}, {num_classes}"
            )
        self.num_samples, self.image_size, self.num_classes = num_samples, image_size, num_classes
        self._base = int(
            np.random.SeedSequence([seed, split == "train"]).generate_state(1, dtype=np.uint64)[0] >> 2
        )
        g = torch.Generator().manual_seed(self._base)
        self.targets = torch.randint(0, num_classes, (num_samples,), generator=g)
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        g = torch.Generator().manual_seed(self._base + 1 + index)
        image = torch.randn(3, self.image_size, self.image_size, generator=g)  # (3, S, S)
        return image, int(self.targets[index])
