"""Figures of the PSConv ablation tables, published numbers beside the user's (make_tables.py --plot DIR).

Table 3: top-1 error against the cyclic interval t (the published line, our points); Table 4: error per
dilation pattern (grouped bars, paper and ours); Table 6: mean +- std over seeds (error bars, paper and
ours). Other tables have no axis to plot along and are skipped. Each call also writes DIR/table_plots.json,
which records what every figure holds (points, bars), so that tests and readers need not read pixels.

    from table_plots import plot_tables
    plot_tables(fill_tables(tables, results), Path("figures"), fmt="svg")
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scale_plots import FORMATS, PlotError, figure_class  # the sibling figure module: one matplotlib entry

__all__ = ["FORMATS", "PLOTTED", "SIDECAR", "PlotError", "plot_tables"]

SIDECAR = "table_plots.json"
PAPER, OURS = "#4c72b0", "#dd8452"  # one colour per source in every figure
_INTERVAL = re.compile(r"\bt\s*=\s*(\d+)")


def _points(artist: Any) -> int:
    """How many values an artist shows, read back from it: a line, error bars or a bar container."""
    from matplotlib.container import BarContainer, ErrorbarContainer

    if artist is None:
        return 0
    if isinstance(artist, BarContainer):
        return len(artist.patches)
    line = artist.lines[0] if isinstance(artist, ErrorbarContainer) else artist  # the data line
    return len(line.get_xdata())


def _ours(filled: Sequence[Any]) -> list[tuple[int, Any]]:
    """(index, cell) of the cells with our value (status ok or incomplete)."""
    return [(i, f) for i, f in enumerate(filled) if f.top1 is not None]


def _std(values: Sequence[float | None]) -> list[float] | None:
    return [v or 0.0 for v in values] if any(v for v in values) else None


def _ours_label(filled: Sequence[Any]) -> str:
    shown = len(_ours(filled))
    runs = len([f for f in filled if f.cell.run is not None])
    return f"ours ({shown} of {runs} cells)" if shown < runs else "ours"


def _interval_plot(ax: Any, filled: Sequence[Any]) -> dict[str, Any]:
    """Table 3: error against the cyclic interval t, on a log2 axis (t = 1, 2, 4, 8)."""
    ts = []
    for i, f in enumerate(filled):
        match = _INTERVAL.search(" ".join(f.cell.labels))
        ts.append(int(match.group(1)) if match else i + 1)
    order = sorted(range(len(filled)), key=lambda i: ts[i])
    (paper,) = ax.plot(
        [ts[i] for i in order], [filled[i].cell.top1 for i in order], "o-", color=PAPER, label="paper"
    )
    ours, mine = sorted(_ours(filled), key=lambda item: ts[item[0]]), None
    if ours:
        mine = ax.errorbar(
            [ts[i] for i, _ in ours],
            [f.top1 for _, f in ours],
            yerr=_std([f.top1_std for _, f in ours]),
            fmt="s--",
            color=OURS,
            capsize=3,
            label=_ours_label(filled),
        )
    ax.set_xscale("log", base=2)
    ticks = {ts[i]: filled[i].cell.labels[-1] for i in reversed(order)}  # the first cell of each t names it
    ax.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("cyclic interval t")
    return {"kind": "line", "published": _points(paper), "ours": _points(mine), "bars": len(ax.patches)}


def _pattern_bars(ax: Any, filled: Sequence[Any]) -> dict[str, Any]:
    """Table 4: a pair of bars per dilation pattern, the paper's and ours (error bars: std over seeds)."""
    xs = list(range(len(filled)))
    paper = ax.bar([x - 0.2 for x in xs], [f.cell.top1 for f in filled], 0.4, color=PAPER, label="paper")
    ax.bar_label(paper, fmt=f"%.{filled[0].table.decimals}f", fontsize=7, padding=2)
    ours, mine = _ours(filled), None
    if ours:
        mine = ax.bar(
            [i + 0.2 for i, _ in ours],
            [f.top1 for _, f in ours],
            0.4,
            yerr=_std([f.top1_std for _, f in ours]),
            color=OURS,
            capsize=3,
            label=_ours_label(filled),
        )
        ax.bar_label(mine, fmt=f"%.{filled[0].table.decimals}f", fontsize=7, padding=2)
    values = [f.cell.top1 for f in filled] + [f.top1 for _, f in ours]
    low, high = min(values), max(values)
    ax.set_ylim(low - max(1.0, 0.5 * (high - low)), high + 0.3 * max(1.0, high - low))
    for i, f in enumerate(filled):  # say why a cell has no bar of ours
        if f.top1 is None and f.cell.run is not None:
            ax.text(
                i + 0.2, ax.get_ylim()[0], f" {f.status}", rotation=90, ha="center", va="bottom", fontsize=7
            )
    ax.set_xticks(xs)
    ax.set_xticklabels(["\n".join(f.cell.labels) for f in filled], fontsize=8)
    ax.set_xlabel(filled[0].table.headers[0].lower())
    return {"kind": "bars", "published": _points(paper), "ours": _points(mine), "bars": len(ax.patches)}


