"""Progress bars readable in log files; run-directory records written by rank 0 only."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from polyscale.engine.progress import _LineWriter, progress
from polyscale.engine.run_dir import RunRecorder, collect_environment


def test_non_tty_progress_becomes_whole_lines() -> None:
    sink = io.StringIO()
    writer = _LineWriter(sink)
    writer.write("\rtrain 1:  10%|#         | 1/10 [00:01<00:09]")
    writer.write("\r")
    writer.write("\rtrain 1: 100%|##########| 10/10 [00:02<00:00]\n")
    assert sink.getvalue().splitlines() == [
        "train 1:  10%|#         | 1/10 [00:01<00:09]",
        "train 1: 100%|##########| 10/10 [00:02<00:00]",
    ]


def test_disabled_progress_returns_the_iterable_itself() -> None:
    items = [1, 2, 3]
    assert progress(items, desc="x", enabled=False) is items
    assert list(progress(items, desc="x", enabled=True)) == items


def test_only_an_enabled_recorder_writes(tmp_path: Path) -> None:
    silent = RunRecorder(tmp_path / "rank1", enabled=False)
    silent.epoch_metrics({"epoch": 1})
    silent.write_results({"best": {}})
    assert not (tmp_path / "rank1").exists()
    recorder = RunRecorder(tmp_path / "rank0", enabled=True, tensorboard=False)
    recorder.epoch_metrics({"epoch": 1, "val_top1": 50.0})
    recorder.epoch_metrics({"epoch": 2, "val_top1": 60.0})
    recorder.write_results({"best": {"top1": 60.0}})
    lines = (tmp_path / "rank0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads((tmp_path / "rank0" / "results.json").read_text()) == {"best": {"top1": 60.0}}
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["metrics.jsonl", "results.json"]


def test_environment_names_versions_commit_devices_and_command() -> None:
    env = collect_environment(world_size=2, device=torch.device("cpu"))
    assert env["world_size"] == 2 and env["device"] == "cpu" and env["packages"]["torch"]
    assert env["git"]["commit"] is None or len(env["git"]["commit"]) == 40
    assert isinstance(env["command"], list) and env["cpu_count"] >= 1
