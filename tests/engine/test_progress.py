"""Progress bars readable in log files (the run directory's tests are in test_run_dir.py)."""

from __future__ import annotations

import io

from polyscale.engine.progress import _LineWriter, progress


def test_non_tty_progress_becomes_whole_lines() -> None:
    sink = io.StringIO()
    writer = _LineWriter(sink)
    writer.write("\rtrain 1:  10%|#         | 1/10 [00:01<00:09]")
    writer.write("\r")
    writer.write("\rtrain 1: 100%|##########| 10/10 [00:02<00:00]\n")
    assert sink.getvalue().splitlines() == [
        "train 1:  10%|#         | 1/10 [00:01<00:09]",
        "train 1: 100%|##########| 10/10 [00:02<00:00]",
    ]


def test_disabled_progress_returns_the_iterable_itself() -> None:
    items = [1, 2, 3]
    assert progress(items, desc="x", enabled=False) is items
    assert list(progress(items, desc="x", enabled=True)) == items
