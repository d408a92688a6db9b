"""Schema of the `data` config group: the data package's own `DataOptions`, so the config keys are the
keyword arguments of `polyscale.data` (one definition of every field, its type and its default)."""

from __future__ import annotations

from dataclasses import dataclass

from polyscale.data.options import DataOptions

__all__ = ["DataConfig"]


@dataclass
class DataConfig(DataOptions):
    """Data set and input pipeline (`data=NAME`); the fields are documented in polyscale.data.DataOptions."""
