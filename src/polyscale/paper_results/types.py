"""The vocabulary of the published results: recipes, runs, table cells and tables.

A *run* is what makes two trainings the same experiment (seed aside): network, conv, recipe and, for
detection, the detector and its head / neck. A *cell* is one published number (or row of numbers) and
the run that reproduces it; a *table* lays cells out as the paper prints them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Cell", "Recipe", "Run", "Table", "metric_label"]


@dataclass(frozen=True)
class Recipe:
    """A training recipe: config keys (dotted) and the values the paper prescribes."""

    name: str
    source: str
    settings: Mapping[str, Any]
    task: str = "classification"  # the task.name its runs train (make_tables matches a run's task first)


@dataclass(frozen=True)
class Run:
    """What makes two trainings the same experiment (seed aside)."""

    model: str  # architecture without the ps_ prefix: resnet50, pyconvresnet50, resnext29_8x64d
    conv: str  # standard | psconv | pyconv | dynamic_psconv
    recipe: str
    pattern: tuple[int, ...] | None = None  # psconv: cyclic dilation pattern; dynamic_psconv: its 2 rates
    axes: str | None = None  # psconv only
    detector: str | None = None  # detection runs: retinanet | free_anchor | fcos | faster_rcnn | mask_rcnn
    head: str = "standard"  # single-stage detectors' head (SEPC Table 1: pconv, pconv_ibn, sepc, ...)
    neck_pconv: int = 0  # PConv modules after a two-stage detector's FPN (SEPC Table 4)

    @property
    def model_config(self) -> str:
        """The `model=NAME` whose natural conv is this run's conv."""
        return f"ps_{self.model}" if self.conv == "psconv" else self.model


@dataclass(frozen=True)
class Cell:
    """One published number (or row) and the run that reproduces it (None: another group's work).

    Classification cells hold top-1 (and top-5) in the table's unit; detection cells hold `values`, the
    published COCO metrics in percent under results.json's keys (bbox_AP, bbox_AP50, ..., segm_AP).
    """

    labels: tuple[str, ...]
    run: Run | None
    top1: float | None = None  # in the table's unit (error or accuracy, %)
    top5: float | None = None
    top1_std: float | None = None
    crop: int | None = None  # test crop read from evaluate.py output; None: the training run's own val
    values: Mapping[str, float] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    caption: str
    headers: tuple[str, ...]  # one per label; grid tables: (row header, column header)
    cells: tuple[Cell, ...]
    unit: str = "error"  # error | accuracy | AP (detection: the columns are `metrics`)
    layout: str = "list"  # list: a line per cell; grid: rows x columns as the PyConv README prints them
    seeds: int = 1  # runs per cell averaged as mean +- std (PSConv Table 6: 5)
    decimals: int = 3
    naming_labels: int | None = None  # leading labels that name a cell (Table 2: the network); None: all
    metrics: tuple[str, ...] = ()  # detection: the results.json keys shown, one column each

    def name(self, cell: Cell) -> str:
        """`ResNet-50 / PSConv`: the cell's naming labels."""
        return " / ".join(cell.labels[: self.naming_labels])


def metric_label(key: str) -> str:
    """`bbox_AP50` -> `box AP50`, `segm_AP` -> `mask AP`: results.json keys as the papers name them."""
    kind, _, metric = key.partition("_")
    return f"{ {'bbox': 'box', 'segm': 'mask'}.get(kind, kind) } {metric}"
