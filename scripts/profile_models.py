"""Size, cost and speed of every registered model: parameters, GMACs and training / inference images/s.

Parameters and GMACs (conv + fc multiply-adds from torch.utils.flop_counter, at 224x224 for ImageNet
nets and 32x32 for CIFAR nets; 1000 classes, 100 for ResNeXt-29 (CIFAR-100), 10 for ResNet-20/56) are
counted on the meta device, so they need no memory and no GPU. Speed is measured when a CUDA device is
present (or with --device cpu): bf16 autocast, channels_last, a warm-up, then `--repeats` timed runs of
`--steps` steps each, timed with CUDA events (CPU: wall clock); the reported value is the median. A
training step is forward + cross-entropy + backward + SGD step, an inference step a forward pass under
torch.inference_mode. Every model is also reported as a ratio to its standard baseline measured in the
same run (ps_X -> X, pyconv[hg]resnetD -> resnetD).

    python scripts/profile_models.py --out profile_models.json                  # all models
    python scripts/profile_models.py --models "ps_resnet50" "pyconv*50" --batch-size 64
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import re
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from polyscale.models import create_model, get_model_spec, list_models
from polyscale.models.complexity import count_macs, count_params


def baseline_of(name: str) -> str:
    """The standard network a model is compared with."""
    if name.startswith("ps_"):
        return name[3:]
    m = re.fullmatch(r"pyconv(?:hg)?resnet(\d+)", name)
    return f"resnet{m.group(1)}" if m else name


def select(patterns: list[str] | None) -> list[str]:
    names = list_models()
    if not patterns:
        return names
    chosen = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"no model matches {patterns}; choose from {names}")
    return chosen


def size_and_cost(name: str) -> dict[str, float | int]:
    spec = get_model_spec(name)
    with torch.device("meta"):
        model = create_model(name, num_classes=spec.paper_classes)
    macs = count_macs(model, spec.input_size)
    return {
        "params": count_params(model),
        "gmacs": macs / 1e9,
        "input_size": spec.input_size,
        "num_classes": spec.paper_classes,
    }


def _timer(device: torch.device) -> Callable[[Callable[[], None], int], float]:
    """Seconds for `steps` calls of `fn` (CUDA events on the GPU, wall clock on the CPU)."""

    def run(fn: Callable[[], None], steps: int) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return time.perf_counter() - t0

    return run


def speed(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float | None]:
    """Median images/s of training and inference steps; None where the batch does not fit."""
    spec = get_model_spec(name)
    batch = args.batch_size or (256 if spec.dataset == "cifar" else 64)
    model = create_model(name, num_classes=spec.paper_classes).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, spec.input_size, spec.input_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.paper_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def amp() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    time_it = _timer(device)

    def train_step() -> None:
        with amp():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def infer_step() -> None:
        with amp():
            model(x)

    out: dict[str, float | None] = {"batch_size": batch}
    for key, fn, mode in (("train_img_s", train_step, True), ("infer_img_s", infer_step, False)):
        model.train(mode)
        try:
            time_it(fn, args.warmup)
            times = [time_it(fn, args.steps) for _ in range(args.repeats)]
            out[key] = batch * args.steps / statistics.median(times)
        except torch.OutOfMemoryError:
            out[key] = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--models", nargs="*", help="names or shell patterns (default: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else no speed) | cuda | cpu")
    parser.add_argument("--batch-size", type=int, default=0, help="0: 64 for ImageNet nets, 256 for CIFAR")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    # CPU default fp32: torch 2.14.1's CPU backward of bf16 channels_last grouped convs with dilation 4
    # (PSConv's grouped terms) crashes intermittently.
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 CUDA, fp32 CPU"
    )
    parser.add_argument("--no-speed", action="store_true", help="only parameters and GMACs")
    parser.add_argument("--out", default="profile_models.json", help="JSON output file")
    args = parser.parse_args()

    names = select(args.models)
    if args.device == "auto":
        device = torch.device("cuda") if torch.cuda.is_available() else None
    else:
        device = torch.device(args.device)
    if args.no_speed:
        device = None
    if args.dtype is None:
        args.dtype = "bf16" if device is not None and device.type == "cuda" else "fp32"
    measured = list(dict.fromkeys([*names, *(baseline_of(n) for n in names)])) if device else names

    rows: dict[str, dict] = {}
    for name in measured:
        rows[name] = {"name": name, "baseline": baseline_of(name), **size_and_cost(name)}
        if device is not None:
            rows[name].update(speed(name, args, device))
        print(f"measured {name}", flush=True)
    for row in rows.values():
        base = rows.get(row["baseline"], {})
        for key in ("train_img_s", "infer_img_s"):
            if row.get(key) and base.get(key):
                row[key.replace("img_s", "vs_baseline")] = row[key] / base[key]

    header = f"{'model':22} {'params':>12} {'GMACs':>7}"
    if device is not None:
        header += f" {'train img/s':>12} {'x base':>7} {'infer img/s':>12} {'x base':>7}"
    print(header)
    for name in measured:  # the selection plus the baselines it was compared with
        r = rows[name]
        line = f"{name:22} {r['params']:>12,} {r['gmacs']:>7.3f}"
        if device is not None:
            for key in ("train", "infer"):
                img_s, ratio = r.get(f"{key}_img_s"), r.get(f"{key}_vs_baseline")
                line += f" {img_s:>12.1f}" if img_s else f" {'OOM':>12}"
                line += f" {ratio:>7.2f}" if ratio else f" {'-':>7}"
        print(line)

    meta = {
        "device": torch.cuda.get_device_name(device) if device and device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "channels_last": True,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "models": [rows[n] for n in measured]}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
