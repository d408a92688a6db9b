"""scripts/table_plots.py on cells filled by make_tables from synthetic runs: which tables are drawn, and
how many published values and values of ours each figure holds (read back from table_plots.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from script_helpers import load_script

from polyscale.errors import PolyscaleError
from polyscale.paper_results import TABLES


@pytest.fixture(scope="module")
def table_plots() -> ModuleType:
    return load_script("table_plots")


def tables(*keys: str) -> list:
    return [t for t in TABLES if t.key in keys]


def fake_runs(make_tables: ModuleType, keys: tuple[str, ...], skip: tuple[str, ...] = ()) -> list:
    """One RunResult per seed of every run of the tables, 0.3 points of error better than the paper; cells
    whose labels contain a `skip` text get no run. Table 6: 5 seeds for 8x64d, 3 for 16x64d."""
    results, seen = [], set()
    for table in tables(*keys):
        for cell in table.cells:
            if cell.run is None or cell.run in seen or any(s in " ".join(cell.labels) for s in skip):
                continue
            seen.add(cell.run)
            seeds = (5 if "8x64d" in cell.labels[0] else 3) if table.seeds > 1 else 1
            for seed in range(seeds):
                acc = 100.0 - cell.top1 + 0.3 + 0.1 * seed
                results.append(
                    make_tables.RunResult(Path(f"/runs/{cell.run}/{seed}"), cell.run, "", seed, acc, 90.0)
                )
    return results


def read_sidecar(out: Path) -> dict[str, dict]:
    return {fig["table"]: fig for fig in json.loads((out / "table_plots.json").read_text())["figures"]}


def test_ablation_tables_beside_the_paper(make_tables, table_plots, tmp_path) -> None:
    keys = ("psconv_t1", "psconv_t3", "psconv_t4", "psconv_t6")
    results = fake_runs(make_tables, keys, skip=("t = 8", "{1, 4, 1, 1}"))
    filled = make_tables.fill_tables(tables(*keys), results)
    paths = table_plots.plot_tables(filled, tmp_path / "figures")
    assert paths == [tmp_path / "figures" / f"{k}.png" for k in ("psconv_t3", "psconv_t4", "psconv_t6")]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    figures = read_sidecar(tmp_path / "figures")
    assert set(figures) == {"psconv_t3", "psconv_t4", "psconv_t6"}  # Table 1 has no axis to plot along
    for cells in filled[1:]:
        record = figures[cells[0].table.key]
        assert record["published"] == len(cells)
        assert record["ours"] == len([f for f in cells if f.top1 is not None])
    assert (figures["psconv_t3"]["kind"], figures["psconv_t3"]["ours"]) == ("line", 3)  # t = 8 not run
    t4 = figures["psconv_t4"]
    assert (t4["kind"], t4["published"], t4["ours"], t4["bars"]) == ("bars", 5, 4, 9)
    t6 = figures["psconv_t6"]  # the official baselines are published only; 16x64d has 3 of 5 seeds
    assert (t6["kind"], t6["published"], t6["ours"], t6["bars"]) == ("errorbars", 6, 4, 0)
    statuses = [f.status for f in filled[3]]
    assert statuses.count("incomplete") == 2 and statuses.count("published only") == 2


def test_svg_and_tables_without_runs_or_axis(make_tables, table_plots, tmp_path) -> None:
    filled = make_tables.fill_tables(tables("psconv_t3", "pyconv", "psconv_t2"), [])
    (path,) = table_plots.plot_tables(filled, tmp_path, fmt="svg")
    assert path == tmp_path / "psconv_t3.svg" and "<svg" in path.read_text()[:1000]
    assert read_sidecar(tmp_path)["psconv_t3"] | {"file": None} == {
        "table": "psconv_t3",
        "file": None,
        "kind": "line",
        "published": 4,
        "ours": 0,
        "bars": 0,
    }
    others = [cells for cells in filled if cells[0].table.key != "psconv_t3"]
    assert len(others) == 2 and table_plots.plot_tables(others, tmp_path / "none") == []
    assert read_sidecar(tmp_path / "none") == {}


def test_user_errors(make_tables, table_plots, tmp_path, monkeypatch) -> None:
    filled = make_tables.fill_tables(tables("psconv_t4"), [])
    with pytest.raises(table_plots.PlotError, match="Unknown figure format 'gif'"):
        table_plots.plot_tables(filled, tmp_path, fmt="gif")
    (tmp_path / "file").write_text("")
    with pytest.raises(PolyscaleError, match="Cannot write figures to"):
        table_plots.plot_tables(filled, tmp_path / "file" / "figures")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(PolyscaleError, match=r"pip install -e \.\[plot\]"):
        table_plots.plot_tables(filled, tmp_path)
