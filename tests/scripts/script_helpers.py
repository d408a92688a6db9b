"""Helpers shared by the scripts/ tests and tests/test_experiments.py (imported as a plain module)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from polyscale.paper_results import PRESETS, RECIPES

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """Import scripts/NAME.py (scripts/ is not a package); registered so dataclasses resolve. scripts/ goes
    on sys.path, as it is when a script runs, so that scripts import their siblings."""
    if name in sys.modules:
        return sys.modules[name]
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def preset_config(preset: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """A resolved-config-like dict for PRESET: its recipe's settings, model and conv, plus CHANGES."""
    run = PRESETS[preset]
    flat: dict[str, Any] = dict(RECIPES[run.recipe].settings)
    flat |= {"model.name": run.model_config, "model.conv.name": run.conv, "seed": 0}
    flat |= {"trainer.limit_train_batches": None, "trainer.limit_val_batches": None}
    flat |= {"experiment_name": preset, "trainer.precision": "fp32"}
    if run.conv == "psconv":
        flat |= {"model.conv.dilation_pattern": list(run.pattern or ()), "model.conv.axes": run.axes}
    if run.detector is not None:  # detection: an ImageNet backbone under the run's detector
        flat |= {
            "detector.name": run.detector,
            "detector.head": run.head,
            "detector.neck_pconv": run.neck_pconv,
        }
        flat |= {"model.checkpoint_path": f"/ckpt/{run.model_config}.pt"}
    flat |= changes or {}
    config: dict[str, Any] = {}
    for key, value in flat.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


WriteRun = Callable[..., Path]  # the write_run fixture (conftest.py)
