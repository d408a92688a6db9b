"""Subprocesses for the reliability tests: a Python child importing the polyscale under test, and two
gloo ranks started without torchrun (what they print comes back per rank)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import polyscale

SRC = Path(polyscale.__file__).resolve().parents[1]  # children import the same polyscale as the tests


def child_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    return env | {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"} | extra


def run_python(code: str, **env: str) -> subprocess.Popen[str]:
    """`python -c CODE` (dedented) with stdout / stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(
    code: str, timeout: float = 120, after_first_line: Callable[[], None] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Run CODE as ranks 0 and 1 of a gloo process group (joined before CODE runs, as `dist`).

    `after_first_line` runs once both ranks have printed a line, while they keep running.
    """
    prologue = "import torch.distributed as dist\ndist.init_process_group('gloo')\n"
    # leave together: a rank exiting while the other still talks to it makes gloo abort the process
    epilogue = "\ndist.barrier()\ndist.destroy_process_group()\n"
    port = str(free_port())
    ranks = [
        run_python(
            prologue + textwrap.dedent(code) + epilogue,
            RANK=str(r),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        for r in (0, 1)
    ]
    done = []
    try:
        heads = ["", ""]
        if after_first_line is not None:
            heads = [rank.stdout.readline() for rank in ranks]
            after_first_line()
        for rank, head in zip(ranks, heads, strict=True):
            out, err = rank.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(rank.args, rank.returncode, head + out, err))
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.communicate()
    return done
