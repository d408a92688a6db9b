"""scripts/make_tables.py on generated detection runs: PSConv Table 7 and SEPC Tables 1 and 4."""

from __future__ import annotations

import csv

from script_helpers import WriteRun

from polyscale.paper_results import PRESETS, TABLES

T7_PRESETS = [name for name in PRESETS if name.startswith("psconv_t7_")]
PUBLISHED = {c.run: c.values for t in TABLES if t.metrics for c in t.cells if c.run is not None}


def lower(values: dict[str, float], by: float) -> dict[str, float]:
    return {k: round(v - by, 6) for k, v in values.items()}


def write_table7(write_detection_run: WriteRun, skip: str = "") -> None:
    """Every Mask R-CNN cell of Table 7, 0.3 AP below the paper in every metric."""
    for name in T7_PRESETS:
        if name != skip:
            write_detection_run(name, name, lower(PUBLISHED[PRESETS[name]], 0.3))


def test_table7_box_and_mask_ap_beside_the_paper(make_tables, write_detection_run, tmp_path, capsys) -> None:
    write_table7(write_detection_run)
    code = make_tables.main([str(tmp_path / "runs"), "--tables", "psconv_t7", "--strict"])
    out = capsys.readouterr().out
    assert code == 0 and "No problems." in out
    assert "| Detector | Architecture | Conv | box AP | mask AP | runs |" in out
    assert "| Mask R-CNN | R50 | standard | 37.0 (paper 37.3, -0.3) | 33.9 (paper 34.2, -0.3) | 1 |" in out
    assert (
        "| Mask R-CNN | X101-32x4d | PSConv | 42.1 (paper 42.4, -0.3) | 37.7 (paper 38.0, -0.3) | 1 |" in out
    )
    # Cascade Mask R-CNN has no torchvision detector: published only, not a problem.
    assert "| Cascade Mask R-CNN | R101 | PSConv | - (paper 44.6) | - (paper 38.4) | - |" in out
    assert out.count("\n| ") == 1 + 12


def test_missing_detection_cell_names_the_preset_and_a_backbone(
    make_tables, write_detection_run, tmp_path, capsys
) -> None:
    write_table7(write_detection_run, skip="psconv_t7_mask_rcnn_ps_resnet101")
    code = make_tables.main([str(tmp_path / "runs"), "--tables", "psconv_t7", "--strict"])
    out = capsys.readouterr().out
    assert code == 1
    assert "| Mask R-CNN | R101 | PSConv | missing (paper 41.6) | missing (paper 37.4) | 0 |" in out
    assert (
        "- MISSING PSConv Table 7: Mask R-CNN / R101 / PSConv -- no run found; train it: python train.py "
        "experiment=psconv_t7_mask_rcnn_ps_resnet101 data.root=/data/coco "
        "model.checkpoint_path=IMAGENET_PS_RESNET101.pt"
    ) in out


def test_detection_runs_are_placed_by_what_they_trained(
    make_tables, write_detection_run, tmp_path, capsys
) -> None:
    values = {"bbox_AP": 38.0, "bbox_AP50": 59.0, "bbox_AP75": 41.0, "bbox_APs": 22.0}
    values |= {"bbox_APm": 42.0, "bbox_APl": 50.0}
    # A RetinaNet preset whose head was changed on the command line fills the SEPC-lite row.
    write_detection_run("lite", "sepc_t1_retinanet_baseline", values, detector__head="sepc_lite")
    write_detection_run("neck", "sepc_t4_faster_rcnn_baseline", values, detector__neck_pconv=4)
    write_detection_run("scratch", "sepc_t1_retinanet_pconv", values, model__checkpoint_path=None)
    write_detection_run("short", "sepc_t1_retinanet_pconv", values, trainer__epochs=2)
    make_tables.main([str(tmp_path / "runs"), "--tables", "sepc_t1,sepc_t4"])
    out = capsys.readouterr().out
    assert (
        "| RetinaNet | SEPC-lite | 240 | 78.5 | 38.0 (paper 38.8, -0.8) | 59.0 (paper 59.9, -0.9) | "
        "41.0 (paper 41.8, -0.8) | 22.0 (paper 22.6, -0.6) | 42.0 (paper 42.8, -0.8) | "
        "50.0 (paper 51.0, -1.0) | 1 |"
    ) in out
    assert (
        "| Faster | PConv | 38.0 (paper 38.5, -0.5) | 59.0 (paper 59.9, -0.9) | 41.0 (paper 41.4, -0.4) | 1 |"
        in out
    )
    assert "| RetinaNet | baseline | 239.32 | 73.2 | missing (paper 35.7) |" in out
    assert "| FSAF | SEPC | 208.11 | 77.4 | - (paper 41.3) |" in out  # no torchvision FSAF
    scratch, short = tmp_path / "runs" / "scratch", tmp_path / "runs" / "short"
    assert f"- UNMATCHED {scratch} -- model.checkpoint_path=null: the papers fine-tune an ImageNet" in out
    assert f"- UNMATCHED {short} -- closest recipe sepc_1x differs in trainer.epochs=2 (paper: 12)" in out


def test_detection_csv_holds_every_published_metric(
    make_tables, write_detection_run, tmp_path, capsys
) -> None:
    write_table7(write_detection_run)
    table = tmp_path / "tables.csv"
    make_tables.main([str(tmp_path / "runs"), "--tables", "psconv_t7", "--csv", str(table)])
    capsys.readouterr()
    rows = list(csv.DictReader(table.open()))
    r50 = [r for r in rows if r["cell"] == "Mask R-CNN / R50 / PSConv"]
    assert [r["metric"] for r in r50] == [
        f"{k}_{m}" for k in ("bbox", "segm") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")
    ]
    assert {r["metric"]: (float(r["ours"]), float(r["paper"]), float(r["diff"])) for r in r50}[
        "segm_APl"
    ] == (52.1, 52.4, -0.3)
    cascade = [r for r in rows if r["cell"].startswith("Cascade")]
    assert len(cascade) == 6 * 12 and all(
        r["ours"] == "" and r["status"] == "published only" for r in cascade
    )
