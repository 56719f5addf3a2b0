"""Page-addressable blocks: the paged codecs, frame headers read from a prefix, range reads in every
tier that serves them (host, disk, Redis, Redis Cluster), and the store's verified piece reads."""

from __future__ import annotations


import pytest
import torch

from kvtier.kvstore import DiskTier, HostTier, KVSpec, TierConfig, TieredStore, chain_hashes, get_codec
from kvtier.kvstore.codecs import codec_max_error
from kvtier.kvstore.frames import FrameIncomplete, decode_frame_header, encode_frame
from kvtier.kvstore.pages import PageLayout, Pages, Summary, coalesce

SPEC = KVSpec("pages", num_layers=3, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=64)
CODECS = ["paged", "paged_int8"]
TIERS = ["host", "disk", pytest.param("redis", marks=pytest.mark.redis), pytest.param("redis_cluster", marks=pytest.mark.redis)]


def blocks(n, seed=0, spec=SPEC):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(spec.block_shape, generator=g).to(spec.torch_dtype) for _ in range(n)]


def keys_for(n, seed=0, spec=SPEC):
    return chain_hashes(spec, [(seed * 7919 + i) % 50000 for i in range(spec.block_tokens * n)])


def page_of(block, layer, head, page, P=16):
    """``[2, P, D]``: K and V of one page of a block."""
    return block[layer, :, head, page * P : (page + 1) * P]


@pytest.mark.parametrize("name", CODECS)
def test_paged_codecs_round_trip_within_their_bound(name):
    codec = get_codec(name)
    block = blocks(1)[0]
    payload, meta = codec.encode(block, SPEC)
    assert memoryview(payload).nbytes == codec.payload_bytes(SPEC)
    back = codec.decode(payload, meta, SPEC)
    err = (back.float() - block.float()).abs()
    assert bool((err <= codec_max_error(codec, block, SPEC)).all())
    if name == "paged":
        assert torch.equal(back, block)


@pytest.mark.parametrize("name", CODECS)
def test_each_page_decodes_alone_and_summaries_bound_its_keys(name):
    codec = get_codec(name)
    block = blocks(1, seed=3)[0]
    payload, meta = codec.encode(block, SPEC)
    whole = codec.decode(payload, meta, SPEC)
    layout = PageLayout.from_meta(b"k" * 32, SPEC, name, meta)
    for layer, head, page in [(0, 0, 0), (2, 1, 3), (1, 0, 2)]:
        r = layout.range_id(layer, head, page)
        off, n = layout.span(Pages(r, 1))
        buf = memoryview(payload)[off : off + n]
        assert layout.verify(Pages(r, 1), buf)
        assert torch.equal(layout.decode_pages(buf, 1)[0], page_of(whole, layer, head, page))
        kmin, kmax, kmean = layout.decode_summary(layer, memoryview(payload)[slice(*_range(layout.span(Summary(layer))))])
        keys = block[layer, 0, head, page * 16 : (page + 1) * 16].float()
        assert bool((kmin[head, page] <= keys.amin(0)).all()) and bool((kmax[head, page] >= keys.amax(0)).all())
        assert torch.allclose(kmean[head, page].float(), keys.mean(0), atol=1e-2)
    bmin, bmax = layout.decode_summary(SPEC.num_layers, memoryview(payload)[slice(*_range(layout.span(Summary(SPEC.num_layers))))])
    assert bool((bmin <= block[:, 0].float().amin(2)).all()) and bool((bmax >= block[:, 0].float().amax(2)).all())


def _range(span):
    return span[0], span[0] + span[1]


def test_a_flipped_byte_fails_only_its_own_page():
    codec = get_codec("paged")
    payload, meta = codec.encode(blocks(1)[0], SPEC)
    layout = PageLayout.from_meta(b"k" * 32, SPEC, "paged", meta)
    data = bytearray(payload)
    off, _ = layout.span(Pages(5, 1))
    data[off + 7] ^= 0x40
    assert not layout.verify(Pages(5, 1), memoryview(data)[off : off + layout.range_bytes])
    assert not layout.verify(Pages(4, 2), memoryview(data)[off - layout.range_bytes : off + layout.range_bytes])
    off6 = layout.span(Pages(6, 1))[0]
    assert layout.verify(Pages(6, 1), memoryview(data)[off6 : off6 + layout.range_bytes])


