"""In-memory sets: CIFAR pickles, on-device augmentation (on the CPU here), synthetic, built-in, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import make_cfg, write_cifar
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from polyscale.config import DataConfig, register_configs
from polyscale.data import build_dataset, build_train_loader, build_val_loader, count_bad_files
from polyscale.data.device_memory import random_crop_flip
from polyscale.errors import ConfigError, DataError

CONFIGS = Path(__file__).parents[2] / "configs"
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def _unnormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Back to 0..255 pixel values."""
    return (x * torch.tensor(std).view(-1, 3, 1, 1) + torch.tensor(mean).view(-1, 3, 1, 1)) * 255


@pytest.fixture()
def cifar10(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, write_cifar(tmp_path, "cifar10")


def _cifar_cfg(root: Path, **kw):
    return make_cfg(
        name="cifar10",
        root=str(root),
        crop_ratio=1.0,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        num_workers=0,
        **kw,
    )


def test_cifar10_reads_the_pickles(cifar10) -> None:
    root, written = cifar10
    val = build_dataset(_cifar_cfg(root), "val")
    train = build_dataset(_cifar_cfg(root), "train")
    assert len(train) == 30 and len(val) == 10 and val.num_classes == 10 and count_bad_files(val) == 0
    image, target = val[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    expected = torch.from_numpy(written["test_batch"][3].reshape(3, 32, 32)).float()  # rows are CHW planes
    assert torch.allclose(_unnormalise(image, CIFAR10_MEAN, CIFAR10_STD)[0], expected, atol=1e-3)
    assert target == written["test_batch_labels"][3]
    assert (
        train.targets.tolist()
        == np.concatenate([written[f"data_batch_{i}_labels"] for i in range(1, 6)]).tolist()
    )


def test_cifar_root_may_point_at_the_extracted_folder(cifar10) -> None:
    root, _ = cifar10
    assert len(build_dataset(_cifar_cfg(root / "cifar-10-batches-py"), "val")) == 10


def test_cifar100_fine_labels_and_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_cifar(tmp_path, "cifar100")
    monkeypatch.setenv("CIFAR_ROOT", str(tmp_path))
    ds = build_dataset(make_cfg(name="cifar100", num_classes=100, crop_ratio=1.0), "train")
    assert len(ds) == 30 and ds.num_classes == 100 and ds.targets.tolist() == written["train_labels"].tolist()
    with pytest.raises(DataError, match=r"cifar100 has 100 classes but data.num_classes=10"):
        build_dataset(make_cfg(name="cifar100", num_classes=10), "train")


def test_cifar_train_transform_is_pad_crop_flip(cifar10) -> None:
    """Each augmented image is a 32x32 window of the zero-padded image, maybe mirrored."""
    root, written = cifar10
    ds = build_dataset(_cifar_cfg(root), "train")
    torch.manual_seed(0)
    for i in range(6):
        out = _unnormalise(ds[i][0], CIFAR10_MEAN, CIFAR10_STD)[0].round()
        padded = torch.nn.functional.pad(ds.images[i].float(), (4, 4, 4, 4))
        windows = [padded[:, t : t + 32, s : s + 32] for t in range(9) for s in range(9)]
        assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)


def test_device_augmentation_crops_flips_and_is_reproducible(cifar10) -> None:
    root, _ = cifar10
    cfg = _cifar_cfg(root, gpu_augment=True)
    ds = build_dataset(cfg, "train")
    loader = build_train_loader(ds, cfg, rank=0, world_size=1, batch_size=8, seed=3, device="cpu")
    loader.set_epoch(2)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and batches[0][0].shape == (8, 3, 32, 32)
    loader.set_epoch(2, start_batch=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[1:], loader))
    flips = 0
    for x, y in batches:
        pixels = _unnormalise(x, CIFAR10_MEAN, CIFAR10_STD).round()
        for img, target in zip(pixels, y):
            matches = [k for k in range(len(ds)) if ds.targets[k] == target]
            padded = [torch.nn.functional.pad(ds.images[k].float(), (4, 4, 4, 4)) for k in matches]
            windows = [p[:, t : t + 32, s : s + 32] for p in padded for t in range(9) for s in range(9)]
            assert any(torch.equal(img, w) for w in windows) or any(
                torch.equal(img, w.flip(-1)) for w in windows
            )
            flips += not any(torch.equal(img, w) for w in windows)
    assert 0 < flips < 24  # both flipped and unflipped samples


