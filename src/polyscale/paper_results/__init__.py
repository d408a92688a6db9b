"""Published results of the PSConv paper (ECCV 2020, Tables 1-7), the PyConv README and the SEPC paper
(CVPR 2020, Tables 1 and 4).

The single source of truth for the reproduction kit: `configs/experiment/` presets carry these
numbers in their header comments and `notes` (tests check they agree), and `scripts/make_tables.py`
prints them beside the user's results. Classification tables hold top-1 / top-5 cells
(`classification.py`), detection tables COCO AP rows (`detection.py`).
"""

from __future__ import annotations

from typing import Any

from polyscale.paper_results import classification, detection
from polyscale.paper_results.types import Cell, Recipe, Run, Table, metric_label

__all__ = ["PRESETS", "RECIPES", "SWEEP_BASES", "TABLES", "UNPUBLISHED", "Cell", "Recipe", "Run", "Table"]
__all__ += ["cells_of", "describe", "metric_label", "preset_notes", "published_text"]

RECIPES: dict[str, Recipe] = {**classification.RECIPES, **detection.RECIPES}
TABLES: tuple[Table, ...] = classification.TABLES + detection.TABLES
PRESETS: dict[str, Run] = {**classification.PRESETS, **detection.PRESETS}  # experiment=NAME -> its run
SWEEP_BASES: dict[str, Run] = classification.SWEEP_BASES  # bases of the Tables 3-5 multirun lines
UNPUBLISHED: dict[str, Run] = {
    **classification.UNPUBLISHED,
    **detection.UNPUBLISHED,
}  # presets of combinations no paper reports


def cells_of(run: Run) -> list[tuple[Table, Cell]]:
    """Every published cell a run fills, in table order."""
    return [(table, cell) for table in TABLES for cell in table.cells if cell.run == run]


def describe(table: Table, cell: Cell) -> str:
    """`PSConv Table 1: ResNet-50 / PSConv` with the published value(s)."""
    return f"{table.title}: {table.name(cell)}: {published_text(table, cell)}"


def published_text(table: Table, cell: Cell) -> str:
    if table.metrics:
        return ", ".join(f"{metric_label(key)} {cell.values[key]}" for key in table.metrics)
    value = f"top-1 {'err' if table.unit == 'error' else 'acc'} {cell.top1}"
    if cell.top1_std is not None:
        value += f" +- {cell.top1_std}"
    return value + (f", top-5 err {cell.top5}" if cell.top5 is not None else "")


def _published(table: Table, cell: Cell) -> dict[str, float]:
    if table.metrics:
        return dict(cell.values)
    unit = "err" if table.unit == "error" else "acc"
    published = {f"top1_{unit}": cell.top1, "top5_err": cell.top5, "top1_err_std": cell.top1_std}
    return {k: v for k, v in published.items() if v is not None}


def preset_notes(name: str) -> dict[str, Any]:
    """The `notes` block of preset NAME: its first cell, published numbers, and the other cells it fills.

    Presets of unpublished combinations (UNPUBLISHED) have no table, row or numbers.
    """
    if name in UNPUBLISHED:
        return {"table": None, "row": None, "published": {}, "also": []}
    (table, cell), *others = cells_of(PRESETS[name])
    return {
        "table": table.title,
        "row": table.name(cell),
        "published": _published(table, cell),
        "also": [describe(t, c) for t, c in others],
    }
