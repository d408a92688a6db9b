"""Operator tests: same random state for every test, and one intra-op thread.

The tensors here are tiny, so threads only add synchronisation; on a busy 2-core machine OpenMP
barriers waiting for a descheduled thread made single float64 convs take 30 ms instead of 0.1 ms.
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
