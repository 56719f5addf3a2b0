"""Triton kernels, one file per kernel: ``@triton.jit`` helpers, the kernel, then its launcher.

Importing this package defines the kernels, so TRITON_INTERPRET=1 must be set before it is
imported for them to run on CPU tensors (the test suite's conftest does that on machines
without CUDA). The launchers assume arguments the public functions have validated.
"""