def test_layouts_reject_bad_meta_and_other_codecs():
    payload, meta = get_codec("paged").encode(blocks(1)[0], SPEC)
    assert PageLayout.from_meta(b"k" * 32, SPEC, "identity", {}) is None
    with pytest.raises(ValueError):
        PageLayout.from_meta(b"k" * 32, SPEC, "paged", {**meta, "range_bytes": 3})
    other = KVSpec("pages", num_layers=3, num_kv_heads=2, head_dim=32, dtype="float16", block_tokens=64)
    with pytest.raises(ValueError):
        PageLayout.from_meta(b"k" * 32, other, "paged", meta)
    layout = PageLayout.from_meta(b"k" * 32, SPEC, "paged", meta)
    with pytest.raises(ValueError):
        layout.span(Pages(layout.num_ranges - 1, 2))
    with pytest.raises(ValueError):
        layout.span(Summary(SPEC.num_layers + 1))


def test_coalesce_makes_runs():
    assert coalesce([5, 3, 4, 9, 9, 0]) == [Pages(0, 1), Pages(3, 3), Pages(9, 1)]
    assert coalesce([]) == []


def test_frame_headers_read_from_a_prefix():
    key = keys_for(1)[0]
    payload, meta = get_codec("paged").encode(blocks(1)[0], SPEC)
    frame = encode_frame(key, SPEC, "paged", meta, SPEC.block_shape, SPEC.dtype, payload)
    with pytest.raises(FrameIncomplete) as e:
        decode_frame_header(frame[:64])
    assert e.value.need > 64
    h = decode_frame_header(frame[: 1 << 16], expect_key=key, expect_spec=SPEC)
    assert h.codec == "paged" and h.data_size == memoryview(payload).nbytes
    assert frame[h.data_offset : h.data_offset + 16] == bytes(memoryview(payload)[:16])


# -- tiers ------------------------------------------------------------------------------------
@pytest.fixture(params=TIERS)
def make_tier(request, tmp_path):
    kind = request.param
    made = []

    def make(codec="paged"):
        if kind == "host":
            t = HostTier(64 << 20, codec=codec)
        elif kind == "disk":
            t = DiskTier(tmp_path / "disk", 64 << 20, codec=codec)
        else:
            from kvtier.kvstore.tiers.redis import RedisTier

            url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")
            t = RedisTier(url, codec=codec)
        made.append(t)
        return t

    make.kind = kind
    yield make
    for t in made:
        t.close()


@pytest.mark.parametrize("codec", CODECS)
def test_tiers_serve_verified_page_ranges(make_tier, codec):
    tier = make_tier(codec)
    assert tier.capabilities.range_reads
    bs, ks = blocks(3, seed=1), keys_for(3, seed=1)
    tier.put(ks, bs, spec=SPEC)
    whole = tier.get(ks, spec=SPEC)
    layouts = tier.page_layouts(ks + keys_for(1, seed=9), spec=SPEC)
    assert layouts[-1] is None and all(lay is not None for lay in layouts[:3])
    wanted = [(0, 1, 0), (0, 1, 1), (0, 1, 2), (2, 0, 3)]
    for i, lay in enumerate(layouts[:3]):
        pieces = coalesce([lay.range_id(*w) for w in wanted]) + [Summary(1)]
        assert len(pieces) == 3
        (bufs,) = tier.read_spans([(ks[i], [lay.span(p) for p in pieces])], spec=SPEC)
        assert all(lay.verify(p, b) for p, b in zip(pieces, bufs))
        got = lay.decode_pages(b"".join(bytes(b) for b in bufs[:2]), 4)
        for j, w in enumerate(wanted):
            assert torch.equal(got[j], page_of(whole[i], *w))
    assert tier.read_spans([(keys_for(1, seed=9)[0], [(0, 16)])], spec=SPEC) == [None]


def test_blocks_without_a_paged_codec_have_no_layout(make_tier):
    tier = make_tier("identity")
    ks = keys_for(1)
    tier.put(ks, blocks(1), spec=SPEC)
    assert tier.page_layouts(ks, spec=SPEC) == [None]


