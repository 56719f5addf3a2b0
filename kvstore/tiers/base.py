"""The StorageTier protocol, its capabilities, and the accounting every tier shares.

A tier is storage and nothing more: it stores what it is given while it has room, returns what it
has, and counts. Which block leaves a tier, and where it goes, is the TieredStore's decision.

Conventions for every tier:
- batched calls; keys are 32-byte ``BlockHash`` values; every call names the ``KVSpec`` its
  keys belong to (shared tiers such as Redis put the spec's fingerprint into their own keys, so one
  server can hold several models and be scanned per model); blocks are tensors
  ``[L, 2, H_kv, T, D]`` of that spec;
- ``put`` returns, per block, the bytes it now occupies in the tier (0: refused for lack of room;
  a key already present is kept as it is and its size returned);
- ``get`` returns, per key, the block or ``None`` (a miss). Anything found but wrong (checksum,
  key or spec mismatch, truncation) is a miss, is removed, and is counted in ``corrupt``;
- a tier never holds more than ``capacity_bytes`` (``None``: bounded elsewhere, e.g. Redis
  ``maxmemory``).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, runtime_checkable

import torch

from ..codecs import Codec
from ..spec import KVSpec

if TYPE_CHECKING:
    from ..pages import PageLayout


@dataclass(frozen=True)
class TierCapabilities:
    """What a tier is, declared once (no ``supports_x()`` methods)."""

    device: str  # where the bytes live: "cuda", "cpu", "disk", "redis"
    persistent: bool  # survives a restart of this process
    shared: bool  # other kvtier processes see the same blocks
    framed: bool  # blocks are stored as checksummed frames (verified on every read)
    iterable: bool = False  # lists the keys it holds for a spec: ``iter_keys(spec)`` (a restart re-adopts them)
    range_reads: bool = False  # serves byte ranges of paged blocks (page_layouts / read_spans)


@dataclass
class TierStats:
    name: str
    blocks: int = 0
    bytes: int = 0
    capacity_bytes: int | None = None
    hits: int = 0
    misses: int = 0
    puts: int = 0
    refused: int = 0  # puts refused for lack of room
    removed: int = 0
    corrupt: int = 0  # frames found wrong on read (a miss, deleted)
    errors: int = 0  # backend errors (I/O, connection); the call degraded to a miss / no-op

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class StorageTier(Protocol):
    name: str
    capabilities: TierCapabilities
    codec: Codec

    @property
    def capacity_bytes(self) -> int | None: ...

    @property
    def used_bytes(self) -> int: ...

    def contains(self, keys: Sequence[bytes], *, spec: KVSpec) -> list[bool]: ...

    def contains_prefix(self, keys: Sequence[bytes], *, spec: KVSpec) -> int:
        """How many leading keys of the chain are present."""

    def get(self, keys: Sequence[bytes], *, spec: KVSpec, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]: ...

    def put(
        self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor], *, spec: KVSpec, first: Sequence[bool] | None = None
    ) -> list[int]: ...

    def remove(self, keys: Sequence[bytes], *, spec: KVSpec) -> int:
        """Remove the keys present; returns how many were removed."""

    def stats(self) -> TierStats: ...

    def close(self) -> None: ...


@runtime_checkable
class RangeReadable(Protocol):
    """A tier that serves byte ranges of the blocks it holds with a page-addressable codec
    (``capabilities.range_reads``). Spans are ``(offset, nbytes)`` relative to a block's payload;
    the tier adds where the payload starts in what it stores. Bytes come back unverified: the
    caller checks them against the layout's checksums (``kvstore.pages``)."""

    def page_layouts(self, keys: Sequence[bytes], *, spec: KVSpec) -> list["PageLayout | None"]:
        """Per key, the layout of the block held (``None``: absent, or not page-addressable)."""

    def read_spans(self, requests: Sequence[tuple[bytes, Sequence[tuple[int, int]]]], *, spec: KVSpec) -> list[list[memoryview] | None]:
        """Per (key, spans), the bytes of every span (``None``: the block is absent or shorter)."""


class TierBase:
    """Shared argument checks and counters. Subclasses hold the bytes."""

    capabilities: TierCapabilities
    contains: Callable[..., list[bool]]  # each subclass's own (StorageTier.contains)

    def __init__(self, name: str, codec: Codec, capacity_bytes: int | None) -> None:
        if capacity_bytes is not None and (not isinstance(capacity_bytes, int) or capacity_bytes < 0):
            raise ValueError(f"capacity_bytes must be a non-negative int or None, got {capacity_bytes!r}")
        self.name = name
        self.codec = codec
        self._capacity = capacity_bytes
        self._stats = TierStats(name=name, capacity_bytes=capacity_bytes)
        self._lock = threading.RLock()

    @property
    def capacity_bytes(self) -> int | None:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._stats.bytes

    def contains_prefix(self, keys: Sequence[bytes], *, spec: KVSpec) -> int:
        n = 0
        for present in self.contains(keys, spec=spec):
            if not present:
                break
            n += 1
        return n

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**asdict(self._stats))

    def close(self) -> None:
        pass

    # -- helpers for subclasses ------------------------------------------------------------
    @staticmethod
    def _check_put(keys: Sequence[bytes], blocks: Sequence[torch.Tensor], spec: KVSpec, first=None) -> None:
        if len(keys) != len(blocks):
            raise ValueError(f"put needs one block per key: got {len(keys)} keys and {len(blocks)} blocks")
        if first is not None and len(first) != len(keys):
            raise ValueError(f"first needs one flag per key: got {len(keys)} keys and {len(first)} flags")
        for k in keys:
            if not isinstance(k, (bytes, bytearray)) or len(k) != 32:
                raise ValueError("every key must be a 32-byte BlockHash")
        for b in blocks:
            spec.check_block(b)

    @staticmethod
    def _check_out(keys: Sequence[bytes], out: Sequence[torch.Tensor] | None, spec: KVSpec) -> None:
        if out is None:
            return
        if len(out) != len(keys):
            raise ValueError(f"get needs one out buffer per key: got {len(keys)} keys and {len(out)} buffers")
        for o in out:
            spec.check_block(o)

    def _fits(self, nbytes: int) -> bool:
        return self._capacity is None or self._stats.bytes + nbytes <= self._capacity
