"""Cluster launchers and Docker: the sbatch template and the multi-node script with fake SLURM tools,
the hydra-submitit launcher configs, and the Dockerfile's dependency filter."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from script_helpers import REPO

SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
MULTINODE = REPO / "scripts" / "launch_multinode.sh"


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """PATH with fake `srun` (records its argv and OMP_NUM_THREADS, then sleeps) and `scontrol`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nprintf "%s\\n" "$@" > "$CAPTURE.tmp"; echo "OMP=$OMP_NUM_THREADS" >> "$CAPTURE.tmp"\n'
        'mv "$CAPTURE.tmp" "$CAPTURE"; exec sleep "${FAKE_SRUN_SLEEP:-0}"\n'
    )
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [[ "$1 $2" == "show hostnames" ]]; then printf "gpu01\\ngpu02\\n"; '
        'else echo "$@" >> "$SCONTROL_LOG"; fi\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CAPTURE=str(tmp_path / "srun_args"))
    env |= {"SCONTROL_LOG": str(tmp_path / "scontrol.log"), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2"}
    env |= {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}
    env |= {"SLURM_SUBMIT_DIR": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("RUN_DIR", None)
    return env


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
    custom = subprocess.run(
        ["bash", str(SBATCH)], env=fake_slurm | {"RUN_DIR": "outputs/mine"}, capture_output=True, timeout=60
    )
    assert custom.returncode == 0 and "hydra.run.dir=outputs/mine" in (tmp_path / "srun_args").read_text()


def test_sbatch_requeues_itself_on_the_time_limit_signal(fake_slurm, tmp_path) -> None:
    env = fake_slurm | {"FAKE_SRUN_SLEEP": "60"}
    log = tmp_path / "job.out"
    with log.open("w") as out:  # a file, not a pipe: the fake training step keeps it open
        job = subprocess.Popen(["bash", str(SBATCH), "seed=1"], env=env, start_new_session=True, stdout=out)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "srun_args").exists():  # training has started
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers
        assert job.wait(timeout=30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # the fake training step (sleep) in the job's own session
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "resumes from outputs/slurm-4242/checkpoints/last.pt" in log.read_text()


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
