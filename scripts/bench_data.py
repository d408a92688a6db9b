"""Throughput of the training input pipelines (images/s): ImageNet decode paths or CIFAR-10 in memory.

`--pipeline imagenet` (default) generates a JPEG class tree with ImageNet-like files (about 500x375,
quality 90, ~100 KB: smooth colour fields plus luma grain) in a temporary folder, or reads `--root` (a
train/ + val/ tree), and times full epochs of `build_train_loader` (RandomResizedCrop 224 + flip +
normalise) for each decoder: pil, torchvision (torchvision.io on the CPU) and, when CUDA is available,
cuda (nvJPEG + crop/flip on the GPU). The baseline, measured in the same run, is the textbook
pipeline: torchvision ImageFolder + transforms.v2 (RandomResizedCrop, flip, ToImage, ToDtype,
Normalize) under a plain DataLoader.

`--pipeline cifar` generates CIFAR-10 python pickles of `--cifar-images` random images (or reads
`--root`, the folder holding cifar-10-batches-py/) and times `build_train_loader` with the project's
cifar10 data options (configs/data/cifar10.yaml: pad 4 + random 32 crop + flip + normalise): the CPU
path for each worker count and `gpu_augment=True` (the whole set on `--device`, augmented there).
Its baseline is torchvision CIFAR10 + transforms.v2 (RandomCrop(32, padding=4), flip, ToImage,
ToDtype, Normalize) under a plain DataLoader.

Reports medians over `--repeats` epochs after a warm-up epoch (every batch iterated; CUDA synchronised
before each clock reading); prints a table and writes JSON.

    python scripts/bench_data.py --workers 0 1 2 --images 512 --out bench_data.json
    python scripts/bench_data.py --pipeline cifar --workers 0 1 2 --out bench_cifar.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

from polyscale.data import DataOptions, build_dataset, build_train_loader

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
BATCH_SIZE = {"imagenet": 64, "cifar": 128}  # --batch-size default per pipeline (cifar: cifar10.yaml's)
IMAGENET_BASELINE = "baseline (ImageFolder + v2)"
CIFAR_BASELINE = "baseline (CIFAR10 + v2)"


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour regions + mid-scale texture + luma grain: JPEG sizes close to ImageNet photos."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    mid = Image.fromarray(rng.integers(0, 256, (height // 6, width // 6, 3), dtype=np.uint8))
    mid = mid.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(coarse, np.float32) * 0.6 + np.asarray(mid, np.float32) * 0.4
    pixels += rng.normal(0, 18, (height, width, 1))  # (H, W, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_tree(root: Path, images: int, classes: int) -> float:
    """root/{train,val}/<class>/*.JPEG; returns the mean training file size in KB."""
    rng = np.random.default_rng(0)
    sizes = []
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = (
                (500, int(rng.integers(333, 376))) if i % 4 else (int(rng.integers(333, 376)), 500)
            )
            path = folder / f"{i:06d}.JPEG"
            photo_like(rng, width, height).save(path, quality=90)
            if split == "train":
                sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def make_cifar10(root: Path, images: int) -> None:
    """root/cifar-10-batches-py/: data_batch_1..5 holding `images` random uint8 images, test_batch, meta.

    torchvision's python layout: each batch a pickled dict, "data" uint8 (n, 3072) rows of R, G, B
    planes, "labels" a list of ints; batches.meta has "label_names".
    """
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    counts = [images // 5 + (i < images % 5) for i in range(5)]
    files = {f"data_batch_{i + 1}": n for i, n in enumerate(counts)} | {"test_batch": max(1, images // 5)}
    for name, n in files.items():
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=pickle.HIGHEST_PROTOCOL)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its live children (Linux /proc).

    Images per CPU-second is the per-core throughput, and unlike wall time it does not drop when
    other jobs share the machine.
    """
    total = time.process_time() + sum(os.times()[2:4])  # self (ns resolution) + reaped children
    tick = os.sysconf("SC_CLK_TCK")
    for task in os.listdir("/proc/self/task"):
        try:
            children = Path(f"/proc/self/task/{task}/children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def consume(batches: Iterable) -> int:
    """Iterate one epoch (the caller synchronises CUDA around it, so queued GPU work counts); images seen."""
    return sum(len(targets) for _, targets in batches)


def time_epochs(
    make_batches: Callable[[int], Iterable], repeats: int, device: torch.device
) -> dict[str, float]:
    """Medians over `repeats` epochs (after a warm-up epoch) of wall and CPU seconds; images per epoch."""
    count = consume(make_batches(0))  # warm-up: workers start, files enter the page cache
    walls, cpus = [], []
    for epoch in range(1, repeats + 1):
        synchronize(device)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        consume(make_batches(epoch))
        synchronize(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - cpu0)
    return {"images": count, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def measure(
    label: str, name: str, workers: int, batches: Callable, repeats: int, device: torch.device
) -> dict:
    """One result row: `label` (the JSON key naming the pipeline) = `name`, rates and medians."""
    t = time_epochs(batches, repeats, device)
    return {
        label: name,
        "workers": workers,
        "images_per_s": t["images"] / t["wall_s"],
        "images_per_cpu_s": t["images"] / t["cpu_s"],
        **t,
    }


def add_ratios(row: dict, base: dict) -> None:
    """Speed-ups over the baseline row `base` (images/s and images per CPU-second ratios)."""
    row["speedup_wall"] = row["images_per_s"] / base["images_per_s"]
    row["speedup_cpu"] = row["images_per_cpu_s"] / base["images_per_cpu_s"]


def epoch_loader(loader: Any) -> Callable[[int], Iterable]:
    """make_batches for a project loader: epoch e's order (set_epoch), then the loader itself."""

    def batches(epoch: int) -> Iterable:
        loader.set_epoch(epoch)
        return loader

    return batches


def plain_loader(dataset: Dataset, workers: int, batch: int) -> Callable[[int], Iterable]:
    """make_batches of the textbook DataLoader: shuffled, incomplete batches dropped."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    return lambda epoch: loader


def polyscale_batches(root: Path, decoder: str, workers: int, batch: int, device: torch.device) -> Callable:
    dataset = build_dataset(
        "train",
        name="imagefolder",
        root=str(root),
        num_classes=None,
        image_size=224,
        decoder=decoder,
        mean=MEAN,
        std=STD,
    )
    loader = build_train_loader(
        dataset,
        rank=0,
        world_size=1,
        batch_size=batch,
        seed=0,
        device=device,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return epoch_loader(loader)


def baseline_batches(root: Path, workers: int, batch: int) -> Callable:
    """The textbook pipeline: ImageFolder (PIL decode) + transforms.v2 on the decoded image."""
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    return plain_loader(datasets.ImageFolder(str(root / "train"), transform=transform), workers, batch)


def run_imagenet(args: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict]:
    cuda = torch.cuda.is_available()
    decoders = args.decoders or ["pil", "torchvision"] + (["cuda"] if cuda else [])
    root = args.root or tmp
    mean_kb = make_tree(root, args.images, args.classes) if args.root is None else None
    rows = []
    for workers in args.workers:
        settings = [(IMAGENET_BASELINE, torch.device("cpu"))]
        settings += [(d, torch.device("cuda" if d == "cuda" else "cpu")) for d in decoders]
        for decoder, device in settings:
            if decoder == IMAGENET_BASELINE:
                batches = baseline_batches(root, workers, args.batch_size)
            else:
                batches = polyscale_batches(root, decoder, workers, args.batch_size, device)
            rows.append(measure("decoder", decoder, workers, batches, args.repeats, device))
        for row in rows[-len(settings) :]:
            add_ratios(row, rows[-len(settings)])
    settings = {
        "pipeline": "imagenet",
        "images": args.images,
        "mean_file_kb": mean_kb,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "crop": 224,
    }
    return rows, settings


class UncheckedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 (same loading, same __getitem__) minus the md5 check regenerated files fail."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


def cifar_options(root: Path, **changes: Any) -> dict[str, Any]:
    """configs/data/cifar10.yaml's data options (DataOptions defaults under them), with `changes`."""
    preset = yaml.safe_load((REPO / "configs" / "data" / "cifar10.yaml").read_text())
    preset.pop("defaults", None)
    return {**preset, "root": str(root), **changes}


def cifar_baseline_batches(root: Path, opts: DataOptions, workers: int, batch: int) -> Callable:
    """The textbook CIFAR pipeline: torchvision CIFAR10 (PIL image per item) + transforms.v2."""
    transform = v2.Compose(
        [
            v2.RandomCrop(opts.image_size, padding=opts.random_crop_padding),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(opts.mean), list(opts.std)),
        ]
    )
    return plain_loader(UncheckedCIFAR10(str(root), train=True, transform=transform), workers, batch)


def run_cifar(args: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = args.root or tmp
    if args.root is None:
        make_cifar10(root, args.cifar_images)
    cpu = torch.device("cpu")
    opts = DataOptions.from_kwargs(cifar_options(root))
    dataset = build_dataset("train", **cifar_options(root))  # uint8 in memory; the loaders only differ
    rows, baselines = [], {}
    for workers in args.workers:
        batches = cifar_baseline_batches(root, opts, workers, args.batch_size)
        baselines[workers] = measure("pipeline", CIFAR_BASELINE, workers, batches, args.repeats, cpu)
        loader = build_train_loader(
            dataset,
            rank=0,
            world_size=1,
            batch_size=args.batch_size,
            seed=0,
            device=cpu,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        row = measure("pipeline", "cpu path", workers, epoch_loader(loader), args.repeats, cpu)
        del loader, batches  # persistent workers stop before the next setting starts
        rows += [baselines[workers], row]
    # gpu_augment is a property of the data set (it keeps its options): the same files, built for it
    on_device = build_dataset("train", **cifar_options(root, gpu_augment=True))
    loader = build_train_loader(
        on_device, rank=0, world_size=1, batch_size=args.batch_size, seed=0, device=device
    )
    rows.append(measure("pipeline", "gpu_augment", 0, epoch_loader(loader), args.repeats, device))
    for row in rows:
        row["device"] = str(device) if row["pipeline"] == "gpu_augment" else "cpu"
        row["baseline_workers"] = row["workers"] if row["workers"] in baselines else min(baselines)
        add_ratios(row, baselines[row["baseline_workers"]])
    settings = {
        "pipeline": "cifar",
        "images": len(dataset),
        "generated": args.root is None,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "crop": opts.image_size,
        "padding": opts.random_crop_padding,
        "device": str(device),
        "ratios": (
            "speedup_* = row / baseline row with workers == baseline_workers: the same worker count for "
            "the CPU rows; for the gpu_augment row (main process only) the 0-worker baseline, or the "
            "fewest-worker one when 0 was not measured"
        ),
        "cpu_rows": "batches stay on the CPU (no copy to the device); gpu_augment batches are on `device`",
    }
    return rows, settings


def print_table(rows: list[dict], label: str) -> None:
    extra = label == "pipeline"  # cifar: device and the baseline each ratio refers to
    header = f"{label:<28} {'workers':>7} " + (f"{'device':>7} " if extra else "")
    header += f"{'images/s':>9} {'img/CPU-s':>10} {'vs baseline (wall, CPU)':>24}"
    print(header + (f" {'baseline':>16}" if extra else ""))
    for row in rows:
        line = f"{row[label]:<28} {row['workers']:>7} " + (f"{row['device']:>7} " if extra else "")
        line += f"{row['images_per_s']:>9.1f} {row['images_per_cpu_s']:>10.1f}"
        line += f" {row['speedup_wall']:>12.2f}x {row['speedup_cpu']:>9.2f}x"
        base = f"{row['baseline_workers']} workers" if extra else ""
        print(line + (f" {base:>16}" if extra else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", choices=("imagenet", "cifar"), default="imagenet")
    parser.add_argument(
        "--cifar", dest="pipeline", action="store_const", const="cifar", help="same as --pipeline cifar"
    )
    parser.add_argument(
        "--root",
        type=Path,
        help="existing data (default: generate): imagenet a train/ + val/ JPEG tree, "
        "cifar the folder holding cifar-10-batches-py/",
    )
    parser.add_argument("--images", type=int, default=512, help="imagenet: training images to generate")
    parser.add_argument("--classes", type=int, default=8, help="imagenet: classes of the generated tree")
    parser.add_argument(
        "--decoders", nargs="+", default=None, help="imagenet; default: pil torchvision [+ cuda]"
    )
    parser.add_argument("--cifar-images", type=int, default=50000, help="cifar: training images to generate")
    parser.add_argument(
        "--device", default=None, help="cifar: gpu_augment device (default: cuda if available)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 imagenet, 128 cifar")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per setting (median)")
    parser.add_argument("--out", type=Path, default=Path("bench_data.json"))
    args = parser.parse_args()
    args.batch_size = args.batch_size or BATCH_SIZE[args.pipeline]
    torch.set_num_threads(1)  # workers=0 then measures one core, like each worker process

    with tempfile.TemporaryDirectory() as tmp:
        run = run_imagenet if args.pipeline == "imagenet" else run_cifar
        rows, settings = run(args, Path(tmp))
    print_table(rows, "decoder" if args.pipeline == "imagenet" else "pipeline")
    cuda = torch.cuda.is_available()
    result = {
        "command": "python scripts/bench_data.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if cuda else None,
        },
        "settings": settings,
        "results": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
