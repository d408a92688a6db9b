"""scripts/export.py: every format x every registered conv type from a checkpoint (max abs diff < 1e-4 at
batches 1 and 3, the batch dynamic), and the one-paragraph errors (exit code 2) of what cannot export.

ONNX needs the export extra (onnx, onnxscript, onnxruntime); those tests skip without it. bench_export.py
runs with -m slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from script_helpers import REPO, load_script
from torch import nn

from polyscale.config import DataConfig, TrainConfig
from polyscale.engine.checkpoint import save_checkpoint
from polyscale.models import create_model
from polyscale.ops import CONV_TYPES

# the network and conv options each conv type's checkpoint is made of: CIFAR ResNet-20 (32 px); PyConv
# with pyramids small enough for its 16 / 32 / 64 channels (PyConvResNet's own need 64+)
NETWORK = {"standard": "resnet20", "psconv": "ps_resnet20"}
CONV_OPTIONS: dict[str, dict[str, Any]] = {
    "pyconv": {"kernel_sizes": [[3, 5, 7], [3, 5], [3]], "pyramid_groups": [[1, 2, 4], [1, 2], [1]]},
}
# (format, conv type) pairs that cannot export, with what the message must name (the operator): they are
# tested to fail clearly instead. docs/export.md lists them. None today.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def export() -> ModuleType:
    return load_script("export")


def train_config(model: str, conv: dict[str, Any], task: str = "classification") -> dict[str, Any]:
    """A resolved config as training runs store it (every schema key), for MODEL with CONV at 32 px."""
    config = OmegaConf.structured(TrainConfig)
    config.data = OmegaConf.structured(DataConfig(name="builtin", image_size=32, num_classes=10))
    config.model.name, config.task.name = model, task
    config.model.conv = OmegaConf.merge(config.model.conv, conv)
    return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]


def write_checkpoint(
    path: Path, model: str, conv: dict[str, Any], *, ema: bool = False, task: str = "classification"
) -> Path:
    """Our container (as a training run writes it) of a freshly initialised MODEL with CONV."""
    torch.manual_seed(0)
    net = create_model(model, num_classes=10, conv=conv)
    weights = net.state_dict()
    payload = {"model": weights, "epoch": 1, "global_step": 2, "metrics": {"top1": 10.0}}
    payload["ema"] = (
        {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()} if ema else None
    )
    payload["config"] = train_config(model, conv, task)
    return save_checkpoint(payload, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """best.pt of a run per registered conv type (new types get resnet20 with the type's defaults)."""
    folder = tmp_path_factory.mktemp("runs")
    return {
        conv: write_checkpoint(
            folder / conv / "checkpoints" / "best.pt",
            NETWORK.get(conv, "resnet20"),
            {"name": conv, **CONV_OPTIONS.get(conv, {})},
        )
        for conv in CONV_TYPES
    }


def run_export(export: ModuleType, *argv: Any) -> dict[str, Any]:
    return export.main([str(a) for a in argv])


def user_error(export: ModuleType, capsys: pytest.CaptureFixture, *argv: Any) -> str:
    """The one-paragraph message of a failing export (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        run_export(export, *argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


@pytest.mark.parametrize("conv", CONV_TYPES)
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
def test_checkpoint_exports_and_matches_pytorch(
    export: ModuleType, checkpoints: dict[str, Path], tmp_path: Path, fmt: str, conv: str, capsys
) -> None:
    """The file is written, matches eager PyTorch within 1e-4 at batch 1 and 3 (dynamic batch) when run by
    its own runtime, and the summary names the network, its conv type and PSConv's impl."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    suffix = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}[fmt]
    out = tmp_path / "deploy" / f"model{suffix}"
    args = [checkpoints[conv], "--format", fmt, "--out", out, "--json", tmp_path / "s.json"]
    args += ["--opset", 18] if fmt == "onnx" else []
    if (fmt, conv) in KNOWN_FAILURES:
        message = user_error(export, capsys, *args)
        assert KNOWN_FAILURES[fmt, conv] in message and "Try --format" in message
        assert not out.exists()
        return
    summary = run_export(export, *args)
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp files
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    assert summary["conv"] == conv and summary["image_size"] == 32 and summary["num_classes"] == 10
    assert [row["batch"] for row in summary["batches"]] == [1, 3]
    assert summary["max_abs_diff"] < 1e-4, summary["batches"]
    assert summary["psconv_impls"] == ({"grouped": 18} if conv == "psconv" else {})
    stdout = capsys.readouterr().out
    assert f"max abs diff vs PyTorch, run by {summary['runtime']}" in stdout
    if fmt == "onnx":
        import onnx

        assert summary["opset"] == 18
        graph = onnx.load(str(out)).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch
        # PSConv's terms land by a gather + add, not by ScatterElements (3x slower in onnxruntime)
        assert "ScatterElements" not in {node.op_type for node in graph.node}


def test_random_network_and_bare_state_dict(export: ModuleType, tmp_path: Path, capsys) -> None:
    """--model alone exports a random network; a bare state dict needs --model (and loads strictly)."""
    summary = run_export(export, "--model", "resnet20", "--format", "torchscript", "--out", tmp_path / "r.ts")
    assert summary["source"] == "random initialisation" and summary["max_abs_diff"] < 1e-4
    bare = tmp_path / "weights.pt"
    torch.save(create_model("ps_resnet20", num_classes=7).state_dict(), bare)
    message = user_error(export, capsys, bare, "--format", "torchscript", "--out", tmp_path / "b.ts")
    assert "bare state dict with no stored config" in message and "--model NAME" in message
    args = [bare, "--model", "resnet20", "--conv", "psconv", "--format", "torchscript", "--out"]
    summary = run_export(export, *args, tmp_path / "b.ts")
    assert (summary["model"], summary["conv"], summary["num_classes"]) == ("resnet20", "psconv", 7)
    args = [bare, "--model", "resnet56", "--format", "torchscript", "--out", tmp_path / "x.ts"]
    message = user_error(export, capsys, *args)
    assert "Fix: name the network the file was made for" in message


def test_ema_weights(export: ModuleType, tmp_path: Path, capsys) -> None:
    path = write_checkpoint(tmp_path / "ema.pt", "resnet20", {"name": "standard"}, ema=True)
    summary = run_export(export, path, "--ema", "--format", "torchscript", "--out", tmp_path / "e.ts")
    assert summary["source"].endswith("(EMA weights)") and summary["max_abs_diff"] < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated (docs/export.md)
        ema_model = torch.jit.load(str(tmp_path / "e.ts"))
    main_model = create_model("resnet20", num_classes=10).eval()
    main_model.load_state_dict(torch.load(path, weights_only=True)["model"])
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(ema_model(x), main_model(x))  # the EMA weights, not the main ones
    plain = write_checkpoint(tmp_path / "plain.pt", "resnet20", {"name": "standard"})
    message = user_error(
        export, capsys, plain, "--ema", "--format", "torchscript", "--out", tmp_path / "p.ts"
    )
    assert "has no EMA weights" in message and "drop --ema" in message


def test_bad_paths_and_files(export: ModuleType, tmp_path: Path, capsys) -> None:
    out = ["--format", "torchscript", "--out", tmp_path / "m.ts"]
    assert "does not exist" in user_error(export, capsys, tmp_path / "missing.pt", *out)
    corrupt = tmp_path / "corrupt.pt"
    torch.save({"model": create_model("resnet20", num_classes=10).state_dict()}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:2000])  # an interrupted copy
    assert "Cannot read checkpoint" in user_error(export, capsys, corrupt, *out)
    empty = tmp_path / "empty.pt"
    empty.touch()
    assert "is empty (0 bytes)" in user_error(export, capsys, empty, *out)
    assert not (tmp_path / "m.ts").exists()


