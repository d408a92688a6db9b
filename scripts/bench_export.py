"""onnxruntime CPU latency of PS-ResNet-50 against ResNet-50, both exported the same way.

Each network (random weights, seeded) goes through scripts/export.py's ONNX export and check (max abs
difference against PyTorch, batches 1 and 3), then one onnxruntime session per network (CPU provider,
`--threads` intra-op threads, sequential execution, all graph optimisations) runs the same input batch.
Sessions alternate (ABBA) after `--warmup` untimed runs each; a row's latency is the median of `--repeats`
runs (wall clock, or process CPU time with `--clock cpu`, which sums the CPU time of ORT's threads). The
ratio is each network's latency over the first network's, measured in the same run.

    python scripts/bench_export.py                                    # ps_resnet50 vs resnet50, 224 px
    python scripts/bench_export.py --threads 2 --batch 8 --repeats 20
    python scripts/bench_export.py --models resnet20 ps_resnet20 --image-size 32   # a quick look

Needs the export extra (pip install -e .[export]).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench_train import alternate, setup, write_json
from export import Network, check_export, export_model, onnx_modules, psconv_impls_used
from polyscale.errors import PolyscaleError
from polyscale.models import create_model, get_model_spec


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "ps_resnet50"], help="first = the baseline")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (and torch's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per session before timing")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per session (median)")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall clock or process CPU time")
    p.add_argument("--onnx-dir", type=Path, default=None, help="keep the .onnx files here (default: temp)")
    p.add_argument("--json", type=Path, default=Path("outputs/bench/bench_export.json"))
    return p.parse_args()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def export_network(name: str, args: argparse.Namespace, folder: Path) -> tuple[Path, dict[str, Any]]:
    """`name` (random weights, seed 0) exported to ONNX in `folder` and checked: (file, its facts)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=get_model_spec(name).paper_classes).eval()
    conv = getattr(model, "polyscale_conv", "standard")
    net = Network(
        model, name, conv, args.image_size, "random initialisation", get_model_spec(name).paper_classes
    )
    path = folder / f"{name}.onnx"
    info = export_model(net, "onnx", path, args.opset)
    check = check_export(net, "onnx", path, tolerance=1e-4)
    facts = {
        "model": name,
        "conv": conv,
        "params": sum(p.numel() for p in model.parameters()),
        "psconv_impls": psconv_impls_used(model),
        "onnx_mb": path.stat().st_size / 1e6,
        "max_abs_diff": max(r["max_abs_diff"] for r in check["batches"]),
        **info,
    }
    return path, facts


def session(path: Path, threads: int) -> Any:
    ort = onnx_modules()["onnxruntime"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    args = parse_args()
    args.device = "cpu"
    setup(args)  # torch threads (export + check) and the CPU malloc tuning of the other benches
    ort = onnx_modules()["onnxruntime"]
    images = torch.randn(
        args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)
    )
    feed = {"images": images.numpy()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.onnx_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows, sides = [], {}
        for name in args.models:
            try:
                path, facts = export_network(name, args, folder)
            except PolyscaleError as err:
                raise SystemExit(f"Error ({type(err).__name__}): {err}") from err
            runner = session(path, args.threads)
            sides[name] = lambda runner=runner: runner.run(None, feed)
            rows.append(facts)
        times = alternate(
            sides, warmup=args.warmup, repeats=args.repeats, device=torch.device("cpu"), clock=args.clock
        )
    base = statistics.median(times[args.models[0]])
    for row in rows:
        median = statistics.median(times[row["model"]])
        row |= {"ms": 1000 * median, "images_per_s": args.batch / median, "ratio": median / base}
        row["times_s"] = times[row["model"]]
    result = {
        "device": f"{cpu_name()}, {args.threads} onnxruntime thread(s)",
        "image_size": args.image_size,
        "batch": args.batch,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "clock": args.clock,
        "baseline": args.models[0],
        "rows": rows,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    print(f"\n| model | conv | ms / batch (median of {args.repeats}) | images/s | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['conv']} | {row['ms']:.1f} | {row['images_per_s']:.1f} | "
            f"{row['ratio']:.2f} | {row['max_abs_diff']:.1e} |"
        )
    print(
        f"\n{result['device']}, onnxruntime {ort.__version__}, batch {args.batch}, {args.image_size}px, "
        f"{args.clock} clock; ratio = latency / {args.models[0]}'s"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
