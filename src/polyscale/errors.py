"""User-facing errors.

Entry points (train.py, evaluate.py) catch `PolyscaleError` and print its message as one paragraph,
without a traceback: each message names the problem and the fix. Programming errors stay ordinary
exceptions with tracebacks.

The library (ops, models, data) takes plain keyword arguments and knows nothing of the config files.
Its messages mark argument names in backquotes, e.g. "`root`=None: ...". `str(err)` shows them bare
("root=None: ..."); the engine, which knows where each argument comes from, re-renders the same error
with the config keys a user types ("data.root=None: ...") through `PolyscaleError.with_keys`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NonFiniteLossError",
    "PolyscaleError",
    "RunDirError",
    "one_line",
]

_OPTION = re.compile(r"`([A-Za-z_][\w.]*)`")


def one_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class PolyscaleError(Exception):
    """Base class of errors caused by the user's input (config, data, checkpoint, run state)."""

    def __str__(self) -> str:
        return _OPTION.sub(r"\1", super().__str__())

    def with_keys(self, key: Mapping[str, str] | Callable[[str], str] | str) -> PolyscaleError:
        """The same error with every marked argument name rendered as a config key.

        `key` is a prefix ("data." turns `root` into data.root), a mapping (names it lacks stay bare)
        or a function of the name.
        """
        if isinstance(key, str):
            prefix = key
            rename: Callable[[str], str] = lambda name: prefix + name
        elif isinstance(key, Mapping):
            table = key
            rename = lambda name: table.get(name, name)
        else:
            rename = key
        raw = self.args[0] if self.args else ""
        text = _OPTION.sub(lambda m: rename(m.group(1)), raw) if isinstance(raw, str) else raw
        new = type(self).__new__(type(self))
        Exception.__init__(new, text, *self.args[1:])
        new.__dict__.update(self.__dict__)
        return new


class ConfigError(PolyscaleError, ValueError):
    """Unknown model / conv / data name, invalid combination of options."""


class DataError(PolyscaleError):
    """Missing data root, wrong folder layout, empty class folders, bad image files (on_bad_file=error)."""


class CheckpointError(PolyscaleError):
    """A checkpoint that cannot be read or does not fit the model."""


class NonFiniteLossError(PolyscaleError):
    """The training loss became NaN or inf; the last good checkpoint is kept."""


class RunDirError(PolyscaleError):
    """The run directory is in use by another process, or cannot be written."""
