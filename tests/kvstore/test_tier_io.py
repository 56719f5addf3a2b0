"""The disk tier's write path (header and payload written without a joined copy, pages dropped after
fsync) and the background threads' CPU and I/O priorities (``kvtier.threads``)."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

import pytest
import torch

from kvtier.kvstore import DiskTier, HostTier, KVSpec, TieredStore, chain_hashes
from kvtier.kvstore.crypto import FrameCipher
from kvtier.kvstore.frames import decode_frame, encode_frame
from kvtier.kvstore.store import TierConfig
from kvtier.kvstore.codecs.base import tensor_bytes
from kvtier.kvstore.tiers.disk import _write_all
from kvtier.threads import check_io_priority, lower_thread_priority, set_thread_io_priority, thread_io_priority

SPEC = KVSpec("tier-io", num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=64)  # 64 KiB blocks
KEYS = chain_hashes(SPEC, list(range(64 * 4)))


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.block_shape, generator=g).half() for _ in range(n)]


def _path(root, key):
    return root / SPEC.short_fingerprint / key.hex()[:2] / (key.hex() + ".kvf")


def _resident_pages(path) -> int:
    """Pages of ``path`` in the page cache (``mincore`` on a read-only mapping made through libc)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
    fd = os.open(path, os.O_RDONLY)
    try:
        p = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert p not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(p, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(p, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


def _fs_type(path) -> str:
    best, kind = "", ""
    for line in open("/proc/self/mounts"):
        parts = line.split()
        if str(path).startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def test_disk_file_is_the_frame_byte_for_byte(tmp_path):
    t = DiskTier(tmp_path, 1 << 22, fsync=True)
    bs = blocks(2)
    sizes = t.put(KEYS[:2], bs, spec=SPEC)
    for key, b, size in zip(KEYS[:2], bs, sizes):
        data = _path(tmp_path, key).read_bytes()
        assert data == encode_frame(key, SPEC, "identity", {}, SPEC.block_shape, SPEC.dtype, tensor_bytes(b))
        assert size == len(data) and decode_frame(data, expect_key=key, expect_spec=SPEC).data == tensor_bytes(b)
    assert t.used_bytes == sum(sizes)
    assert all(torch.equal(a, b) for a, b in zip(t.get(KEYS[:2], spec=SPEC), bs))


def test_encrypted_disk_tier_still_round_trips(tmp_path):
    c = FrameCipher(os.urandom(32))
    t = DiskTier(tmp_path, 1 << 22, fsync=True, cipher=c)
    bs = blocks(2, seed=3)
    sizes = t.put(KEYS[:2], bs, spec=SPEC)
    assert sizes[0] == _path(tmp_path, KEYS[0]).stat().st_size and t.used_bytes == sum(sizes)
    assert all(torch.equal(a, b) for a, b in zip(t.get(KEYS[:2], spec=SPEC), bs))


def test_write_all_writes_every_part_in_order(tmp_path):
    parts = [b"head", b"", memoryview(bytes(range(256)) * 1000), bytearray(b"tail")]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        _write_all(fd, parts)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in parts)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
@pytest.mark.parametrize("drop", [True, False])
def test_fsynced_pages_are_dropped_from_the_page_cache_unless_asked_not_to(tmp_path, drop):
    if _fs_type(tmp_path) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{tmp_path} is on {_fs_type(tmp_path)}: its pages are the file itself")
    t = DiskTier(tmp_path, 1 << 22, fsync=True, drop_written_pages=drop)
    bs = blocks(2, seed=1)
    t.put(KEYS[:2], bs, spec=SPEC)
    resident = [_resident_pages(_path(tmp_path, k)) for k in KEYS[:2]]
    if drop:
        assert resident == [0, 0]
    else:
        assert all(r > 0 for r in resident)
    assert all(torch.equal(a, b) for a, b in zip(t.get(KEYS[:2], spec=SPEC), bs))  # read back from the device


def test_without_fsync_nothing_is_dropped(tmp_path):
    if _fs_type(tmp_path) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip("page cache is the file itself here")
    t = DiskTier(tmp_path, 1 << 22, fsync=False, drop_written_pages=True)
    t.put(KEYS[:1], blocks(1), spec=SPEC)
    assert _resident_pages(_path(tmp_path, KEYS[0])) > 0


def _in_thread(fn):
    out = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    return out[0]


def test_thread_io_priorities_are_per_thread():
    if thread_io_priority() is None:
        pytest.skip("ioprio_get is not available here")
    before = thread_io_priority()

    def low():
        assert set_thread_io_priority("low")
        return thread_io_priority()

    def idle():
        assert set_thread_io_priority("idle")
        return thread_io_priority()

    assert _in_thread(low) == (2, 7)
    assert _in_thread(idle) == (3, 0)
    assert _in_thread(lambda: (set_thread_io_priority("normal"), thread_io_priority())) == (False, before)
    assert thread_io_priority() == before  # the caller's own priority is untouched
    with pytest.raises(ValueError):
        check_io_priority("urgent")
    with pytest.raises(ValueError):
        set_thread_io_priority("realtime")


def test_lower_thread_priority_sets_nice_and_io_priority():
    def run():
        tid = threading.get_native_id()
        n0 = os.getpriority(os.PRIO_PROCESS, tid)
        lower_thread_priority(3, "test thread", "low")
        return os.getpriority(os.PRIO_PROCESS, tid) - n0, thread_io_priority()

    dn, io = _in_thread(run)
    assert dn == 3 or os.getpriority(os.PRIO_PROCESS, 0) + 3 > 19
    assert io in ((2, 7), None)


def test_write_through_threads_run_at_the_configured_priorities(tmp_path):
    store = TieredStore(
        [TierConfig(HostTier(1 << 22)), TierConfig(DiskTier(tmp_path, 1 << 22), write_through=True)],
        io_nice=2,
        io_priority="idle",
    )
    try:
        assert store.put(SPEC, KEYS[:2], blocks(2)) == [True, True]
        assert DiskTier(tmp_path, 1 << 22).stats().blocks == 2  # written through
        base = os.getpriority(os.PRIO_PROCESS, 0)
        nice, io = (
            store._executor(1).submit(lambda: (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), thread_io_priority())).result()
        )
        assert nice == min(19, base + 2)
        assert io in ((3, 0), None)
    finally:
        store.close()


@pytest.mark.parametrize("kwargs", [{"io_nice": 20}, {"io_nice": -1}, {"io_nice": True}, {"io_priority": "fast"}])
def test_store_refuses_bad_io_settings(kwargs):
    with pytest.raises(ValueError):
        TieredStore([HostTier(1 << 20)], **kwargs)
