"""Per-process set-up shared by training and evaluation (`start_process`): the process group, the device,
deterministic mode, the CPU allocator, precision; seeding and batch arithmetic."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from polyscale.engine.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    init_distributed,
    resolve_device,
)
from polyscale.engine.progress import progress
from polyscale.errors import ConfigError

__all__ = [
    "Runtime",
    "autocast_factory",
    "capture_rng_state",
    "configure_determinism",
    "make_grad_scaler",
    "micro_batch_size",
    "restore_rng_state",
    "seed_everything",
    "start_process",
]

T = TypeVar("T")
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    """Seed the global torch, CUDA, numpy and python RNGs (training seeds with `seed + rank`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states as weights_only-loadable data."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic mode: deterministic kernels only (errors on ops without one), no cuDNN autotuning.

    Off: cuDNN picks the fastest algorithms (`benchmark=True`), the usual choice for throughput.
    """
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs; must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and device.type == "cuda"


def tune_cpu_allocator() -> bool:
    """Let glibc's malloc keep freed memory instead of handing it back to the OS after every step.

    PyTorch allocates CPU tensors with plain malloc. With glibc's defaults, blocks above a (dynamic)
    threshold are mmap'ed and unmapped one by one and the heap top is trimmed as soon as a step frees its
    activations, so the next step page-faults the same megabytes in again: 5-14% of a small CNN's CPU
    step, half of a PSConv layer's (scripts/bench_train.py, scripts/bench_conv.py). Serving blocks up to
    32 MiB (glibc's maximum) from the heap and never trimming it removes that churn; the price is a
    resident size that stays at its peak. Returns whether the settings were applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from <malloc.h>
        # (setting either also turns off glibc's dynamic mmap threshold, so both are needed)
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False


def _precision_dtype(precision: str) -> torch.dtype | None:
    if precision not in _PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is unknown: use fp32, bf16 or fp16.")
    return _PRECISIONS[precision]


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the autocast context for `precision` (a null context for fp32)."""
    dtype = _precision_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not."""
    if _precision_dtype(precision) is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def micro_batch_size(global_batch: int, world_size: int, accum_steps: int) -> int:
    """Per-rank micro-batch: the global batch (data.batch_size) split over ranks and accumulation steps."""
    if accum_steps < 1:
        raise ConfigError(f"trainer.accum_steps={accum_steps} must be >= 1.")
    parts = world_size * accum_steps
    if global_batch < parts or global_batch % parts:
        raise ConfigError(
            f"data.batch_size={global_batch} is the global batch and must divide evenly into "
            f"{world_size} rank(s) x {accum_steps} accumulation step(s) = {parts} micro-batches. "
            f"Pick data.batch_size as a multiple of {parts} or change trainer.accum_steps."
        )
    return global_batch // parts


@dataclass(frozen=True)
class Runtime:
    """This process's place and settings, shared by training and evaluation of every task."""

    info: DistInfo
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    show_progress: bool  # progress bars (rank 0 only)

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def __post_init__(self) -> None:
        # built once: autocast() is entered on every micro-batch
        object.__setattr__(self, "_autocast", autocast_factory(self.precision, self.device))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of `precision` (a null context for fp32)."""
        return self._autocast()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks, in place (nothing to do for one process)."""
        return all_reduce_sum(tensor)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (a collective)."""
        return all_gather_object(obj)

    def progress(
        self, iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it"
    ) -> Iterable[T]:
        """A progress bar on rank 0 when bars are on; the iterable itself otherwise."""
        return progress(iterable, desc=desc, total=total, enabled=self.show_progress, unit=unit)


def start_process(trainer: Any, seed: int) -> Runtime:
    """Join torchrun's process group, pick and set the device, tune the CPU allocator, set deterministic
    mode and seed the global RNGs, from the `trainer` config section: what training and evaluation do
    first."""
    info = init_distributed()
    dev = resolve_device(trainer.device, info)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        tune_cpu_allocator()
    configure_determinism(trainer.deterministic, dev)
    _precision_dtype(trainer.precision)  # an unknown precision fails here, before any data is read
    seed_everything(seed)
    return Runtime(info, dev, trainer.precision, trainer.channels_last, trainer.progress and info.is_main)
