"""Per-process set-up shared by training and evaluation: seeding, deterministic mode, precision, batches."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from polyscale.errors import ConfigError

__all__ = [
    "autocast_factory",
    "configure_determinism",
    "make_grad_scaler",
    "micro_batch_size",
    "seed_everything",
]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    """Seed the global torch, CUDA, numpy and python RNGs (training seeds with `seed + rank`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def per_rank_val_batch(cfg_data: DictConfig, world_size: int) -> int:
    """Validation batch per rank from the global data.val_batch_size (null: data.batch_size)."""
    global_batch = cfg_data.val_batch_size or cfg_data.batch_size
    return max(1, global_batch // world_size)
