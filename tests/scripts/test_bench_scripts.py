"""The benchmark scripts run as commands in tiny settings: rows, rates, ratios, image counts (JSON)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from script_helpers import REPO, load_script

from polyscale.data.memory import load_cifar

IMAGENET_BASELINE = "baseline (ImageFolder + v2)"
CIFAR_BASELINE = "baseline (CIFAR10 + v2)"


def run_script(command: list[str], timeout: int, **env_vars: str) -> subprocess.CompletedProcess:
    """`command` in the repo root, single-threaded, outside any torchrun environment; must succeed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env_vars}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def run_bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """`python scripts/bench_data.py ARGS --out tmp_path/bench.json` in the repo root: (JSON, stdout)."""
    out = tmp_path / "bench.json"
    done = run_script([sys.executable, "scripts/bench_data.py", *args, "--out", str(out)], timeout=180)
    assert f"wrote {out}" in done.stdout
    return json.loads(out.read_text()), done.stdout


def check_rates(row: dict[str, Any], images: int) -> None:
    """Positive finite rates, consistent with the epoch's image count and median times."""
    assert row["images"] == images, row
    for key in ("images_per_s", "images_per_cpu_s", "wall_s", "cpu_s"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["images_per_s"] == pytest.approx(images / row["wall_s"])
    assert row["images_per_cpu_s"] == pytest.approx(images / row["cpu_s"])


def check_ratios(row: dict[str, Any], base: dict[str, Any]) -> None:
    assert row["speedup_wall"] == pytest.approx(row["images_per_s"] / base["images_per_s"])
    assert row["speedup_cpu"] == pytest.approx(row["images_per_cpu_s"] / base["images_per_cpu_s"])


def test_imagenet_mode_rows_rates_ratios(tmp_path: Path) -> None:
    args = ("--images", "24", "--classes", "3", "--workers", "0", "--repeats", "1", "--batch-size", "10")
    result, stdout = run_bench(tmp_path, *args)
    decoders = ["pil", "torchvision"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = result["results"]
    assert [(r["decoder"], r["workers"]) for r in rows] == [(d, 0) for d in [IMAGENET_BASELINE, *decoders]]
    assert result["settings"] | {"mean_file_kb": None} == {
        "pipeline": "imagenet",
        "images": 24,
        "mean_file_kb": None,
        "batch_size": 10,
        "repeats": 1,
        "crop": 224,
    }
    assert result["settings"]["mean_file_kb"] > 0
    assert result["command"] == "python scripts/bench_data.py " + " ".join(
        [*args, "--out", str(tmp_path / "bench.json")]
    )
    for row in rows:
        check_rates(row, images=20)  # 24 files, batches of 10, incomplete batch dropped
        check_ratios(row, rows[0])
        assert f"{row['decoder']:<28} {0:>7} {row['images_per_s']:>9.1f}" in stdout
    assert rows[0]["speedup_wall"] == rows[0]["speedup_cpu"] == 1.0


def test_cifar_mode_rows_rates_ratios(tmp_path: Path) -> None:
    args = ("--pipeline", "cifar", "--cifar-images", "300", "--workers", "0", "--device", "cpu")
    result, stdout = run_bench(tmp_path, *args, "--repeats", "2", "--batch-size", "64")
    rows = result["results"]
    assert [(r["pipeline"], r["workers"], r["device"]) for r in rows] == [
        (CIFAR_BASELINE, 0, "cpu"),
        ("cpu path", 0, "cpu"),
        ("gpu_augment", 0, "cpu"),
    ]
    settings = result["settings"]
    assert (settings["pipeline"], settings["images"], settings["generated"]) == ("cifar", 300, True)
    assert (settings["batch_size"], settings["repeats"], settings["crop"], settings["padding"]) == (
        64,
        2,
        32,
        4,
    )
    assert settings["device"] == "cpu" and "baseline_workers" in settings["ratios"]
    for row in rows:
        check_rates(row, images=256)  # 300 images, batches of 64, incomplete batch dropped
        assert row["baseline_workers"] == 0
        check_ratios(row, rows[0])
    assert "gpu_augment" in stdout and "0 workers" in stdout


def test_cifar_gpu_augment_row_compares_with_the_fewest_worker_baseline(tmp_path: Path) -> None:
    args = ("--cifar", "--cifar-images", "130", "--workers", "2", "1", "--device", "cpu")  # --cifar: alias
    result, _ = run_bench(tmp_path, *args, "--repeats", "1", "--batch-size", "32")
    rows = {(r["pipeline"], r["workers"]): r for r in result["results"]}
    assert set(rows) == {(p, w) for p in (CIFAR_BASELINE, "cpu path") for w in (1, 2)} | {("gpu_augment", 0)}
    for (_, workers), row in rows.items():
        check_rates(row, images=128)
        assert row["baseline_workers"] == (workers or 1)
        check_ratios(row, rows[CIFAR_BASELINE, row["baseline_workers"]])


def test_generated_cifar_files_are_what_the_loader_reads(tmp_path: Path) -> None:
    """torchvision's python layout, uneven split over the five batches, a test batch, class names."""
    bench = load_script("bench_data")
    bench.make_cifar10(tmp_path, 303)
    folder = tmp_path / "cifar-10-batches-py"
    names = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
    assert {p.name for p in folder.iterdir()} == names
    images, targets, classes = load_cifar("cifar10", str(tmp_path), train=True)
    assert images.shape == (303, 3, 32, 32) and images.dtype == torch.uint8
    assert targets.shape == (303,) and 0 <= int(targets.min()) <= int(targets.max()) < 10
    assert classes == [f"class{i}" for i in range(10)]
    assert load_cifar("cifar10", str(tmp_path), train=False)[0].shape == (60, 3, 32, 32)
    assert len(bench.UncheckedCIFAR10(str(tmp_path), train=True)) == 303  # the baseline reads them too


def test_gpu_report_runs_every_benchmark_quick_on_cpu(tmp_path: Path) -> None:
    """scripts/gpu_report.sh (the one command for a GPU machine), smoke-run on the CPU: every bench
    writes its JSON, with the layers / models / ratios the docs take from it."""
    run_script(
        ["bash", "scripts/gpu_report.sh", str(tmp_path / "report")], timeout=300, DEVICE="cpu", QUICK="1"
    )
    report = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "report").glob("*.json")}
    assert set(report) == {
        "bench_conv",
        "profile_models",
        "bench_data",
        "bench_data_cifar",
        "bench_train_resnet",
        "bench_train_psresnet",
        "bench_detection",
        "sepc_cost",
    }
    conv = report["bench_conv"]["rows"]
    assert {r["layer"] for r in conv} >= {
        "standard 3x3",
        "psconv (grouped)",
        "psconv (shifts)",
        "original design",
    }
    for row in conv:
        standard = next(
            r["ms"]
            for r in conv
            if r["layer"] == "standard 3x3"
            and all(r[k] == row[k] for k in ("case", "dtype", "format", "mode"))
        )
        assert row["ratio"] == pytest.approx(row["ms"] / standard)
    models = {m["name"]: m for m in report["profile_models"]["models"]}
    assert models["ps_resnet20"]["params"] == models["resnet20"]["params"]  # parameter-neutral
    assert models["ps_resnet20"]["train_img_s"] > 0 and models["ps_resnet20"]["baseline"] == "resnet20"
    assert report["bench_train_psresnet"]["model"] == "ps_resnet20"
    assert (tmp_path / "report" / "versions.txt").read_text().count("torch") >= 1
    assert [row["backbone"] for row in report["bench_detection"]["rows"]] == ["resnet20", "ps_resnet20"]
    heads = report["sepc_cost"]["variants"]
    assert list(heads) == ["standard", "dcn", "pconv", "pconv_ibn", "sepc_lite", "sepc"]