def _seed_spread(ax: Any, filled: Sequence[Any]) -> dict[str, Any]:
    """Table 6: mean +- std per cell, the paper's (left) and ours (right, with the number of seeds)."""
    xs = list(range(len(filled)))
    paper = ax.errorbar(
        [x - 0.12 for x in xs],
        [f.cell.top1 for f in filled],
        yerr=_std([f.cell.top1_std for f in filled]),
        fmt="o",
        color=PAPER,
        capsize=4,
        label="paper",
    )
    ours, mine = _ours(filled), None
    if ours:
        mine = ax.errorbar(
            [i + 0.12 for i, _ in ours],
            [f.top1 for _, f in ours],
            yerr=_std([f.top1_std for _, f in ours]),
            fmt="s",
            color=OURS,
            capsize=4,
            label=_ours_label(filled),
        )
        for i, f in ours:
            ax.annotate(
                f"n={len(f.runs)}/{f.table.seeds}",
                (i + 0.12, f.top1),
                xytext=(6, 0),
                textcoords="offset points",
                fontsize=7,
                va="center",
            )
    ax.set_xticks(xs)
    ax.set_xticklabels(["\n".join(f.cell.labels) for f in filled], fontsize=7)
    ax.set_xlim(-0.6, len(xs) - 0.4)
    return {"kind": "errorbars", "published": _points(paper), "ours": _points(mine), "bars": len(ax.patches)}


# table key -> how it is drawn; other tables are skipped
PLOTTED: dict[str, Callable[[Any, Sequence[Any]], dict[str, Any]]] = {
    "psconv_t3": _interval_plot,
    "psconv_t4": _pattern_bars,
    "psconv_t6": _seed_spread,
}


def plot_tables(filled_tables: Sequence[Sequence[Any]], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Draw the plottable tables of make_tables' `fill_tables` output into OUT_DIR/KEY.FMT.

    Returns the figure paths (table order) and writes OUT_DIR/table_plots.json: per figure its table,
    file, kind and how many published values and values of ours it shows (`bars`: bar patches drawn).
    """
    if fmt not in FORMATS:
        raise PlotError(f"Unknown figure format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    figure = figure_class()
    out_dir = Path(out_dir)
    paths, records = [], []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for filled in filled_tables:
            if not filled or filled[0].table.key not in PLOTTED:
                continue
            table = filled[0].table
            fig = figure(figsize=(max(6.0, 1.3 * len(filled) + 2.0), 4.2))
            ax = fig.subplots()
            record = PLOTTED[table.key](ax, filled)
            ax.set_ylabel(f"top-1 {table.unit} (%)")
            ax.set_title(textwrap.fill(f"{table.title}: {table.caption}", 80), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
            path = out_dir / f"{table.key}.{fmt}"
            fig.savefig(path, bbox_inches="tight", dpi=150)
            paths.append(path)
            records.append({"table": table.key, "file": path.name, **record})
        (out_dir / SIDECAR).write_text(json.dumps({"figures": records}, indent=2) + "\n")
    except OSError as err:
        raise PlotError(
            f"Cannot write figures to {out_dir}: {err.strerror or err}. Choose a writable folder for --plot."
        ) from err
    return paths
