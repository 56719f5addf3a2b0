"""In-process tiers: HostTier (CPU memory, pinned when CUDA is present) and DeviceTier
(a preallocated slot pool on ``cuda``, or on ``cpu`` where there is no GPU).

Both live in process memory, so blocks are not framed or checksummed here (nothing crosses a
process boundary); the bytes are the codec's payload.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Sequence

import torch

from kvtier.threads import lower_thread_priority

from ..codecs import Codec, codec_for_block, get_codec
from ..spec import KVSpec
from .base import TierBase, TierCapabilities


log = logging.getLogger("kvtier.tiers")

# the reserve's thread touches a buffer this many bytes at a time, and gives up between two chunks
# when a put needs the room: a put never waits for it, and the tier's memory exceeds its bound by at
# most the part of that one buffer already touched, for at most the time one chunk takes
_FILL_CHUNK = 1 << 20
# the reserve's thread runs this much lower in CPU priority (nice) than the process
_FILL_NICE = 19
# the tier's thread looks this often whether its spares have been idle long enough to be freed
_TRIM_EVERY_S = 1.0


def _as_codec(codec: str | Codec) -> Codec:
    return get_codec(codec) if isinstance(codec, str) else codec


def default_warm_reserve_bytes(capacity_bytes: int) -> int:
    """The warm reserve a HostTier keeps when not told: an eighth of its capacity, at most 64 MiB."""
    return min(capacity_bytes // 8, 64 << 20)


class HostTier(TierBase):
    """Blocks in CPU memory, one buffer per block.

    With the identity codec a block is kept as a tensor (pinned when CUDA is available, so that
    host→device copies are asynchronous); with another codec the encoded payload is kept.

    The buffers of removed identity blocks are kept as spares and reused by later puts of the same
    size: a copy into memory the process already touched costs a fraction of one into fresh pages
    (6 MiB: about 0.2 ms against 3-4 ms of page faults on the CPU box of docs/data-path.md), as an
    allocator such as Redis's jemalloc reuses the memory of deleted values. Spares count against the
    capacity (``used_bytes + spare bytes <= capacity_bytes``; a put that needs room drops spares
    first), so the tier's memory stays bounded; they are at most ``max_spare_bytes`` (None: the
    capacity). Spares nobody took for ``spare_idle_s`` seconds (no put took one meanwhile) are
    freed, down to the warm reserve, by the tier's background thread (None: never; the thread then
    only fills the reserve). A buffer a ``get`` is still copying out of is never recycled.

    A tier that is still growing removes nothing, so it has no spares of its own: a **warm reserve**
    fills the gap. While the tier has room (``used_bytes + spare bytes + the next buffer <=
    capacity_bytes``), a background thread at a lower CPU priority keeps up to
    ``warm_reserve_bytes`` of spares of the size of the last identity put, their pages already
    touched, so a put copies into memory that costs no page faults. The reserve is spares: it
    counts against the capacity, a put that needs its room drops it (and has the thread give up the
    buffer it is touching, at the next 1 MiB chunk: until then the tier holds up to that buffer's
    touched part beyond its bound), and it is never more than a quarter of the capacity.
    ``warm_reserve_bytes``: None is ``default_warm_reserve_bytes(capacity_bytes)`` (an eighth of
    the capacity, at most 64 MiB); 0 turns it off. The thread starts at the first put.
    """

    capabilities = TierCapabilities(device="cpu", persistent=False, shared=False, framed=False, range_reads=True)

    def __init__(
        self,
        capacity_bytes: int,
        *,
        codec: str | Codec = "identity",
        name: str = "host",
        pin_memory: bool | None = None,
        warm_reserve_bytes: int | None = None,
        max_spare_bytes: int | None = None,
        spare_idle_s: float | None = 10.0,
    ) -> None:
        if capacity_bytes is None:
            raise ValueError("HostTier needs a capacity_bytes (memory must stay bounded)")
        if warm_reserve_bytes is not None and (
            isinstance(warm_reserve_bytes, bool) or not isinstance(warm_reserve_bytes, int) or warm_reserve_bytes < 0
        ):
            raise ValueError(f"warm_reserve_bytes must be a non-negative int or None, got {warm_reserve_bytes!r}")
        if max_spare_bytes is not None and (
            isinstance(max_spare_bytes, bool) or not isinstance(max_spare_bytes, int) or max_spare_bytes < 0
        ):
            raise ValueError(f"max_spare_bytes must be a non-negative int or None, got {max_spare_bytes!r}")
        if spare_idle_s is not None and (
            isinstance(spare_idle_s, bool) or not isinstance(spare_idle_s, (int, float)) or not 0 < spare_idle_s < float("inf")
        ):
            raise ValueError(f"spare_idle_s must be a positive number of seconds or None, got {spare_idle_s!r}")
        super().__init__(name, _as_codec(codec), capacity_bytes)
        reserve = default_warm_reserve_bytes(capacity_bytes) if warm_reserve_bytes is None else warm_reserve_bytes
        self.warm_reserve_bytes = min(reserve, capacity_bytes // 4)  # the reserve is at most a quarter of the capacity
        self.max_spare_bytes = capacity_bytes if max_spare_bytes is None else min(max_spare_bytes, capacity_bytes)
        self.spare_idle_s = None if spare_idle_s is None else float(spare_idle_s)
        self._pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        # key -> (payload tensor (uint8) , meta, nbytes)
        self._entries: dict[bytes, tuple[torch.Tensor, dict, int]] = {}
        self._spares: dict[int, list[torch.Tensor]] = {}  # nbytes -> flat uint8 buffers of removed identity blocks
        self._spare_bytes = 0
        self._reading: dict[int, int] = {}  # id(stored buffer) -> gets copying out of it now
        # the warm reserve (see the class docstring): the size it keeps buffers of, the bytes of the
        # buffer being touched now (counted against the capacity from the start), a put's request
        # that the thread give that buffer up, and the thread's wake-up
        self._reserve_size = 0
        self._filling = 0
        self._fill_cancel = False
        self._fill_wake = threading.Event()
        self._fill_thread: threading.Thread | None = None
        self.num_reserve_fills = 0  # buffers the reserve's thread touched and kept
        self.num_reserve_hits = 0  # puts that took a spare (recycled or from the reserve) instead of fresh pages
        self.num_spares_freed = 0  # spares freed because nobody took them for spare_idle_s
        self._spare_used_at: dict[int, float] = {}  # spare size -> when a put last took one, or one was last kept
        # buffers handed out by ``lease`` and not yet stored or handed back: data_ptr -> the buffer (held, so the
        # address cannot be reused by another allocation while it names a lease)
        self._leased: dict[int, torch.Tensor] = {}
        self.num_adopted = 0  # blocks stored without a copy: the put's block was a buffer this tier leased

    @property
    def spare_bytes(self) -> int:
        return self._spare_bytes

    def _bound_bytes(self) -> int:
        """What counts against the capacity: stored (and reserved) bytes, spares, a buffer being touched."""
        return self._stats.bytes + self._spare_bytes + self._filling

    def _wake_reserve(self, nbytes: int) -> None:
        """After an identity put of ``nbytes`` (under the lock): the reserve keeps that size, and its thread is
        woken if it is short."""
        if not self.warm_reserve_bytes or nbytes > self.warm_reserve_bytes:
            return
        self._reserve_size = nbytes
        if len(self._spares.get(nbytes, ())) * nbytes + self._filling + nbytes > self.warm_reserve_bytes:
            return
        self._start_thread()
        self._fill_wake.set()

    def _start_thread(self) -> None:
        """The tier's background thread (under the lock): it fills the warm reserve and frees idle spares."""
        if self._fill_thread is None:
            self._fill_thread = threading.Thread(
                target=_fill_loop, args=(weakref.ref(self), self._fill_wake), name=f"kvtier-{self.name}-reserve", daemon=True
            )
            _FILL_THREADS.add(self._fill_thread)
            _FILL_WAKES.add(self._fill_wake)
            self._fill_thread.start()

    def _trim_idle_spares(self, now: float | None = None) -> int:
        """Free the spares of each size no put took (and none was kept) for ``spare_idle_s``, down to the warm
        reserve (on the tier's background thread). Returns the bytes freed."""
        if self.spare_idle_s is None:
            return 0
        now = time.monotonic() if now is None else now
        freed = 0
        with self._lock:
            for size in list(self._spares):
                if now - self._spare_used_at.get(size, 0.0) < self.spare_idle_s:
                    continue
                bufs = self._spares[size]
                # the reserve's own size keeps what the reserve would hold
                allowed = self.warm_reserve_bytes // size if self.warm_reserve_bytes and size == self._reserve_size else 0
                while len(bufs) > allowed:
                    bufs.pop()
                    self._spare_bytes -= size
                    self.num_spares_freed += 1
                    freed += size
                if not bufs:
                    del self._spares[size]
                    self._spare_used_at.pop(size, None)
        return freed

    def _fill_reserve(self) -> None:
        """Touch spares of the reserve's size until it holds ``warm_reserve_bytes`` or the tier has no room
        (on the reserve's thread)."""
        capacity = self._capacity
        assert capacity is not None  # __init__ refuses None
        while True:
            with self._lock:
                n = self._reserve_size
                held = len(self._spares.get(n, ())) * n
                if (
                    not n
                    or held + n > self.warm_reserve_bytes
                    or self._spare_bytes + n > capacity // 4
                    or self._bound_bytes() + n > capacity
                ):
                    return
                self._filling, self._fill_cancel = n, False
            buf = None
            try:
                buf = torch.empty(n, dtype=torch.uint8, pin_memory=self._pin)
                for off in range(0, n, _FILL_CHUNK):
                    if self._fill_cancel or _EXITING.is_set():  # a put needs the room, or the process exits
                        buf = None
                        break
                    buf[off : off + _FILL_CHUNK].zero_()  # the pages are faulted in here, not in a put
            finally:
                with self._lock:
                    self._filling = 0
                    kept = buf is not None and not self._fill_cancel and self._bound_bytes() + n <= capacity
                    if kept:
                        self._spares.setdefault(n, []).append(buf)
                        self._spare_bytes += n
                        self._spare_used_at[n] = time.monotonic()
                        self.num_reserve_fills += 1
            if not kept:
                return

    def _take_buffer(self, nbytes: int) -> torch.Tensor | None:
        """A spare of ``nbytes`` (None: none); drops other spares while they would push the tier over
        its capacity. Called under the lock, after ``nbytes`` were reserved in ``_stats.bytes``."""
        buf = self._pop_spare(nbytes)
        if buf is None:
            self._trim_spares()
        return buf

    def _pop_spare(self, nbytes: int) -> torch.Tensor | None:
        """Take a spare of ``nbytes`` out of the spares (under the lock); None: none kept."""
        spares = self._spares.get(nbytes)
        if not spares:
            return None
        self._spare_bytes -= nbytes
        buf = spares.pop()
        if not spares:
            del self._spares[nbytes]
        self.num_reserve_hits += 1
        self._spare_used_at[nbytes] = time.monotonic()
        return buf

    def _trim_spares(self) -> None:
        """Drop spares while they push the tier over its capacity (under the lock, after a put reserved its bytes)."""
        if self._capacity is not None:
            while self._spares and self._bound_bytes() > self._capacity:
                size, bufs = next(iter(self._spares.items()))
                bufs.pop()
                self._spare_bytes -= size
                if not bufs:
                    del self._spares[size]
            if self._filling and self._bound_bytes() > self._capacity:
                self._fill_cancel = True  # the buffer being touched gives its room to this put

    def _recycle(self, entry: tuple[torch.Tensor, dict, int]) -> None:
        """Keep a removed entry's buffer as a spare (under the lock; its bytes already released)."""
        buf, meta, nbytes = entry
        if meta or self.codec.name != "identity" or id(buf) in self._reading or not buf.is_contiguous():
            return  # a paged payload may have views handed out (read_spans); a buffer being read is left alone
        if self._capacity is not None and (
            self._spare_bytes + self._filling + nbytes > self.max_spare_bytes or self._bound_bytes() + nbytes > self._capacity
        ):
            return  # at most max_spare_bytes are held as spares, and used + spares never pass the capacity
        self._spares.setdefault(nbytes, []).append(buf.reshape(-1).view(torch.uint8))
        self._spare_bytes += nbytes
        self._spare_used_at[nbytes] = time.monotonic()
        if self.spare_idle_s is not None:
            self._start_thread()  # frees them if they stay idle

    def lease(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer of ``nbytes`` for a block the caller is about to put (a spare when one of
        that size is kept, its pages already touched; else a new one, pinned as the tier's buffers are).

        A ``put`` of a block whose bytes are exactly this buffer (any typed view of it) **adopts** it: the
        tier keeps the buffer as the stored block instead of copying it. The caller must not write the
        buffer once it was put, and hands it back with ``unlease`` whatever happened (a buffer the tier
        adopted is then left alone; one it did not take goes back to the spares). A leased buffer is
        not counted against the capacity until it is stored: the caller bounds how many it holds
        (the local transport: one request's blocks per transfer slot)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        buf = None
        with self._lock:
            if self.codec.name == "identity":
                buf = self._pop_spare(nbytes)
                self._wake_reserve(nbytes)  # the next lease finds a warm buffer too
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)
        with self._lock:
            self._leased[buf.data_ptr()] = buf
        return buf

    def unlease(self, buf: torch.Tensor, *, recycle: bool = True) -> None:
        """Hand back a buffer of ``lease``. One the tier did not adopt is kept as a spare (when it has room)
        if ``recycle``; pass False while something may still read it (it is then freed with its last reference)."""
        with self._lock:
            held = self._leased.pop(buf.data_ptr(), None)
            if held is None or not recycle:
                return  # adopted by a put (the stored block now), not ours, or still read elsewhere
            self._recycle((held, {}, held.numel()))

    def entry_token(self, key: bytes) -> object | None:
        """An opaque token of the entry stored under ``key`` now (None: none). ``holds(key, token)`` is True
        while that very entry stays: one removed meanwhile (its buffer possibly reused) never matches again."""
        return self._entries.get(bytes(key))

    @staticmethod
    def entry_block(token: object | None) -> torch.Tensor | None:
        """The stored block of an ``entry_token`` (identity codec: the tensor itself, never to be written)."""
        return None if token is None else token[0]  # type: ignore[index]

    def holds(self, key: bytes, token: object | None) -> bool:
        return token is not None and self._entries.get(bytes(key)) is token

    def _adoptable(self, block: torch.Tensor, nbytes: int) -> torch.Tensor | None:
        """The leased buffer ``block`` is a view of, whole (under the lock), taken out of the leases; else None."""
        if not self._leased or block.device.type != "cpu" or not block.is_contiguous():
            return None
        held = self._leased.get(block.data_ptr())
        if held is None or held.numel() != nbytes or block.numel() * block.element_size() != nbytes:
            return None
        del self._leased[block.data_ptr()]
        return held

    def contains(self, keys: Sequence[bytes], *, spec: KVSpec) -> list[bool]:
        entries = self._entries
        return [bytes(k) in entries for k in keys]

    def put(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor], *, spec: KVSpec, first: Sequence[bool] | None = None) -> list[int]:
        """The tier's lock covers its bookkeeping; encoding and copying run outside it, on bytes
        reserved first (so concurrent puts never overshoot the capacity, and gets never wait on a copy)."""
        self._check_put(keys, blocks, spec, first)
        sizes = []
        identity = self.codec.name == "identity"
        for i, (key, block) in enumerate(zip(keys, blocks)):
            key = bytes(key)
            entry = self._entries.get(key)
            if entry is not None:
                sizes.append(entry[2])
                continue
            codec = codec_for_block(self.codec, bool(first[i])) if first is not None else self.codec
            payload, meta = codec.encode(block, spec)
            nbytes = memoryview(payload).nbytes
            adopted = None
            with self._lock:
                if not self._fits(nbytes):
                    self._stats.refused += 1
                    sizes.append(0)
                    continue
                self._stats.bytes += nbytes  # reserved before the copy
                adopted = self._adoptable(block, nbytes) if identity else None
                if adopted is not None:
                    self._trim_spares()
                    buf = adopted
                else:
                    buf = self._take_buffer(nbytes) if identity else None
                if identity:
                    self._wake_reserve(nbytes)
            if buf is None:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)
            if identity:
                if adopted is None:
                    buf.copy_(block.detach().reshape(-1).view(torch.uint8))
                # kept as a typed view in the block's layout: get is then one copy_
                buf = buf.view(spec.torch_dtype).view(spec.block_shape)
            else:
                buf.numpy()[:] = memoryview(payload).cast("B")
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:  # a concurrent put of the same block landed first
                    self._stats.bytes -= nbytes
                    if adopted is not None:
                        self._leased[adopted.data_ptr()] = adopted  # still the caller's lease: unlease recycles it
                    sizes.append(entry[2])
                    continue
                self._entries[key] = (buf, meta, nbytes)
                self._stats.blocks += 1
                self._stats.puts += 1
                if adopted is not None:
                    self.num_adopted += 1
            sizes.append(nbytes)
        return sizes

    def get(self, keys: Sequence[bytes], *, spec: KVSpec, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        self._check_out(keys, out, spec)
        reading = self._reading
        with self._lock:  # an entry never changes once stored: copied without the lock, marked as being read
            entries = [self._entries.get(bytes(key)) for key in keys]
            for entry in entries:
                if entry is not None:
                    reading[id(entry[0])] = reading.get(id(entry[0]), 0) + 1
        counts = [0, 0, 0]  # hits, misses, corrupt
        try:
            return self._copy_out(entries, spec, out, counts)
        finally:
            with self._lock:
                for entry in entries:
                    if entry is not None:
                        n = reading.pop(id(entry[0])) - 1
                        if n:
                            reading[id(entry[0])] = n
                self._stats.hits += counts[0]
                self._stats.misses += counts[1]
                self._stats.corrupt += counts[2]

    def _copy_out(self, entries, spec: KVSpec, out, counts: list[int]) -> list[torch.Tensor | None]:
        result: list[torch.Tensor | None] = []
        identity = self.codec.name == "identity"
        shape, dtype = spec.block_shape, spec.torch_dtype
        hits = misses = corrupt = 0
        for i, entry in enumerate(entries):
            if entry is None:
                misses += 1
                result.append(None)
                continue
            buf, meta, _ = entry
            dst = out[i] if out is not None else None
            try:
                if identity:
                    # buf is the stored block itself (a typed view, see put)
                    if buf.shape != shape or buf.dtype != dtype:
                        raise ValueError("stored block does not match the spec")
                    block = dst.copy_(buf) if dst is not None else buf.clone()
                else:
                    block = self.codec.decode(memoryview(buf.numpy()), meta, spec, out=dst)
            except ValueError:
                # asked with another spec than the block was stored with: a miss, never wrong KV
                corrupt += 1
                misses += 1
                result.append(None)
                continue
            hits += 1
            result.append(block)
        counts[:] = hits, misses, corrupt
        return result

    def remove(self, keys: Sequence[bytes], *, spec: KVSpec) -> int:
        n = 0
        with self._lock:
            for key in keys:
                entry = self._entries.pop(bytes(key), None)
                if entry is not None:
                    self._stats.bytes -= entry[2]
                    self._stats.blocks -= 1
                    self._stats.removed += 1
                    self._recycle(entry)
                    n += 1
        return n

    def keys(self) -> list[bytes]:
        return list(self._entries)

    # -- range reads (paged codecs): views of the stored payload, no copy ----------------------
    def page_layouts(self, keys: Sequence[bytes], *, spec: KVSpec) -> list:
        from ..pages import PageLayout

        out = []
        for key in keys:
            entry = self._entries.get(bytes(key))
            layout = None
            if entry is not None:
                try:
                    layout = PageLayout.from_meta(key, spec, self.codec, entry[1])
                except ValueError:  # stored under another spec's geometry: not this block
                    layout = None
            out.append(layout)
        return out

    def read_spans(self, requests, *, spec: KVSpec) -> list[list[memoryview] | None]:
        out: list[list[memoryview] | None] = []
        with self._lock:
            for key, spans in requests:
                entry = self._entries.get(bytes(key))
                if entry is None or not isinstance(entry[1], dict) or "ranges" not in entry[1]:
                    self._stats.misses += 1
                    out.append(None)
                    continue
                view = memoryview(entry[0].numpy()).cast("B")
                if any(off < 0 or off + n > view.nbytes for off, n in spans):
                    out.append(None)
                    continue
                out.append([view[off : off + n] for off, n in spans])
                self._stats.hits += 1
        return out


# Set at interpreter exit: the reserve threads stop before torch's and the interpreter's own teardown.
# A daemon thread still inside a torch op (zeroing a buffer) while the process finalises aborts it
# ("terminate called without an active exception", exit status 134), so exit waits for them.
_EXITING = threading.Event()
_FILL_THREADS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()
_FILL_WAKES: "weakref.WeakSet[threading.Event]" = weakref.WeakSet()


def _stop_fill_threads(timeout_s: float = 5.0) -> None:
    """atexit: tell every reserve thread to give up its buffer and end, and wait for them."""
    _EXITING.set()
    for wake in list(_FILL_WAKES):
        wake.set()
    for th in list(_FILL_THREADS):
        th.join(timeout_s)


atexit.register(_stop_fill_threads)


def _fill_loop(ref, wake: threading.Event) -> None:
    """The tier's background thread (warm reserve, idle spares): it holds its tier only while working, so
    a tier nobody uses any more is collected and the thread ends."""
    lower_thread_priority(_FILL_NICE, "host tier reserve threads")
    while True:
        woken = wake.wait(_TRIM_EVERY_S)
        tier = ref()
        if tier is None or _EXITING.is_set():
            return
        try:
            if woken:
                wake.clear()
                tier._fill_reserve()
            tier._trim_idle_spares()
        except Exception:  # spares are an optimisation: a failure costs page faults (or memory held longer), nothing else
            log.exception("host tier %s: filling the warm reserve or freeing idle spares failed", tier.name)
        del tier


class DeviceTier(TierBase):
    """A preallocated pool of fixed-size slots on one device (``cuda`` when present, else ``cpu``).

    The pool is ``[num_slots, slot_bytes]`` uint8, allocated once: ``num_slots =
    capacity_bytes // slot_bytes``. ``slot_bytes`` defaults to the first block's size; a block
    larger than a slot is refused (ValueError). Only the identity codec: KV on the device is what
    attention reads.
    """

    capabilities = TierCapabilities(device="cuda", persistent=False, shared=False, framed=False)

    def __init__(
        self,
        capacity_bytes: int,
        *,
        slot_bytes: int | None = None,
        device: str | torch.device | None = None,
        name: str = "device",
        codec: str | Codec = "identity",
        refuse_oversize: bool = False,
    ) -> None:
        codec = _as_codec(codec)
        if codec.name != "identity":
            raise ValueError(f"DeviceTier stores blocks as attention reads them: codec must be 'identity', got {codec.name!r}")
        if capacity_bytes is None:
            raise ValueError("DeviceTier needs a capacity_bytes")
        super().__init__(name, codec, capacity_bytes)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.capabilities = TierCapabilities(device=self.device.type, persistent=False, shared=False, framed=False)
        if slot_bytes is not None and (not isinstance(slot_bytes, int) or slot_bytes <= 0):
            raise ValueError(f"slot_bytes must be a positive int, got {slot_bytes!r}")
        self._slot_bytes = slot_bytes
        # a block larger than a slot: ValueError (one spec per pool), or declined and counted as
        # refused so that a store holding several specs lets it go on to the next tier
        self.refuse_oversize = refuse_oversize
        self._pool: torch.Tensor | None = None
        self._free: list[int] = []
        self._slot_of: dict[bytes, tuple[int, int]] = {}  # key -> (slot, nbytes)
        if slot_bytes is not None:
            self._allocate(slot_bytes)

    def _allocate(self, slot_bytes: int) -> None:
        assert self._capacity is not None  # __init__ refuses None
        num_slots = self._capacity // slot_bytes
        self._slot_bytes = slot_bytes
        self._pool = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, device=self.device)  # [N, slot_bytes]
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def _allocated(self) -> tuple[torch.Tensor, int]:
        """The pool and its slot size, once allocated (at the first put, or given ``slot_bytes``)."""
        assert self._pool is not None and self._slot_bytes is not None, "the pool is allocated at the first put"
        return self._pool, self._slot_bytes

    @property
    def num_slots(self) -> int:
        return 0 if self._pool is None else self._pool.shape[0]

    @property
    def num_free_slots(self) -> int:
        return len(self._free) if self._pool is not None else 0

    def contains(self, keys: Sequence[bytes], *, spec: KVSpec) -> list[bool]:
        slots = self._slot_of
        return [bytes(k) in slots for k in keys]

    def put(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor], *, spec: KVSpec, first: Sequence[bool] | None = None) -> list[int]:
        self._check_put(keys, blocks, spec, first)
        sizes = []
        with self._lock:
            for key, block in zip(keys, blocks):
                key = bytes(key)
                if key in self._slot_of:
                    sizes.append(self._slot_of[key][1])
                    continue
                nbytes = spec.block_nbytes
                if self._pool is None:
                    self._allocate(nbytes)
                pool, slot_bytes = self._allocated()
                if nbytes > slot_bytes:
                    if self.refuse_oversize:
                        self._stats.refused += 1
                        sizes.append(0)
                        continue
                    raise ValueError(f"block of {nbytes} bytes does not fit a {slot_bytes}-byte slot of tier {self.name!r}")
                if not self._free:
                    self._stats.refused += 1
                    sizes.append(0)
                    continue
                slot = self._free.pop()
                pool[slot, :nbytes].copy_(block.detach().reshape(-1).view(torch.uint8), non_blocking=True)
                self._slot_of[key] = (slot, nbytes)
                self._stats.bytes += slot_bytes  # a slot is what the block occupies
                self._stats.blocks += 1
                self._stats.puts += 1
                sizes.append(slot_bytes)
        return sizes

    def get(self, keys: Sequence[bytes], *, spec: KVSpec, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        self._check_out(keys, out, spec)
        result: list[torch.Tensor | None] = []
        with self._lock:
            for i, key in enumerate(keys):
                entry = self._slot_of.get(bytes(key))
                if entry is None or entry[1] != spec.block_nbytes:
                    self._stats.misses += 1
                    result.append(None)
                    continue
                slot, nbytes = entry
                src = self._allocated()[0][slot, :nbytes].view(spec.torch_dtype).view(spec.block_shape)
                result.append(out[i].copy_(src) if out is not None else src.clone())
                self._stats.hits += 1
        return result

    def view(self, key: bytes, spec: KVSpec) -> torch.Tensor | None:
        """The block in place in the pool (no copy), for kernels that read KV where it lies."""
        entry = self._slot_of.get(bytes(key))
        if entry is None or entry[1] != spec.block_nbytes:
            return None
        slot, nbytes = entry
        return self._allocated()[0][slot, :nbytes].view(spec.torch_dtype).view(spec.block_shape)

    def remove(self, keys: Sequence[bytes], *, spec: KVSpec) -> int:
        n = 0
        with self._lock:
            for key in keys:
                entry = self._slot_of.pop(bytes(key), None)
                if entry is not None:
                    self._free.append(entry[0])
                    self._stats.bytes -= self._allocated()[1]
                    self._stats.blocks -= 1
                    self._stats.removed += 1
                    n += 1
        return n

    def keys(self) -> list[bytes]:
        return list(self._slot_of)
