"""In-memory sets: CIFAR pickles, on-device augmentation (on the CPU here), synthetic, built-in, configs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_cifar

from polyscale.data import DataOptions, build_dataset, build_train_loader, build_val_loader, count_bad_files
from polyscale.data.device_memory import random_crop_flip
from polyscale.errors import DataError

CONFIGS = Path(__file__).parents[2] / "configs"
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def _unnormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Back to 0..255 pixel values."""
    return (x * torch.tensor(std).view(-1, 3, 1, 1) + torch.tensor(mean).view(-1, 3, 1, 1)) * 255


@pytest.fixture()
def cifar10(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, write_cifar(tmp_path, "cifar10")


def _cifar(root: Path, **kw) -> dict:
    return dict(name="cifar10", root=str(root), crop_ratio=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD, **kw)


def test_cifar10_reads_the_pickles(cifar10) -> None:
    root, written = cifar10
    val = build_dataset("val", **_cifar(root))
    train = build_dataset("train", **_cifar(root))
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
    assert len(build_dataset("val", **_cifar(root / "cifar-10-batches-py"))) == 10


def test_cifar100_fine_labels_and_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_cifar(tmp_path, "cifar100")
    monkeypatch.setenv("CIFAR_ROOT", str(tmp_path))
    ds = build_dataset("train", name="cifar100", num_classes=100, crop_ratio=1.0)
    assert len(ds) == 30 and ds.num_classes == 100 and ds.targets.tolist() == written["train_labels"].tolist()
    assert ds.classes == [f"class{i}" for i in range(100)]
    with pytest.raises(DataError, match=r"cifar100 has 100 classes but num_classes=10"):
        build_dataset("train", name="cifar100", num_classes=10)


def test_cifar_train_transform_is_pad_crop_flip(cifar10) -> None:
    """Each augmented image is a 32x32 window of the zero-padded image, maybe mirrored."""
    root, written = cifar10
    ds = build_dataset("train", **_cifar(root))
    torch.manual_seed(0)
    for i in range(6):
        out = _unnormalise(ds[i][0], CIFAR10_MEAN, CIFAR10_STD)[0].round()
        padded = torch.nn.functional.pad(ds.images[i].float(), (4, 4, 4, 4))
        windows = [padded[:, t : t + 32, s : s + 32] for t in range(9) for s in range(9)]
        assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)


def test_device_augmentation_crops_flips_and_is_reproducible(cifar10) -> None:
    root, _ = cifar10
    ds = build_dataset("train", **_cifar(root, gpu_augment=True))
    loader = build_train_loader(ds, rank=0, world_size=1, batch_size=8, seed=3, device="cpu")
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
    cpu = [build_dataset("val", **_cifar(root))[i][0] for i in range(10)]
    ds = build_dataset("val", crop_size=32, **_cifar(root, gpu_augment=True))
    seen = []
    for rank in range(3):
        for x, y in build_val_loader(ds, rank=rank, world_size=3, batch_size=2, device="cpu"):
            seen += [(img, int(t)) for img, t in zip(x, y)]
    assert len(seen) == 10 and all(torch.allclose(img, ref, atol=1e-5) for (img, _), ref in zip(seen, cpu))


def test_synthetic_is_fixed_and_shaped() -> None:
    opts = dict(name="synthetic", num_classes=7, image_size=12, num_train_samples=20, num_val_samples=5)
    train, again, val = (
        build_dataset("train", **opts),
        build_dataset("train", **opts),
        build_dataset("val", crop_size=9, **opts),
    )
    assert len(train) == 20 and len(val) == 5 and train.num_classes == 7
    assert torch.equal(train[4][0], again[4][0]) and train[4][1] == again[4][1] and 0 <= train[4][1] < 7
    assert not torch.equal(train[4][0], train[5][0]) and val[0][0].shape == (3, 9, 9)
    assert abs(float(train[0][0].mean())) < 0.2 and 0.8 < float(train[0][0].std()) < 1.2


def test_builtin_set_gets_cifar_style_pipeline() -> None:
    opts = dict(
        name="builtin",
        num_classes=4,
        image_size=16,
        crop_ratio=1.0,
        num_train_samples=16,
        num_val_samples=8,
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )
    train, val = build_dataset("train", **opts), build_dataset("val", **opts)
    assert len(train) == 16 and len(val) == 8 and train.num_classes == 4
    x, y = val[0]
    assert x.shape == (3, 16, 16) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0 and 0 <= y < 4
    torch.manual_seed(0)
    assert train[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("name", ["builtin", "synthetic", "cifar10", "cifar100", "imagenet", "imagefolder"])
def test_data_config_files_are_valid_options(name: str) -> None:
    """configs/data/NAME.yaml, read as plain YAML, gives valid DataOptions (no Hydra needed here)."""
    yaml = pytest.importorskip("yaml")
    values = yaml.safe_load((CONFIGS / "data" / f"{name}.yaml").read_text())
    values.pop("defaults", None)
    opts = DataOptions.from_kwargs(values)
    opts.validate()
    assert opts.name == name and len(opts.mean) == len(opts.std) == 3 and 0 < opts.crop_ratio <= 1
    if name in ("synthetic", "builtin"):
        small = {**values, "num_train_samples": 8, "num_val_samples": 4}
        assert build_dataset("val", **small)[0][0].shape == (3, opts.image_size, opts.image_size)


class _Payload:
    """Unpickling this creates a folder: a harmless stand-in for os.system in a planted file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_cifar_pickle_that_would_run_code_is_refused(cifar10, tmp_path: Path) -> None:
    root, _ = cifar10
    marker = tmp_path / "code_ran"
    planted = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "extra": _Payload(marker)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(planted, protocol=protocol))
        with pytest.raises(
            DataError, match=r"data_batch_1 holds objects other than arrays and lists"
        ) as info:
            build_dataset("train", **_cifar(root))
        assert "posix.mkdir" in str(info.value) and "is not loaded" in str(info.value)
        assert not marker.exists()
    assert len(build_dataset("val", **_cifar(root))) == 10  # the untouched files still load


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batches_of_any_pickle_protocol_and_key_type_load(tmp_path: Path, protocol: int) -> None:
    """The official files are Python 2 pickles (byte-string keys and data, read as latin1); re-pickled
    ones use str keys, bytes keys, numpy 1 or numpy 2 module names."""
    written = write_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"]:
        batch = pickle.loads((folder / name).read_bytes())
        batch = {k.encode(): [c.encode() for c in v] if k == "label_names" else v for k, v in batch.items()}
        stream = pickle.dumps(batch, protocol=protocol)
        if name == "data_batch_2" and protocol <= 2:  # numpy 1 wrote numpy.core.*, numpy 2 numpy._core.*
            # (protocols <= 2 name globals in newline-terminated text: the rename keeps the stream valid)
            stream = stream.replace(b"numpy._core", b"numpy.core")
        (folder / name).write_bytes(stream)
    ds = build_dataset("train", **_cifar(tmp_path))
    assert ds.classes == [f"class{i}" for i in range(10)]
    expected = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(ds.images, torch.from_numpy(expected))


def _python2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle (protocol 0) wrote it: byte-string keys and array data (STRING
    opcodes), numpy.core globals. Written out by hand, since Python 3 cannot produce it."""
    rows, cols = data.shape
    text = (
        "(dp0\nS'data'\np1\ncnumpy.core.multiarray\n_reconstruct\np2\n(cnumpy\nndarray\np3\n(I0\ntp4\nS'b'\n"
        f"p5\ntp6\nRp7\n(I1\n(I{rows}\nI{cols}\ntp8\ncnumpy\ndtype\np9\n(S'u1'\np10\nI0\nI1\ntp11\nRp12\n"
        "(I3\nS'|'\np13\nNNNI-1\nI-1\nI0\ntp14\nbI00\n"
    )
    escaped = "".join(f"\\x{b:02x}" for b in data.tobytes())
    text += f"S'{escaped}'\np15\ntp16\nbsS'labels'\np17\n(lp18\n"
    text += (
        "".join(f"I{label}\na" for label in labels) + "sS'batch_label'\np19\nS'testing batch 1 of 1'\np20\ns."
    )
    return text.encode("ascii")


def test_cifar_batch_written_by_python_2_loads(cifar10) -> None:
    root, _ = cifar10
    data = np.random.default_rng(5).integers(0, 256, (3, 3072), dtype=np.uint8)
    stream = _python2_pickle(data, [7, 0, 3])
    assert pickle.loads(stream, encoding="latin1")["labels"] == [7, 0, 3]  # what the stdlib reads
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(stream)
    ds = build_dataset("val", **_cifar(root))
    assert ds.targets.tolist() == [7, 0, 3]
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(3, 3, 32, 32)))
