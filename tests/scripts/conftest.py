"""Fixtures for the scripts/ tests: the make_tables module, fake run directories."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from script_helpers import WriteRun, load_script, preset_config


@pytest.fixture(scope="session")
def make_tables() -> ModuleType:
    return load_script("make_tables")


@pytest.fixture
def write_run(tmp_path: Path) -> WriteRun:
    """write_run(NAME, preset, top1, top5, **config changes) -> run dir holding results.json + config.yaml."""

    def write(
        name: str,
        preset: str,
        top1: float,
        top5: float = 93.0,
        *,
        final: tuple[float, float] | None = None,
        crops: dict[int, float] | None = None,
        **changes: Any,
    ) -> Path:
        directory = tmp_path / "runs" / name
        directory.mkdir(parents=True)
        config = preset_config(preset, {k.replace("__", "."): v for k, v in changes.items()})
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
        final_top1, final_top5 = final or (top1 - 0.5, top5 - 0.5)
        results = {
            "best": {"top1": top1, "top5": top5, "epoch": 100},
            "final": {"top1": final_top1, "top5": final_top5, "epoch": 119},
            "num_val_samples": 50000,
            "bad_files": 0,
        }
        (directory / "results.json").write_text(json.dumps(results))
        if crops:
            evals = [
                {"crop_size": c, "top1": a, "top5": 95.0, "num_samples": 50000} for c, a in crops.items()
            ]
            (directory / "eval.json").write_text(json.dumps({"checkpoint": "best.pt", "results": evals}))
        return directory

    return write


@pytest.fixture
def write_detection_run(tmp_path: Path) -> WriteRun:
    """write_detection_run(NAME, preset, values, **config changes) -> a detection run dir (results.json).

    values: results.json's best-epoch metrics (bbox_AP, ..., in %); the final epoch is 0.5 AP lower.
    """

    def write(name: str, preset: str, values: dict[str, float], **changes: Any) -> Path:
        directory = tmp_path / "runs" / name
        directory.mkdir(parents=True)
        config = preset_config(preset, {k.replace("__", "."): v for k, v in changes.items()})
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
        results = {
            "best": {**values, "epoch": 12},
            "final": {**{k: v - 0.5 for k, v in values.items()}, "epoch": 12},
            "num_val_images": 5000,
            "bad_files": 0,
        }
        (directory / "results.json").write_text(json.dumps(results))
        return directory

    return write
