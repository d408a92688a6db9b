"""scripts/analyze_scales.py on checkpoints trained here: shares per scale, stages, figures, comparisons,
dynamic PSConv, detection and the PSConv authors' files, and the errors a user can cause."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from script_helpers import REPO, load_script
from torch import nn

sys.path.insert(0, str(REPO / "tests" / "engine"))  # engine_helpers: tiny training runs
sys.path.insert(0, str(REPO / "tests" / "models"))  # psconv_original_ref: the authors' file layout

from engine_helpers import TINY, compose_config  # noqa: E402

from polyscale.engine.fit import run_training  # noqa: E402
from polyscale.models import create_model, load_model_weights  # noqa: E402
from polyscale.models.scales import aggregate, scale_shares  # noqa: E402

ONE_STEP = ("trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
RUNS = {  # name: overrides of a one-step ResNet-20 run on the built-in data
    "ps": ("model=ps_resnet20",),
    "ps_1211": ("model=ps_resnet20", "model.conv.dilation_pattern=[1,2,1,1]", "seed=1"),  # Table 4
    "pyconv": (
        "model/conv=pyconv",
        "model.conv.kernel_sizes=[[3,5],[3,5],[3]]",
        "model.conv.pyramid_groups=[[1,2],[1,2],[1]]",
    ),
    "standard": (),
}


@pytest.fixture(scope="module")
def analyze() -> ModuleType:
    return load_script("analyze_scales")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """RUN_DIR/checkpoints/last.pt of every run in RUNS, trained once for the module."""
    root = tmp_path_factory.mktemp("runs")
    for name, overrides in RUNS.items():
        run_training(compose_config("train", *TINY, *ONE_STEP, *overrides), root / name)
    return {name: root / name / "checkpoints" / "last.pt" for name in RUNS}


def run_main(analyze: ModuleType, capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = analyze.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_report(out: Path) -> dict[str, Any]:
    return json.loads((out / "scales.json").read_text())


def bars_per_panel(layers: list[dict[str, Any]]) -> int:
    """Stacked bars drawn for a layer list: one segment per layer and scale."""
    return sum(len(layer.get("rates") or layer["levels"]) for layer in layers)


def test_psconv_shares_stages_and_figures(analyze, runs, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, _ = run_main(analyze, capsys, runs["ps"], "--out", out)
    assert code == 0
    report = read_report(out)
    (net,) = report["networks"]
    assert (net["model"], net["conv"], net["source"], net["task"]) == (
        "ps_resnet20",
        "psconv",
        "polyscale checkpoint",
        "classification",
    )
    assert net["label"] == "ps/last.pt" and net["conv_options"] == {
        "dilation_pattern": [1, 2, 1, 4],
        "axes": "both",
    }
    layers = net["layers"]
    model = create_model("ps_resnet20", num_classes=10)
    psconvs = [name for name, m in model.named_modules() if hasattr(m, "dilation_matrix")]
    assert [layer["name"] for layer in layers] == psconvs and len(psconvs) == 18
    for layer in layers:
        assert layer["rates"] == [1, 2, 4] and layer["shares"]["count"] == [0.5, 0.25, 0.25]
        assert layer["type"] == "psconv" and layer["class"] == "PSConv2d"
        for metric in ("l1", "l2"):
            assert sum(layer["shares"][metric]) == pytest.approx(1.0, abs=1e-5)
    # Independently: the share of |w| at rate 4 of one layer, from the checkpoint's weights.
    load_model_weights(model, torch.load(runs["ps"], weights_only=True)["model"])
    conv = model.layer2[1].conv2
    d, w = conv.dilation_matrix(), conv.dense_weight().detach().abs().sum((2, 3))
    entry = next(layer for layer in layers if layer["name"] == "layer2.1.conv2")
    assert entry["shares"]["l1"][2] == pytest.approx(float(w[d == 4].sum() / w.sum()), abs=1e-6)
    assert [(s["stage"], s["layers"]) for s in net["stages"]] == [("layer1", 6), ("layer2", 6), ("layer3", 6)]
    assert net["total"][0]["layers"] == 18 and net["total"][0]["shares"]["count"] == [0.5, 0.25, 0.25]
    # The figure: one stacked bar per layer with a segment per rate, in an L1 and an L2 panel.
    (figure,) = report["figures"]
    assert figure["files"] == ["scales.png", "scales.svg"]
    assert [p["metric"] for p in figure["panels"]] == ["l1", "l2"]
    assert all(p["bars"] == bars_per_panel(layers) == 54 for p in figure["panels"])
    assert (out / "scales.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "scales.svg").read_text()[:1000]
    assert "layer3 L1 share: d=1" in stdout and f"wrote {out / 'scales.json'}" in stdout


def test_compare_two_dilation_patterns_side_by_side(analyze, runs, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    args = (runs["ps"], "--compare", runs["ps_1211"], "--out", out, "--formats", "png")
    code, _, _ = run_main(analyze, capsys, *args, "--labels", "{1,2,1,4}", "{1,2,1,1}")
    assert code == 0
    report = read_report(out)
    a, b = report["networks"]
    assert (a["label"], b["label"], b["seed"]) == ("{1,2,1,4}", "{1,2,1,1}", 1)
    assert all(layer["rates"] == [1, 2] and layer["shares"]["count"] == [0.75, 0.25] for layer in b["layers"])
    comparison = report["comparison"]
    assert comparison["only_in_a"] == comparison["only_in_b"] == [] and len(comparison["layers"]) == 18
    row = comparison["layers"][0]
    assert row["rates"] == [1, 2, 4] and row["l1"]["b"][2] == 0.0
    assert row["count"]["b_minus_a"] == [0.25, 0.0, -0.25]
    assert [s["stage"] for s in comparison["stages"]] == ["layer1", "layer2", "layer3"]
    files = {fig["figure"]: fig for fig in report["figures"]}
    assert [fig["files"] for fig in report["figures"]] == [["scales.png"], ["scales_2.png"], ["compare.png"]]
    assert all(p["bars"] == bars_per_panel(b["layers"]) == 36 for p in report["figures"][1]["panels"])
    per_layer, per_stage = files["comparison"]["panels"]
    assert per_layer["bars"] == bars_per_panel(a["layers"]) + bars_per_panel(b["layers"]) == 54 + 36
    assert per_stage["bars"] == bars_per_panel(a["stages"]) + bars_per_panel(b["stages"]) == 9 + 6
    assert all((out / f).is_file() for fig in report["figures"] for f in fig["files"])


def test_pyconv_shares_per_kernel_size(analyze, runs, tmp_path, capsys) -> None:
    code, _, _ = run_main(analyze, capsys, runs["pyconv"], "--out", tmp_path, "--formats", "svg")
    assert code == 0
    report = read_report(tmp_path)
    layers = report["networks"][0]["layers"]
    assert [layer["levels"] for layer in layers] == [[3, 5]] * 12 + [[3]] * 6
    first = layers[0]  # layer1.0.conv1: 16 -> 16 channels as 8 + 8, groups 1 and 2
    weights = [8 * 16 * 9, 8 * 8 * 25]
    assert first["shares"]["count"] == pytest.approx([w / sum(weights) for w in weights], abs=1e-6)
    assert first["type"] == "pyconv" and first["pyramid_groups"] == [1, 2] and first["out_splits"] == [8, 8]
    stages = report["networks"][0]["stages"]
    assert [(s["stage"], s["levels"]) for s in stages] == [
        ("layer1", [3, 5]),
        ("layer2", [3, 5]),
        ("layer3", [3]),
    ]
    assert all(p["bars"] == bars_per_panel(layers) == 30 for p in report["figures"][0]["panels"])
    assert (tmp_path / "scales.svg").is_file() and not (tmp_path / "scales.png").exists()


class StandInDynamic(nn.Module):
    """The analysis interface of polyscale.ops.dynamic_psconv.DynamicPSConv2d, with a fixed mask."""

    def __init__(self, channels: int, large_every: int) -> None:
        super().__init__()
        self.rates = (1, 2)
        self.weight = nn.Parameter(torch.ones(channels, channels, 3, 3))
        index = torch.arange(channels * channels).view(channels, channels)
        self.register_buffer("mask", index % large_every == 0)
        with torch.no_grad():
            self.weight[self.mask] = 3.0  # large-rate kernels carry 3x the weight

    def large_rate_mask(self) -> torch.Tensor:
        return self.mask

    def large_fraction(self) -> float:
        return float(self.mask.float().mean())


def test_dynamic_layers_learned_fraction_and_count_panel(analyze, tmp_path) -> None:
    model = nn.Module()
    model.stem = nn.Conv2d(3, 4, 3)
    model.layer1 = nn.Sequential(StandInDynamic(4, 2), StandInDynamic(4, 4))
    model.layer2 = nn.Sequential(StandInDynamic(8, 4))
    layers = scale_shares(model)
    assert [(x.name, x.stage, x.type, x.values) for x in layers] == [
        ("layer1.0", "layer1", "dynamic_psconv", [1, 2]),
        ("layer1.1", "layer1", "dynamic_psconv", [1, 2]),
        ("layer2.0", "layer2", "dynamic_psconv", [1, 2]),
    ]
    assert layers[0].large_fraction == 0.5 and layers[0].shares("count") == [0.5, 0.5]
    assert layers[0].shares("l1") == pytest.approx([0.25, 0.75]) and layers[1].shares("l1") == pytest.approx(
        [0.5, 0.5]
    )
    assert layers[0].shares("l2") == pytest.approx([0.1, 0.9])
    stage1 = aggregate(layers)[0]
    assert stage1["large_fraction"] == pytest.approx(0.375) and stage1["shares"]["count"] == [0.625, 0.375]
    net = analyze.Network("stand-in", "-", "custom", "dynamic_psconv", "module", layers)
    figure = analyze.plot_network(net.to_json(), tmp_path, "scales", ["png"])
    assert [p["metric"] for p in figure["panels"]] == ["l1", "l2", "count"]
    assert all(p["bars"] == 6 for p in figure["panels"]) and (tmp_path / "scales.png").is_file()
    assert net.to_json()["layers"][0]["large_fraction"] == 0.5


def test_the_real_dynamic_psconv_layer(analyze) -> None:
    dynamic = pytest.importorskip("polyscale.ops.dynamic_psconv")
    layer = dynamic.DynamicPSConv2d(16, 16, 3)
    (scales,) = scale_shares(nn.Sequential(layer))
    assert scales.type == "dynamic_psconv" and scales.values == list(layer.rates)
    assert scales.large_fraction == pytest.approx(layer.large_fraction())
    assert scales.shares("count")[1] == pytest.approx(float(layer.large_rate_mask().float().mean()))


def test_detection_checkpoint_reads_the_backbone(analyze, tmp_path, capsys) -> None:
    overrides = (
        "task=detection",
        "model=ps_resnet20",
        "data.image_size=64",
        "data.min_size=64",
        "data.max_size=64",
        "data.num_train_images=4",
        "data.num_val_images=2",
        "data.batch_size=4",
        "data.num_workers=0",
        "detector.fpn_channels=32",
        "schedule.warmup_steps=0",
        "trainer.device=cpu",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.epochs=1",
        "trainer.limit_train_batches=1",
    )
    run_training(compose_config("train", *overrides), tmp_path / "det")
    code, _, err = run_main(analyze, capsys, tmp_path / "det/checkpoints/last.pt", "--formats", "png")
    assert code == 0, err
    net = read_report(tmp_path / "det" / "analysis")["networks"][0]  # default: RUN_DIR/analysis
    assert net["task"] == "detection" and len(net["layers"]) == 18
    assert net["layers"][0]["name"] == "backbone.body.layer1.0.conv1"
    assert [s["stage"] for s in net["stages"]] == ["layer1", "layer2", "layer3"]


def test_psconv_authors_backbone_is_converted_and_analysed(analyze, tmp_path, capsys) -> None:
    from psconv_original_ref import generated_state_dict

    path = tmp_path / "ps_resnet50_original.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in generated_state_dict("ps_resnet50").items()}}, path
    )
    code, stdout, err = run_main(analyze, capsys, path, "--out", tmp_path / "out", "--formats", "png")
    assert code == 0, err
    net = read_report(tmp_path / "out")["networks"][0]
    assert (net["model"], net["source"]) == ("ps_resnet50", "psconv_original")
    assert "converted 16 original PSConv layers" in net["load"]
    assert any("masked-block weights" in w for w in net["warnings"]) and "note:" in stdout
    assert [(s["stage"], s["layers"]) for s in net["stages"]] == [
        ("layer1", 3),
        ("layer2", 4),
        ("layer3", 6),
        ("layer4", 3),
    ]
    for layer in net["layers"]:  # random weights of one scale: the L1 shares follow the kernel counts
        assert layer["shares"]["count"] == [0.5, 0.25, 0.25]
        assert layer["shares"]["l1"] == pytest.approx([0.5, 0.25, 0.25], abs=0.02)


def test_user_errors_are_one_paragraph_with_exit_code_2(analyze, runs, tmp_path, capsys, monkeypatch) -> None:
    def fails(*args: Any, match: str) -> None:
        code, out, err = run_main(analyze, capsys, *args, "--out", tmp_path / "out")
        assert code == 2 and match in err and "Traceback" not in err + out, err
        assert err.startswith("error: ") and err.count("\n") == 1

    fails(tmp_path / "nowhere.pt", match="does not exist")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    fails(tmp_path / "notes.txt", match="Cannot read checkpoint")
    fails(runs["standard"], match="no PSConv, dynamic PSConv or PyConv layers")
    fails(runs["ps"], "--model", "ps_resnet50", match="Drop them")
    fails(runs["ps"], "--ema", match="has no EMA weights")
    torch.save({"weight": torch.ones(3)}, tmp_path / "odd.pt")
    fails(tmp_path / "odd.pt", match="--model NAME")
    torch.save(create_model("resnet20", num_classes=10).state_dict(), tmp_path / "bare.pt")
    fails(tmp_path / "bare.pt", match="for a PS network's bare state dict pass --model ps_NAME")
    fails(runs["ps"], "--formats", "gif", match="--formats 'gif'")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    fails(runs["ps"], match="pip install -e .[plot]")


def test_bare_state_dict_with_the_model_named(analyze, runs, tmp_path, capsys) -> None:
    weights = torch.load(runs["ps_1211"], weights_only=True)["model"]
    torch.save(weights, tmp_path / "bare.pt")
    args = (
        tmp_path / "bare.pt",
        "--model",
        "ps_resnet20",
        "--dilation-pattern",
        "1,2,1,1",
        "--out",
        tmp_path,
    )
    code, _, err = run_main(analyze, capsys, *args)
    assert code == 0, err
    net = read_report(tmp_path)["networks"][0]
    assert (net["model"], net["source"], net["conv_options"]) == (
        "ps_resnet20",
        "state_dict",
        {"dilation_pattern": [1, 2, 1, 1]},
    )
    assert net["layers"][0]["rates"] == [1, 2] and net["layers"][0]["pattern"] == [1, 2, 1, 1]


def test_command_line_entry_point(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "analyze_scales.py"), str(tmp_path / "missing.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr
