import os
import time

import pytest
import torch

from kvtier.kvstore import DeviceTier, DiskTier, HostTier, KVSpec, chain_hashes
from kvtier.kvstore.frames import decode_frame

SPEC = KVSpec("disk", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.block_shape, generator=g).half() for _ in range(n)]


KEYS = chain_hashes(SPEC, list(range(16 * 4)))


def test_disk_tier_survives_a_restart(tmp_path):
    t = DiskTier(tmp_path, 1 << 20)
    bs = blocks(4)
    sizes = t.put(KEYS, bs, spec=SPEC)
    t.close()
    # a crash mid-write leaves a temporary file: it is ignored and cleaned on open
    shard = next(p for p in (tmp_path / SPEC.short_fingerprint).iterdir())
    (shard / ".tmp-crashed").write_bytes(b"partial")
    t2 = DiskTier(tmp_path, 1 << 20)
    assert sorted(t2.iter_keys(SPEC)) == sorted(KEYS)
    assert t2.used_bytes == sum(sizes) and t2.stats().blocks == 4
    assert all(torch.equal(a, b) for a, b in zip(t2.get(KEYS, spec=SPEC), bs))
    assert not (shard / ".tmp-crashed").exists()


def test_disk_files_are_frames_named_by_key(tmp_path):
    t = DiskTier(tmp_path, 1 << 20)
    t.put(KEYS[:1], blocks(1), spec=SPEC)
    path = tmp_path / SPEC.short_fingerprint / KEYS[0].hex()[:2] / (KEYS[0].hex() + ".kvf")
    frame = decode_frame(path.read_bytes(), expect_key=KEYS[0], expect_spec=SPEC)
    assert frame.codec == "identity" and frame.shape == SPEC.block_shape


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_corrupt_disk_frame_is_a_counted_miss_and_deleted(tmp_path, damage):
    t = DiskTier(tmp_path, 1 << 20)
    t.put(KEYS[:2], blocks(2), spec=SPEC)
    p0 = tmp_path / SPEC.short_fingerprint / KEYS[0].hex()[:2] / (KEYS[0].hex() + ".kvf")
    p1 = tmp_path / SPEC.short_fingerprint / KEYS[1].hex()[:2] / (KEYS[1].hex() + ".kvf")
    data = bytearray(p0.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
        p0.write_bytes(bytes(data))
    elif damage == "truncate":
        p0.write_bytes(bytes(data[:-100]))
    else:  # another block's (valid) frame under this key's name
        p0.write_bytes(p1.read_bytes())
    got = t.get(KEYS[:2], spec=SPEC)
    assert got[0] is None and got[1] is not None
    assert t.stats().corrupt == 1 and not p0.exists()
    assert t.contains(KEYS[:2], spec=SPEC) == [False, True]


def test_disk_file_deleted_behind_our_back_is_a_miss(tmp_path):
    t = DiskTier(tmp_path, 1 << 20)
    t.put(KEYS[:1], blocks(1), spec=SPEC)
    os.unlink(tmp_path / SPEC.short_fingerprint / KEYS[0].hex()[:2] / (KEYS[0].hex() + ".kvf"))
    assert t.get(KEYS[:1], spec=SPEC) == [None]
    assert t.used_bytes == 0


def test_host_tier_with_a_lossless_codec_and_bounded_capacity():
    t = HostTier(2 * SPEC.block_nbytes)
    assert t.put(KEYS[:3], blocks(3), spec=SPEC)[2] == 0
    with pytest.raises(ValueError):
        HostTier(None)


def test_device_tier_is_a_preallocated_slot_pool():
    t = DeviceTier(3 * SPEC.block_nbytes, slot_bytes=SPEC.block_nbytes)
    assert t.num_slots == 3 and t.num_free_slots == 3
    bs = blocks(4)
    assert t.put(KEYS, bs, spec=SPEC) == [SPEC.block_nbytes] * 3 + [0]
    assert t.num_free_slots == 0
    view = t.view(KEYS[1], SPEC)
    assert torch.equal(view, bs[1]) and view.data_ptr() != bs[1].data_ptr()
    t.remove(KEYS[1:2], spec=SPEC)
    assert t.num_free_slots == 1 and t.put(KEYS[3:], bs[3:], spec=SPEC) == [SPEC.block_nbytes]
    with pytest.raises(ValueError):
        DeviceTier(1 << 20, slot_bytes=0)
    big = KVSpec("disk", num_layers=4, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)
    with pytest.raises(ValueError, match="slot"):
        t.put(chain_hashes(big, list(range(16))), [torch.zeros(big.block_shape, dtype=torch.float16)], spec=big)


def test_device_tier_declares_what_to_do_with_a_block_larger_than_its_slots():
    big = KVSpec("disk", num_layers=4, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)
    strict = DeviceTier(4 * SPEC.block_nbytes, slot_bytes=SPEC.block_nbytes, device="cpu")
    with pytest.raises(ValueError, match="does not fit"):
        strict.put(chain_hashes(big, list(range(16))), [torch.zeros(big.block_shape, dtype=torch.float16)], spec=big)
    lenient = DeviceTier(4 * SPEC.block_nbytes, slot_bytes=SPEC.block_nbytes, device="cpu", refuse_oversize=True)
    assert lenient.put(chain_hashes(big, list(range(16))), [torch.zeros(big.block_shape, dtype=torch.float16)], spec=big) == [0]
    assert lenient.stats().refused == 1 and lenient.stats().blocks == 0
    assert lenient.put(chain_hashes(SPEC, list(range(16))), blocks(1), spec=SPEC) == [SPEC.block_nbytes]


def test_only_tiers_that_declare_it_list_their_keys(tmp_path):
    assert DiskTier(tmp_path, 1 << 20).capabilities.iterable
    assert not HostTier(1 << 20).capabilities.iterable and not DeviceTier(1 << 20, device="cpu").capabilities.iterable


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 5), min_size=1, max_size=3)), max_size=20))
def test_device_slots_are_conserved(ops):
    """Free slots + used slots == all slots, and no two blocks ever share a slot."""
    keys = chain_hashes(SPEC, list(range(16 * 6)))
    bs = blocks(6)
    t = DeviceTier(4 * SPEC.block_nbytes, slot_bytes=SPEC.block_nbytes)
    for is_put, ids in ops:
        ks = [keys[i] for i in dict.fromkeys(ids)]
        if is_put:
            t.put(ks, [bs[keys.index(k)] for k in ks], spec=SPEC)
        else:
            t.remove(ks, spec=SPEC)
        used = [slot for slot, _ in t._slot_of.values()]
        assert len(set(used)) == len(used)
        assert sorted(used + t._free) == list(range(t.num_slots))
        assert t.used_bytes == len(used) * SPEC.block_nbytes
        for k in t.keys():
            assert torch.equal(t.view(k, SPEC), bs[keys.index(k)])


