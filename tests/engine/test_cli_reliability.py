"""The reliability contract at the command line: kills, two launches, a full disk, empty checkpoints.

Each case runs train.py / evaluate.py as a user would (a subprocess): one paragraph, exit code 2 (or the
signal's code), no traceback, and nothing lost.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from engine_helpers import REPO, TINY, load, run_cli, subprocess_env

# Long enough to be interrupted: a few hundred steps of a tiny network.
LONG = (*TINY, "trainer.epochs=200", "trainer.log_every_n_steps=1")


def _start(run: Path, *extra: str, **popen) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "train.py", *LONG, *extra, f"hydra.run.dir={run}"],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _wait_for(process: subprocess.Popen[str], text: str, timeout: float = 120) -> str:
    """Read the process's output until a line holds `text`."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    process.kill()
    raise AssertionError(f"never printed {text!r}:\n{''.join(seen)[-3000:]}")


def test_sigterm_finishes_the_step_writes_last_and_says_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = _start(run)
    _wait_for(job, "epoch 1/200")
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Stopped by SIGTERM after global step" in out and "Traceback" not in out
    assert f"trainer.resume=auto hydra.run.dir={run}" in out
    stopped = load(run / "checkpoints" / "last.pt")  # checksum verified inside
    assert stopped["global_step"] >= 4
    done = run_cli(
        "train.py",
        *TINY,
        f"trainer.epochs={stopped['epoch'] + 1}",
        "trainer.resume=auto",
        f"hydra.run.dir={run}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Resumed from {run / 'checkpoints' / 'last.pt'} at global step {stopped['global_step']}" in (
        done.stdout + done.stderr
    )


def test_a_second_launch_on_the_same_run_dir_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _start(run)
    try:
        _wait_for(first, "epoch 1/200")
        second = run_cli("train.py", *TINY, "trainer.epochs=1", f"hydra.run.dir={run}")
        output = second.stdout + second.stderr
        assert second.returncode == 2 and "RunDirError" in output and str(first.pid) in output, output
        assert "hydra.run.dir" in output and "Traceback" not in output
    finally:
        first.kill()
        first.communicate()
    # the killed holder's lock is gone with it: the directory is usable again
    again = run_cli("train.py", *TINY, "trainer.epochs=1", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_checkpoint_that_does_not_fit_on_disk_is_one_paragraph_also_in_train_log(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = subprocess.run(
        [sys.executable, "train.py", *TINY, "trainer.epochs=1", f"hydra.run.dir={run}"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_file_size_limit(600_000),  # logs fit; ResNet-20 weights + momentum (2 MB) do not
    )
    output = job.stdout + job.stderr
    assert job.returncode == 2 and "CheckpointError" in output and "Traceback" not in output, output[-3000:]
    assert str(run / "checkpoints") in output
    assert "Error (CheckpointError)" in (run / "train.log").read_text()
    assert not [p.name for p in (run / "checkpoints").iterdir()]  # no partial file left behind


def test_an_empty_checkpoint_is_reported_not_a_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    done = run_cli("evaluate.py", f"checkpoint={empty}", f"hydra.run.dir={tmp_path / 'eval'}")
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "is empty (0 bytes)" in output and "Traceback" not in output, output
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    done = run_cli("train.py", *TINY, "trainer.epochs=1", "trainer.resume=auto", f"hydra.run.dir={run}")
    output = done.stdout + done.stderr
    assert done.returncode == 2 and str(run / "checkpoints" / "last.pt") in output, output
    assert "Traceback" not in output


def test_checkpoints_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        done = run_cli("train.py", *TINY, "trainer.epochs=1", f"hydra.run.dir={tmp_path}")
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("last.pt", "best.pt"):
        assert (tmp_path / "checkpoints" / name).stat().st_mode & 0o777 == 0o644
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["checksum"]["algorithm"]
