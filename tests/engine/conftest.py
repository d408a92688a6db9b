"""Engine tests run training in-process: restore the global torch flags a run sets (deterministic mode).

(One intra-op thread for in-process tests comes from tests/conftest.py.)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # engine_helpers


@pytest.fixture(autouse=True)
def _restore_torch_flags() -> Iterator[None]:
    deterministic = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
