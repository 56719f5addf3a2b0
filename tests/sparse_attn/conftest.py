"""One torch thread for the sparse-attention tests.

The tensors here are tiny; on a busy 2-core box, two OpenMP threads per small op stall on each
other and made these tests 50x slower. Restored after each test.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
