"""Test-wide set-up: markers, the Triton interpreter on CPU-only machines, Redis fixtures."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton runs on the CPU only through its interpreter, and the variable must be set before
    # any kernel is defined (i.e. before sparse_attn or the codec kernels are imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Redis servers (single node, TLS, 3-node cluster) started by the tests on free loopback ports.
pytest_plugins = ["tests.redis_servers"]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