def test_host_tier_reuses_removed_buffers_within_its_capacity():
    n = SPEC.block_nbytes
    # spares: at most max_spare_bytes (2 blocks); no reserve, no idle spares freed: no background thread
    t = HostTier(8 * n, warm_reserve_bytes=0, max_spare_bytes=2 * n, spare_idle_s=None)
    bs = blocks(4)
    t.put(KEYS, bs, spec=SPEC)
    old = {bytes(k): t._entries[bytes(k)][0].data_ptr() for k in KEYS}
    assert t.remove(KEYS[:3], spec=SPEC) == 3
    assert t.spare_bytes == 2 * n and t.used_bytes == n  # the third buffer is freed
    new = blocks(2, seed=1)
    keys = chain_hashes(SPEC, list(range(1000, 1000 + 32)))
    t.put(keys, new, spec=SPEC)
    assert t.spare_bytes == 0
    assert {t._entries[bytes(k)][0].data_ptr() for k in keys} <= {old[bytes(k)] for k in KEYS[:3]}  # reused memory
    assert all(torch.equal(a, b) for a, b in zip(t.get(keys, spec=SPEC), new))  # holding the new blocks
    assert torch.equal(t.get(KEYS[3:], spec=SPEC)[0], bs[3])
    # room for new blocks comes before spares: used + spare never passes the capacity
    t.remove(keys, spec=SPEC)
    assert t.spare_bytes == 2 * n
    more = chain_hashes(SPEC, list(range(2000, 2000 + 16 * 7)))
    assert all(t.put(more, blocks(7, seed=2), spec=SPEC))
    assert t.used_bytes + t.spare_bytes <= 8 * n and t.used_bytes == 8 * n


