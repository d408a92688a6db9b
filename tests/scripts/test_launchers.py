"""Cluster launchers and Docker: the sbatch template and the multi-node script with fake SLURM tools,
the hydra-submitit launcher configs, and the Dockerfile's dependency filter."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from script_helpers import REPO

SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
MULTINODE = REPO / "scripts" / "launch_multinode.sh"


FAKE_SRUN = """#!/bin/bash
# Records its arguments, then runs the task as a real srun does, in a session of its own; like
# slurmstepd it delivers a forwarded USR1 to every process of the step (here: the task's process group).
printf "%s\\n" "$@" > "$CAPTURE.tmp"
echo "OMP=$OMP_NUM_THREADS" >> "$CAPTURE.tmp"
mv "$CAPTURE.tmp" "$CAPTURE"
while [[ "$1" == --* ]]; do shift; done  # srun's own options
echo "srun: started" >> "$EVENTS"
setsid "$@" &
task=$!
echo "$task" > "$CAPTURE.task"
trap 'echo "srun: USR1 to the step" >> "$EVENTS"; kill -USR1 -- -"$task"' USR1
status=0
wait "$task" || status=$?
while kill -0 "$task" 2>/dev/null; do status=0; wait "$task" || status=$?; done
echo "srun: task exited $status" >> "$EVENTS"
exit "$status"
"""

FAKE_TORCHRUN = """#!/bin/bash
# Starts one rank and waits for it. A USR1 ends this shell unless it was started with USR1 ignored.
echo "torchrun: started" >> "$EVENTS"
"$FAKE_PYTHON" "$FAKE_RANK" &
wait $!
status=$?
echo "torchrun: rank exited $status" >> "$EVENTS"
exit "$status"
"""

FAKE_RANK = """
import os, signal, sys, time

def log(line):
    with open(os.environ["EVENTS"], "a") as events:
        events.write(line + "\\n")

received = []
if os.environ.get("FAKE_RANK_DEAF") != "1":  # what polyscale.engine.signals.StopSignals does
    signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
log("rank: training")
deadline = time.monotonic() + float(os.environ.get("FAKE_TRAIN_S", "0"))
while time.monotonic() < deadline and not received:
    time.sleep(0.02)  # training steps
if received:
    log("rank: USR1, writing last.pt")
    time.sleep(0.3)
    log("rank: wrote last.pt")
    sys.exit(138)
