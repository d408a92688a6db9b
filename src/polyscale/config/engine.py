"""Schemas of the `optim`, `schedule`, `trainer` groups and of evaluate.py's `eval` block."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1  # for the global batch data.batch_size (not rescaled with the world size)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    no_decay_norm_bias: bool = False  # exempt norm weights and biases from weight decay


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine (half cosine to min_lr, per iteration) | step (x gamma at milestones)
    milestones: list[int] = field(default_factory=list)  # epochs, for step
    gamma: float = 0.1
    min_lr: float = 0.0
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start_factor * lr
    warmup_start_factor: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a grad scaler)
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA)
    accum_steps: int = 1  # gradient accumulation: per-rank micro-batch = global batch / world / accum
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    ema: bool = False
    ema_decay: float = 0.9999
    clip_grad_norm: float | None = None
    deterministic: bool = False
    limit_train_batches: int | None = None  # optimizer steps per epoch (debugging / smoke runs)
    limit_val_batches: int | None = None
    resume: str | None = None  # auto | PATH
    checkpoint_every_n_steps: int = 0  # also write last.pt every N optimizer steps (0: per epoch only)
    log_every_n_steps: int = 50
    val_every_n_epochs: int = 1
    progress: bool = True  # progress bars on rank 0


@dataclass
class EvalConfig:
    crop_sizes: list[int] = field(default_factory=list)  # empty: the data config's image_size
    output: str | None = None  # JSON file (default: next to the checkpoint)
