"""Codec protocol and registry.

A codec turns one block (a tensor in the spec's layout and dtype) into a payload (a buffer) and
a small ``meta`` dict, and back. Codecs are looked up by name; ``"a+b"`` stacks a lossless stage
``b`` (e.g. ``zstd``) on top of a codec ``a``.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from kvtier.registry import Registry

from ..spec import KVSpec


@runtime_checkable
class Codec(Protocol):
    name: str
    lossless: bool

    def encode(self, block: torch.Tensor, spec: KVSpec) -> tuple[memoryview | bytes, dict]:
        """Payload and meta for one block ``[L, 2, H_kv, T, D]`` of ``spec``."""

    def decode(self, payload, meta: dict, spec: KVSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        """The block back (into ``out`` when given). Raises ValueError on a bad payload."""


_CODECS: Registry[Callable[[], Codec]] = Registry("codec")
_STAGES: Registry[Callable[[Codec], Codec]] = Registry("lossless stage")


def register_codec(name: str, factory: Callable[[], Codec]) -> None:
    """Make ``get_codec(name)`` build a codec with ``factory()``; a taken name is a ValueError."""
    _CODECS.register(factory, name=name)


def register_stage(name: str, wrap: Callable[[Codec], Codec]) -> None:
    """A lossless stage that wraps any codec (``identity+zstd``)."""
    _STAGES.register(wrap, name=name)


def available_codecs() -> list[str]:
    return _CODECS.names()


def get_codec(name: str) -> Codec:
    """The codec for ``name``: a registered codec, optionally followed by ``+stage`` parts."""
    if not isinstance(name, str) or not name:
        raise ValueError("codec name must be a non-empty string")
    base, *stages = name.split("+")
    codec = _CODECS.get(base)()
    for stage in stages:
        codec = _STAGES.get(stage)(codec)
    return codec


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 and fp8 included)."""
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def tensor_from_bytes(payload, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor view of ``payload`` (no copy; read-only buffers give a tensor not to be written)."""
    view = memoryview(payload).cast("B")
    numel = 1
    for s in shape:
        numel *= s
    if view.nbytes != numel * dtype.itemsize:
        raise ValueError(f"payload has {view.nbytes} bytes, expected {numel * dtype.itemsize} for shape {list(shape)} {dtype}")
    if view.nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    import warnings

    with warnings.catch_warnings():  # torch warns that read-only buffers give non-writable tensors
        warnings.simplefilter("ignore")
        return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(tuple(shape))


def codec_for_block(codec: Codec, first: bool) -> Codec:
    """The codec to encode one block with: ``codec.for_block(first)`` where the codec varies with
    the block's place (``first``: the first block of a sequence, no known parent; e.g. ``kivi4s``
    keeps its attention sinks exact), else ``codec``. Decoding never needs it: the payload's meta
    says what was kept."""
    f = getattr(codec, "for_block", None)
    return f(first) if f is not None else codec