sys.exit(int(os.environ.get("FAKE_RANK_EXIT", "0")))
"""


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """PATH with fake `srun` (records its argv and OMP_NUM_THREADS, runs the task), `torchrun` (runs one
    fake rank) and `scontrol`; all of them log what happens to $EVENTS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [[ "$1 $2" == "show hostnames" ]]; then printf "gpu01\\ngpu02\\n"; '
        'else echo "scontrol $*" >> "$EVENTS"; fi\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CAPTURE=str(tmp_path / "srun_args"))
    env |= {
        "EVENTS": str(tmp_path / "events"),
        "FAKE_PYTHON": sys.executable,
        "FAKE_RANK": str(tmp_path / "rank.py"),
    }
    env |= {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    env |= {"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "SLURM_SUBMIT_DIR": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("RUN_DIR", None)
    return env


def events(tmp_path: Path) -> list[str]:
    path = tmp_path / "events"
    return path.read_text().splitlines() if path.exists() else []


def test_sbatch_runs_torchrun_on_every_node_with_resume(fake_slurm, tmp_path) -> None:
    args = ["experiment=psconv_t1_ps_resnet50", "model.conv.dilation_pattern=[1,2]"]
    done = subprocess.run(
        ["bash", str(SBATCH), *args], env=fake_slurm, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    recorded = (tmp_path / "srun_args").read_text().splitlines()
    assert recorded == [
        "--kill-on-bad-exit=1",
        "--ntasks-per-node=1",
        "bash",  # runs torchrun with USR1 ignored (the training processes take it)
        "-c",
        'trap "" USR1; exec "$@"',
        "polyscale-task",
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu01:29500",  # the first node of the allocation
        "--rdzv_id=4242",
        "train.py",
        "hydra.run.dir=outputs/slurm-4242",  # fixed per job id, which a requeue keeps
        "trainer.resume=auto",
        *args,
        "OMP=8",  # 32 CPUs / 4 ranks
    ]
    assert events(tmp_path)[-1] == "srun: task exited 0"  # and no requeue
    custom = subprocess.run(
        ["bash", str(SBATCH)], env=fake_slurm | {"RUN_DIR": "outputs/mine"}, capture_output=True, timeout=60
    )
    assert custom.returncode == 0 and "hydra.run.dir=outputs/mine" in (tmp_path / "srun_args").read_text()
    failed = subprocess.run(
        ["bash", str(SBATCH)], env=fake_slurm | {"FAKE_RANK_EXIT": "3"}, capture_output=True
    )
    assert failed.returncode == 3 and not any(e.startswith("scontrol") for e in events(tmp_path))


def start_job(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The batch script in a session of its own, its output in `log`; returns once the rank trains (its
    handler is installed: a signal before that would be lost, and the test would wait for nothing)."""
    with log.open("w") as out:  # a file, not a pipe: the fake training step keeps it open
        job = subprocess.Popen(["bash", str(SBATCH), "seed=1"], env=env, start_new_session=True, stdout=out)
    deadline = time.monotonic() + 30
    while "rank: training" not in events(log.parent):
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.05)
    return job


def end_job(job: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """Kill whatever the test left running: the job's session and the fake step's."""
    for pgid in (job.pid, int((tmp_path / "srun_args.task").read_text())):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def test_sbatch_lets_training_save_then_requeues_on_the_time_limit_signal(fake_slurm, tmp_path) -> None:
    log = tmp_path / "job.out"
    job = start_job(fake_slurm | {"FAKE_TRAIN_S": "60"}, log)
    try:
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers
        assert job.wait(timeout=30) == 0
    finally:
        end_job(job, tmp_path)
    assert events(tmp_path) == [
        "srun: started",
        "torchrun: started",
        "rank: training",
        "srun: USR1 to the step",
        "rank: USR1, writing last.pt",  # the signal reached the training process ...
        "rank: wrote last.pt",
        "torchrun: rank exited 138",  # ... torchrun survived it and waited ...
        "srun: task exited 138",
        "scontrol requeue 4242",  # ... and only then was the job requeued
    ]
    assert "resumes from outputs/slurm-4242/checkpoints/last.pt" in log.read_text()


def test_sbatch_requeues_after_the_grace_period_when_training_does_not_stop(fake_slurm, tmp_path) -> None:
    log = tmp_path / "job.out"
    job = start_job(fake_slurm | {"FAKE_TRAIN_S": "60", "FAKE_RANK_DEAF": "1", "STOP_GRACE": "2"}, log)
    try:
        started = time.monotonic()
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=30) == 0 and time.monotonic() - started >= 2
    finally:
        end_job(job, tmp_path)
    assert events(tmp_path)[-1] == "scontrol requeue 4242"
    assert "did not stop within 2 s; requeueing anyway" in log.read_text()


def test_sbatch_header_asks_for_signal_and_requeue() -> None:
    directives = [
        line.split(maxsplit=1)[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")
    ]
    assert {"--ntasks-per-node=1", "--requeue", "--signal=B:USR1@300", "--open-mode=append"} <= set(
        directives
    )


def test_multinode_command(tmp_path) -> None:
    env = dict(os.environ, DRY_RUN="1", NNODES="2", MASTER_ADDR="node0", RUN_DIR="/shared/runs/t1.ps50")
    done = subprocess.run(
        ["bash", str(MULTINODE), "experiment=psconv_t3_t2", "seed=3"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shlex.split(done.stdout) == [
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=gpu",
        "--max_restarts=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29500",
        "--rdzv_id=t1_ps50",
        str(REPO / "train.py"),
        "hydra.run.dir=/shared/runs/t1.ps50",
        "trainer.resume=auto",
        "experiment=psconv_t3_t2",
        "seed=3",
    ]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "set RUN_DIR to a run directory on a filesystem shared by all nodes"),
        ({"RUN_DIR": "out", "NNODES": "2"}, "NNODES=2 needs MASTER_ADDR"),
    ],
)
def test_multinode_refuses_incomplete_settings(env: dict[str, str], message: str) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("RUN_DIR", "NNODES", "MASTER_ADDR")}
    done = subprocess.run(["bash", str(MULTINODE)], env=base | env, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr


def test_submitit_launcher_configs() -> None:
    launchers = REPO / "configs" / "hydra" / "launcher"
    slurm = yaml.safe_load((launchers / "slurm.yaml").read_text())
    one_gpu = yaml.safe_load((launchers / "slurm_1gpu.yaml").read_text())
    assert slurm["defaults"] == ["submitit_slurm"] and one_gpu["defaults"] == ["slurm"]
    assert slurm["tasks_per_node"] == slurm["gpus_per_node"] == 8  # one DDP rank per GPU
    assert one_gpu["tasks_per_node"] == one_gpu["gpus_per_node"] == 1
    assert slurm["max_num_timeout"] > 0 and slurm["signal_delay_s"] >= 60  # requeue with time to spare


def test_submitit_launcher_composes_when_installed() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from polyscale.config import register_configs

    register_configs()
    if not OmegaConf.has_resolver("polyscale_stamp"):
        OmegaConf.register_new_resolver("polyscale_stamp", lambda: "stamp")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm_1gpu"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.max_num_timeout) == (1, 30)


def test_dockerfile_installs_the_project_over_the_base_images_torch(tmp_path) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(
        r"ARG BASE_IMAGE=pytorch/pytorch:2\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime\n", dockerfile
    )
    assert "WORKDIR /workspace" in dockerfile and "pip install --no-deps -e ." in dockerfile
    # The requirements filter keeps every dependency except the torch pair and the editable project.
    grep = re.search(r"(grep -v -E '[^']+' requirements\.txt)", dockerfile)
    assert grep is not None
    kept = subprocess.run(["bash", "-c", grep.group(1)], cwd=REPO, capture_output=True, text=True).stdout
    names = {
        re.split(r"[=<>~! ]", line)[0] for line in kept.splitlines() if line and not line.startswith("#")
    }
    assert {"timm", "hydra-core", "omegaconf"} <= names and not {"torch", "torchvision", "-e"} & names
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "outputs/", "multirun/"} <= set(ignored)