def test_sepc_cost_counts_head_multiply_adds_as_the_paper(tmp_path: Path) -> None:
    """scripts/sepc_cost.py: the PConv head costs what the standard head costs (SEPC Table 1: 239.29 vs
    239.32 G); iBN adds no multiply-adds; deformable convs count as convs plus their offset convs."""
    out = tmp_path / "sepc.json"
    args = ["--backbone", "resnet20", "--size", "64", "96", "--fpn-channels", "32", "--repeats", "1"]
    args += ["--warmup", "0", "--json", str(out)]
    done = run_script([sys.executable, "scripts/sepc_cost.py", *args], timeout=300)
    heads = json.loads(out.read_text())["variants"]
    assert heads["standard"]["head_gmacs_ratio"] == 1.0
    assert heads["pconv"]["head_gmacs_ratio"] == pytest.approx(1.0, abs=0.02)
    assert heads["pconv_ibn"]["head_gmacs"] == pytest.approx(heads["pconv"]["head_gmacs"], rel=1e-3)
    # Offset convs (18 output channels) are all that a deformable conv adds: a few percent at most.
    for deform, plain in (("dcn", "standard"), ("sepc_lite", "pconv_ibn"), ("sepc", "sepc_lite")):
        assert 1.0 < heads[deform]["head_gmacs"] / heads[plain]["head_gmacs"] < 1.2, deform
    assert heads["sepc"]["paper_gflops"] == 242.22 and heads["dcn"]["paper_time_ms"] == 102.1
    assert f"| pconv | {heads['pconv']['gmacs']:.2f} |" in done.stdout


def test_bench_detection_rows_rates_ratios(tmp_path: Path) -> None:
    """scripts/bench_detection.py: one row per backbone, the task/bare ratio of each and the rate beside
    the first backbone's, in tiny settings (the numbers are not the point: their consistency is)."""
    out = tmp_path / "det.json"
    args = ["--steps", "2", "--repeats", "2", "--warmup", "0", "--image-size", "32", "--batch", "2"]
    args += ["--fpn-channels", "32", "--json", str(out)]
    done = run_script([sys.executable, "scripts/bench_detection.py", *args], timeout=300)
    report = json.loads(out.read_text())
    assert [row["backbone"] for row in report["rows"]] == ["resnet20", "ps_resnet20"]
    for row in report["rows"]:
        assert len(row["times_s"]["bare"]) == len(row["times_s"]["task"]) == 2
        rate = 2 * 2 / min(row["times_s"]["task"]) >= row["task_images_per_s"] > 0  # median of the repeats
        assert rate and math.isclose(row["ratio"], row["task_images_per_s"] / row["bare_images_per_s"])
    first, second = report["rows"]
    assert first["vs_first_backbone"] == 1.0
    assert math.isclose(second["vs_first_backbone"], second["task_images_per_s"] / first["task_images_per_s"])
    assert f"| ps_resnet20 | {second['bare_images_per_s']:.1f} |" in done.stdout
