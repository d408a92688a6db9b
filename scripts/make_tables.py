#!/usr/bin/env python
"""Collect training runs into tables laid out like the PSConv paper's Tables 1-7, the PyConv README and
the SEPC paper's Tables 1 and 4.

Every `results.json` under the given roots is one run; its `config.yaml` says which table cells it
fills (architecture, conv, dilation pattern, axes, detector, head and the recipe's settings, not the
preset's name, so sweep jobs are placed by what they trained). Each cell shows our number, the published
one from `polyscale.paper_results` and the difference (ours - paper). Missing cells, duplicate runs and runs
that fit no cell are named with the command that fixes them; nothing is guessed.

    python scripts/make_tables.py outputs multirun [--csv tables.csv] [--output tables.md]
        [--tables psconv_t1,psconv_t6 | all] [--metric best|final] [--ignore trainer.epochs] [--strict]
        [--plot DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polyscale.errors import PolyscaleError
from polyscale.paper_results import PRESETS, RECIPES, TABLES, Cell, Recipe, Run, Table, metric_label

# A run that was cut short is no reproduction, whatever its recipe says.
_FULL_RUN = {"trainer.limit_train_batches": None, "trainer.limit_val_batches": None}


@dataclass
class RunResult:
    """One run directory: the Run it trained (or why it fits none) and its accuracies or APs (%)."""

    directory: Path
    run: Run | None
    reason: str = ""
    seed: int | None = None
    top1: float | None = None
    top5: float | None = None
    crops: dict[int, float] = field(default_factory=dict)  # evaluate.py top-1 per test crop
    values: dict[str, float] = field(default_factory=dict)  # detection: bbox_AP, ..., segm_APl


@dataclass
class Filled:
    """A table cell with our value(s) in the table's unit."""

    table: Table
    cell: Cell
    runs: list[RunResult]
    top1: float | None = None
    top1_std: float | None = None
    top5: float | None = None
    values: dict[str, float] = field(default_factory=dict)  # detection tables: results.json key -> AP
    status: str = "ok"  # ok | published only | missing | duplicate | no eval | incomplete