# -- the store ----------------------------------------------------------------------------------
def _store(tmp_path, host_codec="paged", host_bytes=64 << 20):
    return TieredStore(
        [
            TierConfig(HostTier(host_bytes, codec=host_codec)),
            TierConfig(DiskTier(tmp_path / "d", 256 << 20, codec="paged"), write_through=True),
        ]
    )


def test_store_reads_pieces_from_the_fastest_tier_and_falls_back(tmp_path):
    store = _store(tmp_path)
    bs, ks = blocks(2, seed=2), keys_for(2, seed=2)
    store.put(SPEC, ks, bs)
    layouts = store.page_layouts(SPEC, ks)
    req = [(lay, [Pages(lay.range_id(1, 1, 2), 2), Summary(0)]) for lay in layouts]
    res = store.read_pieces(SPEC, req)
    assert set(res.bytes_by_tier) == {"host"} and res.mismatches == 0
    assert torch.equal(layouts[1].decode_pages(res.pieces[1][0], 2)[1], page_of(bs[1], 1, 1, 3))
    store._tiers[0].tier.remove([ks[1]], spec=SPEC)  # gone from host behind the store's back: disk serves it
    res = store.read_pieces(SPEC, req)
    assert res.pieces[1] is not None and res.bytes_by_tier["disk"] == sum(layouts[1].span(p)[1] for p in req[1][1])


def test_store_never_serves_a_corrupt_page(tmp_path):
    store = TieredStore([TierConfig(DiskTier(tmp_path / "d", 256 << 20, codec="paged"))])
    bs, ks = blocks(1, seed=4), keys_for(1, seed=4)
    store.put(SPEC, ks, bs)
    (lay,) = store.page_layouts(SPEC, ks)
    tier = store._tiers[0].tier
    path = tier._path(ks[0], SPEC.short_fingerprint)
    data = bytearray(path.read_bytes())
    base = len(data) - lay.codec.payload_bytes(SPEC)
    data[base + lay.span(Pages(7, 1))[0] + 3] ^= 1
    path.write_bytes(bytes(data))
    res = store.read_pieces(SPEC, [(lay, [Pages(7, 1)])])
    assert res.pieces == [None] and res.mismatches == 1
    ok = store.read_pieces(SPEC, [(lay, [Pages(8, 1)])])
    assert ok.pieces[0] is not None
    with pytest.raises(ValueError):
        store.read_pieces(KVSpec("x", 1, 1, 16, block_tokens=64), [(lay, [Pages(0, 1)])])


@pytest.mark.redis
def test_store_reads_pieces_from_redis_written_by_another_instance(redis_url, tmp_path):
    from kvtier.kvstore.tiers.redis import RedisTier

    writer = TieredStore([TierConfig(RedisTier(redis_url, codec="paged_int8"))])
    bs, ks = blocks(2, seed=5), keys_for(2, seed=5)
    writer.put(SPEC, ks, bs)
    reader = TieredStore([TierConfig(HostTier(1 << 20, codec="paged")), TierConfig(RedisTier(redis_url, codec="paged"))])
    layouts = reader.page_layouts(SPEC, ks)
    assert [lay.codec.name for lay in layouts] == ["paged_int8"] * 2
    res = reader.read_pieces(SPEC, [(lay, [Pages(0, 4)]) for lay in layouts])
    assert res.bytes_by_tier == {"redis": 2 * 4 * layouts[0].range_bytes} and res.reads_by_tier == {"redis": 2}
    pages = layouts[0].decode_pages(res.pieces[0][0], 4)
    ref = get_codec("paged_int8").decode(*get_codec("paged_int8").encode(bs[0], SPEC), SPEC)
    assert torch.equal(pages[3], page_of(ref, 0, 0, 3))
    writer.close(), reader.close()