def test_detection_checkpoints_are_refused(export: ModuleType, tmp_path: Path, capsys) -> None:
    """Our detection checkpoints and detectors' state dicts: detection export is not supported, said so."""
    ours = write_checkpoint(tmp_path / "det.pt", "resnet20", {"name": "standard"}, task="detection")
    out = ["--format", "torchscript", "--out", tmp_path / "d.ts"]
    message = user_error(export, capsys, ours, *out)
    assert "task=detection" in message and "detection export is not supported" in message
    detector = {"backbone.body.conv1.weight": torch.zeros(8, 3, 3, 3), "rpn.head.conv.weight": torch.zeros(1)}
    torch.save(detector, tmp_path / "detector.pt")
    message = user_error(export, capsys, tmp_path / "detector.pt", "--model", "resnet50", *out)
    assert "a detector's state dict" in message and "detection export is not supported" in message


def test_option_errors(export: ModuleType, checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:
    ckpt, ts = checkpoints["standard"], tmp_path / "m.ts"
    message = user_error(export, capsys, ckpt, "--format", "torchscript", "--out", ts, "--opset", 17)
    assert "--opset applies to --format onnx only" in message
    message = user_error(export, capsys, ckpt, "--format", "exported-program", "--out", tmp_path / "m.onnx")
    assert "name it m.pt2" in message
    message = user_error(export, capsys, ckpt, "--model", "resnet56", "--format", "torchscript", "--out", ts)
    assert "trained as model=resnet20 model/conv=standard" in message and "Drop them" in message
    message = user_error(export, capsys, "--model", "resnet21", "--format", "torchscript", "--out", ts)
    assert "Unknown model 'resnet21'" in message and "Set --model to one of" in message
    assert "Nothing to export" in user_error(export, capsys, "--format", "torchscript", "--out", ts)
    assert not ts.exists()


def test_missing_onnx_dependencies_name_the_extra(
    export: ModuleType, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Without onnxruntime (an import that fails) --format onnx stops first, naming the extra to install."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    message = user_error(
        export, capsys, tmp_path / "missing.pt", "--format", "onnx", "--out", tmp_path / "m.onnx"
    )
    assert "missing: onnxruntime" in message and "pip install -e .[export]" in message
    assert "does not exist" not in message  # before the checkpoint is read


# ---- what cannot export: the operator, the layer and what to try instead ----


class _Kth(nn.Module):
    """torch.kthvalue: no ONNX translation in torch.onnx (torch 2.14)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x.kthvalue(2, dim=1, keepdim=True).values


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


class _PythonFunction(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Twice.apply(x)


def tiny_network(export: ModuleType, layer: nn.Module) -> Any:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return export.Network(model.eval(), "tiny", "standard", 8, "test", 4)


def test_onnx_failure_names_operator_layer_and_alternative(export: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    net = tiny_network(export, _Kth())
    with pytest.raises(export.ExportError) as exc:
        export.export_model(net, "onnx", tmp_path / "m.onnx")
    message = str(exc.value)
    assert "torch.onnx.export failed in 1 (_Kth) at operator aten.kthvalue" in message
    assert "Try --format exported-program" in message
    export.export_model(net, "exported-program", tmp_path / "m.pt2")  # the alternative works
    assert export.check_export(net, "exported-program", tmp_path / "m.pt2", 1e-4)["batches"][1]["batch"] == 3


def test_torchscript_failure_names_python_function_and_layer(export: ModuleType, tmp_path: Path) -> None:
    """A Python autograd Function traces but cannot be saved: named with its layer, before torch.jit.save."""
    net = tiny_network(export, _PythonFunction())
    with pytest.raises(export.ExportError) as exc:
        export.export_model(net, "torchscript", tmp_path / "m.ts")
    message = str(exc.value)
    assert "torch.jit.trace failed in 1 (_PythonFunction)" in message and "_Twice" in message
    assert "Try --format exported-program or --format onnx" in message
    assert not (tmp_path / "m.ts").exists()


def test_a_differing_export_is_not_written(export: ModuleType, tmp_path: Path, capsys, monkeypatch) -> None:
    """A check past the tolerance (here: a network that is not deterministic) leaves no file at --out."""

    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)

    monkeypatch.setattr(export, "load_network", lambda args: tiny_network(export, Noisy()))
    out = tmp_path / "m.pt2"
    message = user_error(export, capsys, "--model", "x", "--format", "exported-program", "--out", out)
    assert "differs from PyTorch by up to" in message and "The file was not written" in message
    assert list(tmp_path.iterdir()) == []


def test_command_line_exit_code_and_message(tmp_path: Path) -> None:
    """`python scripts/export.py` as a process: exit code 2, the message on stderr, no traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "scripts/export.py", str(tmp_path / "none.pt"), "--format", "torchscript"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "m.ts")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Error (CheckpointError): Checkpoint" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_bench_export_rows_and_ratios(tmp_path: Path) -> None:
    """scripts/bench_export.py in tiny settings: one row per network, ratios against the first."""
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "bench.json"
    args = ["--models", "resnet20", "ps_resnet20", "--image-size", "32", "--repeats", "2", "--warmup", "1"]
    done = subprocess.run(
        [sys.executable, "scripts/bench_export.py", *args, "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [row["model"] for row in rows] == ["resnet20", "ps_resnet20"] and report["baseline"] == "resnet20"
    for row in rows:
        assert len(row["times_s"]) == 2 and row["max_abs_diff"] < 1e-4
        assert row["ratio"] == pytest.approx(row["ms"] / rows[0]["ms"])
        assert f"| {row['model']} | {row['conv']} | {row['ms']:.1f} |" in done.stdout
    assert rows[0]["ratio"] == 1.0 and rows[1]["psconv_impls"] == {"grouped": 18}
