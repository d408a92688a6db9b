"""Training throughput of the full trainer against a bare hand-written loop, measured in the same run.

Both train the same model (one instance, shared) on the same pre-made synthetic batches already on the
device, with the same batch, precision and memory format. The trainer side is `train_one_epoch` with
everything a real run has per step (loss bookkeeping, non-finite check, LR schedule, logging to
TensorBoard every `--log-every` steps, progress bar); data loading is excluded from both, so the ratio
isolates the engine's overhead. Repeats alternate between the two; CPU times are medians of wall-clock
repeats (or of process CPU time, `--clock cpu`), CUDA times come from CUDA events after warm-up. On the
CPU both run under the malloc tuning `run_training` applies (`--default-malloc` to compare without).

    python scripts/bench_train.py                         # CPU: resnet20, 32x32, batch 64
    python scripts/bench_train.py --device cuda --model resnet50 --image-size 224 --batch 128 \
        --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from polyscale.config import OptimConfig, ScheduleConfig
from polyscale.engine.distributed import DistInfo
from polyscale.engine.loop import StepSettings, TrainState, train_one_epoch
from polyscale.engine.optim import build_optimizer, build_scheduler
from polyscale.engine.run_dir import RunRecorder
from polyscale.engine.runtime import Runtime, autocast_factory, make_grad_scaler, tune_cpu_allocator
from polyscale.models import create_model
from polyscale.tasks.classification import ClassificationLoss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats before timing (each side)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument(
        "--default-malloc", action="store_true", help="CPU: keep glibc's default trimming (see runtime.py)"
    )
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="CPU only: wall clock, or process CPU time (robust on a shared machine; use with --threads 1)",
    )
    p.add_argument("--json", type=Path, default=Path("outputs/bench/bench_train.json"))
    return p.parse_args()


def make_batches(args: argparse.Namespace, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batches.append((images, torch.randint(0, 10, (args.batch,), generator=g).to(device)))
    return batches


def bare_loop(model, optimizer, scaler, autocast, batches) -> Callable[[], None]:
    """The reference: forward, loss, backward, step. Nothing else."""
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for images, targets in batches:
            with autocast():
                loss = loss_fn(model(images), targets)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def trainer_loop(model, optimizer, scaler, autocast, batches, args, device, recorder) -> Callable[[], None]:
    """The engine: `train_one_epoch` over the same batches (a fresh "epoch" per repeat)."""
    scheduler = build_scheduler(
        optimizer, OmegaConf.structured(ScheduleConfig()), steps_per_epoch=len(batches), epochs=10_000
    )
    state = TrainState(
        model=model, train_model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
    )
    runtime = Runtime(DistInfo(), device, args.precision, args.channels_last, show_progress=True)
    settings = StepSettings(
        device=device,
        batch_loss=ClassificationLoss(runtime, nn.CrossEntropyLoss(), mixup=None),  # the task's step
        steps=len(batches),
        log_every=args.log_every,
        progress=True,
    )

    def run() -> None:
        state.step_in_epoch = 0
        train_one_epoch(state, batches, settings, recorder=recorder)

    return run


def timed(fn: Callable[[], None], device: torch.device, clock: str = "wall") -> float:
    """Seconds for one call: CUDA events on the GPU, wall clock or process CPU time on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    now = time.process_time if clock == "cpu" else time.perf_counter
    t0 = now()
    fn()
    return now() - t0


def alternate(
    sides: dict[str, Callable[[], None]], *, warmup: int, repeats: int, device: torch.device, clock: str
) -> dict[str, list[float]]:
    """Seconds of each side per repeat: `warmup` untimed calls each (allocator, cuDNN autotuning, lazy
    initialisation), then the sides in alternating order (ABBA), so that noise and position hit both."""
    for run in sides.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeats):
        for name in sides if r % 2 == 0 else reversed(sides):
            times[name].append(timed(sides[name], device, clock))
    return times


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def setup(args: argparse.Namespace) -> torch.device:
    """Threads, cuDNN autotuning on CUDA, and on the CPU the malloc tuning run_training applies (both loops
    share this process) unless `--default-malloc`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if device.type == "cpu" and not getattr(args, "default_malloc", False):
        tune_cpu_allocator()
    return device


def main() -> None:
    args = parse_args()
    device = setup(args)
    torch.manual_seed(0)
    # One model, optimizer and scaler serve both loops: same tensors, same memory layout, so that the
    # ratio measures the loops and not where the allocator happened to put two copies of the weights.
    model = create_model(args.model, num_classes=10).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OmegaConf.structured(OptimConfig(lr=0.01, weight_decay=1e-4)))
    scaler = make_grad_scaler(args.precision, device)
    batches = make_batches(args, device)
    autocast = autocast_factory(args.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        recorder = RunRecorder(tmp, enabled=True)
        sides = {
            "bare": bare_loop(model, optimizer, scaler, autocast, batches),
            "trainer": trainer_loop(model, optimizer, scaler, autocast, batches, args, device, recorder),
        }
        times = alternate(sides, warmup=args.warmup, repeats=args.repeats, device=device, clock=args.clock)
        recorder.close()
    ips = {name: args.steps * args.batch / statistics.median(t) for name, t in times.items()}
    ratio = ips["trainer"] / ips["bare"]
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "bare_images_per_s": ips["bare"],
        "trainer_images_per_s": ips["trainer"],
        "ratio": ratio,
        "clock": args.clock if device.type == "cpu" else "cuda events",
        "tuned_malloc": device.type == "cpu" and not args.default_malloc,
        "times_s": times,
        "torch": torch.__version__,
    }
    print(f"\n| loop | images/s (median of {args.repeats}) |\n|---|---|")
    print(f"| bare | {ips['bare']:.1f} |\n| trainer | {ips['trainer']:.1f} |")
    print(
        f"\ntrainer / bare = {ratio:.3f}  ({result['device']}, {args.model}, {args.image_size}px, "
        f"batch {args.batch}, {args.precision}{', channels_last' if args.channels_last else ''}, "
        f"{result['clock']})"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
