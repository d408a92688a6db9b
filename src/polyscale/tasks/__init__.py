"""Tasks: what differs between kinds of training; the engine runs any of them with one loop.

A task is a module `polyscale.tasks.NAME` defining `TASK`, an instance of `polyscale.tasks.base.Task`,
selected with `task=NAME` (configs/task/NAME.yaml). Adding a task is a new module plus its configs; the
engine needs no edit (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from polyscale.errors import ConfigError
from polyscale.tasks.base import BatchLoss, Checkpoint, DataBundle, Runtime, Task

__all__ = ["BatchLoss", "Checkpoint", "DataBundle", "Runtime", "Task", "get_task", "list_tasks"]

_NOT_TASKS = {"arguments", "base"}


def list_tasks() -> list[str]:
    """Names of the task modules in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_TASKS)


def get_task(name: str) -> Task:
    """The `TASK` of module polyscale.tasks.NAME; an unknown name lists the known ones."""
    if name not in list_tasks():
        raise ConfigError(
            f"Unknown task {name!r}: choose task=NAME with NAME one of {', '.join(list_tasks())}."
        )
    task = importlib.import_module(f"polyscale.tasks.{name}").TASK
    if not isinstance(task, Task):
        raise TypeError(f"polyscale.tasks.{name}.TASK is a {type(task).__name__}, not a polyscale.tasks.Task")
    return task
