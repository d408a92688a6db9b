"""Data for the data tests, generated: a JPEG class tree with awkward files, CIFAR-format pickles."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from polyscale.config import DataConfig

CLASSES = ("c0", "c1", "c2")
# Awkward files of the tree (relative to its root); each decodes to RGB or is a bad file.
GRAY, CMYK, ALPHA = "train/c0/gray.jpg", "train/c1/cmyk.jpg", "train/c2/alpha.png"
CORRUPT, TRUNCATED = "train/c2/zz_corrupt.JPEG", "val/c1/truncated.JPEG"
CMYK_RGB = (200, 40, 90)  # the colour the CMYK file holds


def make_cfg(**overrides: Any) -> DictConfig:
    """A data config as Hydra gives it (structured DictConfig, lists as ListConfig)."""
    return OmegaConf.structured(DataConfig(**overrides))


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random low-frequency colours + noise, uint8 (H, W, 3): JPEG-friendly like a photo."""
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    up = np.kron(coarse, np.ones((8, 8, 1), np.float32))[:height, :width]
    return np.clip(up + rng.normal(0, 6, up.shape), 0, 255).astype(np.uint8)


def write_jpeg_tree(root: Path, *, per_class: int = 4, val_per_class: int = 2, awkward: bool = True) -> Path:
    """root/{train,val}/{c0,c1,c2}/*.JPEG of assorted sizes, plus (awkward=True) the files above."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = 40 + 8 * ((i + c) % 3), 64 - 8 * (i % 2)
                Image.fromarray(_smooth_image(rng, h, w)).save(folder / f"{i:02d}.JPEG", quality=90)
    if awkward:
        Image.fromarray(_smooth_image(rng, 48, 40)[..., 0]).save(root / GRAY, quality=90)  # mode L
        Image.new("RGB", (44, 52), CMYK_RGB).convert("CMYK").save(root / CMYK, quality=95)
        rgba = np.dstack([_smooth_image(rng, 40, 40), rng.integers(0, 256, (40, 40), dtype=np.uint8)])
        Image.fromarray(rgba, "RGBA").save(root / ALPHA)
        (root / CORRUPT).write_bytes(b"this is not a JPEG at all" * 20)
        good = (root / "val/c1/00.JPEG").read_bytes()
        (root / TRUNCATED).write_bytes(good[: len(good) // 2])
    return root


def write_cifar(root: Path, name: str, per_batch: int = 6, test: int = 10) -> dict[str, np.ndarray]:
    """torchvision's python-format CIFAR files with random images; returns the arrays written."""
    rng = np.random.default_rng(1)
    hundred = name == "cifar100"
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    files = (
        {"train": 5 * per_batch, "test": test}
        if hundred
        else {**{f"data_batch_{i}": per_batch for i in range(1, 6)}, "test_batch": test}
    )
    written = {}
    for fname, n in files.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane
        labels = rng.integers(0, classes, n).tolist()
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
        written[fname] = data
        written[fname + "_labels"] = np.array(labels)
    meta_name, key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({key: [f"class{i}" for i in range(classes)]}, f)
    return written
