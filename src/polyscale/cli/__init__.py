"""Entry-point logic behind the thin `train.py` and `evaluate.py` at the repository root."""

from polyscale.cli.common import open_data_keys, prepare_launch, report_user_errors

__all__ = ["open_data_keys", "prepare_launch", "report_user_errors"]