def test_host_tier_keeps_every_removed_buffer_within_its_capacity_by_default():
    """As an allocator reuses the memory of deleted values: a round of puts deleted, then the same number
    again, lands in the first round's memory (no fresh pages); used + spares never pass the capacity."""
    n = SPEC.block_nbytes
    t = HostTier(8 * n, warm_reserve_bytes=0, spare_idle_s=None)
    assert t.max_spare_bytes == 8 * n  # the default: the capacity
    keys = chain_hashes(SPEC, list(range(16 * 8)))
    bs = blocks(8, seed=4)
    assert all(t.put(keys, bs, spec=SPEC))
    old = {t._entries[bytes(k)][0].data_ptr() for k in keys}
    assert t.remove(keys, spec=SPEC) == 8
    assert t.spare_bytes == 8 * n and t.used_bytes == 0  # every buffer kept (a quarter before: 2)
    hits = t.num_reserve_hits
    keys2 = chain_hashes(SPEC, list(range(5000, 5000 + 16 * 6)))
    bs2 = blocks(6, seed=5)
    assert all(t.put(keys2, bs2, spec=SPEC))
    assert t.num_reserve_hits == hits + 6 and {t._entries[bytes(k)][0].data_ptr() for k in keys2} <= old
    assert t.used_bytes + t.spare_bytes <= 8 * n
    assert all(torch.equal(g, b) for g, b in zip(t.get(keys2, spec=SPEC), bs2))  # the new bytes, not the old
    # a larger block needs room: spares are dropped first, the bound holds
    big = KVSpec("big", num_layers=2, num_kv_heads=2, head_dim=32, dtype="float16", block_tokens=16)
    assert big.block_nbytes == 2 * n
    assert t.put(chain_hashes(big, list(range(16))), [torch.ones(big.block_shape, dtype=torch.float16)], spec=big) == [2 * n]
    assert t.used_bytes == 8 * n and t.spare_bytes == 0


def test_host_tier_frees_spares_left_idle_down_to_its_warm_reserve():
    n = SPEC.block_nbytes
    t = HostTier(16 * n, warm_reserve_bytes=2 * n, spare_idle_s=30.0)
    keys = chain_hashes(SPEC, list(range(16 * 8)))
    assert all(t.put(keys, blocks(8, seed=6), spec=SPEC))
    _wait_for(lambda: not t._filling and t.num_reserve_fills >= 1, "the reserve")
    t.remove(keys, spec=SPEC)
    held = t.spare_bytes
    assert held >= 8 * n
    now = time.monotonic()
    assert t._trim_idle_spares(now) == 0  # used just now: kept
    assert t._trim_idle_spares(now + 31.0) == held - 2 * n  # idle: freed down to the reserve (2 blocks)
    assert t.spare_bytes == 2 * n and t.num_spares_freed == held // n - 2
    assert t.put(keys[:1], blocks(1, seed=7), spec=SPEC) == [n]  # the reserve is still there for the next put
    off = HostTier(16 * n, warm_reserve_bytes=0, spare_idle_s=None)
    off.put(keys[:2], blocks(2), spec=SPEC)
    off.remove(keys[:2], spec=SPEC)
    assert off._trim_idle_spares(time.monotonic() + 1e6) == 0 and off.spare_bytes == 2 * n  # None: kept
    with pytest.raises(ValueError, match="max_spare_bytes"):
        HostTier(n, max_spare_bytes=-1)
    with pytest.raises(ValueError, match="spare_idle_s"):
        HostTier(n, spare_idle_s=0)
    assert HostTier(4 * n, max_spare_bytes=100 * n).max_spare_bytes == 4 * n  # never beyond the capacity


def test_host_tier_never_recycles_a_buffer_being_read():
    t = HostTier(8 * SPEC.block_nbytes, warm_reserve_bytes=0)
    bs = blocks(1)
    t.put(KEYS[:1], bs, spec=SPEC)
    entry = t._entries[bytes(KEYS[0])]
    t._reading[id(entry[0])] = 1  # as a get copying out of it holds it
    t.remove(KEYS[:1], spec=SPEC)
    assert t.spare_bytes == 0  # left to the reader; freed when it lets go
    t._reading.clear()


