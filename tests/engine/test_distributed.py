"""Two CPU processes under torchrun (gloo): one run directory, exact validation counts, same accuracy."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from engine_helpers import TINY, compose_config, load, run_cli

from polyscale.engine.distributed import DistInfo, _export_slurm_rendezvous, dist_info, resolve_device
from polyscale.engine.evaluation import evaluate_checkpoint
from polyscale.errors import ConfigError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_training_writes_one_run_dir_and_counts_every_val_sample(tmp_path: Path) -> None:
    # The default run directory names a timestamp: all ranks must agree on it (one directory).
    stamped = f"hydra.run.dir={tmp_path}/runs/${{polyscale_stamp:}}"
    overrides = [o for o in TINY if not o.startswith("data.num_val_samples")]
    done = run_cli(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "train.py",
        *overrides,
        "data.num_val_samples=51",
        "trainer.epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.tensorboard=true",
        stamped,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (day,) = (tmp_path / "runs").iterdir()
    (run_dir,) = day.iterdir()  # runs/DATE/TIME
    # Only rank 0 wrote: one set of files, one line per epoch, one TensorBoard event file, one log.
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("tensorboard/")] == [
        ".hydra/config.yaml",
        ".hydra/hydra.yaml",
        ".hydra/overrides.yaml",
        ".lock",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "config.yaml",
        "env.json",
        "metrics.jsonl",
        "results.json",
        "train.log",
    ]
    assert len([f for f in files if f.startswith("tensorboard/")]) == 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]
    assert done.stdout.count("epoch 2/2") + done.stderr.count("epoch 2/2") == 1  # rank 0 logs
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_val_samples"] == 51 and results["bad_files"] == 0  # 25 + 26: odd, no padding
    # rank 0's weights (and BN statistics) evaluated by one process give the very same numbers
    best = run_dir / "checkpoints" / "best.pt"
    assert load(best)["epoch"] == results["best"]["epoch"]
    cfg = compose_config("eval", f"checkpoint={best}", "trainer.device=cpu", "trainer.progress=false")
    report = evaluate_checkpoint(cfg, tmp_path / "eval", [f"checkpoint={best}"])
    (single,) = report["results"]
    assert single["num_samples"] == 51
    assert (single["top1"], single["top5"]) == (results["best"]["top1"], results["best"]["top5"])


def test_device_resolution() -> None:
    assert resolve_device("cpu", DistInfo()) == torch.device("cpu")
    with pytest.raises(ConfigError, match="is not a device"):
        resolve_device("tpu7", DistInfo())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_request_without_cuda_is_a_config_error() -> None:
    assert resolve_device("auto", DistInfo()) == torch.device("cpu")
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        resolve_device("cuda", DistInfo())


def test_ranks_come_from_torchrun_else_from_a_multi_task_srun_step(monkeypatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that undo also removes what the code under test sets
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NTASKS", "8")  # a batch script: not a step of several tasks
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert dist_info() == DistInfo(0, 0, 1)
    slurm = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-10]")
    info = dist_info()
    assert info == DistInfo(5, 1, 8)
    _export_slurm_rendezvous(info)
    assert [os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")] == [
        "gpu07",
        "24242",
        "5",
        "1",
        "8",
    ]
    monkeypatch.setenv("RANK", "3")  # torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist_info() == DistInfo(3, 1, 4)
