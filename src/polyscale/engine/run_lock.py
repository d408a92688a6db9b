"""The run directory's lock: one process trains in a run directory at a time.

A second process started on the same directory (a resubmitted job while the first still runs, a typo in
hydra.run.dir) would interleave metrics.jsonl, TensorBoard events and checkpoints, so it stops at once
with a message naming the holder. `lock_run_dir` is what the engine calls (on every rank).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from polyscale.engine.distributed import all_gather_object
from polyscale.errors import RunDirError

__all__ = ["LOCK_NAME", "RunLock", "acquire_run_lock", "lock_run_dir"]

LOCK_NAME = ".lock"  # flock()ed while a process trains here; holds that process's description
_PID_LOCK_NAME = ".lock.pid"  # where flock is not supported: exists while a process trains here
# flock errors of file systems without it (some NFS / Lustre / FUSE mounts)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_UNWRITTEN_GRACE_S = 30.0  # an O_EXCL lock file still empty after this was left by a crash


class RunLock:
    """The run directory's lock, held until `release()` (or the end of a `with` block).

    With flock the kernel drops the lock when the process dies, even by SIGKILL, so a crashed run never
    blocks the next one; the fallback lock file is taken over once its process is gone.
    """

    def __init__(self, path: Path, fd: int, *, remove_on_release: bool) -> None:
        self.path, self._fd, self._remove = path, fd, remove_on_release

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the directory free (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._remove:
                self.path.unlink(missing_ok=True)
            else:
                # The file stays: removing a flock()ed file lets a waiting opener lock a deleted inode
                # while a third process creates a new file, and then two would hold "the" lock.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_self() -> bytes:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "start_ticks": _process_start(os.getpid()),
    }
    return (json.dumps(holder) + "\n").encode()


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _parse_holder(raw: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(raw.decode(errors="replace"))
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_gone(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process no longer exists (or the pid was reused)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False  # another host's processes cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, under another user
    ticks = holder.get("start_ticks")
    return ticks is not None and _process_start(pid) not in (None, ticks)


def _busy(run_dir: Path, holder: dict[str, Any], lock_file: Path | None = None) -> str:
    if holder.get("pid"):
        pid, host = holder["pid"], holder.get("host", "an unknown host")
        who = (
            f"pid {pid} on {host}, since {holder.get('since', 'an unknown time')}, running "
            f"`{holder.get('command', '?')}`"
        )
        stop = f"stop it (kill {pid} on {host}: it writes last.pt and exits)"
    else:
        who = "a process that has not written its details yet"
        stop = "stop it"
    stale = (
        f" If that process no longer exists (its node went down), delete {lock_file}."
        if lock_file is not None
        else ""
    )
    return (
        f"Run directory {run_dir} is in use by another polyscale process: {who}. Two runs writing one "
        "directory would interleave metrics.jsonl, TensorBoard events and checkpoints. Wait for it to "
        f"finish, {stop}, or give this run another directory with hydra.run.dir=PATH.{stale}"
    )


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _describe_self(), 0)


def _acquire_lock_file(run_dir: Path) -> RunLock:
    """Fallback without flock: an O_EXCL-created file, taken over when its process is gone."""
    path = run_dir / _PID_LOCK_NAME
    holder: dict[str, Any] = {}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            try:
                holder = _parse_holder(path.read_bytes())
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            if _holder_gone(holder) or (not holder and age > _UNWRITTEN_GRACE_S):
                # Two processes taking over the same stale file could both succeed if one unlinks the
                # other's fresh file between its read and its unlink; the window is microseconds, while
                # the mistake it prevents (two runs in one directory) takes a human to cause.
                path.unlink(missing_ok=True)
                continue
            raise RunDirError(_busy(run_dir, holder, path)) from None
        _write_holder(fd)
        return RunLock(path, fd, remove_on_release=True)
    raise RunDirError(_busy(run_dir, holder, path))


def acquire_run_lock(run_dir: str | Path) -> RunLock:
    """Take RUN_DIR's lock for this process, or raise RunDirError naming the process that holds it.

    The lock file records this process's pid, host, start time and command line for that message.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise RunDirError(
            f"Cannot use run directory {run_dir}: {err.strerror or err}. Choose a writable one with "
            "hydra.run.dir=PATH."
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _parse_holder(os.pread(fd, 4096, 0))
        os.close(fd)
        raise RunDirError(_busy(run_dir, holder)) from None
    except OSError as err:
        os.close(fd)
        if err.errno in _NO_FLOCK:
            return _acquire_lock_file(run_dir)
        raise RunDirError(f"Cannot lock run directory {run_dir}: {err.strerror or err}.") from err
    _write_holder(fd)
    return RunLock(path, fd, remove_on_release=False)


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path, *, enabled: bool = True) -> Iterator[RunLock | None]:
    """Hold RUN_DIR's lock for the block where `enabled` (rank 0), released on exit.

    With several ranks this is a collective (every rank calls it): rank 0's outcome is shared, so every
    rank raises the same RunDirError instead of the others waiting for rank 0 at their next collective.
    """
    lock, refusal = None, None
    if enabled:
        try:
            lock = acquire_run_lock(run_dir)
        except RunDirError as err:
            refusal = str(err)
    refusal = all_gather_object(refusal)[0]
    if refusal is not None:
        if lock is not None:
            lock.release()
        raise RunDirError(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
