"""Image-folder data sets on a generated JPEG tree: shapes, value ranges, RGB conversion, bad files."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import ALPHA, CMYK, CMYK_RGB, CORRUPT, GRAY, TRUNCATED
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from polyscale.data import build_dataset, build_train_loader, build_val_loader, count_bad_files
from polyscale.data.decode import RandomResizedCropDecode, ResizeCenterCropDecode, open_rgb
from polyscale.data.gpu_decode import EncodedBatchDecoder, EncodedSample, collate_encoded
from polyscale.errors import DataError

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)
DECODERS = ["pil", "torchvision", "cuda"]  # "cuda" runs its device stage on the CPU here


def _opts(root: Path, **kw) -> dict:
    """Data options of the generated tree (what the engine passes on from the data config)."""
    base = dict(name="imagefolder", root=str(root), num_classes=3, image_size=24, num_workers=0)
    return {**base, **kw}


def _workers(opts: dict) -> dict:
    """The loader arguments among the options."""
    return {k: opts[k] for k in ("num_workers", "pin_memory", "persistent_workers") if k in opts}


def _index(ds, rel: str) -> int:
    return next(i for i in range(len(ds)) if ds.path(i).endswith(rel.split("/", 1)[1]))


def _val_batches(ds, opts, batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    loader = build_val_loader(ds, rank=0, world_size=1, batch_size=batch_size, device="cpu", **_workers(opts))
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("decoder", DECODERS)
def test_val_items_shape_range_and_bad_file(jpeg_tree: Path, decoder: str, caplog) -> None:
    opts = _opts(jpeg_tree, decoder=decoder, mean=[0.0] * 3, std=[1.0] * 3)  # identity normalisation
    ds = build_dataset("val", crop_size=20, **opts)
    with caplog.at_level(logging.WARNING, logger="polyscale.data"):
        images, targets = _val_batches(ds, opts)
    assert images.shape == (len(ds), 3, 20, 20) and images.dtype == torch.float32
    bad = _index(ds, TRUNCATED)
    assert targets[bad] == -1 and int((targets == -1).sum()) == 1
    assert torch.equal(targets[targets >= 0], torch.as_tensor(np.delete(ds.targets, bad)))
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.05
    assert count_bad_files(ds) == 1
    assert TRUNCATED.split("/")[-1] in caplog.text and "skipped (target -1)" in caplog.text


@pytest.fixture()
def train_as_val(jpeg_tree: Path, tmp_path: Path) -> Path:
    """A root whose val/ is the tree's train/ (with the awkward files): evaluated without augmentation."""
    for split in ("train", "val"):
        (tmp_path / split).symlink_to(jpeg_tree / "train", target_is_directory=True)
    return tmp_path


@pytest.mark.parametrize("decoder", DECODERS)
def test_awkward_modes_become_rgb(train_as_val: Path, decoder: str) -> None:
    opts = _opts(train_as_val, decoder=decoder, mean=[0.0] * 3, std=[1.0] * 3)
    ds = build_dataset("val", **opts)
    images, targets = _val_batches(ds, opts, batch_size=len(ds))
    assert images.shape == (len(ds), 3, 24, 24) and int((targets == -1).sum()) == 1  # the corrupt file
    gray = images[_index(ds, GRAY)]
    assert torch.allclose(gray[0], gray[1], atol=1 / 255) and torch.allclose(gray[1], gray[2], atol=1 / 255)
    cmyk_pixel = images[_index(ds, CMYK)].mean((1, 2)) * 255
    assert torch.allclose(cmyk_pixel, torch.tensor(CMYK_RGB, dtype=torch.float32), atol=6)
    with Image.open(train_as_val / ALPHA) as png:
        expected = F.pil_to_tensor(v2.CenterCrop(24)(v2.Resize(27)(png.convert("RGB")))).float() / 255
    assert torch.allclose(images[_index(ds, ALPHA)], expected, atol=1 / 255 + 1e-6)


def test_normalisation_matches_mean_std(jpeg_tree: Path) -> None:
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    raw = build_dataset("val", **_opts(jpeg_tree, mean=[0.0] * 3, std=[1.0] * 3))[0][0]
    normed = build_dataset("val", **_opts(jpeg_tree, mean=mean, std=std))[0][0]
    expected = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normed, expected, atol=1e-5)


def test_train_substitutes_next_decodable_file(jpeg_tree: Path, caplog) -> None:
    ds = build_dataset("train", **_opts(jpeg_tree))
    bad = _index(ds, CORRUPT)
    with caplog.at_level(logging.WARNING, logger="polyscale.data"):
        torch.manual_seed(3)
        image, target = ds[bad]
    torch.manual_seed(3)
    next_image, next_target = ds[(bad + 1) % len(ds)]
    assert torch.equal(image, next_image) and target == next_target
    assert count_bad_files(ds) == 1 and "zz_corrupt.JPEG" in caplog.text
    ds[bad]  # a known bad file is not counted twice
    assert count_bad_files(ds) == 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_on_bad_file_error_raises_naming_the_file(jpeg_tree: Path, decoder: str) -> None:
    ds = build_dataset("train", **_opts(jpeg_tree, on_bad_file="error", decoder=decoder))
    with pytest.raises(
        DataError, match=r"Cannot read image file .*zz_corrupt.JPEG.* on_bad_file=skip"
    ) as info:
        ds[_index(ds, CORRUPT)]
    assert "`on_bad_file`=skip" in info.value.args[0]  # marked, so the engine can name its config key
    assert "data.on_bad_file=skip to log" in str(info.value.with_keys("data."))


