"""Speed of PSConv against a standard 3x3 conv, a dilated conv and the original authors' design.

Setting of the PSConv paper's speed test: input (N, C, H, W) = (200, 64, 56, 56), 64 output channels
(use a smaller --batch on CPU), plus a grouped ResNeXt case (C=128, 32 groups by default). Every row
is reported as a ratio to the standard conv measured in the same run, for forward and
forward+backward, each dtype and memory format. CPU times are medians of round-robin repeats (the
rows alternate, so load from other processes hits them alike); CUDA times use CUDA events after
warm-up.

    python scripts/bench_conv.py --device cpu --batch 8 --repeats 15 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from polyscale.engine.runtime import tune_cpu_allocator
from polyscale.ops import PSConv2d
from polyscale.ops.psconv_terms import IMPLS


class OriginalPSConv(nn.Module):
    """The original authors' layer, written from its description (docs/operators.md) as a speed peer only.

    Sum of a dense 3x3 conv whose blocks (out part i, in part i) and (out part i+2, in part i) are
    masked to zero (mask kept by a gradient hook), a groups=4 conv at dilation d and a groups=4 conv
    at dilation 2d on the input with its channel halves swapped: 1.5x the multiply-adds of a conv.
    """

    def __init__(self, channels: int, out_channels: int, groups: int = 1, dilation: int = 2, parts: int = 4):
        super().__init__()
        self.gwconv = nn.Conv2d(channels, out_channels, 3, 1, dilation, dilation, groups * parts, bias=False)
        self.gwconv_shift = nn.Conv2d(
            channels, out_channels, 3, 1, 2 * dilation, 2 * dilation, groups * parts, bias=False
        )
        self.conv = nn.Conv2d(channels, out_channels, 3, 1, 1, groups=groups, bias=False)
        mask = torch.ones_like(self.conv.weight)  # (C_out, C_in/groups, 3, 3)
        out_part, in_part = out_channels // groups // parts, channels // groups // parts
        for g in range(groups):
            for i in range(parts):
                for o in (i, (i + parts // 2) % parts):
                    rows = slice(g * out_channels // groups + o * out_part, None)
                    mask[rows][:out_part, i * in_part : (i + 1) * in_part] = 0
        self.register_buffer("mask", mask)
        with torch.no_grad():
            self.conv.weight.mul_(mask)
        self.conv.weight.register_hook(lambda grad: grad * self.mask)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return self.gwconv(x) + self.gwconv_shift(torch.cat((x2, x1), dim=1)) + self.conv(x)


def build_rows(channels: int, groups: int) -> dict[str, nn.Module]:
    """The compared layers for one case, all channels -> channels, 3x3, stride 1."""
    rows: dict[str, nn.Module] = {
        "standard 3x3": nn.Conv2d(channels, channels, 3, 1, 1, groups=groups, bias=False),
        "dilated d=2": nn.Conv2d(channels, channels, 3, 1, 2, 2, groups=groups, bias=False),
    }
    for impl in IMPLS:
        rows[f"psconv ({impl})"] = PSConv2d(channels, channels, 3, groups=groups, impl=impl)
    rows["original design"] = OriginalPSConv(channels, channels, groups)
    return rows


def timer(device: torch.device, clock: str) -> Callable[[Callable[[], None]], float]:
    """Seconds taken by one call: CUDA events on GPU; on CPU wall clock, or with clock="cpu" the
    process's CPU time (with --threads 1 this ignores time lost to other processes on a shared VM)."""
    if device.type != "cuda":
        now = time.process_time if clock == "cpu" else time.perf_counter

        def run(fn: Callable[[], None]) -> float:
            start = now()
            fn()
            return now() - start

        return run

    def run_cuda(fn: Callable[[], None]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    return run_cuda


def make_step(module: nn.Module, x: Tensor, backward: bool, dtype: torch.dtype) -> Callable[[], None]:
    """One forward (no grad) or forward+backward call of `module` on `x`."""
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)
    if not backward:

        def forward() -> None:
            with torch.no_grad(), autocast:
                module(x)

        return forward
    x = x.detach().requires_grad_()
    with autocast:
        grad = torch.randn_like(module(x))

    def forward_backward() -> None:
        with autocast:
            y = module(x)
        y.backward(grad)
        x.grad = None
        module.zero_grad(set_to_none=True)

    return forward_backward


def bench_case(
    args: argparse.Namespace, channels: int, groups: int, dtype: torch.dtype, fmt: str
) -> list[dict]:
    device = torch.device(args.device)
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.randn(args.batch, channels, args.size, args.size, device=device)
    x = x.contiguous(memory_format=memory_format)
    modules = {
        name: m.to(device, memory_format=memory_format) for name, m in build_rows(channels, groups).items()
    }
    results = []
    measure = timer(device, args.clock)
    for backward in (False, True):
        steps = {name: make_step(m, x, backward, dtype) for name, m in modules.items()}
        for step in steps.values():  # warm-up: allocator, oneDNN / cuDNN algorithm choice
            for _ in range(args.warmup):
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):  # round-robin so that background load hits every row alike
            for name, step in steps.items():
                times[name].append(measure(step))
        base = statistics.median(times["standard 3x3"])
        for name, samples in times.items():
            median = statistics.median(samples)
            results.append(
                {
                    "case": f"C={channels} groups={groups}",
                    "dtype": str(dtype).removeprefix("torch."),
                    "format": fmt,
                    "mode": "fwd+bwd" if backward else "fwd",
                    "layer": name,
                    "ms": 1e3 * median,
                    "ratio": median / base,
                }
            )
    return results


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} x{len(names)}" if names else platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch", type=int, default=None, help="default: 200 on CUDA (the paper's), 8 on CPU"
    )
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--channels", type=int, default=64, help="dense case, 0 to skip")
    parser.add_argument("--grouped-channels", type=int, default=128, help="ResNeXt case, 0 to skip")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 15 on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--formats", default="contiguous,channels_last")
    parser.add_argument("--dtypes", default=None, help="default: float32,bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="CPU only: see timer()")
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="CPU only: keep freed memory in glibc's heap, as training does (runtime.tune_cpu_allocator)",
    )
    parser.add_argument("--json", default=None, help="write the rows and the setting to this file")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (200 if cuda else 8)
    args.repeats = args.repeats or (50 if cuda else 15)
    dtypes = [
        getattr(torch, d) for d in (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    ]
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steady_malloc and not tune_cpu_allocator():
        print("--steady-malloc: mallopt unavailable (not glibc); using the default allocator")

    cases = [(c, g) for c, g in [(args.channels, 1), (args.grouped_channels, args.groups)] if c]
    rows = []
    for channels, groups in cases:
        for dtype in dtypes:
            for fmt in args.formats.split(","):
                rows += bench_case(args, channels, groups, dtype, fmt)

    header = f"{'case':<18} {'dtype':<9} {'format':<14} {'mode':<8} {'layer':<20} {'ms':>9} {'ratio':>6}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['case']:<18} {r['dtype']:<9} {r['format']:<14} {r['mode']:<8} {r['layer']:<20} "
            f"{r['ms']:9.2f} {r['ratio']:6.2f}"
        )
    if args.json:
        setting = {k: v for k, v in vars(args).items() if k != "json"}
        device_name = torch.cuda.get_device_name() if cuda else cpu_name()
        meta = {"torch": torch.__version__, "device_name": device_name, "threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump({"setting": setting, "meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
