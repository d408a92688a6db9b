"""The run directory: records written by rank 0 only, and the lock that keeps a second process out."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from process_helpers import run_python, run_two_ranks

from polyscale.engine import run_lock as run_lock_mod
from polyscale.engine.run_dir import RunRecorder, collect_environment
from polyscale.engine.run_lock import acquire_run_lock, lock_run_dir
from polyscale.errors import RunDirError

TRY_LOCK = """
import sys
from polyscale.engine.run_lock import acquire_run_lock
from polyscale.errors import RunDirError
try:
    acquire_run_lock({run!r})
except RunDirError as err:
    print(err)
    sys.exit(2)
print("locked")
"""

HOLD_LOCK = """
import time
from polyscale.engine.run_lock import acquire_run_lock
lock = acquire_run_lock({run!r})
print("locked", flush=True)
time.sleep(120)
"""


def try_lock(run: Path) -> tuple[int, str]:
    """(exit code, stdout) of another process trying to lock `run`."""
    child = run_python(TRY_LOCK.format(run=str(run)))
    out, err = child.communicate(timeout=60)
    assert not err, err
    return child.returncode, out


def holder(run: Path) -> dict:
    return json.loads((run / ".lock").read_text())


def test_a_second_process_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with acquire_run_lock(run) as lock:
        assert lock.held and holder(run)["pid"] == os.getpid()
        code, out = try_lock(run)
        assert code == 2 and len(out.strip().splitlines()) == 1, out
        pid, host = os.getpid(), socket.gethostname()
        assert out.startswith(
            f"Run directory {run} is in use by another polyscale process: pid {pid} on {host}, since "
        )
        assert (
            holder(run)["command"] in out and f"kill {pid} on {host}" in out and "hydra.run.dir=PATH" in out
        )
        with pytest.raises(RunDirError, match="is in use by another polyscale process"):
            acquire_run_lock(run)  # another open of the file conflicts even within one process
    acquire_run_lock(run).release()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = run_python(HOLD_LOCK.format(run=str(run)))
    try:
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(RunDirError, match=f"pid {child.pid} on "):
            acquire_run_lock(run)
    finally:
        child.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
        child.communicate(timeout=30)
    assert holder(run)["pid"] == child.pid  # the dead holder's description is still in the file
    with acquire_run_lock(run):
        assert holder(run)["pid"] == os.getpid()


def test_release_then_acquire_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = acquire_run_lock(run)
    lock.release()
    lock.release()  # idempotent
    assert not lock.held and (run / ".lock").read_text() == ""
    with lock_run_dir(run) as again:
        assert again is not None and again.held
    assert not again.held
    with pytest.raises(ValueError), lock_run_dir(run):
        raise ValueError("the run failed")
    acquire_run_lock(run).release()  # released on the way out (a second open would conflict)
    with lock_run_dir(tmp_path / "other", enabled=False) as nothing:  # ranks > 0 take no lock
        assert nothing is None and not (tmp_path / "other").exists()


def test_without_flock_an_exclusive_lock_file_is_used(tmp_path: Path, monkeypatch) -> None:
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")  # what some NFS / Lustre mounts answer

    monkeypatch.setattr(run_lock_mod.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    pid_file = run / ".lock.pid"
    with acquire_run_lock(run):
        assert json.loads(pid_file.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirError, match=f"pid {os.getpid()} on .*If that process no longer exists"):
            acquire_run_lock(run)  # its holder is alive
    assert not pid_file.exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = socket.gethostname()
    for stale in (
        {"pid": dead.pid, "host": here},  # the process is gone
        {"pid": os.getpid(), "host": here, "start_ticks": -1},  # the pid now belongs to another process
    ):
        pid_file.write_text(json.dumps(stale))
        with acquire_run_lock(run):
            assert json.loads(pid_file.read_text())["pid"] == os.getpid()
    pid_file.write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}))
    with pytest.raises(RunDirError, match=f"pid {dead.pid} on elsewhere"):
        acquire_run_lock(run)  # cannot be checked from here: only a human can say it is gone
    pid_file.write_text("")  # a holder that crashed between creating and describing the file
    with pytest.raises(RunDirError, match="has not written its details yet"):
        acquire_run_lock(run)
    old = time.time() - 120
    os.utime(pid_file, (old, old))
    with acquire_run_lock(run):
        pass


def test_a_refused_lock_stops_every_rank(tmp_path: Path) -> None:
    run, released = tmp_path / "run", tmp_path / "released"
    code = f"""
    import sys, time
    from pathlib import Path
    from polyscale.engine.run_lock import lock_run_dir
    from polyscale.errors import RunDirError
    try:
        with lock_run_dir({str(run)!r}, enabled=dist.get_rank() == 0):
            print("training")
    except RunDirError as err:
        print(err, flush=True)
    while not Path({str(released)!r}).exists():  # the other process gives the directory free
        time.sleep(0.05)
    with lock_run_dir({str(run)!r}, enabled=dist.get_rank() == 0) as lock:
        print("training", lock is not None)
    """
    lock = acquire_run_lock(run)

    def give_free() -> None:
        lock.release()
        released.touch()

    try:
        ranks = run_two_ranks(code, after_first_line=give_free)
    finally:
        lock.release()
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-2000:] for r in ranks]
    refusals = [r.stdout.splitlines()[0] for r in ranks]
    assert (
        refusals[0] == refusals[1]
        and f"in use by another polyscale process: pid {os.getpid()}" in refusals[0]
    )
    assert [r.stdout.splitlines()[1:] for r in ranks] == [["training True"], ["training False"]]


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
