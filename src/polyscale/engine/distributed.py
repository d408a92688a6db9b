"""torchrun's process group, device choice, rank helpers and the run-wide timestamp.

Ranks come from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), as in
nanoGPT and the torchvision references, or else from an `srun` step of several tasks. One process
group serves both device types: gloo carries CPU tensors and, where CUDA exists, NCCL carries CUDA
tensors ("cpu:gloo,cuda:nccl"), so nothing is hard-wired to CUDA and `trainer.device=cpu` works on a
GPU node too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from polyscale.errors import ConfigError

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_min",
    "all_reduce_sum",
    "broadcast_buffers",
    "destroy_distributed",
    "dist_info",
    "init_distributed",
    "init_run_stamp",
    "resolve_device",
    "run_stamp",
    "world_size",
]

_RUN_STAMP: str | None = None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment (a single process when the variables are unset).

    Without torchrun's variables, an `srun` step of several tasks (SLURM_STEP_NUM_TASKS > 1, e.g. the
    submitit launcher's tasks) makes each task one rank. A plain `python train.py` inside a batch
    script is not a step of several tasks and stays a single process.
    """
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        return DistInfo(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_STEP_NUM_TASKS"])
        )
    return DistInfo(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if head is None:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges = head.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def _export_slurm_rendezvous(info: DistInfo) -> None:
    """torchrun's variables for an srun step: rank 0 runs on the step's first node, port from the job id."""
    env = os.environ
    env.setdefault(
        "MASTER_ADDR", _first_slurm_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    )
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
    env.update(RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size))


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (idempotent; nothing to do for a single process)."""
    info = dist_info()
    if info.distributed and "RANK" not in os.environ:
        _export_slurm_rendezvous(info)
    if info.distributed and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return info


def init_run_stamp() -> str:
    """Fix this job's timestamp once, agreed by every rank (rank 0's clock wins).

    Called by every rank before Hydra composes, so `${polyscale_stamp:}` in `hydra.run.dir` names one
    directory for the whole job instead of one per rank when the ranks' clocks straddle a second.
    """
    global _RUN_STAMP
    if _RUN_STAMP is None:
        stamp = [datetime.now().strftime("%Y-%m-%d/%H-%M-%S")]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(stamp, src=0)
        _RUN_STAMP = stamp[0]
    return _RUN_STAMP


def run_stamp() -> str:
    """The `${polyscale_stamp:}` resolver: the stamp fixed by `init_run_stamp` (fixed now if it was not)."""
    return _RUN_STAMP if _RUN_STAMP is not None else init_run_stamp()


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    """`auto` picks this rank's GPU when CUDA exists, else the CPU; `cuda` means this rank's GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.device={spec} was asked for, but PyTorch sees no CUDA device on this machine. "
            "Use trainer.device=cpu (or auto), or install a CUDA build of PyTorch."
        )
    if spec == "cuda":
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    try:
        return torch.device(spec)
    except RuntimeError as err:
        raise ConfigError(f"trainer.device={spec!r} is not a device: use auto, cpu, cuda or cuda:N.") from err


def world_size() -> int:
    """Number of ranks in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (no-op for a single process); returns it for chaining."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Minimum over all ranks in place (no-op for a single process)."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over all ranks in place (no-op for a single process)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list for a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to all ranks.

    DDP syncs buffers at the start of each training forward, so after the last step every rank holds
    statistics from its own last batch. Evaluation and the saved checkpoint must use the same (rank 0's).
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def destroy_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
