"""Stop signals: a flag instead of death, the previous handlers back afterwards, every rank agreeing on a
signal only some got, data workers that survive signals sent to the whole job."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from process_helpers import child_env, free_port, run_python, run_two_ranks

from polyscale.engine.signals import StopSignals, resume_command, stop_exit_code, stop_requested


def test_a_signal_sets_the_flag_and_the_previous_handler_comes_back() -> None:
    child = run_python(
        """
        import signal
        from polyscale.engine.signals import StopSignals
        with StopSignals() as stops:
            print(stops.received)
            signal.raise_signal(signal.SIGTERM)  # the process survives it
            signal.raise_signal(signal.SIGUSR1)  # the first signal is the one reported
            print(stops.received.name, stops.requested)
        with StopSignals() as stops:
            signal.raise_signal(signal.SIGUSR1)
            print(stops.received.name)
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
        signal.raise_signal(signal.SIGTERM)  # default again: the process ends here
        print("still alive")
        """
    )
    out, err = child.communicate(timeout=120)
    assert out.splitlines() == ["None", "SIGTERM True", "SIGUSR1", "True"], err
    assert child.returncode == -signal.SIGTERM
    assert "SIGTERM received: stopping after this step, with a checkpoint." in err


def test_previous_python_handlers_are_restored_in_process() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals((signal.SIGUSR1,), announce=False) as stops:
            signal.raise_signal(signal.SIGUSR1)
        assert stops.received == signal.SIGUSR1 and seen == []
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_single_process_decides_alone() -> None:
    with StopSignals(announce=False) as stops:
        assert stop_requested(stops) is None
        signal.raise_signal(signal.SIGUSR1)
        assert stop_requested(stops) == "SIGUSR1"
    assert stop_requested(None) is None


def test_ranks_agree_when_only_one_got_the_signal() -> None:
    ranks = run_two_ranks(
        """
        import signal
        from polyscale.engine.signals import StopSignals, stop_requested
        with StopSignals() as stops:
            print(stop_requested(stops))
            if dist.get_rank() == 1:
                signal.raise_signal(signal.SIGTERM)
            print(stop_requested(stops), getattr(stops.received, "name", None))
        """
    )
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-2000:] for r in ranks]
    assert [r.stdout.splitlines() for r in ranks] == [["None", "SIGTERM None"], ["None", "SIGTERM SIGTERM"]]


def test_exit_code_and_resume_command(monkeypatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert (stop_exit_code("SIGTERM"), stop_exit_code("SIGUSR1")) == (143, 138)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # a torchrun worker
    assert stop_exit_code("SIGTERM") == 0
    command = resume_command(
        "outputs/run 1", ["model=ps_resnet50", "trainer.resume=auto", "hydra.run.dir=old", "data.root=/d"]
    )
    assert command == (
        "python train.py trainer.resume=auto 'hydra.run.dir=outputs/run 1' model=ps_resnet50 data.root=/d"
    )


DATA_WORKER_UNDER_SIGTERM = """
import multiprocessing, os, signal, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from polyscale.data.loader import shield_data_worker
from polyscale.engine.signals import StopSignals

class Slow(Dataset):
    def __len__(self):
        return 100_000

    def __getitem__(self, i):
        time.sleep(0.002)
        return i

init = shield_data_worker if sys.argv[1:] == ["shield"] else None
with StopSignals(announce=False) as stops:
    loader = DataLoader(Slow(), batch_size=4, num_workers=1, worker_init_fn=init, persistent_workers=True)
    batches = iter(loader)
    next(batches)
    (worker,) = multiprocessing.active_children()
    os.system(f"kill -TERM {worker.pid}")  # from another process, as SLURM and torchrun send it
    time.sleep(0.5)
    for _ in range(20):
        next(batches)
    print("worker alive:", worker.is_alive(), flush=True)
# Exit with the persistent worker still running: the DataLoader's shutdown (SIGTERM from the parent) ends it.
"""


@pytest.mark.parametrize("shield", [True, False])
def test_shielded_data_workers_survive_a_sigterm_sent_to_the_whole_job(tmp_path, shield: bool) -> None:
    script = tmp_path / "worker.py"
    script.write_text(DATA_WORKER_UNDER_SIGTERM)
    args = [sys.executable, str(script), *(["shield"] if shield else [])]
    done = subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=120)  # no hang
    if shield:
        assert (done.returncode, done.stdout) == (0, "worker alive: True\n"), done.stderr[-2000:]
    else:  # PyTorch's own worker handler: the rank fails before it could write a checkpoint
        assert done.returncode == 1 and "RuntimeError: DataLoader worker (pid" in done.stderr, done.stderr[
            -2000:
        ]


RANK = """
import os, sys, time
import torch.distributed as dist
from polyscale.engine.signals import StopSignals, stop_exit_code, stop_requested

dist.init_process_group("gloo")
with StopSignals(announce=False) as stops:
    print("training", flush=True)
    for step in range(1, 2000):
        time.sleep(0.05)  # one optimizer step
        name = stop_requested(stops)
        if name:
            # one write(2) of a whole line: atomic on a pipe the ranks share (print may split it in two)
            os.write(1, f"rank {dist.get_rank()} stopped by {name} after step {step}\\n".encode())
            dist.barrier()  # rank 0 has written last.pt before any rank exits
            sys.exit(stop_exit_code(name))
sys.exit(5)
"""


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (what SLURM signals: every process of the job step)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            children.setdefault(int(text[text.rindex(")") + 2 :].split()[1]), []).append(
                int(stat.parent.name)
            )
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


@pytest.mark.parametrize("how", ["USR1 to every process, torchrun ignoring it", "SIGTERM to torchrun"])
def test_signals_reach_every_rank_through_torchrun(tmp_path: Path, how: str) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    torchrun += [f"--master_port={free_port()}", str(script)]
    usr1 = how.startswith("USR1")
    command = (
        ["bash", "-c", 'trap "" USR1; exec "$@"', "task", *torchrun] if usr1 else torchrun
    )  # train.sbatch's
    job = subprocess.Popen(
        command,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        ready = job.stdout.read(len("training\n") * 2)  # both ranks run their steps
        assert ready.count("training") == 2, ready
        if usr1:
            for pid in process_tree(job.pid):
                os.kill(pid, signal.SIGUSR1)
        else:
            job.send_signal(signal.SIGTERM)  # torchrun forwards it to each rank's process group
        out, err = job.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    stops = sorted(line.split(" after step ")[0] for line in out.splitlines() if " stopped by " in line)
    name = "SIGUSR1" if usr1 else "SIGTERM"
    assert stops == [f"rank 0 stopped by {name}", f"rank 1 stopped by {name}"], out + err[-3000:]
    steps = {line.split(" after step ")[1] for line in out.splitlines() if " stopped by " in line}
    assert len(steps) == 1  # the same step on both ranks
    if usr1:  # torchrun survived the signal and saw its workers finish cleanly: no failure report
        assert job.returncode == 0 and "ChildFailedError" not in err, err[-3000:]
    else:  # torchrun was signalled itself and says so (its own exception, after the ranks had stopped)
        assert job.returncode == 1 and "Received 15 death signal" in err
