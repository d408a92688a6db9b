"""Figures of scripts/analyze_scales.py: stacked bars of each multi-scale layer's kernel weight per scale.

`plot_network` draws one network (a panel per metric, a bar per layer, stages marked); `plot_comparison`
two side by side (per layer and per stage). Both read the networks as analyze_scales.py writes them to
scales.json (`polyscale.models.scales`: `LayerScales.to_json()`, `aggregate()`) and return a record of
what they drew (bars per panel), so that tests and readers need not read pixels.

    from scale_plots import plot_network
    plot_network(report["networks"][0], Path("analysis"), "scales", ["png", "svg"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polyscale.errors import PolyscaleError
from polyscale.models.scales import scale_label, scales_of, stage_of

__all__ = ["FORMATS", "PlotError", "figure_class", "plot_comparison", "plot_network"]

FORMATS = ("png", "svg", "pdf")
_METRIC_TEXT = {
    "l1": "share of sum |w| (L1)",
    "l2": "share of sum w² (L2)",
    "count": "share of kernels",
}


class PlotError(PolyscaleError):
    """Figures cannot be drawn: matplotlib missing, an unknown format, an unwritable folder (exit code 2)."""


def figure_class() -> Any:
    """matplotlib's Figure (no pyplot: no global state, no display needed); a user error without it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotError(
            "The plots need matplotlib, which is not installed. Install the plot extra: "
            "pip install -e .[plot] (or pip install matplotlib)."
        ) from err
    return Figure


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    """A colour per scale label: dilations dark (d=1) to light; kernel sizes light (k=3) to dark."""
    from matplotlib import colormaps

    order = sorted(set(labels), key=lambda t: (t[0] != "d", int(t[2:])))
    dilation = [t for t in order if t.startswith("d")]
    kernel = [t for t in order if t.startswith("k")]
    out = {}
    for names, cmap in ((dilation, colormaps["viridis"]), (kernel, colormaps["YlOrRd"])):
        for i, name in enumerate(names):
            out[name] = cmap(0.15 + 0.7 * i / max(1, len(names) - 1))
    return out


def _stack(
    ax: Any,
    xs: Sequence[float],
    entries: Sequence[tuple[list[str], list[float]]],
    colors: dict,
    width: float,
    legend: bool = True,
    **style: Any,
) -> None:
    """Stacked bars, one per entry (its labels and shares), segments in the colours' order; one ax.bar
    call (one legend entry) per scale label."""
    bottoms = [0.0] * len(entries)
    for label in colors:
        xs_l, heights, bases, where = [], [], [], []
        for i, (labels, shares) in enumerate(entries):
            if label in labels:
                xs_l.append(xs[i])
                heights.append(shares[labels.index(label)])
                bases.append(bottoms[i])
                where.append(i)
        if not xs_l:
            continue
        ax.bar(
            xs_l,
            heights,
            width,
            bottom=bases,
            color=colors[label],
            label=label if legend else None,
            edgecolor="white",
            linewidth=0.3,
            **style,
        )
        for i, h in zip(where, heights):
            bottoms[i] += h


def _mark_stages(ax: Any, stages: Sequence[str], top: bool) -> None:
    """Dotted lines between stages; the stage names above the top panel."""
    from matplotlib.transforms import blended_transform_factory

    starts = [i for i in range(len(stages)) if i == 0 or stages[i] != stages[i - 1]]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="0.25", linestyle=":", linewidth=1.0)
    if top:
        where = blended_transform_factory(ax.transData, ax.transAxes)
        for i, end in zip(starts, [*starts[1:], len(stages)]):
            ax.text((i + end - 1) / 2, 1.02, stages[i], transform=where, ha="center", va="bottom", fontsize=9)


def _tick_labels(ax: Any, names: Sequence[str], rotation: int = 90) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=rotation, fontsize=max(5, min(8, 480 // max(1, len(names)))))
    ax.set_xlim(-0.6, len(names) - 0.4)


def _save(fig: Any, out_dir: Path, stem: str, formats: Sequence[str]) -> list[str]:
    files = []
    for fmt in formats:
        fig.savefig(out_dir / f"{stem}.{fmt}", bbox_inches="tight", dpi=150)
        files.append(f"{stem}.{fmt}")
    return files


def _bar(entry: dict[str, Any], metric: str) -> tuple[list[str], list[float]]:
    """(scale labels, shares) of a layer / stage entry of the JSON: one stacked bar."""
    return [scale_label(entry["scale"], v) for v in scales_of(entry)], entry["shares"][metric]


def _figure_record(kind: str, labels: list[str], files: list[str], panels: list[dict]) -> dict[str, Any]:
    return {
        "figure": kind,
        "networks": labels,
        "files": files,
        "panels": panels,
        "bars": sum(p["bars"] for p in panels),
    }


def plot_network(net: dict[str, Any], out_dir: Path, stem: str, formats: Sequence[str]) -> dict[str, Any]:
    """One figure of a network (its JSON): a panel per metric (L1, L2, and with dynamic layers the learned
    share of kernels) of stacked bars per layer; dashed: where the bars would end if all |w| were equal
    (the fixed pattern); stages separated and named. Returns the figure's record (bars drawn per panel)."""
    layers = net["layers"]
    dynamic = any("large_fraction" in layer for layer in layers)
    metrics = ["l1", "l2", *(["count"] if dynamic else [])]
    colors = _colors([t for layer in layers for t in _bar(layer, "l1")[0]])
    fig = figure_class()(figsize=(max(6.0, 0.3 * len(layers) + 2.5), 2.4 * len(metrics) + 1.6))
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    panels = []
    for row, (ax, metric) in enumerate(zip(axes, metrics)):
        _stack(
            ax, range(len(layers)), [_bar(layer, metric) for layer in layers], colors, 0.8, legend=row == 0
        )
        panels.append({"metric": metric, "bars": len(ax.patches)})  # counted before any other artist
        if metric != "count":
            ends = [
                (x, y) for x, layer in enumerate(layers) for y in _cumulative(layer["shares"]["count"])[:-1]
            ]
            ax.hlines(
                [y for _, y in ends],
                [x - 0.4 for x, _ in ends],
                [x + 0.4 for x, _ in ends],
                colors="black",
                linestyles="--",
                linewidth=0.7,
                label="if all |w| were equal" if row == 0 else None,
            )
        ax.set_ylim(0, 1)
        ax.set_ylabel(
            _METRIC_TEXT[metric] + ("\n(dynamic: learned)" if metric == "count" else ""), fontsize=9
        )
        _mark_stages(ax, [layer["stage"] for layer in layers], top=row == 0)
    _tick_labels(axes[-1], [layer["name"] for layer in layers])
    axes[-1].set_xlabel("layer (module name)")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="scale", title_fontsize=8)
    fig.suptitle(
        f"{net['label']}: model={net['model']} (conv {net['conv']}), kernel weight per scale", fontsize=10
    )
    return _figure_record("network", [net["label"]], _save(fig, out_dir, stem, formats), panels)


def _cumulative(shares: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for s in shares:
        total += s
        out.append(total)
    return out


def plot_comparison(
    a: dict[str, Any], b: dict[str, Any], out_dir: Path, stem: str, formats: Sequence[str]
) -> dict[str, Any]:
    """Two networks (their JSON) side by side, A plain and B hatched: the L1 share per layer (matched by
    name) and per stage. Returns the figure's record (bars drawn per panel)."""
    from matplotlib.patches import Patch

    nets = (a, b)
    layers = [{e["name"]: e for e in net["layers"]} for net in nets]
    stages = [{(e["stage"], e["scale"]): e for e in net["stages"]} for net in nets]
    names = list(dict.fromkeys([*layers[0], *layers[1]]))
    stage_keys = list(dict.fromkeys([*stages[0], *stages[1]]))
    colors = _colors([t for side in layers for e in side.values() for t in _bar(e, "l1")[0]])
    fig = figure_class()(figsize=(max(7.0, 0.45 * len(names) + 3.0), 7.5))
    ax_layers, ax_stages = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 2]})
    panels = []
    for ax, per, keys, entries in (
        (ax_layers, "layer", names, layers),
        (ax_stages, "stage", stage_keys, stages),
    ):
        for side, (offset, hatch) in enumerate(((-0.21, None), (0.21, "///"))):
            present = [(i, entries[side][key]) for i, key in enumerate(keys) if key in entries[side]]
            bars = [_bar(e, "l1") for _, e in present]
            xs = [i + offset for i, _ in present]
            _stack(ax, xs, bars, colors, 0.4, legend=False, hatch=hatch, alpha=1.0 - 0.2 * side)
        panels.append({"metric": "l1", "per": per, "bars": len(ax.patches)})
        ax.set_ylim(0, 1)
        ax.set_ylabel(_METRIC_TEXT["l1"], fontsize=9)
    _mark_stages(ax_layers, [stage_of(n) for n in names], top=True)
    _tick_labels(ax_layers, names)
    _tick_labels(
        ax_stages, [s if scale == "dilation" else f"{s} (kernel sizes)" for s, scale in stage_keys], 0
    )
    ax_stages.set_xlabel("stage")
    handles = [Patch(color=c, label=t) for t, c in colors.items()]
    handles += [
        Patch(facecolor="white", edgecolor="black", label=f"left: {a['label']}"),
        Patch(facecolor="white", edgecolor="black", hatch="///", label=f"right: {b['label']}"),
    ]
    ax_layers.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle(f"{a['label']} vs {b['label']}: share of kernel weight (L1) per scale", fontsize=10)
    fig.subplots_adjust(hspace=0.9)
    return _figure_record("comparison", [a["label"], b["label"]], _save(fig, out_dir, stem, formats), panels)