def _wait_for(cond, what: str, timeout_s: float = 60.0) -> None:
    """Polls ``cond`` (the reserve fills on a thread of its own); no timing is asserted, only the end state."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_host_tier_warm_reserve_is_used_and_stays_within_its_capacity():
    n = SPEC.block_nbytes
    t = HostTier(12 * n, warm_reserve_bytes=2 * n)
    bs = blocks(12, seed=3)
    keys = chain_hashes(SPEC, list(range(16 * 12)))
    assert t.put(keys[:1], bs[:1], spec=SPEC) == [n]
    _wait_for(lambda: t.spare_bytes == 2 * n, "the reserve")  # touched in the background, no block removed
    assert t.num_reserve_fills == 2 and t.used_bytes == n
    reserved = {b.data_ptr() for b in t._spares[n]}
    assert t.put(keys[1:2], bs[1:2], spec=SPEC) == [n]
    assert t._entries[bytes(keys[1])][0].data_ptr() in reserved  # the put landed in a pre-faulted buffer
    assert t.num_reserve_hits == 1
    # the tier grows to its capacity: the reserve refills to what room is left, never beyond
    for i in range(2, 12):
        assert t.put(keys[i : i + 1], bs[i : i + 1], spec=SPEC) == [n]
        room = 12 * n - t.used_bytes
        _wait_for(lambda: t.spare_bytes == min(2 * n, room) and not t._filling, "the reserve to settle")
        assert t.used_bytes + t.spare_bytes + t._filling <= 12 * n
    assert t.used_bytes == 12 * n and t.spare_bytes == 0
    assert t.num_reserve_hits >= 10  # every put after the first found a buffer waiting (the thread had settled)
    assert t.put(chain_hashes(SPEC, list(range(5000, 5016))), blocks(1), spec=SPEC) == [0]  # full: refused
    got = t.get(keys, spec=SPEC)
    assert all(g is not None and torch.equal(g, b) for g, b in zip(got, bs))  # byte-exact


def test_host_tier_put_takes_the_room_of_a_reserve_buffer_being_touched():
    n = SPEC.block_nbytes
    t = HostTier(4 * n, warm_reserve_bytes=0)  # no thread: the fill in progress is staged by hand
    bs = blocks(4)
    assert all(t.put(KEYS[:3], bs[:3], spec=SPEC))
    t._filling = n  # as the reserve's thread does while it touches a buffer of n bytes
    assert t.put(KEYS[3:], bs[3:], spec=SPEC) == [n]
    assert t._fill_cancel  # the thread is told to give the buffer up: its room is this put's
    t._filling = 0
    assert all(torch.equal(g, b) for g, b in zip(t.get(KEYS, spec=SPEC), bs))


def test_host_tier_warm_reserve_is_validated_and_bounded():
    with pytest.raises(ValueError, match="warm_reserve_bytes"):
        HostTier(1 << 20, warm_reserve_bytes=-1)
    assert HostTier(1 << 30).warm_reserve_bytes == 64 << 20  # the default: an eighth, at most 64 MiB
    assert HostTier(8 << 20).warm_reserve_bytes == 1 << 20
    assert HostTier(8 << 20, warm_reserve_bytes=1 << 30).warm_reserve_bytes == 2 << 20  # at most a quarter


def test_a_process_exits_cleanly_while_its_warm_reserve_is_filling():
    """The reserve's thread zeroes buffers inside torch; a process that ends meanwhile must not abort
    ("terminate called without an active exception", status 134): exit stops and waits for it."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from kvtier.kvstore import HostTier, KVSpec, chain_hashes\n"
        "spec = KVSpec(model_id='m', num_layers=4, num_kv_heads=8, head_dim=128, block_tokens=256, dtype='float16')\n"
        "t = HostTier(64 * spec.block_nbytes, warm_reserve_bytes=16 * spec.block_nbytes)\n"
        "keys = chain_hashes(spec, list(range(spec.block_tokens * 3)))\n"
        "t.put(keys, [torch.zeros(spec.block_shape, dtype=torch.float16)] * 3, spec=spec)\n"
    )
    for _ in range(5):  # the race is at the very end of the process: try it a few times
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]


def _leased_block(t: HostTier, block: torch.Tensor) -> torch.Tensor:
    buf = t.lease(SPEC.block_nbytes)
    buf.copy_(block.reshape(-1).view(torch.uint8))
    return buf.view(SPEC.torch_dtype).view(SPEC.block_shape)


