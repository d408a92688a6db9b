"""Data for the data tests, generated: a JPEG class tree with awkward files, CIFAR-format pickles,
16-bit PNGs, animated GIFs."""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("c0", "c1", "c2")
# Awkward files of the tree (relative to its root); each decodes to RGB or is a bad file.
GRAY, CMYK, ALPHA = "train/c0/gray.jpg", "train/c1/cmyk.jpg", "train/c2/alpha.png"
CORRUPT, TRUNCATED = "train/c2/zz_corrupt.JPEG", "val/c1/truncated.JPEG"
CMYK_RGB = (200, 40, 90)  # the colour the CMYK file holds


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


def write_png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG of uint16 `values` (H, W) grayscale or (H, W, 3) RGB, written chunk by chunk (PIL
    cannot save 16-bit RGB)."""
    height, width = values.shape[:2]
    channels = 1 if values.ndim == 2 else values.shape[2]
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = values.reshape(height, width * channels).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def write_animated_gif(
    path: Path, colours: list[tuple[int, int, int]], size: tuple[int, int] = (40, 32)
) -> None:
    """A GIF with one flat frame per colour (first frame first)."""
    frames = [Image.new("RGB", size, c) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
