"""Every registered sparse-attention kernel, every backend, against its float32 reference.

The tolerance comes from the kernel's registration. The Triton kernels run under
``TRITON_INTERPRET=1`` here (the root conftest sets it on machines without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from kvtier.sparse_attn.registry import KERNELS
from tests.contracts.kernel_cases import BUILDERS, GRID

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: two OpenMP threads on a busy 2-core box stall each other (50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_kernel_has_a_case_builder_and_three_implementations():
    assert set(KERNELS) == set(BUILDERS)
    for entry in KERNELS.values():
        assert callable(entry.reference) and callable(entry.torch_impl) and callable(entry.triton_impl), entry.name
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            assert entry.tolerance(dtype).atol > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_kernel_matches_reference(name, case, backend):
    entry = KERNELS[name]
    args = BUILDERS[name](case)
    ref = entry.reference(*args)
    got = entry.impl(backend)(*args)
    entry.assert_close(got, ref, case.dtype)
    outs = got if isinstance(got, tuple) else (got,)
    for t in outs:
        assert not torch.isnan(t.float()).any(), f"{name}/{backend} produced NaN"
    if isinstance(got, tuple):  # (o, lse): an empty state is exactly (0, -inf)
        o, lse = got
        empty = torch.isneginf(lse)
        assert torch.equal(torch.isneginf(ref[1]), empty)
        assert (o.float()[empty] == 0).all()


def _to(x, device, dtype):
    """Move a builder's arguments (tensors, KVLevels, patterns) to ``device``; float16 to ``dtype``
    (float32 tensors are the lse inputs and stay float32)."""
    import dataclasses

    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if x.dtype == torch.float16 else x.to(device)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return type(x)(**{f.name: _to(getattr(x, f.name), device, dtype) for f in dataclasses.fields(x)})
    if isinstance(x, (list, tuple)):
        return type(x)(_to(y, device, dtype) for y in x)
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in GRID if c.dtype == torch.float16], ids=lambda c: c.id)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_kernel_matches_reference_on_gpu_in_bf16(name, case):
    """bf16 only here: Triton's interpreter computes bf16 wrongly on the CPU."""
    entry = KERNELS[name]
    args = _to(BUILDERS[name](case), torch.device("cuda"), torch.bfloat16)
    entry.assert_close(entry.impl("triton")(*args), entry.reference(*args), torch.bfloat16)