def test_host_tier_adopts_a_block_written_into_a_buffer_it_leased():
    n = SPEC.block_nbytes
    t = HostTier(4 * n, warm_reserve_bytes=0, spare_idle_s=None)
    bs = blocks(4, seed=30)
    leased = _leased_block(t, bs[0])
    assert t.used_bytes == 0  # a lease is not stored bytes
    assert t.put(KEYS[:1], [leased], spec=SPEC) == [n]
    t.unlease(leased)  # adopted: handing it back leaves the stored block alone
    stored = t._entries[bytes(KEYS[0])][0]
    assert stored.data_ptr() == leased.data_ptr() and t.num_adopted == 1  # kept, not copied
    assert torch.equal(t.get(KEYS[:1], spec=SPEC)[0], bs[0]) and t.used_bytes == n
    # a tensor the tier did not lend is copied, as is a lease viewed only in part
    plain = bs[1].clone()
    t.put(KEYS[1:2], [plain], spec=SPEC)
    assert t._entries[bytes(KEYS[1])][0].data_ptr() != plain.data_ptr()
    part = t.lease(2 * n)
    part[:n].copy_(bs[2].reshape(-1).view(torch.uint8))
    t.put(KEYS[2:3], [part[:n].view(SPEC.torch_dtype).view(SPEC.block_shape)], spec=SPEC)
    assert t._entries[bytes(KEYS[2])][0].data_ptr() != part.data_ptr() and t.num_adopted == 1
    t.unlease(part, recycle=False)
    assert not t._leased
    # a removed adopted block's buffer becomes a spare, and the next lease takes it
    t.remove(KEYS[:1], spec=SPEC)
    assert t.spare_bytes == n
    again = t.lease(n)
    assert again.data_ptr() == leased.data_ptr() and t.spare_bytes == 0
    t.unlease(again)
    assert t.spare_bytes == n  # not adopted: back to the spares (recycle=True)
    with pytest.raises(ValueError, match="nbytes"):
        t.lease(0)


def test_host_tier_lease_of_a_block_already_stored_or_refused_is_not_adopted():
    n = SPEC.block_nbytes
    t = HostTier(2 * n, warm_reserve_bytes=0, spare_idle_s=None)
    bs = blocks(3, seed=31)
    t.put(KEYS[:1], bs[:1], spec=SPEC)
    dup = _leased_block(t, bs[0])
    assert t.put(KEYS[:1], [dup], spec=SPEC) == [n]  # already there: the stored entry stays
    assert t._entries[bytes(KEYS[0])][0].data_ptr() != dup.data_ptr() and t.num_adopted == 0
    t.unlease(dup, recycle=False)  # something may still read it: not kept as a spare
    assert t.spare_bytes == 0 and not t._leased
    t.put(KEYS[1:2], bs[1:2], spec=SPEC)  # full now
    over = _leased_block(t, bs[2])
    assert t.put(KEYS[2:3], [over], spec=SPEC) == [0] and t.num_adopted == 0  # refused: no room
    t.unlease(over)
    assert t.used_bytes + t.spare_bytes <= 2 * n  # a spare only within the capacity


def test_host_tier_entry_tokens_tell_a_removed_entry_from_the_one_stored_again():
    t = HostTier(4 * SPEC.block_nbytes, warm_reserve_bytes=0)
    bs = blocks(1, seed=32)
    t.put(KEYS[:1], bs, spec=SPEC)
    token = t.entry_token(KEYS[0])
    assert t.holds(KEYS[0], token) and torch.equal(t.entry_block(token), bs[0])
    t.remove(KEYS[:1], spec=SPEC)
    assert not t.holds(KEYS[0], token) and t.entry_token(KEYS[0]) is None and not t.holds(KEYS[0], None)
    t.put(KEYS[:1], bs, spec=SPEC)  # the same key again: a new entry, not the one the token named
    assert not t.holds(KEYS[0], token)


def test_store_lends_its_host_tiers_buffers_and_plain_ones_otherwise(tmp_path):
    from kvtier.kvstore import TieredStore

    n = SPEC.block_nbytes
    host = HostTier(8 * n, warm_reserve_bytes=0)
    store = TieredStore([host])
    bs = blocks(2, seed=33)
    buf = store.lease_buffer(n)
    buf.copy_(bs[0].reshape(-1).view(torch.uint8))
    assert store.put(SPEC, KEYS[:1], [buf.view(SPEC.torch_dtype).view(SPEC.block_shape)]) == [True]
    store.release_buffer(buf)
    assert host.num_adopted == 1 and torch.equal(store.get(SPEC, KEYS[:1])[0], bs[0])
    token, held = store.first_tier_entry(KEYS[0], buf)
    assert held.data_ptr() == buf.data_ptr() and store.first_tier_holds(KEYS[0], token)
    store.remove(SPEC, KEYS[:1])
    assert not store.first_tier_holds(KEYS[0], token)
    disk_only = TieredStore([DiskTier(tmp_path, 8 * n)])
    plain = disk_only.lease_buffer(n)
    assert plain.numel() == n and plain.dtype == torch.uint8
    token, held = disk_only.first_tier_entry(KEYS[0], plain)
    assert held is plain and disk_only.first_tier_holds(KEYS[0], token)  # the caller's buffer is its own
    disk_only.release_buffer(plain)
    store.close()
    disk_only.close()
