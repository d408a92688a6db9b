#!/usr/bin/env python
"""Where a trained network puts its kernel weight: the share of each scale, per layer and per stage.

For every PSConv layer, the share of the kernel weight (L1: sum |w|, L2: sum w^2) held by the kernels
of each dilation rate; for dynamic PSConv layers also the learned fraction of large-rate kernels; for
PyConv layers the share of each pyramid level (kernel size). `count` is the share of the weights
themselves (PSConv: of the kernels), the value L1 and L2 would take if every weight had the same
magnitude: the fixed pattern ({1,2,1,4}: 1/4 at rate 2) that training moves away from.

Reads our checkpoints (the network is rebuilt from the config they store; any task), bare state dicts
and the PSConv / PyConv authors' files (converted; `--model NAME` when the layout does not say which
network). Writes DIR/scales.json and a figure per network (stacked bars per layer, stages marked);
`--compare CHECKPOINT2` adds the second network and a side-by-side figure (seeds, Table 4 patterns).

    python scripts/analyze_scales.py RUN/checkpoints/best.pt [--compare RUN2/checkpoints/best.pt]
        [--out DIR] [--labels A B] [--ema] [--formats png,svg] [--model NAME]
        [--dilation-pattern 1,2,1,4] [--axes both]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from polyscale.errors import CheckpointError, PolyscaleError
from polyscale.models.scales import METRICS, LayerScales, aggregate, scale_label, scale_shares, scales_of

if str(Path(__file__).resolve().parent) not in sys.path:  # scripts/ is not a package: import the sibling
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_plots import FORMATS, figure_class, plot_comparison, plot_network  # noqa: E402

SCALES_JSON = "scales.json"


class ScaleAnalysisError(PolyscaleError):
    """A checkpoint or option this script cannot analyse (exit code 2, one paragraph)."""


# --- loading a checkpoint -----------------------------------------------------------------------------------


@dataclass
class Network:
    """An analysed checkpoint: what it is, where it came from, its layers."""

    label: str
    checkpoint: str
    model: str
    conv: str
    source: str  # polyscale checkpoint | state_dict | psconv_original | pyconv_original
    layers: list[LayerScales]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "checkpoint": self.checkpoint,
            "model": self.model,
            "conv": self.conv,
            "source": self.source,
            **self.meta,
            "layers": [layer.to_json() for layer in self.layers],
            "stages": aggregate(self.layers),
            "total": aggregate(self.layers, by_stage=False),
        }


def default_label(path: Path) -> str:
    """RUN_NAME/best.pt for RUN_DIR/checkpoints/best.pt, else the file's name."""
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def _cpu_runtime() -> Any:
    from polyscale.engine.distributed import DistInfo
    from polyscale.engine.runtime import Runtime

    return Runtime(DistInfo(), torch.device("cpu"), "fp32", channels_last=False, show_progress=False)


class _Built(NamedTuple):
    """A network rebuilt for a checkpoint, with its weights loaded."""

    model: nn.Module
    report: Any  # polyscale.models.LoadReport
    name: str  # model=NAME
    conv: str
    source: str  # polyscale checkpoint | state_dict | psconv_original | pyconv_original
    meta: dict[str, Any]


