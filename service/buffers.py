"""A bounded pool of reusable byte buffers for block transfers.

Fresh multi-megabyte allocations cost page faults on every request (the kernel zeroes each new
page); a transfer that takes its buffers from this pool and gives them back reuses memory that is
already mapped. At most ``max_bytes`` are kept while idle; anything beyond is freed on release.
"""

from __future__ import annotations

import threading

import torch


class BufferPool:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[torch.Tensor]] = {}  # nbytes -> idle uint8 buffers
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int, count: int = 1) -> list[torch.Tensor]:
        """``count`` uint8 tensors of ``nbytes`` each (reused when idle ones of that size exist)."""
        out: list[torch.Tensor] = []
        with self._lock:
            free = self._free.get(nbytes, [])
            while free and len(out) < count:
                out.append(free.pop())
                self._idle_bytes -= nbytes
        out += [torch.empty(nbytes, dtype=torch.uint8) for _ in range(count - len(out))]
        return out

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            for b in buffers:
                n = b.numel()
                if self._idle_bytes + n > self.max_bytes:
                    continue  # dropped: freed by the garbage collector
                self._free.setdefault(n, []).append(b)
                self._idle_bytes += n

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes
