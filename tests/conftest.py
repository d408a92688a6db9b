"""Project-wide test settings.

In-process tests run torch with one intra-op thread. Their tensors are small, and on a 2-core CI
machine (or a busy one) OpenMP barriers waiting for a descheduled thread made the model-zoo tests
3-4x slower than single-threaded. Subprocess tests (train.py / torchrun runs) keep torch's default.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
