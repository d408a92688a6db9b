"""Every decoder path gives 8-bit RGB of the right values for 16-bit, animated, palette, CMYK, BMP and TIFF
files, and counts the files it cannot convert as bad instead of loading something else."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_animated_gif, write_png16
from PIL import Image
from torchvision.transforms.v2 import functional as F

from polyscale.data import build_dataset, build_train_loader, build_val_loader, count_bad_files
from polyscale.data.decode import ResizeCenterCropDecode, decode_rgb_tensor, open_rgb
from polyscale.data.gpu_decode import EncodedValLoad

DECODERS = ["pil", "torchvision", "cuda"]  # "cuda": its device stage runs on the CPU here

# 16-bit values with awkward roundings (255 -> 1, 1000 -> 4, 65280 -> 254): expected round(v * 255 / 65535).
VALUES16 = np.array([[0, 255, 256, 1000], [32768, 40000, 65280, 65535]], dtype=np.uint16)  # (2, 4)


def _to8(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.int64)


@pytest.fixture(scope="module")
def png16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """name: (path, expected 8-bit RGB (H, W, 3))."""
    folder = tmp_path_factory.mktemp("png16")
    rgb = np.stack([VALUES16, 65535 - VALUES16, VALUES16 // 3], -1)  # (2, 4, 3)
    write_png16(folder / "gray16.png", VALUES16)
    write_png16(folder / "rgb16.png", rgb)
    Image.fromarray(VALUES16).save(folder / "gray16.tif")  # PIL writes 16-bit grayscale TIFF (I;16)
    gray = np.repeat(_to8(VALUES16)[..., None], 3, -1)
    return {
        "gray16.png": (folder / "gray16.png", gray),
        "rgb16.png": (folder / "rgb16.png", _to8(rgb)),
        "gray16.tif": (folder / "gray16.tif", gray),
    }


@pytest.mark.parametrize("name", ["gray16.png", "rgb16.png", "gray16.tif"])
def test_16_bit_images_are_scaled_to_8_bits_by_every_decoder(png16, name: str) -> None:
    path, expected = png16[name]
    expected = torch.from_numpy(expected).permute(2, 0, 1)  # (3, 2, 4)
    decoded = {
        "pil": F.pil_to_tensor(open_rgb(str(path))),
        "torchvision": decode_rgb_tensor(str(path)),
        "cuda decoder's CPU fallback": EncodedValLoad(2, 2)(str(path)).data,  # not a JPEG: the worker decodes
        # evaluation's fused resize + center crop: shorter side 2 = as is, crop the middle 2 columns
        "pil val": F.pil_to_tensor(ResizeCenterCropDecode(2, 2, draft=False)(str(path))),
    }
    for where, image in decoded.items():
        want = expected[:, :, 1:3] if where == "pil val" else expected
        assert image.dtype == torch.uint8 and image.shape == want.shape, where
        assert (image.long() - want.long()).abs().max() <= 1, (where, image, want)


@pytest.mark.parametrize("decoder", DECODERS)
def test_16_bit_images_train_to_their_8_bit_values(tmp_path: Path, decoder: str) -> None:
    """Flat 16-bit images through the training crops (fused PIL crop, tensor crop, device crop)."""
    colours = {"gray": (51400,) * 3, "rgb": (1000, 40000, 65280)}
    for split in ("train", "val"):
        for name, colour in colours.items():
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            values = np.tile(np.array(colour, np.uint16), (30, 40, 1))  # (H, W, 3)
            write_png16(folder / "x.png", values[..., 0] if name == "gray" else values)
    opts = dict(name="imagefolder", root=str(tmp_path), num_classes=2, image_size=8, decoder=decoder)
    ds = build_dataset("train", mean=[0.0] * 3, std=[1.0] * 3, **opts)
    loader = build_train_loader(ds, rank=0, world_size=1, batch_size=2, seed=0, device="cpu", num_workers=0)
    images, targets = next(iter(loader))
    for image, target in zip(images, targets):
        want = torch.from_numpy(_to8(np.array(colours[ds.classes[int(target)]]))).view(3, 1, 1)
        assert ((image * 255).round() - want).abs().max() <= 1, (
            ds.classes[int(target)],
            image[:, 0, 0] * 255,
        )


def _flat_tree(root: Path, files: dict[str, tuple[int, int, int] | None]) -> Path:
    """train/ = val/: class c0 with the given files, class c1 with one plain PNG. A colour is the flat RGB
    the file must decode to (None: a bad file)."""
    for split in ("train", "val"):
        (root / split / "c1").mkdir(parents=True)
        Image.new("RGB", (24, 20), (1, 2, 3)).save(root / split / "c1" / "plain.png")
    (root / "val" / "c0").symlink_to(root / "train" / "c0", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, int, int] | None]]:
    """Flat images in assorted formats and a few files no decoder can use, with what each must give."""
    root = tmp_path_factory.mktemp("zoo")
    c0 = root / "train" / "c0"
    c0.mkdir(parents=True)
    expect: dict[str, tuple[int, int, int] | None] = {}
    size = (24, 20)

    def flat16(name: str, value: tuple[int, int, int]) -> None:
        write_png16(c0 / name, np.tile(np.array(value, np.uint16), (size[1], size[0], 1)))
        expect[name] = tuple(int(v) for v in _to8(np.array(value)))

    flat16("a16.png", (1000, 40000, 65280))
    write_png16(c0 / "b16gray.png", np.full(size[::-1], 51400, np.uint16))
    expect["b16gray.png"] = (200, 200, 200)
    write_animated_gif(c0 / "anim.gif", [(220, 20, 60), (0, 128, 0), (0, 0, 255)], size)
    expect["anim.gif"] = (220, 20, 60)  # the first frame
    frames = [Image.new("RGB", size, c) for c in [(10, 120, 240), (250, 250, 0)]]
    frames[0].save(c0 / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    expect["anim.webp"] = (10, 120, 240)
    Image.new("RGB", size, (30, 60, 90)).save(c0 / "plain.bmp")
    expect["plain.bmp"] = (30, 60, 90)
    Image.new("RGB", size, (90, 60, 30)).save(c0 / "plain.tif")
    expect["plain.tif"] = (90, 60, 30)
    palette = Image.new("P", size, 1)
    palette.putpalette([0, 0, 0, 40, 80, 160] + [0] * 762)
    palette.save(c0 / "palette_alpha.png", transparency=0)  # index 0 transparent, pixels index 1
    expect["palette_alpha.png"] = (40, 80, 160)
    Image.new("RGB", size, (200, 40, 90)).convert("CMYK").save(c0 / "cmyk.jpg", quality=95)
    expect["cmyk.jpg"] = (200, 40, 90)
    # bad: empty, float pixels (no 8-bit range), broken link, link loop (open() fails: the as-root
    # stand-in for an unreadable file, since root reads a chmod 000 file)
    (c0 / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.full(size[::-1], 0.5, np.float32)).save(c0 / "float.tif")
    (c0 / "broken_link.png").symlink_to(c0 / "missing.png")
    (c0 / "loop_a.png").symlink_to(c0 / "loop_b.png")
    (c0 / "loop_b.png").symlink_to(c0 / "loop_a.png")
    for name in ("empty.jpg", "float.tif", "broken_link.png", "loop_a.png", "loop_b.png"):
        expect[name] = None
    return _flat_tree(root, expect), expect


@pytest.mark.parametrize("decoder", DECODERS)
def test_assorted_formats_decode_to_their_colour_or_count_as_bad(zoo, decoder: str, caplog) -> None:
    root, expect = zoo
    opts = dict(name="imagefolder", root=str(root), num_classes=2, image_size=8, decoder=decoder)
    opts |= dict(mean=[0.0] * 3, std=[1.0] * 3, crop_ratio=1.0)  # items = pixels / 255
    val = build_dataset("val", **opts)
    loader = build_val_loader(val, rank=0, world_size=1, batch_size=4, device="cpu", num_workers=0)
    with caplog.at_level(logging.WARNING, logger="polyscale.data"):
        images, targets = (torch.cat(t) for t in zip(*loader))
    names = [Path(val.path(i)).name for i in range(len(val))]
    assert sorted(n for n in names if n != "plain.png") == sorted(expect)
    for i, name in enumerate(names):
        colour = expect.get(name, (1, 2, 3))
        if colour is None:
            assert targets[i] == -1, name
            assert name in caplog.text
            continue
        assert targets[i] >= 0, name
        pixels = (images[i] * 255).round()  # (3, 8, 8), flat
        assert (pixels - torch.tensor(colour).view(3, 1, 1)).abs().max() <= 2, (name, pixels[:, 0, 0])
    assert count_bad_files(val) == sum(c is None for c in expect.values())
    # Training: the same files through the fused / tensor crop paths, bad ones replaced.
    train = build_dataset("train", **opts)
    batches = build_train_loader(
        train, rank=0, world_size=1, batch_size=3, seed=0, device="cpu", num_workers=0
    )
    for x, y in batches:
        assert x.shape == (3, 3, 8, 8) and y.min() >= 0
    assert count_bad_files(train) == count_bad_files(val)
