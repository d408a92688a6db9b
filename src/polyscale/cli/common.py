"""What both entry points do before and around Hydra: process group, run stamp, schemas, error reports."""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
from collections.abc import Iterator

from omegaconf import OmegaConf

from polyscale.config import register_configs
from polyscale.engine.distributed import (
    destroy_distributed,
    dist_info,
    init_distributed,
    init_run_stamp,
    run_stamp,
)
from polyscale.errors import PolyscaleError

__all__ = ["EXIT_USER_ERROR", "open_data_keys", "prepare_launch", "report_user_errors"]

EXIT_USER_ERROR = 2

# Ranks other than 0 write nothing: no .hydra/ folder, no log file (warnings still reach stderr).
_NON_ZERO_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none")
_prepared = False


def prepare_launch(argv: list[str] | None = None) -> list[str]:
    """Call before Hydra composes. Joins torchrun's process group, fixes the run stamp all ranks agree on,
    registers the schemas and the `${polyscale_stamp:}` resolver, and (rank > 0) turns off Hydra's files.

    `argv` (default sys.argv) is extended in place with the overrides for non-zero ranks and returned.
    """
    argv = sys.argv if argv is None else argv
    global _prepared
    init_distributed()
    init_run_stamp()
    if not _prepared:
        atexit.register(destroy_distributed)
        _prepared = True
    register_configs()
    if not OmegaConf.has_resolver("polyscale_stamp"):
        OmegaConf.register_new_resolver("polyscale_stamp", run_stamp)
    if dist_info().rank > 0:
        argv.extend(o for o in _NON_ZERO_RANK_OVERRIDES if o not in argv)
    return argv


def open_data_keys(argv: list[str]) -> list[str]:
    """evaluate.py: `data.KEY=VALUE` without a `data=NAME` choice changes the data section stored in the
    checkpoint, whose schema is known only once the checkpoint is read; Hydra is told to accept the key
    (`+data.KEY=VALUE`) and the engine checks it against the stored data set's schema. In place."""
    if any(arg.startswith("data=") for arg in argv):
        return argv
    for i, arg in enumerate(argv):
        if arg.startswith("data.") and "=" in arg:
            argv[i] = "+" + arg
    return argv


@contextlib.contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn a PolyscaleError into its one-paragraph message on stderr and exit code 2, without a traceback."""
    try:
        yield
    except PolyscaleError as err:
        info = dist_info()
        prefix = f"[rank {info.rank}] " if info.distributed else ""
        message = f"{prefix}Error ({type(err).__name__}): {err}"
        sys.stderr.write(f"\n{message}\n")
        sys.stderr.flush()
        _to_log_files(message)
        sys.exit(EXIT_USER_ERROR)


def _to_log_files(message: str) -> None:
    """Also put the message into the run's log file (Hydra's train.log), where the run's story is read
    later; the console already has it on stderr."""
    record = logging.LogRecord("polyscale", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
