"""In-memory data sets: CIFAR-10/100 (the python pickle batches), the built-in set, synthetic.

CIFAR and the built-in set become one `InMemoryImageDataset` (uint8 images (N, 3, H, W) + targets), so
the CPU transform and the on-device augmentation (`gpu_augment`) treat them alike.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polyscale.data.layout import resolve_root
from polyscale.data.options import DataOptions
from polyscale.errors import DataError

__all__ = ["InMemoryImageDataset", "SyntheticDataset", "load_cifar"]


class InMemoryImageDataset(Dataset):
    """uint8 images (N, 3, H, W) and int64 targets (N,); items (transform(image), target).

    `options` are the settings it was built with; the loaders read the on-device augmentation from them
    (`gpu_augment`, crop, padding, flip, mean / std).
    """

    bad_file_mask = None  # nothing to decode, nothing can be bad

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        num_classes: int,
        transform: Callable[[Tensor], Tensor],
        classes: list[str] | None = None,
        crop_size: int | None = None,
        options: DataOptions | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.targets = images, targets.long()
        self.num_classes, self.transform = num_classes, transform
        self.classes = classes or [str(i) for i in range(num_classes)]
        self.crop_size = crop_size  # evaluation crop the transform was built for (None: image_size)
        self.options = options

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])


_CIFAR = {  # name: (folder, training files, test files, meta file, label key, class-name key, archive)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        "fine_labels",
        "fine_label_names",
        "cifar-100-python.tar.gz",
    ),
}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled uint8 array needs, under numpy 1 and numpy 2 module names."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 0-4
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar  # a numpy scalar among the labels
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    # Python 3 writes bytes as _codecs.encode(text, "latin1") under protocols 0-2 (a re-pickled batch).
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class _ForbiddenObject(pickle.UnpicklingError):
    """A pickle refers to something a CIFAR batch never holds."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays only.

    A pickle can call any importable function while it loads (`os.system` included), and `root` is
    whatever folder the user pointed at: every global the stream asks for must be one that builds an
    array; anything else stops the load before it is called.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise _ForbiddenObject(f"{module}.{name}")
        return found


def _load_batch(path: Path, archive: str) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys; DataError if it is unreadable or holds other objects."""
    try:
        with open(path, "rb") as f:
            # Python 2 wrote the official files: latin1 turns their byte strings (array data included) back
            # into what they were.
            content = _ArrayUnpickler(f, encoding="latin1").load()
    except _ForbiddenObject as exc:
        raise DataError(
            f"{path} holds objects other than arrays and lists ({exc}) and is not loaded: unpickling it "
            f"could run code. A CIFAR batch is a pickled dict of a uint8 array and label lists; "
            f"replace the file with the one from {archive} (https://www.cs.toronto.edu/~kriz/cifar.html)."
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(
            f"Cannot read the CIFAR pickle {path} ({type(exc).__name__}: {exc}); re-extract {archive} there."
        ) from exc
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a CIFAR batch (a pickled {type(content).__name__}, not a dict).")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _field(batch: dict[str, Any], key: str, path: Path, archive: str) -> Any:
    if key not in batch:
        raise DataError(
            f"{path} is not a CIFAR batch of this data set: it has no {key!r} entry (keys: "
            f"{', '.join(map(str, batch)) or 'none'}); re-extract {archive} there."
        )
    return batch[key]


def load_cifar(name: str, root: str | None, train: bool) -> tuple[Tensor, Tensor, list[str]]:
    """(images uint8 (N, 3, 32, 32), targets int64 (N,), class names) of CIFAR-10/100.

    Reads torchvision's python layout without torchvision's loader: its md5 check hashes 170 MB on every
    start and rejects regenerated files, and without that check it would unpickle whatever is there.
    Files are checked for presence here and unpickled with `_ArrayUnpickler`.
    """
    base, train_files, test_files, meta_file, label_key, names_key, archive = _CIFAR[name]
    files = [*train_files, *test_files, meta_file]
    how = (
        f"{base}/ with {', '.join(files)} (the python version: download {archive} "
        f"from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there; nothing is downloaded here)"
    )
    path = resolve_root(root, "CIFAR_ROOT", name, how)
    if path.name == base and not (path / base).is_dir():
        path = path.parent  # `root` points at the extracted folder itself
    folder = Path(path) / base
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{name} files missing in {folder}: {', '.join(missing)}. Expected {path} to hold {how}; "
            f"set `root` (or $CIFAR_ROOT) to the folder that contains {base}/."
        )
    chunks, targets = [], []
    for fname in train_files if train else test_files:
        file = folder / fname
        batch = _load_batch(file, archive)
        data = np.asarray(_field(batch, "data", file, archive))
        labels = np.asarray(_field(batch, label_key, file, archive))
        shapes_fit = data.shape[1:] == (3072,) and labels.shape == data.shape[:1]
        if data.dtype != np.uint8 or labels.dtype.kind not in "iu" or not shapes_fit:
            raise DataError(
                f"{file} does not hold CIFAR images: 'data' is {data.dtype} {data.shape}, the labels "
                f"{labels.dtype} {labels.shape}; expected uint8 (N, 3072) rows (R, G, B planes of 32x32) "
                f"and N integer labels; "
                f"re-extract {archive} there."
            )
        chunks.append(data)
        targets.append(labels.astype(np.int64))
    meta = _load_batch(folder / meta_file, archive)
    classes = [
        c.decode("latin1") if isinstance(c, bytes) else str(c)
        for c in _field(meta, names_key, folder / meta_file, archive)
    ]
    images = torch.from_numpy(np.concatenate(chunks).reshape(-1, 3, 32, 32))  # rows are CHW planes
    return images, torch.from_numpy(np.concatenate(targets)), classes


class SyntheticDataset(Dataset):
    """Fixed random images (standard normal, i.e. already standardised) and labels, for benchmarks.

    Item i is a pure function of (seed, split, i): generated on access from its own generator, so the
    set takes no memory and never touches the global RNG.
    """

    bad_file_mask = None

    def __init__(
        self,
        num_samples: int,
        image_size: int,
        num_classes: int,
        *,
        seed: int = 0,
        split: str = "train",
        options: DataOptions | None = None,
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
        self.options = options

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        g = torch.Generator().manual_seed(self._base + 1 + index)
        image = torch.randn(3, self.image_size, self.image_size, generator=g)  # (3, S, S)
        return image, int(self.targets[index])
