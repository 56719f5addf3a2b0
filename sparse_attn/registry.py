"""The kernel registry: one entry per kernel, with its three implementations and its tolerance.

Every kernel has
  - ``reference``: float32 torch code, written for clarity (it materializes whatever it likes);
    it is the specification the others are held to;
  - ``torch_impl``: the CPU path (it also runs on CUDA), chunked over keys so that memory
    stays bounded however long the cache is;
  - ``triton_impl``: the Triton launcher (``None`` where Triton is not installed).

All three take the same arguments as the public function, less ``backend`` (and less
``check_indices`` where the public function has it). The tolerance an implementation is held to
against the reference depends on the dtype of the inputs, and lives here, next to the
registration (``register(...)`` in each kernel's module), not in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from kvtier.registry import Registry


@dataclass(frozen=True)
class Tolerance:
    """``|got - ref| <= atol + rtol * |ref|`` elementwise (``torch.testing.assert_close``)."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class KernelEntry:
    name: str
    reference: Callable
    torch_impl: Callable
    triton_impl: Callable | None
    # Tolerance per input dtype (the dtype of q, or of o for the merges).
    tolerances: Mapping[torch.dtype, Tolerance] = field(default_factory=dict)

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        if dtype not in self.tolerances:
            raise ValueError(f"kernel {self.name!r} declares no tolerance for {dtype}; it has {sorted(map(str, self.tolerances))}")
        return self.tolerances[dtype]

    def impl(self, backend: str) -> Callable:
        """The implementation a (resolved) backend runs: ``"triton"`` or ``"torch"``."""
        if backend == "triton":
            if self.triton_impl is None:
                raise ValueError(f"kernel {self.name!r} has no Triton implementation here (is triton installed?)")
            return self.triton_impl
        if backend == "torch":
            return self.torch_impl
        raise ValueError(f"backend must be 'triton' or 'torch' once resolved, got {backend!r}")

    def assert_close(self, got, ref, dtype: torch.dtype) -> None:
        """Compare an implementation's output (a tensor or a tuple of them) with the reference's.

        Outputs are compared in float32; ``-inf`` must match ``-inf`` exactly.
        """
        tol = self.tolerance(dtype)
        got_t = got if isinstance(got, (tuple, list)) else (got,)
        ref_t = ref if isinstance(ref, (tuple, list)) else (ref,)
        if len(got_t) != len(ref_t):
            raise AssertionError(f"{self.name}: {len(got_t)} outputs, the reference has {len(ref_t)}")
        for i, (g, r) in enumerate(zip(got_t, ref_t)):
            if tuple(g.shape) != tuple(r.shape):
                raise AssertionError(f"{self.name}: output {i} has shape {list(g.shape)}, the reference {list(r.shape)}")
            torch.testing.assert_close(
                g.float().cpu(),
                r.float().cpu(),
                atol=tol.atol,
                rtol=tol.rtol,
                msg=lambda m, i=i: f"{self.name} output {i} ({dtype}): {m}",
            )


KERNELS: Registry[KernelEntry] = Registry("kernel")


def register(entry: KernelEntry) -> KernelEntry:
    """Register a kernel's entry under its name; a taken name is a ValueError."""
    return KERNELS.register(entry, name=entry.name)


def get_kernel(name: str) -> KernelEntry:
    return KERNELS.get(name)


def available_kernels() -> Sequence[str]:
    return KERNELS.names()


# Tolerances shared by the attention kernels: float32 accumulation everywhere, so the error is
# the rounding of the output to the input dtype plus a different summation order.
ATTENTION_TOLERANCES: Mapping[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=2e-5, rtol=2e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2),
}
