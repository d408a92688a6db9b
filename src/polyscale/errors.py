"""User-facing errors.

Entry points (train.py, evaluate.py) catch `PolyscaleError` and print its message as one paragraph,
without a traceback: each message names the problem and the fix. Programming errors stay ordinary
exceptions with tracebacks.
"""

from __future__ import annotations


class PolyscaleError(Exception):
    """Base class of errors caused by the user's input (config, data, checkpoint, run state)."""


class ConfigError(PolyscaleError, ValueError):
    """Unknown model / conv / data name, invalid combination of options."""


class DataError(PolyscaleError):
    """Missing data root, wrong folder layout, empty class folders, bad image files (on_bad_file=error)."""


class CheckpointError(PolyscaleError):
    """A checkpoint that cannot be read or does not fit the model."""


class NonFiniteLossError(PolyscaleError):
    """The training loss became NaN or inf; the last good checkpoint is kept."""
