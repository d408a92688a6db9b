"""scripts/make_tables.py on generated run directories: values, layout, missing / duplicate / unmatched."""

from __future__ import annotations

import csv
import subprocess
import sys
from types import ModuleType

import pytest
from script_helpers import REPO, WriteRun

from polyscale.paper_results import PRESETS, TABLES

T1_PRESETS = [name for name in PRESETS if name.startswith("psconv_t1_")]
T1_ERRORS = {c.run: (c.top1, c.top5) for c in TABLES[0].cells}


def run_main(make_tables: ModuleType, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = make_tables.main([str(a) for a in args])
    return code, capsys.readouterr().out


def write_table1(write_run: WriteRun, skip: str = "") -> None:
    """All Table 1 runs, 0.2 points worse than the paper in top-1 error and 0.1 in top-5."""
    for name in T1_PRESETS:
        if name != skip:
            top1_err, top5_err = T1_ERRORS[PRESETS[name]]
            write_run(name, name, 100 - top1_err - 0.2, 100 - top5_err - 0.1)


def test_table1_values_differences_and_no_problems(make_tables, write_run, tmp_path, capsys) -> None:
    write_table1(write_run, skip="psconv_t1_resnet50")
    write_run("r50", "psconv_t1_resnet50", 77.0, 93.3)  # errors 23.000 / 6.700
    code, out = run_main(make_tables, capsys, tmp_path / "runs", "--tables", "psconv_t1", "--strict")
    assert code == 0
    assert "| ResNet-50 | standard | 23.000 | 22.850 | +0.150 | 6.700 | 6.532 | +0.168 | 1 |" in out
    assert "| SE-ResNet-101 | PSConv | 19.986 | 19.786 | +0.200 | 5.024 | 4.924 | +0.100 | 1 |" in out
    assert out.count("\n| ") == 1 + 12  # header + one line per cell (the separator starts with |---)
    assert "No problems." in out and "PSConv Table 2" not in out


def test_default_shows_every_table_a_run_fills(make_tables, write_run, tmp_path, capsys) -> None:
    write_run("r50", "psconv_t1_resnet50", 77.0, 93.3)
    _, out = run_main(make_tables, capsys, tmp_path / "runs")
    titles = [line for line in out.splitlines() if line.startswith("### PSConv Table")]
    assert [t.split(":")[0] for t in titles] == [f"### PSConv Table {i}" for i in (1, 2, 3, 4)]
    assert "| ResNet-50 | t = 1 (baseline) | 23.000 | 22.850 | +0.150 |" in out
    assert "| {1, 1, 1, 1} (baseline) | 23.000 | 22.850 | +0.150 |" in out
    assert "| DRN-A-50 | 25.557M | 19.079 | stepwise (120 epoch) | - | 22.900 |  | - | 6.600 |  | - |" in out


def test_missing_cell_is_named_with_its_command(make_tables, write_run, tmp_path, capsys) -> None:
    write_table1(write_run, skip="psconv_t1_ps_resnet101")
    code, out = run_main(make_tables, capsys, tmp_path / "runs", "--tables", "psconv_t1", "--strict")
    assert code == 1
    assert "| ResNet-101 | PSConv | missing | 19.954 |  | missing | 5.052 |  | 0 |" in out
    assert (
        "- MISSING PSConv Table 1: ResNet-101 / PSConv -- no run found; train it: "
        "python train.py experiment=psconv_t1_ps_resnet101 data.root=/data/imagenet"
    ) in out


def test_a_run_shared_by_tables_is_reported_once(make_tables, write_run, tmp_path, capsys) -> None:
    write_run("ps", "psconv_t1_ps_resnet50", 79.0)
    _, out = run_main(make_tables, capsys, tmp_path / "runs", "--tables", "psconv_t3,psconv_t4")
    baseline = (
        "- MISSING PSConv Table 3: ResNet-50 / t = 1 (baseline); PSConv Table 4: {1, 1, 1, 1} (baseline) "
        "-- no run found; train it: python train.py experiment=psconv_t1_resnet50 data.root=/data/imagenet"
    )
    t2 = "- MISSING PSConv Table 3: PS-ResNet-50 / t = 2; PSConv Table 4: {1, 2, 1, 2} (= t = 2) -- no run"
    assert baseline in out and t2 in out
    assert out.count("MISSING") == 6  # one line per run: baseline, t = 2, 4, 8, {1,2,1,1}, {1,4,1,1}
    assert "| {1, 2, 1, 4} (default) | 21.000 | 21.126 | -0.126 |" in out


def test_duplicates_are_named_not_averaged(make_tables, write_run, tmp_path, capsys) -> None:
    first = write_run("a", "psconv_t1_ps_resnet50", 79.0)
    # model=resnet50 model/conv=psconv is the same network as model=ps_resnet50: the same cell.
    second = write_run("b", "psconv_t1_ps_resnet50", 78.0, model__name="resnet50")
    code, out = run_main(make_tables, capsys, tmp_path / "runs", "--tables", "psconv_t1", "--strict")
    assert code == 1
    assert "| ResNet-50 | PSConv | duplicate | 21.126 |  | duplicate | 5.724 |  | 2 |" in out
    assert (
        f"- DUPLICATE PSConv Table 1: ResNet-50 / PSConv -- 2 runs of the same cell: {first}, {second}" in out
    )
    assert "21.500" not in out and "21.000" not in out and "22.000" not in out


def test_table6_mean_and_sample_std_over_seeds(make_tables, write_run, tmp_path, capsys) -> None:
    for seed, err in enumerate((17.0, 17.2, 17.4, 17.1, 17.3)):
        write_run(f"ps{seed}", "psconv_t6_ps_resnext29_8x64d", 100 - err, seed=seed)
    csv_path = tmp_path / "t.csv"
    _, out = run_main(make_tables, capsys, tmp_path / "runs", "--csv", csv_path)
    assert "| ResNeXt-29 (8x64d) | PSConv | 17.200 +- 0.158 | 17.138 +- 0.286 | +0.062 | 5/5 |" in out
    assert "| ResNeXt-29 (8x64d) | standard (official) | - | 17.770 |  | - |" in out
    assert "| ResNeXt-29 (16x64d) | PSConv | missing | 16.528 +- 0.353 |  | 0/5 |" in out
    rows = {(r["cell"], r["metric"]): r for r in csv.DictReader(csv_path.open())}
    row = rows[("ResNeXt-29 (8x64d) / PSConv", "top1_error")]
    assert float(row["ours"]) == pytest.approx(17.2) and float(row["ours_std"]) == pytest.approx(
        0.158114, abs=1e-6
    )
    assert (row["runs"], row["paper"], row["paper_std"], row["status"]) == ("5", "17.138", "0.286", "ok")
    assert float(row["diff"]) == pytest.approx(0.062)
    assert rows[("ResNeXt-29 (16x64d) / PSConv", "top1_error")]["status"] == "missing"


def test_table6_repeated_seed_and_missing_seeds(make_tables, write_run, tmp_path, capsys) -> None:
    for name, seed in (("a", 0), ("b", 0)):
        write_run(name, "psconv_t6_resnext29_8x64d", 82.0, seed=seed)
    for seed in (0, 1, 2):
        write_run(f"ps{seed}", "psconv_t6_ps_resnext29_8x64d", 83.0 - seed, seed=seed)
    _, out = run_main(make_tables, capsys, tmp_path / "runs")
    assert "| ResNeXt-29 (8x64d) | standard (self impl.) | duplicate | 18.074 +- 0.130 |  | 2/5 |" in out
    assert (
        "- DUPLICATE PSConv Table 6: ResNeXt-29 (8x64d) / standard (self impl.) -- seeds [0, 0] repeat" in out
    )
    assert "| ResNeXt-29 (8x64d) | PSConv | 18.000 +- 1.000 | 17.138 +- 0.286 | +0.862 | 3/5 |" in out
    assert "- INCOMPLETE PSConv Table 6: ResNeXt-29 (8x64d) / PSConv -- 3 of 5 seeds ([0, 1, 2])" in out


def test_runs_off_the_recipe_are_unmatched_unless_ignored(make_tables, write_run, tmp_path, capsys) -> None:
    short = write_run("short", "psconv_t1_resnet50", 60.0, trainer__epochs=1)
    smoke = write_run("smoke", "psconv_t3_t8", 10.0, trainer__limit_val_batches=1)
    _, out = run_main(make_tables, capsys, tmp_path / "runs", "--tables", "psconv_t1")
    assert (
        f"- UNMATCHED {short} -- closest recipe psconv_imagenet differs in trainer.epochs=1 (paper: 120)"
        in out
    )
    assert (
        f"- UNMATCHED {smoke} -- closest recipe psconv_imagenet differs in trainer.limit_val_batches=1" in out
    )
    assert "| ResNet-50 | standard | missing |" in out
    _, out = run_main(
        make_tables, capsys, tmp_path / "runs", "--tables", "psconv_t1", "--ignore", "trainer.epochs"
    )
    assert "| ResNet-50 | standard | 40.000 | 22.850 | +17.150 |" in out and str(short) not in out


def test_pyconv_grid_with_test_crop_from_evaluate(make_tables, write_run, tmp_path, capsys) -> None:
    write_run("aug50", "pyconv_aug_pyconvresnet50", 79.5, crops={224: 79.6, 320: 80.7})
    write_run("aug101", "pyconv_aug_pyconvresnet101", 80.5)  # evaluate.py not run yet
    write_run("hg152", "pyconv_pyconvhgresnet152", 79.4)
    _, out = run_main(make_tables, capsys, tmp_path / "runs")
    assert "| Network | test crop: 224x224 | test crop: 320x320 |" in out
    assert "| PyConvResNet-50 (+augment) | 79.50 (paper 79.44, +0.06) | 80.70 (paper 80.59, +0.11) |" in out
    assert "| PyConvResNet-101 (+augment) | 80.50 (paper 80.58, -0.08) | no eval (paper 81.49, n/a) |" in out
    missing = "missing (paper 78.48, n/a) | missing (paper 79.22, n/a)"
    assert f"| PyConvHGResNet | {missing} | 79.40 (paper 79.36, +0.04) |" in out
    assert "- NO EVAL PyConv README (+augment): PyConvResNet-101 (+augment) / test crop: 320x320" in out
    assert "'eval.crop_sizes=[224,320]' eval.output=RUN_DIR/eval.json" in out


def test_metric_final_and_output_file(make_tables, write_run, tmp_path, capsys) -> None:
    write_run("r50", "psconv_t1_resnet50", 77.0, 93.3, final=(76.5, 93.0))
    target = tmp_path / "tables.md"
    args = ("--tables", "psconv_t1", "--metric", "final", "--output", target)
    code, out = run_main(make_tables, capsys, tmp_path / "runs", *args)
    assert code == 0 and out == ""
    assert (
        "| ResNet-50 | standard | 23.500 | 22.850 | +0.650 | 7.000 | 6.532 | +0.468 | 1 |"
        in target.read_text()
    )


def test_command_line_and_its_errors(make_tables, write_run, tmp_path, capsys) -> None:
    assert make_tables.main([str(tmp_path)]) == 2
    assert f"no results.json under {tmp_path}" in capsys.readouterr().err
    write_run("r50", "psconv_t1_resnet50", 77.0, 93.3)
    (tmp_path / "runs" / "bare").mkdir()
    (tmp_path / "runs" / "bare" / "results.json").write_text('{"best": {"top1": 1, "top5": 2}}')
    with pytest.raises(SystemExit) as exit_info:
        make_tables.main([str(tmp_path), "--tables", "psconv_t9"])
    assert exit_info.value.code == 2 and "unknown table(s) ['psconv_t9']" in capsys.readouterr().err
    # As a script (scripts/ is not a package): one subprocess, for the entry point.
    script = [
        sys.executable,
        str(REPO / "scripts" / "make_tables.py"),
        str(tmp_path),
        "--tables",
        "psconv_t1",
    ]
    done = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "| ResNet-50 | standard | 23.000 | 22.850 | +0.150 |" in done.stdout
    assert "UNMATCHED" in done.stdout and "no config.yaml next to results.json" in done.stdout


def test_unreadable_eval_file_is_an_error_naming_it(make_tables, write_run, tmp_path) -> None:
    run_dir = write_run("aug50", "pyconv_aug_pyconvresnet50", 79.5)
    (run_dir / "eval_notes.json").write_text('{"results": [{"crop": 320}]}')
    with pytest.raises(SystemExit, match=r"eval_notes\.json is not evaluate.py output"):
        make_tables.main([str(tmp_path / "runs")])