def test_headers_longer_than_the_first_read_are_read_again(make_tier, monkeypatch):
    """64 layers x 8 heads x 16 pages: 8,192 range checksums (a 66 KiB header), read first 4 KiB at a time."""
    if make_tier.kind == "host":
        pytest.skip("the host tier keeps the meta in memory")
    import kvtier.kvstore.tiers.disk as disk_mod
    import kvtier.kvstore.tiers.redis as redis_mod

    for mod in (disk_mod, redis_mod):
        monkeypatch.setattr(mod, "header_read_size", lambda spec: 4096)
    big = KVSpec("pages-big", num_layers=64, num_kv_heads=8, head_dim=16, dtype="float16", block_tokens=256)
    tier = make_tier("paged")
    b, k = blocks(1, seed=8, spec=big)[0], keys_for(1, seed=8, spec=big)
    tier.put(k, [b], spec=big)
    (lay,) = tier.page_layouts(k, spec=big)
    assert lay is not None and lay.num_ranges == 8192
    r = lay.range_id(63, 7, 15)
    (bufs,) = tier.read_spans([(k[0], [lay.span(Pages(r, 1))])], spec=big)
    assert lay.verify(Pages(r, 1), bufs[0])
    assert torch.equal(lay.decode_pages(bufs[0], 1)[0], page_of(b, 63, 7, 15))


# -- per-head summaries (summary layout 2) and frames written before them (layout 1) ------------
def layer_summary_frame(payload, meta, spec=SPEC):
    """The same block as a frame written before per-head summaries: per layer ``[3, H, Np, D]``,
    one checksum per layer, no ``sum_v`` in the meta."""
    import numpy as np
    import xxhash

    L, H = spec.num_layers, spec.num_kv_heads
    data = bytearray(memoryview(payload).cast("B"))
    off, lb = meta["sum_offset"], meta["sum_layer_bytes"]
    itemsize = 2 if meta["sum_dtype"] == "float16" else 4
    crc = []
    for layer in range(L):
        a = off + layer * lb
        t = np.frombuffer(bytes(data[a : a + lb]), dtype=np.uint8).reshape(H, 3, lb // (3 * H * itemsize), itemsize)
        data[a : a + lb] = t.transpose(1, 0, 2, 3).tobytes()
        crc.append(xxhash.xxh3_64_intdigest(bytes(data[a : a + lb])))
    crc.append(xxhash.xxh3_64_intdigest(bytes(data[off + L * lb :])))
    old = {k: v for k, v in meta.items() if k != "sum_v"}
    old["sum_crc"] = np.array(crc, dtype=np.uint64).tobytes()
    return memoryview(bytes(data)), old


@pytest.mark.parametrize("name", CODECS)
def test_each_heads_summaries_are_one_verified_range(name):
    codec = get_codec(name)
    block = blocks(1, seed=6)[0]
    payload, meta = codec.encode(block, SPEC)
    lay = PageLayout.from_meta(b"k" * 32, SPEC, name, meta)
    assert lay.head_summaries and meta["sum_v"] == 2
    for layer in range(SPEC.num_layers):
        whole = lay.decode_summary(layer, memoryview(payload)[slice(*_range(lay.span(Summary(layer))))])
        assert lay.verify(Summary(layer), memoryview(payload)[slice(*_range(lay.span(Summary(layer))))])
        spans = [lay.span(Summary(layer, h)) for h in range(SPEC.num_kv_heads)]
        assert spans[0][0] == lay.span(Summary(layer))[0] and spans[1][0] == spans[0][0] + spans[0][1]
        assert spans[0][1] * SPEC.num_kv_heads == lay.span(Summary(layer))[1]
        for h, span in enumerate(spans):
            buf = memoryview(payload)[slice(*_range(span))]
            assert lay.verify(Summary(layer, h), buf)
            for a, b in zip(lay.decode_summary(layer, buf, h), whole):
                assert torch.equal(a, b[h])
            keys = block[layer, 0, h].float().view(-1, 16, SPEC.head_dim)
            kmin, kmax, _ = lay.decode_summary(layer, buf, h)
            assert bool((kmin <= keys.amin(1)).all()) and bool((kmax >= keys.amax(1)).all())
    # a flipped byte fails its own head's piece and the whole layer's, not the other head's
    data = bytearray(payload)
    off1, n1 = lay.span(Summary(1, 1))
    data[off1 + 5] ^= 0x10
    assert not lay.verify(Summary(1, 1), memoryview(data)[off1 : off1 + n1])
    assert not lay.verify(Summary(1), memoryview(data)[slice(*_range(lay.span(Summary(1))))])
    assert lay.verify(Summary(1, 0), memoryview(data)[slice(*_range(lay.span(Summary(1, 0))))])
    with pytest.raises(ValueError):
        lay.span(Summary(0, SPEC.num_kv_heads))
    with pytest.raises(ValueError):
        lay.span(Summary(SPEC.num_layers, 0))


def test_frames_with_per_layer_summaries_still_read():
    payload, meta = get_codec("paged").encode(blocks(1, seed=7)[0], SPEC)
    new = PageLayout.from_meta(b"k" * 32, SPEC, "paged", meta)
    old_payload, old_meta = layer_summary_frame(payload, meta)
    old = PageLayout.from_meta(b"k" * 32, SPEC, "paged", old_meta)
    assert not old.head_summaries
    for layer in range(SPEC.num_layers + 1):
        buf = memoryview(old_payload)[slice(*_range(old.span(Summary(layer))))]
        assert old.verify(Summary(layer), buf)
        want = new.decode_summary(layer, memoryview(payload)[slice(*_range(new.span(Summary(layer))))])
        for a, b in zip(old.decode_summary(layer, buf), want):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="layout 1"):
        old.span(Summary(0, 0))
    assert torch.equal(get_codec("paged").decode(old_payload, old_meta, SPEC), get_codec("paged").decode(payload, meta, SPEC))
    with pytest.raises(ValueError, match="summary layout version 3"):
        PageLayout.from_meta(b"k" * 32, SPEC, "paged", {**meta, "sum_v": 3})
    with pytest.raises(ValueError, match="sum_crc"):
        PageLayout.from_meta(b"k" * 32, SPEC, "paged", {**old_meta, "sum_v": 2})


