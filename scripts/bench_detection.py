"""Training throughput of the detection task against the same torchvision detector driven by a bare
hand-written loop, measured in the same run; and each backbone's rate beside the first one's.

For every backbone (default: resnet20 and ps_resnet20) one detector, optimizer and set of pre-made batches
of the built-in detection set (already on the device) serve both loops. The bare loop is forward (the
loss dict), sum, backward, step; the task's side is the engine's `train_one_epoch` with the detection
task's `DetectionLoss` (device transfer, autocast, per-loss sums), the LR schedule, logging and the
progress bar. Repeats alternate between the two; CPU times are medians of wall-clock repeats (or of
process CPU time, `--clock cpu`), CUDA times come from CUDA events after warm-up.

    python scripts/bench_detection.py                              # CPU: FCOS, 64 px, batch 8
    python scripts/bench_detection.py --device cuda --image-size 512 --batch 8 --fpn-channels 256 \\
        --models resnet50 ps_resnet50 --detector retinanet
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench_train import alternate, setup, write_json
from polyscale.config import OptimConfig, ScheduleConfig
from polyscale.data import build_detection_dataset
from polyscale.detection import create_detector
from polyscale.engine.distributed import DistInfo
from polyscale.engine.loop import StepSettings, TrainState, train_one_epoch
from polyscale.engine.optim import build_optimizer, build_scheduler
from polyscale.engine.run_dir import RunRecorder
from polyscale.engine.runtime import Runtime
from polyscale.models import get_model_spec
from polyscale.tasks.detection import DetectionLoss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", default="fcos", choices=["retinanet", "fcos", "faster_rcnn", "mask_rcnn"])
    p.add_argument(
        "--models", nargs="+", default=["resnet20", "ps_resnet20"], help="backbones; first = baseline"
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats before timing (each side)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="CPU only: wall or process CPU time"
    )
    p.add_argument("--json", type=Path, default=Path("outputs/bench/bench_detection.json"))
    return p.parse_args()


def make_batches(args: argparse.Namespace, device: torch.device) -> tuple[list, int]:
    """`steps` batches of the built-in detection set on `device`, and its class count."""
    data = build_detection_dataset(
        "train",
        name="builtin_detection",
        image_size=args.image_size,
        num_train_images=args.steps * args.batch,
        with_masks=args.detector == "mask_rcnn",
        hflip=False,
    )
    items = [data[i] for i in range(len(data))]
    batches = []
    for start in range(0, len(items), args.batch):
        chunk = items[start : start + args.batch]
        images = [image.to(device) for image, _ in chunk]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for _, t in chunk]
        batches.append((images, targets))
    return batches, int(data.num_classes)


def bench_backbone(
    name: str, args: argparse.Namespace, device: torch.device, batches: list, classes: int
) -> dict:
    torch.manual_seed(0)
    model = create_detector(
        args.detector,
        backbone=name,
        num_classes=classes,
        fpn_channels=args.fpn_channels,
        min_size=args.image_size,
        max_size=args.image_size,
        trainable_stages=get_model_spec(name).num_stages + 1,  # from scratch: everything trains
        frozen_bn=False,
    ).to(device)
    optimizer = build_optimizer(model, OmegaConf.structured(OptimConfig(lr=0.01, weight_decay=1e-4)))

    def bare() -> None:
        model.train()
        for images, targets in batches:
            loss = sum(model(images, targets).values())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    schedule = OmegaConf.structured(ScheduleConfig())
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch=len(batches), epochs=10_000)
    state = TrainState(model=model, train_model=model, optimizer=optimizer, scheduler=scheduler)
    runtime = Runtime(DistInfo(), device, "fp32", channels_last=False, show_progress=True)
    settings = StepSettings(
        device=device, batch_loss=DetectionLoss(runtime), steps=len(batches), log_every=20
    )
    with tempfile.TemporaryDirectory() as tmp:
        recorder = RunRecorder(tmp, enabled=True)

        def task() -> None:
            state.step_in_epoch = 0
            train_one_epoch(state, batches, settings, recorder=recorder)

        sides = {"bare": bare, "task": task}
        times = alternate(sides, warmup=args.warmup, repeats=args.repeats, device=device, clock=args.clock)
        recorder.close()
    ips = {side: args.steps * args.batch / statistics.median(t) for side, t in times.items()}
    return {"backbone": name, "bare_images_per_s": ips["bare"], "task_images_per_s": ips["task"]} | {
        "ratio": ips["task"] / ips["bare"],
        "times_s": times,
    }


def main() -> None:
    args = parse_args()
    device = setup(args)
    batches, classes = make_batches(args, device)
    rows = [bench_backbone(name, args, device, batches, classes) for name in args.models]
    for row in rows:
        row["vs_first_backbone"] = row["task_images_per_s"] / rows[0]["task_images_per_s"]
    on = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    result = {
        "device": on,
        "detector": args.detector,
        "image_size": args.image_size,
        "batch": args.batch,
        "fpn_channels": args.fpn_channels,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "clock": args.clock if device.type == "cpu" else "cuda events",
        "rows": rows,
        "torch": torch.__version__,
    }
    print(f"\n{args.detector}, {args.image_size} px, batch {args.batch}, {on} (medians of {args.repeats})\n")
    print("| backbone | bare loop (images/s) | detection task (images/s) | task / bare | vs first backbone |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['backbone']} | {row['bare_images_per_s']:.1f} | {row['task_images_per_s']:.1f} | "
            f"{row['ratio']:.3f} | {row['vs_first_backbone']:.3f} |"
        )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
