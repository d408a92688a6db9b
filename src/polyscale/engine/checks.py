"""Value checks of the engine's settings, run before anything is built or read.

Each failing check names the key, the value and the allowed range, so `trainer.epochs=0` stops at once
with a message instead of exiting 0 after doing nothing, or failing an epoch later with a misleading one.
"""

from __future__ import annotations

from typing import Any

from polyscale.errors import ConfigError

__all__ = ["check_values"]

# key -> (lowest allowed value, whether null is allowed)
_AT_LEAST: dict[str, tuple[float, bool]] = {
    "trainer.epochs": (1, False),
    "trainer.accum_steps": (1, False),
    "trainer.limit_train_batches": (1, True),
    "trainer.limit_val_batches": (1, True),
    "trainer.val_every_n_epochs": (1, False),
    "trainer.log_every_n_steps": (0, False),
    "trainer.checkpoint_every_n_steps": (0, False),
    "trainer.stop_after_steps": (1, True),
    "trainer.label_smoothing": (0, False),
    "trainer.mixup_alpha": (0, False),
    "trainer.cutmix_alpha": (0, False),
    "data.batch_size": (1, False),
    "data.val_batch_size": (1, True),
    "data.num_workers": (0, False),
    "data.image_size": (1, False),
    "data.num_train_samples": (1, False),
    "data.num_val_samples": (1, False),
    "data.num_classes": (1, True),
    "model.num_classes": (1, True),
}
_OPEN_INTERVALS = {  # key -> (low, high): low < value <= high
    "trainer.clip_grad_norm": (0.0, float("inf")),
    "trainer.ema_decay": (0.0, 1.0),
}
_CLOSED = {"trainer.mix_prob": (0.0, 1.0), "model.drop_rate": (0.0, 1.0)}  # low <= value <= high


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if node is None or not hasattr(node, part):
            return _MISSING
        node = getattr(node, part)
    return node


_MISSING = object()


def check_values(cfg: Any) -> None:
    """ConfigError for the first out-of-range value of the trainer, data and model sections."""
    for key, (low, nullable) in _AT_LEAST.items():
        value = _get(cfg, key)
        if value is _MISSING or (value is None and nullable):
            continue
        if value is None or value < low:
            null = " or null" if nullable else ""
            raise ConfigError(f"{key}={value} is out of range: it must be >= {low:g}{null}.")
    for key, (low, high) in _OPEN_INTERVALS.items():
        value = _get(cfg, key)
        if value is _MISSING or value is None:
            continue
        if not low < value <= high:
            raise ConfigError(f"{key}={value} is out of range: must be > {low:g} and <= {high:g}, or null.")
    for key, (low, high) in _CLOSED.items():
        value = _get(cfg, key)
        if value is not _MISSING and value is not None and not low <= value <= high:
            raise ConfigError(f"{key}={value} is out of range: it must lie in [{low:g}, {high:g}].")
    label_smoothing = _get(cfg, "trainer.label_smoothing")
    if label_smoothing is not _MISSING and label_smoothing >= 1:
        raise ConfigError(f"trainer.label_smoothing={label_smoothing} is out of range: it must be in [0, 1).")
