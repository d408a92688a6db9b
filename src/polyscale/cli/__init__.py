"""Entry-point logic behind the thin `train.py` and `evaluate.py` at the repository root."""

from polyscale.cli.common import prepare_launch, report_user_errors

__all__ = ["prepare_launch", "report_user_errors"]
