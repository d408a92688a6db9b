"""Progress bars on rank 0: tqdm with rate and ETA, readable in log files as well as terminals.

On a terminal tqdm redraws one line in place. When stderr is not a terminal (a log file, a SLURM job,
CI) redrawing with carriage returns leaves one unreadable megabyte-long line, so the bar is printed as
a new line at most every `log_interval_s` seconds instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress"]

T = TypeVar("T")


class _LineWriter:
    """File wrapper turning tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    initial: int = 0,
    log_interval_s: float = 10.0,
    unit: str = "it",
) -> Iterable[T]:
    """Wrap `iterable` in a tqdm bar (`enabled=False`: returned unchanged, e.g. on non-zero ranks)."""
    if not enabled:
        return iterable
    stream = sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        initial=initial,
        dynamic_ncols=tty,
        leave=not tty,
        file=stream if tty else _LineWriter(stream),
        mininterval=0.5 if tty else log_interval_s,
        maxinterval=max(10.0, log_interval_s) if not tty else 10.0,
        ascii=not tty,
        delay=0.0 if tty else 2.0,  # log files: loops shorter than 2 s leave no progress lines at all
        unit=unit,
    )