def _select(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) or isinstance(actual, float):
        number = isinstance(actual, int | float) and not isinstance(actual, bool) and expected is not None
        return number and math.isclose(float(actual), float(expected), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(expected, list):
        return (
            isinstance(actual, list | tuple)
            and len(actual) == len(expected)
            and all(_same(a, e) for a, e in zip(actual, expected))
        )
    return actual == expected


def recipe_mismatches(config: Mapping[str, Any], recipe: Recipe, ignore: frozenset[str]) -> list[str]:
    """`key=actual (paper: expected)` for every recipe setting the config does not follow."""
    settings = {**recipe.settings, **_FULL_RUN}
    return [
        f"{key}={_select(config, key)!r} (paper: {value!r})"
        for key, value in settings.items()
        if key not in ignore and not _same(_select(config, key), value)
    ]


def identify_run(config: Mapping[str, Any], ignore: frozenset[str] = frozenset()) -> Run | str:
    """The Run a resolved training config describes, or a sentence saying why it fits no recipe."""
    model, conv = _select(config, "model.name"), _select(config, "model.conv.name")
    if not isinstance(model, str) or not isinstance(conv, str):
        return "config has no model.name / model.conv.name"
    task = _select(config, "task.name") or "classification"
    recipes = {name: recipe for name, recipe in RECIPES.items() if recipe.task == task}
    if not recipes:
        return f"task {task!r} has no published recipe"
    misses = {name: recipe_mismatches(config, recipe, ignore) for name, recipe in recipes.items()}
    recipe = min(misses, key=lambda name: len(misses[name]))
    if misses[recipe]:
        return f"closest recipe {recipe} differs in " + ", ".join(misses[recipe])
    scratch = not _select(config, "model.checkpoint_path") and "model.checkpoint_path" not in ignore
    if task == "detection" and scratch:
        return "model.checkpoint_path=null: the papers fine-tune an ImageNet backbone, not a random one"
    custom = any(
        _select(config, f"model.conv.{key}") for key in ("kernel_sizes", "pyramid_groups", "groups")
    )  # (runs of older versions store the pyramid groups as model.conv.groups)
    if conv == "pyconv" and custom:
        return "custom PyConv kernel_sizes / pyramid_groups (the tables use the defaults)"
    arch = model.removeprefix("ps_")  # model=ps_resnet50 and model=resnet50 model/conv=psconv are one net
    ps_args: tuple = ()
    if conv == "psconv":
        pattern = tuple(int(d) for d in _select(config, "model.conv.dilation_pattern") or ())
        ps_args = (pattern, _select(config, "model.conv.axes"))
    elif conv == "dynamic_psconv":  # the learned mask chooses between two rates
        ps_args = (tuple(int(d) for d in _select(config, "model.conv.rates") or ()),)
    if task != "detection":
        return Run(arch, conv, recipe, *ps_args)
    detector = {
        "detector": _select(config, "detector.name"),
        "head": _select(config, "detector.head") or "standard",
        "neck_pconv": int(_select(config, "detector.neck_pconv") or 0),
    }
    return Run(arch, conv, recipe, *ps_args, **detector)


def load_run(results_file: Path, metric: str, ignore: frozenset[str]) -> RunResult:
    """Read results.json, config.yaml (or Hydra's .hydra/config.yaml) and any eval*.json of a run."""
    directory = results_file.parent
    config_file = next(
        (p for p in (directory / "config.yaml", directory / ".hydra/config.yaml") if p.is_file()), None
    )
    if config_file is None:
        return RunResult(directory, None, "no config.yaml next to results.json")
    config = yaml.safe_load(config_file.read_text()) or {}
    detection = _select(config, "task.name") == "detection"
    wanted = "bbox_AP" if detection else "top1/top5"
    try:
        entry = json.loads(results_file.read_text())[metric]
        if detection:
            values, top1, top5 = {k: float(v) for k, v in entry.items() if k != "epoch"}, None, None
            if "bbox_AP" not in values:
                raise KeyError("bbox_AP")
        else:
            values, top1, top5 = {}, float(entry["top1"]), float(entry["top5"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return RunResult(directory, None, f"results.json has no {metric}.{wanted} ({err!r})")
    run = identify_run(config, ignore)
    result = RunResult(directory, run if isinstance(run, Run) else None, run if isinstance(run, str) else "")
    result.seed, result.top1, result.top5, result.values = config.get("seed"), top1, top5, values
    for eval_file in sorted(directory.glob("eval*.json")):  # evaluate.py ... eval.output=RUN_DIR/eval.json
        try:
            for item in json.loads(eval_file.read_text()).get("results", []):
                result.crops[int(item["crop_size"])] = float(item["top1"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise SystemExit(
                f"error: {eval_file} is not evaluate.py output ({err!r}); move it out of the run"
            ) from err
    return result


def collect(
    roots: Sequence[Path], metric: str = "best", ignore: frozenset[str] = frozenset()
) -> list[RunResult]:
    """Every run under the roots (recursively), each directory once."""
    files = sorted({p.resolve() for root in roots for p in Path(root).rglob("results.json")})
    return [load_run(path, metric, ignore) for path in files]


def fill(table: Table, cell: Cell, runs: list[RunResult]) -> Filled:
    """Our value(s) for one cell: a single run, or mean +- std over seeds (sample std, n - 1)."""
    filled = Filled(table, cell, runs)
    if cell.run is None:
        filled.status = "published only"
        return filled
    seeds = [r.seed for r in runs]
    if not runs:
        filled.status = "missing"
    elif (table.seeds == 1 and len(runs) > 1) or len(set(seeds)) < len(seeds):
        filled.status = "duplicate"
    elif cell.crop is not None and any(cell.crop not in r.crops for r in runs):
        filled.status = "no eval"
    if filled.status != "ok":
        return filled
    if table.metrics:  # detection: each metric averaged over the cell's runs (one seed in the papers)
        filled.values = {
            key: statistics.fmean(r.values[key] for r in runs)
            for key in cell.values
            if all(key in r.values for r in runs)
        }
        return filled
    accs = [r.crops[cell.crop] if cell.crop else r.top1 for r in runs]
    to_unit = (lambda acc: 100.0 - acc) if table.unit == "error" else (lambda acc: acc)
    top1 = [to_unit(a) for a in accs]
    filled.top1 = statistics.fmean(top1)
    filled.top1_std = statistics.stdev(top1) if len(top1) > 1 else None
    if cell.crop is None:
        filled.top5 = statistics.fmean(to_unit(r.top5) for r in runs)  # type: ignore[arg-type]
    if len(runs) < table.seeds:
        filled.status = "incomplete"
    return filled


def fill_tables(tables: Sequence[Table], results: Sequence[RunResult]) -> list[list[Filled]]:
    by_run: dict[Run, list[RunResult]] = {}
    for result in results:
        if result.run is not None:
            by_run.setdefault(result.run, []).append(result)
    return [[fill(t, c, by_run.get(c.run, []) if c.run else []) for c in t.cells] for t in tables]


def _preset(run: Run) -> str:
    return next((name for name, preset_run in PRESETS.items() if preset_run == run), "?")


def problems(filled_tables: Sequence[Sequence[Filled]], results: Sequence[RunResult]) -> list[str]:
    """One line per problem, grouped by run so a run shared by several tables is named once."""
    by_run: dict[tuple[Run, str], list[Filled]] = {}
    for filled in (f for table in filled_tables for f in table if f.status not in ("ok", "published only")):
        by_run.setdefault((filled.cell.run, filled.status), []).append(filled)  # type: ignore[arg-type]
    lines = []
    for (run, status), cells in by_run.items():
        names = "; ".join(f"{f.table.title}: {f.table.name(f.cell)}" for f in cells)
        dirs = ", ".join(str(r.directory) for r in cells[0].runs)
        root = {"resnext_cifar": "/data/cifar100"}.get(run.recipe, "/data/imagenet")
        if RECIPES[run.recipe].task == "detection":
            root = f"/data/coco model.checkpoint_path=IMAGENET_{run.model_config.upper()}.pt"
        if status == "missing":
            fix = f"train it: python train.py experiment={_preset(run)} data.root={root}"
            lines.append(f"MISSING {names} -- no run found; {fix}")
        elif status == "duplicate":
            seeds = [r.seed for r in cells[0].runs]
            what = (
                f"seeds {seeds} repeat" if cells[0].table.seeds > 1 else f"{len(seeds)} runs of the same cell"
            )
            lines.append(
                f"DUPLICATE {names} -- {what}: {dirs}; keep one under the roots (no number is shown)"
            )
        elif status == "no eval":
            crop = cells[0].cell.crop
            lines.append(
                f"NO EVAL {names} -- no test crop {crop} in eval*.json of {dirs}; run: python "
                f"evaluate.py checkpoint=RUN_DIR/checkpoints/best.pt data=imagenet data.root={root} "
                f"'eval.crop_sizes=[224,{crop}]' eval.output=RUN_DIR/eval.json"
            )
        else:
            seeds = sorted(r.seed for r in cells[0].runs if r.seed is not None)
            want = cells[0].table.seeds
            lines.append(
                f"INCOMPLETE {names} -- {len(seeds)} of {want} seeds ({seeds}); mean +- std over "
                f"those; add: python train.py -m experiment={_preset(run)} seed=..."
            )
    cell_runs = {c.run for t in TABLES for c in t.cells}
    for r in results:
        if r.run is None:
            lines.append(f"UNMATCHED {r.directory} -- {r.reason}")
        elif r.run not in cell_runs:
            lines.append(f"UNMATCHED {r.directory} -- {r.run} is in no published table")
    return lines


def _num(value: float | None, decimals: int, sign: bool = False) -> str:
    return "" if value is None else f"{value:{'+' if sign else ''}.{decimals}f}"


def _ours(f: Filled, top5: bool = False) -> str:
    if f.status in ("missing", "duplicate", "no eval", "published only"):
        return {"published only": "-"}.get(f.status, f.status)
    value = f.top5 if top5 else f.top1
    std = "" if top5 or f.top1_std is None else f" +- {_num(f.top1_std, f.table.decimals)}"
    return _num(value, f.table.decimals) + std


def _diff(ours: float | None, paper: float | None, decimals: int) -> str:
    return _num(ours - paper, decimals, sign=True) if ours is not None and paper is not None else ""


def render_ap_table(filled: Sequence[Filled]) -> str:
    """Markdown for a detection table: a line per cell, one column per metric as `ours (paper, diff)`."""
    table = filled[0].table
    d = table.decimals
    header = [*table.headers, *(metric_label(m) for m in table.metrics), "runs"]
    out = [f"### {table.title}: {table.caption}", ""]
    out += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for f in filled:
        texts = []
        for key in table.metrics:
            paper = f.cell.values.get(key)
            if f.status != "ok" or key not in f.values:
                texts.append(f"{_ours(f) if f.status != 'ok' else 'n/a'} (paper {_num(paper, d)})")
            else:
                texts.append(
                    f"{_num(f.values[key], d)} (paper {_num(paper, d)}, {_diff(f.values[key], paper, d)})"
                )
        out.append(
            "| " + " | ".join([*f.cell.labels, *texts, str(len(f.runs)) if f.cell.run else "-"]) + " |"
        )
    return "\n".join(
        out + ["", "ours (paper, ours - paper); COCO AP in %, best epoch unless --metric final."]
    )


def render_table(filled: Sequence[Filled]) -> str:
    """Markdown: a line per cell (PSConv tables), rows x columns (PyConv README tables), or AP columns."""
    table = filled[0].table
    if table.metrics:
        return render_ap_table(filled)
    d, unit = table.decimals, "err" if table.unit == "error" else "acc"
    out = [f"### {table.title}: {table.caption}", ""]
    if table.layout == "grid":
        columns = list(dict.fromkeys(f.cell.labels[1] for f in filled))
        out += [f"| {table.headers[0]} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for row in dict.fromkeys(f.cell.labels[0] for f in filled):
            entries = {f.cell.labels[1]: f for f in filled if f.cell.labels[0] == row}
            texts = [
                f"{_ours(e)} (paper {_num(e.cell.top1, d)}, {_diff(e.top1, e.cell.top1, d) or 'n/a'})"
                for e in (entries[c] for c in columns)
            ]
            out.append(f"| {row} | " + " | ".join(texts) + " |")
        return "\n".join(out + ["", f"ours (paper, ours - paper); top-1 {unit} in %."])
    has_top5 = any(f.cell.top5 is not None for f in filled)
    metrics = [f"Top-1 {unit}", "paper", "diff"] + ([f"Top-5 {unit}", "paper", "diff"] if has_top5 else [])
    header = [*table.headers, *metrics, "runs"]
    out += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for f in filled:
        paper1 = _num(f.cell.top1, d) + (f" +- {_num(f.cell.top1_std, d)}" if f.cell.top1_std else "")
        values = [_ours(f), paper1, _diff(f.top1, f.cell.top1, d)]
        if has_top5:
            values += [_ours(f, top5=True), _num(f.cell.top5, d), _diff(f.top5, f.cell.top5, d)]
        runs = str(len(f.runs)) + (f"/{table.seeds}" if table.seeds > 1 else "") if f.cell.run else "-"
        out.append("| " + " | ".join([*f.cell.labels, *values, runs]) + " |")
    return "\n".join(out + ["", f"diff = ours - paper, in % {unit}; best epoch unless --metric final."])


CSV_COLUMNS = ["table", "cell", "metric", "ours", "ours_std", "runs", "paper", "paper_std", "diff"]
CSV_COLUMNS += ["status", "run_dirs"]


def write_csv(path: Path, filled_tables: Sequence[Sequence[Filled]]) -> None:
    """Long format: one line per cell and metric (values in the table's unit, %; detection: every AP)."""
    rounded = lambda v: None if v is None else round(v, 6)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        for f in (f for table in filled_tables for f in table):
            metrics = [(key, f.values.get(key), None, paper, None) for key, paper in f.cell.values.items()]
            if not f.table.metrics:
                metrics = [
                    (f"top1_{f.table.unit}", f.top1, f.top1_std, f.cell.top1, f.cell.top1_std),
                    (f"top5_{f.table.unit}", f.top5, None, f.cell.top5, None),
                ]
            for metric, ours, std, paper, paper_std in metrics:
                if paper is None and ours is None:
                    continue
                diff = ours - paper if ours is not None and paper is not None else None
                dirs = ";".join(str(r.directory) for r in f.runs)
                values = (f.table.title, f.table.name(f.cell), metric, rounded(ours), rounded(std))
                values += (len(f.runs), paper, paper_std, rounded(diff), f.status, dirs)
                writer.writerow(dict(zip(CSV_COLUMNS, values)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("roots", nargs="+", type=Path, help="folders searched recursively for results.json")
    keys = ", ".join(t.key for t in TABLES)
    parser.add_argument(
        "--tables", default="", help=f"comma-separated keys or 'all' (default: with runs): {keys}"
    )
    parser.add_argument(
        "--metric", choices=("best", "final"), default="best", help="epoch reported (papers: best)"
    )
    parser.add_argument(
        "--ignore", action="append", default=[], help="recipe key not to check, e.g. data.name"
    )
    parser.add_argument("--csv", type=Path, help="also write the cells as CSV")
    parser.add_argument("--output", type=Path, help="write the Markdown here instead of stdout")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 on missing, duplicate or unmatched runs"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="also draw Tables 3, 4 and 6 as figures in DIR (needs .[plot])",
    )
    args = parser.parse_args(argv)

    results = collect(args.roots, args.metric, frozenset(args.ignore))
    if not results:
        print(f"error: no results.json under {', '.join(map(str, args.roots))}", file=sys.stderr)
        return 2
    keys = {t.key for t in TABLES}
    wanted = [k for k in args.tables.split(",") if k] if args.tables != "all" else sorted(keys)
    if unknown := set(wanted) - keys:
        parser.error(f"unknown table(s) {sorted(unknown)}; choose from {', '.join(sorted(keys))} or all")
    runs = {r.run for r in results}
    tables = [t for t in TABLES if t.key in wanted or (not wanted and any(c.run in runs for c in t.cells))]
    filled = fill_tables(tables, results)
    issues = problems(filled, results)
    text = "\n\n".join(render_table(f) for f in filled)
    text += "\n\n" + (
        "### Problems\n\n" + "\n".join(f"- {line}" for line in issues) if issues else "No problems."
    )
    if args.output:
        args.output.write_text(text + "\n")
    else:
        print(text)
    if args.csv:
        write_csv(args.csv, filled)
    if args.plot:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package
        from table_plots import plot_tables

        try:
            for path in plot_tables(filled, args.plot):
                print(f"wrote {path}", file=sys.stderr)
        except PolyscaleError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 1 if args.strict and issues else 0


if __name__ == "__main__":
    sys.exit(main())