def test_disk_keeps_a_bounded_number_of_files_open_and_coalesces_adjacent_spans(tmp_path, monkeypatch):
    import os

    import kvtier.kvstore.tiers.disk as disk_mod

    with pytest.raises(ValueError):
        DiskTier(tmp_path / "bad", 1 << 20, codec="paged", open_files=-1)
    tier = DiskTier(tmp_path / "d", 64 << 20, codec="paged", open_files=2)
    bs, ks = blocks(4, seed=8), keys_for(4, seed=8)
    tier.put(ks, bs, spec=SPEC)
    layouts = tier.page_layouts(ks, spec=SPEC)
    opens, preads = [], []
    real_open, real_pread = os.open, os.pread
    monkeypatch.setattr(disk_mod.os, "open", lambda *a, **k: opens.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(disk_mod.os, "pread", lambda fd, n, off: preads.append(n) or real_pread(fd, n, off))
    pieces = [Summary(1, 0), Summary(1, 1), Pages(3, 2), Summary(2, 1)]
    for _ in range(2):
        for i in (2, 3):  # the last two blocks stay open: no open after the first pass
            (bufs,) = tier.read_spans([(ks[i], [layouts[i].span(p) for p in pieces])], spec=SPEC)
            assert all(layouts[i].verify(p, b) for p, b in zip(pieces, bufs))
    assert len(opens) == 0 and len(tier._open) == 2  # page_layouts opened them (and kept the last two)
    assert preads == [2 * layouts[0].span(Summary(1, 0))[1], 2 * layouts[0].range_bytes, layouts[0].span(Summary(2, 1))[1]] * 4
    (bufs,) = tier.read_spans([(ks[0], [layouts[0].span(Pages(0, 1))])], spec=SPEC)
    assert layouts[0].verify(Pages(0, 1), bufs[0]) and len(opens) == 1 and len(tier._open) == 2
    # a removed block's file is closed, and a read of it is a miss
    assert tier.remove([ks[0]], spec=SPEC) == 1 and ks[0] not in tier._open._fds
    assert tier.read_spans([(ks[0], [(0, 16)])], spec=SPEC) == [None]
    # open_files=0: a file per read, closed after it
    t0 = DiskTier(tmp_path / "d", 64 << 20, codec="paged", open_files=0)
    (bufs,) = t0.read_spans([(ks[1], [layouts[1].span(Summary(0, 1))])], spec=SPEC)
    assert layouts[1].verify(Summary(0, 1), bufs[0]) and len(t0._open) == 0
    tier.close()
    assert len(tier._open) == 0
    t0.close()
