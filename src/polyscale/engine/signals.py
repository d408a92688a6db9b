"""Stop requests by signal: finish the current step, write last.pt on every rank's agreement, exit.

SIGTERM is what schedulers send before they kill a job (SLURM at the time limit and on preemption, with
KillWait, 30 s by default, before SIGKILL; Kubernetes; torchrun forwarding its own SIGTERM) and what
`kill PID` sends. SIGUSR1 is SLURM's early warning (`--signal=USR1@300`), which scripts/slurm/train.sbatch
forwards to the training processes. Without handlers both end the process at once, losing every step
since the last checkpoint. (Under srun the warning is the dependable one: at the hard time limit srun
itself gets the SIGTERM too and answers it by killing its tasks, "srun: forcing job termination".)

`StopSignals` only sets a flag (nothing else is safe at an arbitrary point of a step); the loop asks
`stop_requested` after every optimizer step, so all ranks stop at the same step even when the signal
reached only some of them. A second signal while last.pt is written changes nothing: the flag is
already set, and the atomic write leaves the previous file intact if a SIGKILL follows.

Exit code of a run stopped this way (`stop_exit_code`): 128 + the signal's number (143 for SIGTERM, 138
for SIGUSR1) for a plain `python train.py`, and 0 for each worker under torchrun.
- Not 0 for a plain run, because the run has not finished: `train.py && evaluate.py`, CI steps and job
  chains must not take it for done. 128 + N is how shells and SLURM already report "ended by signal N",
  so the status reads the same as the kill it replaces.
- 0 under torchrun (TORCHELASTIC_RUN_ID is set), because torchrun reads any non-zero worker exit as a
  crash: it prints a ChildFailedError report over the stop message, SIGTERMs the other workers and,
  with --max-restarts, restarts the group, which would train on past the stop. The caller still learns
  of the stop from torchrun: a torchrun that was signalled itself exits non-zero (SignalException).
- The requeue never depends on it: train.sbatch requeues whenever it forwarded the warning, and SLURM
  requeues a job preempted with PreemptMode=REQUEUE whatever its exit code.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "STOP_SIGNALS",
    "StopSignals",
    "resume_command",
    "stop_exit_code",
    "stop_requested",
]

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Context manager: while inside, `signals` set `received` (the first one to arrive) instead of
    ending the process; the previous handlers come back on exit.

    Install it on every rank, in the main thread, before the data loaders start their workers: forked
    workers inherit the handler (and so survive SIGUSR1 sent to the whole job); for SIGTERM the loaders'
    workers run `polyscale.data.loader.shield_data_worker`.
    """

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS, *, announce: bool = True) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.announce = announce
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            if self.announce:  # os.write: no lock a signal could interrupt (print / logging take locks)
                note = f"\n{self.received.name} received: stopping after this step, with a checkpoint.\n"
                os.write(2, note.encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignals must be entered in the main thread (Python runs handlers there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def stop_requested(signals: StopSignals | None) -> str | None:
    """The name of the stop signal ("SIGTERM") when any rank received one, else None; every rank gets
    the same answer.

    A collective when torch.distributed runs with several ranks (every rank must call it at the same
    step): a MAX all-reduce of one CPU integer, which the "cpu:gloo,cuda:nccl" and "gloo" groups carry
    over gloo. Free for a single process.
    """
    number = int(signals.received) if signals is not None and signals.received is not None else 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([number], dtype=torch.int64)  # (1,) on the CPU
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        number = int(flag.item())
    return signal.Signals(number).name if number else None


def stop_exit_code(name: str) -> int:
    """Exit code of a run stopped by signal `name`: 128 + its number ("SIGTERM" -> 143), or 0 in a
    torchrun worker (module doc)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return 0
    return 128 + int(signal.Signals[name])


def resume_command(
    run_dir: str | Path, overrides: Sequence[str] = (), program: str = "python train.py"
) -> str:
    """The command that continues the run in `run_dir` with the same `overrides` (Hydra's task overrides),
    shell-quoted; the run's own resume and run-dir overrides are replaced."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("trainer.resume=", "hydra.run.dir="))]
    args = ["trainer.resume=auto", f"hydra.run.dir={run_dir}", *kept]
    return f"{program} {shlex.join(args)}"
