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
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start_factor * lr (may be fractional)
    warmup_steps: int = 0  # the warm-up in optimizer steps instead (detection's 500 iterations); 0: epochs
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
    ema_warmup: bool = False  # timm's decay warm-up (1 - (1 + step) ** -2/3, capped at ema_decay)
    best_on_ema: bool = False  # track best.pt / results.json on the EMA weights instead of the main ones
    clip_grad_norm: float | None = None
    deterministic: bool = False
    limit_train_batches: int | None = None  # optimizer steps per epoch (debugging / smoke runs)
    limit_val_batches: int | None = None  # also disables the check that every val sample was counted
    resume: str | None = None  # auto (RUN_DIR/checkpoints/last.pt, fresh start if absent) | PATH
    checkpoint_every_n_steps: int = 0  # also write last.pt every N optimizer steps (0: per epoch only)
    # Stop (like a preemption) once this many optimizer steps are done, after writing last.pt. For testing
    # resume; a run continued with trainer.resume=auto does not stop again past this step.
    stop_after_steps: int | None = None
    log_every_n_steps: int = 20  # loss / LR / images/s to TensorBoard and the progress bar
    val_every_n_epochs: int = 1  # the last epoch is always validated
    progress: bool = True  # progress bars on rank 0
    tensorboard: bool = True  # TensorBoard events in RUN_DIR/tensorboard


@dataclass
class EvalConfig:
    crop_sizes: list[int] = field(default_factory=list)  # empty: the data config's image_size
    output: str | None = None  # JSON file (default: RUN_DIR/eval.json, the evaluation's run directory)
    use_ema: bool = False  # evaluate the checkpoint's EMA weights instead of the main ones
