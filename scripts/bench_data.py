"""Throughput of the ImageNet training pipeline (images/s) per decode path and worker count.

Generates a JPEG class tree with ImageNet-like files (about 500x375, quality 90, ~100 KB: smooth
colour fields plus luma grain) in a temporary folder, or reads `--root` (a train/ + val/ tree), and
times full epochs of `build_train_loader` (RandomResizedCrop 224 + flip + normalise) for each decoder:
pil, torchvision (torchvision.io on the CPU) and, when CUDA is available, cuda (nvJPEG + crop/flip on
the GPU). The baseline, measured in the same run, is the textbook pipeline: torchvision ImageFolder +
transforms.v2 (RandomResizedCrop, flip, ToImage, ToDtype, Normalize) under a plain DataLoader.
Reports medians over `--repeats` epochs after a warm-up epoch; prints a table and writes JSON.

    python scripts/bench_data.py --workers 0 1 2 --images 512 --out bench_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from polyscale.config import DataConfig
from polyscale.data import build_dataset, build_train_loader

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


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


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its live children (Linux /proc).

    Images per CPU-second is the per-core throughput, and unlike wall time it does not drop when
    other jobs share the machine.
    """
    total = sum(os.times()[:4])  # self + reaped children
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


def time_epochs(
    make_batches: Callable[[int], Iterable], repeats: int, device: torch.device
) -> dict[str, float]:
    """Medians over `repeats` epochs (after a warm-up epoch) of wall and CPU seconds; images per epoch."""
    count = sum(len(y) for _, y in make_batches(0))  # warm-up: workers start, files enter the page cache
    walls, cpus = [], []
    for epoch in range(1, repeats + 1):
        cpu0 = cpu_seconds()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in make_batches(epoch):
                pass
            end.record()
            torch.cuda.synchronize()
            walls.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            for _ in make_batches(epoch):
                pass
            walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - cpu0)
    return {"images": count, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def polyscale_batches(root: Path, decoder: str, workers: int, batch: int, device: torch.device) -> Callable:
    cfg = OmegaConf.structured(
        DataConfig(
            name="imagefolder",
            root=str(root),
            num_classes=None,
            image_size=224,
            decoder=decoder,
            num_workers=workers,
            persistent_workers=workers > 0,
            mean=MEAN,
            std=STD,
        )
    )
    loader = build_train_loader(
        build_dataset(cfg, "train"), cfg, rank=0, world_size=1, batch_size=batch, seed=0, device=device
    )

    def batches(epoch: int) -> Iterable:
        loader.set_epoch(epoch)
        return loader

    return batches


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
    ds = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    return lambda epoch: loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="existing train/ + val/ JPEG tree (default: generate one)")
    parser.add_argument("--images", type=int, default=512, help="training images to generate")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--decoders", nargs="+", default=None, help="default: pil torchvision [+ cuda]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per setting (median)")
    parser.add_argument("--out", type=Path, default=Path("bench_data.json"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    decoders = args.decoders or ["pil", "torchvision"] + (["cuda"] if cuda else [])
    torch.set_num_threads(1)  # workers=0 then measures one core, like each worker process

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        mean_kb = make_tree(root, args.images, args.classes) if args.root is None else None
        rows = []
        for workers in args.workers:
            settings = [("baseline (ImageFolder + v2)", torch.device("cpu"))]
            settings += [(d, torch.device("cuda" if d == "cuda" else "cpu")) for d in decoders]
            for decoder, device in settings:
                if decoder.startswith("baseline"):
                    batches = baseline_batches(root, workers, args.batch_size)
                else:
                    batches = polyscale_batches(root, decoder, workers, args.batch_size, device)
                t = time_epochs(batches, args.repeats, device)
                rows.append(
                    {
                        "decoder": decoder,
                        "workers": workers,
                        "images_per_s": t["images"] / t["wall_s"],
                        "images_per_cpu_s": t["images"] / t["cpu_s"],
                        **t,
                    }
                )
            base = rows[-len(settings)]
            for row in rows[-len(settings) :]:
                row["speedup_wall"] = base["wall_s"] / row["wall_s"]
                row["speedup_cpu"] = base["cpu_s"] / row["cpu_s"]
    header = (
        f"{'decoder':<28} {'workers':>7} {'images/s':>9} {'img/CPU-s':>10} {'vs baseline (wall, CPU)':>24}"
    )
    print(header)
    for row in rows:
        rates = f"{row['images_per_s']:>9.1f} {row['images_per_cpu_s']:>10.1f}"
        ratios = f"{row['speedup_wall']:>12.2f}x {row['speedup_cpu']:>9.2f}x"
        print(f"{row['decoder']:<28} {row['workers']:>7} {rates} {ratios}")
    result = {
        "command": "python scripts/bench_data.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if cuda else None,
        },
        "settings": {
            "images": args.images,
            "mean_file_kb": mean_kb,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "crop": 224,
        },
        "results": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
