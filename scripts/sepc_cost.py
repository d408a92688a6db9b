"""Cost of each SEPC head variant beside the paper's Table 1: multiply-adds at 800x1333 and inference
latency relative to the standard head, measured in the same run.

For every `detector.head` variant one detector (RetinaNet by default, ResNet-50, 256-channel FPN,
80 classes) runs in eval mode on one image already at the test size, so torchvision's transform does not
resize it. Multiply-adds come from torch.utils.flop_counter (conv + fc; a deformable conv counts as the
conv it replaces, its bilinear sampling not, as the paper's counter does), for the whole detector and for
the head alone (run on the FPN's maps). Latency is the forward (backbone, FPN, head, box decoding and
NMS); variants alternate (ABBA), CPU times are medians of wall-clock repeats, CUDA times come from CUDA
events after warm-up. The paper's "FLOPS(G)" column counts multiply-adds; its times are on its own GPU,
so compare ratios to the baseline, not milliseconds.

    python scripts/sepc_cost.py                                   # CPU, 800x1333, ResNet-50 RetinaNet
    python scripts/sepc_cost.py --device cuda --repeats 20
    python scripts/sepc_cost.py --size 128 160 --backbone resnet20 --fpn-channels 64 --repeats 2  # smoke
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench_train import alternate, setup, write_json
from polyscale.detection import create_detector
from polyscale.paper_results import TABLES

VARIANTS = ("standard", "dcn", "pconv", "pconv_ibn", "sepc_lite", "sepc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", default="retinanet", choices=["retinanet", "free_anchor", "fcos"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per variant before timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="CPU only: wall or process CPU time"
    )
    p.add_argument("--json", type=Path, default=Path("outputs/bench/sepc_cost.json"))
    return p.parse_args(argv)


def _deform_conv_flops(inp, weight, *_args, out_shape, **_kwargs) -> int:
    """torchvision::deform_conv2d as the conv it replaces: 2 x output elements x (C_in / groups) x k x k."""
    return 2 * out_shape.numel() * weight[1] * weight[2] * weight[3]


def count_macs(fn, *args) -> int:
    """Multiply-adds of fn(*args), deformable convs included."""
    mapping = {torch.ops.torchvision.deform_conv2d: _deform_conv_flops}  # keyed by op packet
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def head_macs(model: nn.Module, images: list[torch.Tensor]) -> int:
    """Multiply-adds of the head alone, on the FPN's maps of the (already test-sized) image."""
    with torch.no_grad():
        batch, _ = model.transform(images)
        features = list(model.backbone(batch.tensors).values())
    return count_macs(model.head, features)


def paper_costs(detector: str) -> dict[str, tuple[str, str]]:
    """head variant -> (FLOPs G, time ms) of the paper's Table 1 row for this detector."""
    table = next(t for t in TABLES if t.key == "sepc_t1")
    kind = "retinanet" if detector == "fcos" else detector  # FCOS is not in the table: RetinaNet's rows
    return {c.run.head: (c.labels[2], c.labels[3]) for c in table.cells if c.run and c.run.detector == kind}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = setup(args)
    torch.manual_seed(0)
    height, width = args.size
    images = [torch.rand(3, height, width, device=device)]
    models, result = {}, {}
    for variant in args.variants:
        model = create_detector(
            args.detector,
            args.backbone,
            args.num_classes,
            head=variant,
            fpn_channels=args.fpn_channels,
            min_size=min(height, width),
            max_size=max(height, width),
        )
        models[variant] = model.to(device).eval()
        result[variant] = {
            "gmacs": count_macs(models[variant], images) / 1e9,
            "head_gmacs": head_macs(models[variant], images) / 1e9,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        }

    def forward(model: nn.Module):
        def run() -> None:
            with torch.no_grad():
                model(images)

        return run

    times = alternate(
        {v: forward(m) for v, m in models.items()},
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
        clock=args.clock,
    )
    base = args.variants[0]
    paper = paper_costs(args.detector)
    for variant, entry in result.items():
        entry["latency_ms"] = statistics.median(times[variant]) * 1000
        entry["gmacs_ratio"] = entry["gmacs"] / result[base]["gmacs"]
        entry["head_gmacs_ratio"] = entry["head_gmacs"] / result[base]["head_gmacs"]
        entry["latency_ratio"] = entry["latency_ms"] / (statistics.median(times[base]) * 1000)
        if variant in paper and base in paper:
            flops, ms = (float(x) for x in paper[variant])
            entry["paper_gflops"], entry["paper_time_ms"] = flops, ms
            entry["paper_gflops_ratio"] = flops / float(paper[base][0])
            entry["paper_latency_ratio"] = ms / float(paper[base][1])
    summary = {
        "device": str(device),
        "torch": torch.__version__,
        "detector": args.detector,
        "backbone": args.backbone,
        "size": [height, width],
        "fpn_channels": args.fpn_channels,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "baseline": base,
        "variants": result,
    }
    header = "| head | GMACs | vs base | paper | head GMACs | vs base | latency ms | vs base | paper |"
    print(header + "\n" + "|---" * 9 + "|")
    for variant, e in result.items():
        paper_macs = f"{e['paper_gflops_ratio']:.4f}" if "paper_gflops_ratio" in e else "-"
        paper_time = f"{e['paper_latency_ratio']:.3f}" if "paper_latency_ratio" in e else "-"
        print(
            f"| {variant} | {e['gmacs']:.2f} | {e['gmacs_ratio']:.4f} | {paper_macs} "
            f"| {e['head_gmacs']:.2f} | {e['head_gmacs_ratio']:.4f} "
            f"| {e['latency_ms']:.1f} | {e['latency_ratio']:.3f} | {paper_time} |"
        )
    write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