def _from_stored_config(path: Path, ckpt: dict[str, Any], weights: dict[str, Tensor]) -> _Built:
    """The network our container's config describes (as evaluate.py rebuilds it, any task)."""
    from polyscale.engine.checkpoint import stored_config, trained_as
    from polyscale.engine.evaluation import effective_config
    from polyscale.models import load_model_weights
    from polyscale.tasks import get_task

    cfg = effective_config(OmegaConf.create({"checkpoint": str(path)}), ckpt, [])
    fc = weights.get("fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None else int(cfg.data.get("num_classes") or 1)
    model = get_task(cfg.task.name).build_model(cfg, num_classes, _cpu_runtime())
    # classification: the whole network must fit. Other tasks: their heads follow the data set's class
    # count, which the checkpoint does not store; load_network checks that the analysed layers loaded.
    report = load_model_weights(
        model,
        weights,
        strict=cfg.task.name == "classification",
        name=str(path),
        trained_as=trained_as(ckpt),
        fix="Fix: analyse the checkpoint with the polyscale version that wrote it.",
    )
    conv = OmegaConf.to_container(cfg.model.conv, resolve=True)
    meta = {
        "task": cfg.task.name,
        "seed": stored_config(ckpt).get("seed"),
        "conv_options": _conv_options(conv),
    }
    return _Built(model, report, cfg.model.name, conv["name"], "polyscale checkpoint", meta)


def _conv_options(conv: dict[str, Any]) -> dict[str, Any]:
    """The options of the conv type that was used (the config also holds the other types' defaults)."""
    from polyscale.ops.factory import OPTIONS

    keys = OPTIONS.get(conv["name"], tuple(conv))
    return {k: conv[k] for k in keys if k != "name" and conv.get(k) is not None}


def _from_state_dict(path: Path, weights: Any, model_name: str | None, conv: dict[str, Any]) -> _Built:
    """The network of a file without a stored config: `model_name`, or the one its layout names."""
    from polyscale.models import create_model, list_models, load_model_weights, read_state_dict
    from polyscale.models.describe import describe_state_dict

    sd, fmt, _ = read_state_dict(weights, name=str(path))
    looks = describe_state_dict(sd)
    meta = {"task": "classification", "seed": None, "looks_like": looks, "model_from": "--model"}
    if model_name is None:
        model_name, meta["model_from"] = looks.split()[0].split(",")[0], "layout"
        if model_name not in list_models():
            raise ScaleAnalysisError(
                f"{path} stores no config, and its layout ({looks}) names no registered network. Pass the "
                "network it holds: --model NAME (python -c 'import polyscale.models as m; "
                "print(m.list_models())' lists them)."
            )
        if " with model/conv=" in looks:  # a standard trunk with our PyConv / dynamic PSConv layers
            conv = {"name": looks.split(" with model/conv=")[1].split(",")[0], **conv}
    fc = sd.get("fc.weight")
    model = create_model(model_name, num_classes=0 if fc is None else int(fc.shape[0]), conv=conv or None)
    fix = (
        f"Fix: pass the network the file holds with --model NAME (it looks like {looks}), and for PSConv "
        "files its --dilation-pattern / --axes."
    )
    report = load_model_weights(model, sd, strict=True, name=str(path), fix=fix)
    meta["conv_options"] = conv
    return _Built(model, report, model_name, model.polyscale_conv, fmt, meta)


def load_network(
    path: str | Path,
    *,
    label: str | None = None,
    use_ema: bool = False,
    model_name: str | None = None,
    conv_options: dict[str, Any] | None = None,
) -> Network:
    """Load a checkpoint, rebuild its network and analyse its multi-scale layers.

    Our containers are rebuilt from their stored config (then `model_name` / `conv_options` must not be
    given); other files need `model_name` unless their layout names a registered network.
    """
    from polyscale.engine.checkpoint import (
        is_polyscale_checkpoint,
        load_checkpoint,
        model_state,
        stored_config,
    )

    path = Path(path)
    ckpt = load_checkpoint(path)
    ours = is_polyscale_checkpoint(ckpt)
    if use_ema and not ours:
        raise ScaleAnalysisError(f"--ema needs a polyscale checkpoint; {path} is a bare state dict.")
    weights = model_state(ckpt, use_ema=use_ema, source=path) if ours else ckpt
    with warnings.catch_warnings(record=True) as caught:  # the converter's notes go into the JSON
        warnings.simplefilter("always")
        if ours and stored_config(ckpt).get("model"):
            if model_name or conv_options:
                raise ScaleAnalysisError(
                    f"{path} stores the config it was trained with, so the network is rebuilt from it; "
                    "--model, --dilation-pattern and --axes are for files without one. Drop them."
                )
            built = _from_stored_config(path, ckpt, weights)
        else:
            built = _from_state_dict(path, weights, model_name, conv_options or {})
    layers = scale_shares(built.model)
    if not layers:
        hint = ""
        if built.meta.get("model_from") == "layout":
            hint = (
                " The network was told by the file's layout, which cannot show our PSConv (its weights have "
                "nn.Conv2d's shape): for a PS network's bare state dict pass --model ps_NAME."
            )
        raise ScaleAnalysisError(
            f"{path} holds model={built.name} (conv {built.conv}), which has no PSConv, dynamic PSConv or "
            "PyConv layers: there are no scales to compare. Analyse a checkpoint of a PS or PyConv network "
            "(model=ps_NAME, model/conv=psconv, pyconv or dynamic_psconv)." + hint
        )
    report = built.report
    problems = [*report.missing_keys, *(k for k, _, _ in report.mismatched_keys)]
    unread = sorted({layer.name for layer in layers for key in problems if key.startswith(f"{layer.name}.")})
    if unread:
        raise CheckpointError(
            f"{path} does not hold the weights of the layers {', '.join(unread[:4])} of the network its "
            f"config describes ({report.summary()}); their numbers would be those of a fresh initialisation. "
            "Analyse a checkpoint written by this polyscale version."
        )
    meta = {**built.meta, "weights": "ema" if use_ema else "model", "load": report.summary()}
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    meta |= {"warnings": notes} if notes else {}
    return Network(
        label or default_label(path), str(path), built.name, built.conv, built.source, layers, meta
    )


# --- comparison ---------------------------------------------------------------------------------------------


def _side_by_side(a: list[dict], b: list[dict], key: str) -> tuple[list[dict], list[str], list[str]]:
    """Entries of the same `key` (and scale kind) side by side, their shares on the union of their scales;
    also the keys only A and only B have."""
    index_b = {(e[key], e["scale"]): e for e in b}
    rows, only_a = [], []
    for ea in a:
        eb = index_b.pop((ea[key], ea["scale"]), None)
        if eb is None:
            only_a.append(ea[key])
            continue
        values = sorted(set(scales_of(ea)) | set(scales_of(eb)))
        row: dict[str, Any] = {key: ea[key], "scale": ea["scale"]}
        row["rates" if ea["scale"] == "dilation" else "levels"] = values
        for m in METRICS:
            sa, sb = ([dict(zip(scales_of(e), e["shares"][m])).get(v, 0.0) for v in values] for e in (ea, eb))
            row[m] = {"a": sa, "b": sb, "b_minus_a": [round(y - x, 6) for x, y in zip(sa, sb)]}
        if "large_fraction" in ea or "large_fraction" in eb:
            row["large_fraction"] = {"a": ea.get("large_fraction"), "b": eb.get("large_fraction")}
        rows.append(row)
    return rows, only_a, [name for name, _ in index_b]


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two analysed networks (their JSON) side by side, per layer (by name), per stage and in total."""
    layers, only_a, only_b = _side_by_side(a["layers"], b["layers"], "name")
    out = {"a": a["label"], "b": b["label"], "layers": layers}
    out["stages"] = _side_by_side(a["stages"], b["stages"], "stage")[0]
    out["total"] = _side_by_side(a["total"], b["total"], "stage")[0]
    return out | {"only_in_a": only_a, "only_in_b": only_b}


# --- command line -------------------------------------------------------------------------------------------


def default_out(path: Path) -> Path:
    """RUN_DIR/analysis for RUN_DIR/checkpoints/NAME.pt, else an analysis folder beside the file."""
    return path.parent.parent / "analysis" if path.parent.name == "checkpoints" else path.parent / "analysis"


def _summary(net: Network) -> list[str]:
    lines = [f"{net.label}: model={net.model} (conv {net.conv}), {len(net.layers)} multi-scale layers"]
    for entry in aggregate(net.layers):
        values = scales_of(entry)
        parts = [
            f"{scale_label(entry['scale'], v)} {l1:.3f} (of weights {n:.3f})"
            for v, l1, n in zip(values, entry["shares"]["l1"], entry["shares"]["count"])
        ]
        extra = f", large-rate kernels {entry['large_fraction']:.3f}" if "large_fraction" in entry else ""
        lines.append(f"  {entry['stage']:>8} L1 share: " + ", ".join(parts) + extra)
    return lines


def _parse_pattern(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").strip("[]{}").split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected rates like 1,2,1,4, got {text!r}") from err


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Analyse, plot, write DIR/scales.json; returns what was written there."""
    formats = [f for f in args.formats.split(",") if f]
    if not formats or set(formats) - set(FORMATS):
        raise ScaleAnalysisError(
            f"--formats {args.formats!r}: choose among {', '.join(FORMATS)} (comma-separated)."
        )
    figure_class()  # fail before the (slow) loading when matplotlib is missing
    conv = {
        k: v for k, v in (("dilation_pattern", args.dilation_pattern), ("axes", args.axes)) if v is not None
    }
    paths = [args.checkpoint] + ([args.compare] if args.compare else [])
    labels = list(args.labels or [])
    if len(labels) > len(paths):
        raise ScaleAnalysisError(f"--labels got {len(labels)} names for {len(paths)} checkpoint(s).")
    labels += [None] * (len(paths) - len(labels))
    nets = [
        load_network(p, label=lab, use_ema=args.ema, model_name=args.model, conv_options=conv)
        for p, lab in zip(paths, labels)
    ]
    if len(nets) == 2 and nets[0].label == nets[1].label:
        nets[1].label += " (2)"
    out = args.out or default_out(args.checkpoint)
    try:
        out.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {"format": "polyscale-scales", "version": 1}
        report["networks"] = [net.to_json() for net in nets]
        stems = ("scales", "scales_2")
        report["figures"] = [
            plot_network(net, out, stem, formats) for net, stem in zip(report["networks"], stems)
        ]
        if len(nets) == 2:
            report["comparison"] = compare(*report["networks"])
            report["figures"].append(plot_comparison(*report["networks"], out, "compare", formats))
        (out / SCALES_JSON).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise ScaleAnalysisError(
            f"Cannot write the analysis to {out}: {err.strerror or err}. Choose a writable folder with "
            "--out DIR."
        ) from err
    for net in nets:
        print("\n".join(_summary(net)))
        for warning in net.meta.get("warnings", []):
            print(f"  note: {warning}")
    written = [out / SCALES_JSON, *(out / f for fig in report["figures"] for f in fig["files"])]
    print("wrote " + ", ".join(str(p) for p in written))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="our checkpoint, a bare state dict or an authors' file")
    parser.add_argument(
        "--compare", type=Path, metavar="CHECKPOINT2", help="a second checkpoint, side by side"
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: RUN_DIR/analysis)")
    parser.add_argument("--labels", nargs="+", metavar="NAME", help="names of the networks in the figures")
    parser.add_argument("--ema", action="store_true", help="analyse the EMA weights of our checkpoints")
    parser.add_argument("--formats", default="png,svg", help="figure formats, comma-separated (png,svg,pdf)")
    parser.add_argument(
        "--model", help="network of a file without a stored config (default: from its layout)"
    )
    parser.add_argument(
        "--dilation-pattern", type=_parse_pattern, help="PSConv rates of such a file, e.g. 1,2,1,4"
    )
    parser.add_argument("--axes", choices=("both", "input", "output"), help="PSConv axes of such a file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except PolyscaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