def test_cuda_path_equals_torchvision_path(jpeg_tree: Path) -> None:
    """Same crop boxes and flips from the per-sample seeds, same decoder on the CPU: same batches."""
    batches = {}
    for decoder in ("torchvision", "cuda"):
        opts = _opts(jpeg_tree, decoder=decoder)
        loader = build_train_loader(
            build_dataset("train", **opts),
            rank=0,
            world_size=1,
            batch_size=5,
            seed=4,
            device="cpu",
            num_workers=0,
        )
        batches[decoder] = list(loader)
    for (x_tv, y_tv), (x_gpu, y_gpu) in zip(batches["torchvision"], batches["cuda"]):
        assert torch.equal(y_tv, y_gpu) and torch.allclose(x_tv, x_gpu, atol=1e-5)


def test_fused_eval_crop_matches_resize_then_center_crop(jpeg_tree: Path) -> None:
    path = str(jpeg_tree / "val/c0/00.JPEG")
    for crop, resize in ((24, 27), (32, 32), (16, 40)):
        reference = F.pil_to_tensor(v2.CenterCrop(crop)(v2.Resize(resize)(open_rgb(path)))).float()
        fused = F.pil_to_tensor(ResizeCenterCropDecode(resize, crop, draft=False)(path)).float()
        assert fused.shape == (3, crop, crop)
        assert (fused - reference).abs().max() <= 2  # same resampling, one pass: rounding only


def test_jpeg_draft_stays_close_to_full_decode(tmp_path: Path) -> None:
    """Reduce-on-decode (1/4 scale here) changes pixels by about a grey level on average."""
    y, x = np.mgrid[0:600, 0:800] / 100.0
    smooth = np.stack([np.sin(x) * 100 + 120, np.cos(y) * 100 + 120, np.sin(x + y) * 60 + 120], -1)
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "big.jpg", quality=90)
    path = str(tmp_path / "big.jpg")
    full = F.pil_to_tensor(ResizeCenterCropDecode(146, 128, draft=False)(path)).float()
    drafted = F.pil_to_tensor(ResizeCenterCropDecode(146, 128, draft=True)(path)).float()
    assert drafted.shape == full.shape and (drafted - full).abs().mean() < 1.5
    torch.manual_seed(0)
    top, left, h, w = T.RandomResizedCrop.get_params(open_rgb(path), [0.5, 1.0], [0.75, 4 / 3])
    reference = F.resized_crop(F.pil_to_tensor(open_rgb(path)), top, left, h, w, [64, 64], antialias=True)
    for draft in (False, True):
        torch.manual_seed(0)  # the fused op draws the same box
        out = RandomResizedCropDecode(64, [0.5, 1.0], [0.75, 4 / 3], draft=draft)(path)
        assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
        diff = (out.float() - reference.float()).abs()
        assert diff.max() <= 1 if not draft else diff.mean() < 1.5


@pytest.mark.parametrize("on_bad_file", ["skip", "error"])
def test_device_stage_handles_a_jpeg_only_the_header_of_which_is_valid(
    jpeg_tree: Path, on_bad_file: str
) -> None:
    ds = build_dataset("train", **_opts(jpeg_tree, decoder="cuda", on_bad_file=on_bad_file))
    torch.manual_seed(0)
    sample, target, index = ds[0]
    sample = sample._replace(flip=False)
    broken = EncodedSample(
        torch.tensor(list(b"\xff\xd8" + bytes(60) + b"\xff\xd9"), dtype=torch.uint8), sample.params, False
    )
    batch = collate_encoded([(broken, (target + 1) % 3, 5), (sample, target, index)])
    for train in (True, False):
        decode = EncodedBatchDecoder(
            ds, torch.device("cpu"), 24, "bilinear", [0.0] * 3, [1.0] * 3, train=train
        )
        if on_bad_file == "error":
            with pytest.raises(DataError, match=f"Cannot read image file {re.escape(ds.path(5))}"):
                decode(batch)
            continue
        images, targets = decode(batch)
        if train:  # stand-in: the next decodable sample of the batch
            assert torch.equal(images[0], images[1]) and targets.tolist() == [target, target]
        else:
            assert targets.tolist() == [-1, target]
            assert decode(collate_encoded([(broken, 1, 5)]))[1].tolist() == [-1]  # a batch of bad files
    assert count_bad_files(ds) == (1 if on_bad_file == "skip" else 0) and ds.bad_file_mask[5] == (
        on_bad_file == "skip"
    )