def test_random_crop_flip_offsets_follow_seed_bits() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    seeds = torch.tensor([(1 << 20) * 2 + 1, (1 << 40) + 0])  # sample 0: top 1, left 2; sample 1: flip
    out = random_crop_flip(images, seeds, size=3, padding=1, hflip=True)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    assert torch.equal(out[0], padded[0, :, 1:4, 2:5]) and torch.equal(
        out[1], padded[1, :, 0:3, 0:3].flip(-1)
    )


def test_device_eval_loader_matches_cpu_eval(cifar10) -> None:
    root, _ = cifar10
    cpu = [build_dataset(_cifar_cfg(root), "val")[i][0] for i in range(10)]
    cfg = _cifar_cfg(root, gpu_augment=True)
    ds = build_dataset(cfg, "val", crop_size=32)
    seen = []
    for rank in range(3):
        for x, y in build_val_loader(ds, cfg, rank=rank, world_size=3, batch_size=2, device="cpu"):
            seen += [(img, int(t)) for img, t in zip(x, y)]
    assert len(seen) == 10 and all(torch.allclose(img, ref, atol=1e-5) for (img, _), ref in zip(seen, cpu))


def test_gpu_augment_needs_an_in_memory_set() -> None:
    cfg = make_cfg(name="synthetic", gpu_augment=True, num_train_samples=8, image_size=8)
    with pytest.raises(ConfigError, match=r"in-memory set .* SyntheticDataset is not one"):
        build_train_loader(
            build_dataset(cfg, "train"), cfg, rank=0, world_size=1, batch_size=2, seed=0, device="cpu"
        )


def test_synthetic_is_fixed_and_shaped() -> None:
    cfg = make_cfg(name="synthetic", num_classes=7, image_size=12, num_train_samples=20, num_val_samples=5)
    train, again, val = (
        build_dataset(cfg, "train"),
        build_dataset(cfg, "train"),
        build_dataset(cfg, "val", crop_size=9),
    )
    assert len(train) == 20 and len(val) == 5 and train.num_classes == 7
    assert torch.equal(train[4][0], again[4][0]) and train[4][1] == again[4][1] and 0 <= train[4][1] < 7
    assert not torch.equal(train[4][0], train[5][0]) and val[0][0].shape == (3, 9, 9)
    assert abs(float(train[0][0].mean())) < 0.2 and 0.8 < float(train[0][0].std()) < 1.2


def test_builtin_set_gets_cifar_style_pipeline() -> None:
    pytest.importorskip("polyscale.data.builtin")
    cfg = make_cfg(
        name="builtin",
        num_classes=4,
        image_size=16,
        crop_ratio=1.0,
        num_train_samples=16,
        num_val_samples=8,
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 16 and len(val) == 8 and train.num_classes == 4
    x, y = val[0]
    assert x.shape == (3, 16, 16) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0 and 0 <= y < 4
    torch.manual_seed(0)
    assert train[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("name", ["builtin", "synthetic", "cifar10", "cifar100", "imagenet", "imagefolder"])
def test_data_configs_compose_and_validate(name: str) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(f"data/{name}").data
    data = OmegaConf.to_object(cfg)
    assert isinstance(data, DataConfig) and data.name == name
    assert len(data.mean) == len(data.std) == 3 and 0 < data.crop_ratio <= 1
    if name in ("synthetic", "builtin"):
        cfg.num_train_samples, cfg.num_val_samples = 8, 4
        if name == "builtin":
            pytest.importorskip("polyscale.data.builtin")
        assert build_dataset(cfg, "val")[0][0].shape == (3, data.image_size, data.image_size)
