"""Session fixtures of the data tests (generators in data_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import write_jpeg_tree


@pytest.fixture(scope="session")
def jpeg_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree with a grayscale, a CMYK, an RGBA PNG, a corrupt and a truncated file (read-only use)."""
    return write_jpeg_tree(tmp_path_factory.mktemp("jpeg_tree"))


@pytest.fixture(scope="session")
def clean_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jpeg_tree(tmp_path_factory.mktemp("clean_tree"), per_class=6, awkward=False)
