"""TierAttention: decode attention over KV that stays in the tiers, reading only selected pages."""

from __future__ import annotations

import pytest
import torch

from kvtier.kvstore import DiskTier, HostTier, KVSpec, TierConfig, TieredStore, chain_hashes
from kvtier.kvstore.pages import Summary
from kvtier.retrieval.tier_attention import TierAttention
from kvtier.sparse_attn import sparse_decode

SPEC = KVSpec("tier-att", num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32", block_tokens=64)
P = 16


def context(n_blocks, seed=0, spec=SPEC):
    """Blocks with a few strongly matching 'needle' pages, and the chain's keys."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(spec.num_layers, 2, spec.num_kv_heads, n_blocks * spec.block_tokens, spec.head_dim, generator=g)
    blocks = [kv[:, :, :, i * spec.block_tokens : (i + 1) * spec.block_tokens].contiguous() for i in range(n_blocks)]
    keys = chain_hashes(spec, [(seed * 31 + i) % 50000 for i in range(n_blocks * spec.block_tokens)])
    return kv, blocks, keys


def store_for(tmp_path, kind="disk", codec="paged"):
    if kind == "disk":
        return TieredStore([TierConfig(DiskTier(tmp_path / "d", 1 << 30, codec=codec))])
    if kind == "host":
        return TieredStore([TierConfig(HostTier(1 << 30, codec=codec))])
    raise AssertionError(kind)


def dense(q, k, v):
    """Full attention reference: q [H_q, D] over k, v [H_kv, T, D]."""
    o, lse = sparse_decode(q[None].float(), k[None].float(), v[None].float())
    return o[0], lse[0]


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_budget_covering_the_context_is_full_attention(tmp_path, kind):
    kv, blocks, keys = context(4)
    store = store_for(tmp_path, kind)
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=4 * 64, prefetch=False)
    ctx = att.open(keys)
    q = torch.randn(4, SPEC.head_dim)
    tail_k, tail_v = torch.randn(2, 5, SPEC.head_dim), torch.randn(2, 5, SPEC.head_dim)
    for layer in range(2):
        o, lse = att.decode_layer(ctx, layer, q, tail_k, tail_v)
        k = torch.cat([kv[layer, 0], tail_k], 1)
        v = torch.cat([kv[layer, 1], tail_v], 1)
        o_ref, lse_ref = dense(q, k, v)
        assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(lse, lse_ref, atol=1e-5)
    s = att.stats()
    assert s.page_misses == 2 * 2 * 16 and s.page_hits == 0
    assert s.page_bytes_read[kind] == s.selected_bytes  # exactly the selected pages' bytes


def test_selection_equals_the_same_selection_over_resident_kv(tmp_path):
    kv, blocks, keys = context(16, seed=1)
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=128, candidate_blocks=4, full_score_pages=0, prefetch=False)
    ctx = att.open(keys)
    q = torch.randn(4, SPEC.head_dim)
    ids = att.select(ctx, 1, q)
    assert ids.shape == (2, 128 // P) and bool((ids[:, 0] == 0).all())  # the sink page is always kept
    o, lse = att.decode_layer(ctx, 1, q)
    tok = att.token_ids(ctx, ids)
    o_ref, lse_ref = sparse_decode(q[None], kv[1, 0][None], kv[1, 1][None], tok[None])
    assert torch.allclose(o, o_ref[0], atol=1e-5) and torch.allclose(lse, lse_ref[0], atol=1e-5)


def test_hierarchy_finds_the_needle_pages_and_prunes_blocks(tmp_path):
    kv, blocks, keys = context(32, seed=2)
    q = torch.randn(4, SPEC.head_dim)
    # plant, per KV head, one page whose keys align with that head's queries (block 21, page 2)
    for h in range(2):
        kv[:, 0, h, 21 * 64 + 32 : 21 * 64 + 48] = 3 * q[2 * h] / q[2 * h].norm() * SPEC.head_dim**0.5
    blocks = [kv[:, :, :, i * 64 : (i + 1) * 64].contiguous() for i in range(32)]
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=64, candidate_blocks=4, full_score_pages=0, prefetch=False)
    ctx = att.open(keys)
    ids = att.select(ctx, 0, q)
    assert all(21 * 4 + 2 in row for row in ids.tolist())
    s = att.stats()
    assert s.pages_scored == 4 * 4 and s.blocks_scored == 32  # level 2 saw 4 blocks of 32


def test_page_cache_hits_across_steps_and_prefetch_warms_the_next_layer(tmp_path):
    kv, blocks, keys = context(16, seed=3)
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=128, prefetch=True)
    ctx = att.open(keys)
    q = torch.randn(4, SPEC.head_dim)
    for layer in range(2):
        att.decode_layer(ctx, layer, q)
    first = att.stats()
    assert first.page_hits == 0 and first.prefetched == 0
    att.reset_stats()
    for layer in range(2):  # same query: layer 1's pages were prefetched while layer 0 ran
        att.decode_layer(ctx, layer, q)
    second = att.stats()
    assert second.page_misses == 0 and second.hit_rate == 1.0
    assert sum(second.page_bytes_read.values()) == 0
    att.close()


def test_a_bounded_page_cache_reads_again(tmp_path):
    kv, blocks, keys = context(8, seed=4)
    store = store_for(tmp_path, "disk", "paged_int8")
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=128, page_cache_bytes=0, prefetch=False)
    ctx = att.open(keys)
    q = torch.randn(4, SPEC.head_dim)
    att.decode_layer(ctx, 0, q)
    att.decode_layer(ctx, 0, q)
    s = att.stats()
    assert s.page_hits == 0 and s.page_misses == 2 * 2 * 8 and len(att.pages) == 0
    assert s.page_bytes_read["disk"] == s.selected_bytes


@pytest.mark.redis
def test_decode_from_redis_cluster(redis_cluster_url):
    from kvtier.kvstore.tiers.redis import RedisTier

    kv, blocks, keys = context(8, seed=5)
    store = TieredStore([TierConfig(RedisTier(redis_cluster_url, codec="paged"))])
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=8 * 64, prefetch=False)
    ctx = att.open(keys)
    q = torch.randn(4, SPEC.head_dim)
    o, lse = att.decode_layer(ctx, 1, q)
    o_ref, lse_ref = dense(q, kv[1, 0], kv[1, 1])
    assert torch.allclose(o, o_ref, atol=1e-5)
    assert set(att.stats().page_bytes_read) == {"redis"}
    store.close()


def test_bad_input_is_a_value_error(tmp_path):
    _, blocks, keys = context(2)
    store = TieredStore([TierConfig(HostTier(1 << 30))])  # identity: not page-addressable
    store.put(SPEC, keys, blocks)
    with pytest.raises(ValueError, match="page-addressable"):
        TierAttention(store, SPEC).open(keys)
    with pytest.raises(ValueError):
        TierAttention(store, SPEC, budget=0)
    with pytest.raises(ValueError):
        TierAttention(object(), SPEC)
    store2 = store_for(tmp_path)
    store2.put(SPEC, keys, blocks)
    att = TierAttention(store2, SPEC, prefetch=False)
    ctx = att.open(keys)
    with pytest.raises(ValueError):
        att.decode_layer(ctx, 2, torch.randn(4, 32))
    with pytest.raises(ValueError):
        att.decode_layer(ctx, 0, torch.randn(3, 32))
    with pytest.raises(ValueError):
        att.decode_layer(ctx, 0, torch.randn(4, 32), torch.randn(2, 3, 32))


def test_an_empty_context_attends_the_resident_tokens_only(tmp_path):
    att = TierAttention(store_for(tmp_path), SPEC, prefetch=False)
    ctx = att.open([])
    q = torch.randn(4, 32)
    k, v = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    o, lse = att.decode_layer(ctx, 0, q, k, v)
    o_ref, lse_ref = dense(q, k, v)
    assert torch.allclose(o, o_ref, atol=1e-5)


def test_level_0_groups_blocks_and_still_finds_the_needle(tmp_path):
    kv, blocks, keys = context(48, seed=5)
    q = torch.randn(4, SPEC.head_dim)
    for h in range(2):  # a needle page per KV head in block 37, page 1
        kv[:, 0, h, 37 * 64 + 16 : 37 * 64 + 32] = 3 * q[2 * h] / q[2 * h].norm() * SPEC.head_dim**0.5
    blocks = [kv[:, :, :, i * 64 : (i + 1) * 64].contiguous() for i in range(48)]
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=64, candidate_blocks=4, candidate_groups=3, full_score_pages=0, prefetch=False)
    ctx = att.open(keys)
    assert ctx.group_blocks == 4 and ctx.groups is not None and ctx.groups.shape[2] == 12  # ceil(sqrt(48 / 3)) blocks a group
    # a group's bound bounds its blocks'
    D = SPEC.head_dim
    g = ctx.groups[:, :, 9:10]  # [L, H, 1, 2D]: maximum then minimum
    b = ctx.bounds[:, :, 36:40]
    assert bool((g[..., :D] >= b[..., :D]).all()) and bool((g[..., D:] <= b[..., D:]).all())
    assert torch.equal(g[..., :D], b[..., :D].amax(2, keepdim=True).float()) and torch.equal(
        g[..., D:], b[..., D:].amin(2, keepdim=True).float()
    )
    ids = att.select(ctx, 0, q)
    assert all(37 * 4 + 1 in row for row in ids.tolist()) and bool((ids[:, 0] == 0).all())
    s = att.stats()
    assert s.blocks_scored < 48  # level 0 scored 12 groups, level 1 the blocks of the kept ones only
    # extending the context regroups it (and a short last group is padded without changing its bound)
    _, more, more_keys = context(3, seed=6)
    store.put(SPEC, more_keys, more)
    att.extend(ctx, more_keys)
    assert ctx.num_blocks == 51 and ctx.group_blocks == 5 and ctx.groups.shape[2] == 11
    assert torch.equal(ctx.groups[:, :, 10:], ctx.bounds[:, :, 50:51].float())
    assert torch.equal(ctx.groups, att.open(keys + more_keys).groups)
    _, more2, more2_keys = context(4, seed=7)  # the same group size: only the last groups are rebuilt
    store.put(SPEC, more2_keys, more2)
    att.extend(ctx, more2_keys)
    assert ctx.group_blocks == 5 and torch.equal(ctx.groups, att.open(keys + more_keys + more2_keys).groups)
    assert torch.equal(ctx.bounds, att.open(keys + more_keys + more2_keys).bounds)
    o, lse = att.decode_layer(ctx, 1, q)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()


# -- streamed prefill -----------------------------------------------------------------------------
def causal_reference(q, k, v, scale, allowed=None):
    """q [H_q, T, D] over k, v [H_kv, T, D], causal (and ``allowed [H_kv, T, T]`` if given), float32."""
    H_q, T, D = q.shape
    G = H_q // k.shape[0]
    s = torch.einsum("hgtd,hsd->hgts", q.view(-1, G, T, D), k) * scale
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    mask = mask if allowed is None else mask & allowed
    s = s.masked_fill(~(mask if mask.dim() == 2 else mask.unsqueeze(1)), float("-inf"))
    return torch.einsum("hgts,hsd->hgtd", s.softmax(-1), v).reshape(H_q, T, D)


def test_streamed_prefill_with_a_covering_budget_is_full_causal_attention(tmp_path):
    from kvtier.retrieval.tier_attention import StreamedPrefill

    T, n = 640, 96  # chunks that do not align with blocks
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, T, SPEC.head_dim, generator=g)  # [L, H_q, T, D]
    k = torch.randn(2, 2, T, SPEC.head_dim, generator=g)
    v = torch.randn(2, 2, T, SPEC.head_dim, generator=g)
    store = store_for(tmp_path)
    att = TierAttention(store, SPEC, budget=T, prefetch=False)
    sp = StreamedPrefill(att, resident_tokens=16)
    out = torch.empty(2, 4, T, SPEC.head_dim)
    most_resident = 0
    for a in range(0, T, n):
        b = min(T, a + n)
        for layer in range(2):
            o, lse = sp.attend(layer, q[layer, :, a:b], k[layer, :, a:b], v[layer, :, a:b])
            out[layer, :, a:b] = o
            most_resident = max(most_resident, sp.k_local(layer).shape[1])
        sp.commit()
    scale = SPEC.head_dim**-0.5
    for layer in range(2):
        assert torch.allclose(out[layer], causal_reference(q[layer], k[layer], v[layer], scale), atol=1e-5)
    assert sp.stored_tokens == 576 and sp.ctx.num_blocks == 9  # blocks ending >= 16 tokens before the end are stored
    assert most_resident <= 16 + 64 + n  # memory: the resident tail, a block, a chunk
    # what was written is the KV itself: decode over it equals full attention too
    qd = torch.randn(4, SPEC.head_dim, generator=g)
    o, _ = att.decode_layer(sp.ctx, 1, qd, sp.k_local(1), sp.v_local(1))
    o_ref, _ = dense(qd, k[1], v[1])
    assert torch.allclose(o, o_ref, atol=1e-5)


def test_streamed_prefill_attends_the_selected_pages_and_the_causal_resident_tokens(tmp_path):
    from kvtier.retrieval.tier_attention import StreamedPrefill

    T, n = 768, 128
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, T, SPEC.head_dim, generator=g).expand(2, -1, -1, -1)
    k = torch.randn(1, 2, T, SPEC.head_dim, generator=g).expand(2, -1, -1, -1)
    v = torch.randn(1, 2, T, SPEC.head_dim, generator=g).expand(2, -1, -1, -1)
    store = store_for(tmp_path)
    att = TierAttention(store, SPEC, budget=64, candidate_blocks=2, full_score_pages=0, prefetch=False)
    sp = StreamedPrefill(att)
    for a in range(0, T - n, n):
        for layer in range(2):
            sp.attend(layer, q[layer, :, a : a + n], k[layer, :, a : a + n], v[layer, :, a : a + n])
        sp.commit()
    a = T - n
    assert sp.stored_tokens == a
    ids = att.select(sp.ctx, 0, q[0, :, -64:].reshape(-1, SPEC.head_dim))  # what the last chunk will select
    assert ids.shape == (2, 4)
    o, _ = sp.attend(0, q[0, :, a:], k[0, :, a:], v[0, :, a:])
    allowed = torch.zeros(2, T, T, dtype=torch.bool)
    for h in range(2):
        allowed[h, :, att.token_ids(sp.ctx, ids)[h]] = True
    allowed[:, :, a:] = True  # the chunk's own tokens (causal within)
    ref = causal_reference(q[0], k[0], v[0], SPEC.head_dim**-0.5, allowed)[:, a:]
    assert torch.allclose(o, ref, atol=1e-5)
    with pytest.raises(ValueError, match="already attended"):
        sp.attend(0, q[0, :, a:], k[0, :, a:], v[0, :, a:])
    with pytest.raises(ValueError, match="commit"):
        sp.commit()


def test_a_short_context_is_scored_page_by_page(tmp_path):
    kv, blocks, keys = context(16, seed=9)
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    q = torch.randn(4, SPEC.head_dim)
    one = TierAttention(store, SPEC, budget=64, candidate_blocks=2, prefetch=False)  # 64 pages <= full_score_pages
    ids = one.select(one.open(keys), 0, q)
    assert one.stats().pages_scored == 64 and one.stats().blocks_scored == 0
    ref = TierAttention(store, SPEC, budget=64, candidate_blocks=None, prefetch=False)
    assert torch.equal(ids, ref.select(ref.open(keys), 0, q))
    with pytest.raises(ValueError):
        TierAttention(store, SPEC, full_score_pages=-1)


def test_mean_weight_scores_pages_by_bound_and_mean_key(tmp_path):
    kv, blocks, keys = context(8, seed=10)
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    q = torch.randn(4, SPEC.head_dim)
    att = TierAttention(store, SPEC, budget=64, mean_weight=0.5, prefetch=False)
    ids = att.select(att.open(keys), 1, q)
    k = kv[1, 0].view(2, 32, 16, SPEC.head_dim)  # [H, pages, P, D]
    qg = q.view(2, 2, SPEC.head_dim)
    bound = (qg.clamp_min(0) @ k.amax(2).transpose(1, 2)) + (qg.clamp_max(0) @ k.amin(2).transpose(1, 2))
    s = (0.5 * bound + 0.5 * (qg @ k.mean(2).transpose(1, 2))).amax(1)  # [H, pages]
    s[:, 0] = float("inf")
    assert torch.equal(ids, s.topk(4, 1).indices.sort(1).values)
    with pytest.raises(ValueError):
        TierAttention(store, SPEC, mean_weight=2.0)


# -- per-head summary reads ------------------------------------------------------------------------
def test_a_step_reads_only_its_candidate_heads_summaries_and_reuses_them(tmp_path):
    kv, blocks, keys = context(24, seed=8)
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=32, candidate_blocks=3, candidate_groups=None, full_score_pages=0, prefetch=False)
    ctx = att.open(keys)
    att.reset_stats()
    # a fixed query: with one drawn from the global RNG (whatever ran before), both KV heads sometimes chose the same
    # three blocks, and the strict "<" below (fewer bytes than the candidates' whole layers) could not hold
    q = torch.randn(4, SPEC.head_dim, generator=torch.Generator().manual_seed(81))
    ids = att.select(ctx, 1, q)
    lay = ctx.layouts[0]
    head_bytes = lay.span(Summary(1, 0))[1]
    s = att.stats()
    pairs = {(b, h) for h, row in enumerate(ctx.candidates[1][0]) for b in row}
    assert len(pairs) <= 2 * 3
    assert s.summary_bytes_read["disk"] == len(pairs) * head_bytes < len({b for b, _ in pairs}) * lay.span(Summary(1))[1]
    assert len(att.summaries) == len(pairs)  # one hot entry per (block, layer, KV head)
    att.reset_stats()
    assert torch.equal(att.select(ctx, 1, q), ids)  # the same candidates: nothing read again
    assert att.stats().summary_bytes_read == {}
    # the page bounds read per head are those of the whole layer
    for b, h in pairs:
        kmin, kmax, _ = lay.decode_summary(1, store.read_pieces(SPEC, [(ctx.layouts[b], [Summary(1)])]).pieces[0][0])
        got = att.summaries.get_value((keys[b], 1, h))
        assert torch.equal(got, torch.cat([kmax[h], kmin[h]], 1))
    att.close()


def test_blocks_written_before_per_head_summaries_decode_alike(tmp_path):
    """Frames with per-layer summaries (layout 1, as written before) are read whole per layer and
    give the same selection and attention as the same blocks written now."""
    import os

    from kvtier.kvstore.frames import decode_frame, encode_frame

    sys_path = os.path.join(os.path.dirname(__file__), "..", "kvstore")
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("kvtier_test_pages", os.path.join(sys_path, "test_pages.py"))
    tp = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(tp)
    kv, blocks, keys = context(12, seed=9)
    new_store = store_for(tmp_path / "new")
    new_store.put(SPEC, keys, blocks)
    tier = new_store._tiers[0].tier
    old_root = tmp_path / "old"
    for key in keys:  # the same frames, rewritten with layout 1 summaries
        path = tier._path(key, SPEC.short_fingerprint)
        f = decode_frame(path.read_bytes(), expect_key=key, expect_spec=SPEC)
        payload, meta = tp.layer_summary_frame(f.data, f.codec_meta, SPEC)
        dst = old_root / path.relative_to(tier.root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(encode_frame(key, SPEC, "paged", meta, SPEC.block_shape, SPEC.dtype, payload))
    old_store = TieredStore([TierConfig(DiskTier(old_root, 1 << 30, codec="paged"))])
    old_store.register_spec(SPEC)  # adopts the blocks found on disk
    q = torch.randn(4, SPEC.head_dim)
    outs = []
    for store in (new_store, old_store):
        att = TierAttention(store, SPEC, budget=48, candidate_blocks=3, candidate_groups=None, full_score_pages=0, prefetch=False)
        ctx = att.open(keys)
        assert all(lay.head_summaries == (store is new_store) for lay in ctx.layouts)
        outs.append([att.select(ctx, layer, q) for layer in range(2)] + list(att.decode_layer(ctx, 1, q)))
        att.close()
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    new_store.close(), old_store.close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_steps_that_reuse_the_last_steps_candidates_and_pages_equal_fresh_ones(tmp_path, prefetch):
    """Drifting queries over many steps: the candidates' bounds and the pages kept in the context's
    slots give the selection and the attention a fresh instance computes from nothing."""
    kv, blocks, keys = context(32, seed=10)
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=96, candidate_blocks=5, candidate_groups=None, full_score_pages=0, prefetch=prefetch)
    ctx = att.open(keys)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, SPEC.head_dim, generator=g)
    reused = 0
    for step in range(8):
        q = q + 0.5 * torch.randn(q.shape, generator=g)
        for layer in range(2):
            fresh = TierAttention(store, SPEC, budget=96, candidate_blocks=5, candidate_groups=None, full_score_pages=0, prefetch=False)
            want = fresh.select(fresh.open(keys), layer, q[layer])
            before = att.stats()
            o, lse = att.decode_layer(ctx, layer, q[layer])
            assert torch.equal(ctx.last_pages[layer], want)
            assert sorted(sum(ctx.page_slots[layer][0], [])) == sorted(want.flatten().tolist()) or step == 0
            tok = att.token_ids(ctx, want)
            o_ref, lse_ref = sparse_decode(q[layer][None], kv[layer, 0][None], kv[layer, 1][None], tok[None])
            assert torch.allclose(o, o_ref[0], atol=1e-5) and torch.allclose(lse, lse_ref[0], atol=1e-5)
            reused += att.stats().page_hits - before.page_hits
            fresh.close()
    assert reused > 0 and len(ctx.candidates) == 2 and len(ctx.page_slots) == 2
    # without room in the page cache, no pages are kept in the context either
    small = TierAttention(store, SPEC, budget=96, candidate_blocks=5, page_cache_bytes=0, prefetch=False)
    sctx = small.open(keys)
    small.decode_layer(sctx, 0, q[0])
    assert sctx.page_slots == {}
    att.close(), small.close()


# -- memory: compact block bounds, metadata accounting, returning freed memory ----------------------
def test_block_bounds_are_float16_rounded_outward_and_select_alike(tmp_path):
    from kvtier.retrieval.tier_attention import _half_outward

    x = torch.tensor([0.1, -0.1, 1 / 3, 70000.0, -70000.0, 0.0])
    up, down = _half_outward(x, up=True), _half_outward(x, up=False)
    assert up.dtype == down.dtype == torch.float16
    assert bool((up.float() >= x).all()) and bool((down.float() <= x).all())
    fin = x.abs() <= 65504
    assert bool(((up.float() - x)[fin] <= 1e-3 * x.abs().clamp_min(1e-2)[fin]).all()) and bool(
        ((x - down.float())[fin] <= 1e-3 * x.abs().clamp_min(1e-2)[fin]).all()
    )
    assert up[3] == float("inf") and down[4] == float("-inf") and up[5] == 0 and down[5] == 0
    kv, blocks, keys = context(48, seed=5)
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    kw = dict(budget=64, candidate_blocks=4, candidate_groups=3, full_score_pages=0, prefetch=False)
    a16 = TierAttention(store, SPEC, **kw)
    a32 = TierAttention(store, SPEC, block_bounds_dtype=torch.float32, **kw)
    c16, c32 = a16.open(keys), a32.open(keys)
    assert c16.bounds.dtype == torch.float16 and c32.bounds.dtype == torch.float32
    D = SPEC.head_dim
    # outward: the float16 maximum is >= the float32 one, the minimum <=, and within float16's rounding
    assert bool((c16.bounds[..., :D].float() >= c32.bounds[..., :D]).all()) and bool(
        (c16.bounds[..., D:].float() <= c32.bounds[..., D:]).all()
    )
    assert torch.allclose(c16.bounds.float(), c32.bounds, rtol=1e-3, atol=1e-4)
    assert c16.metadata_bytes()["bounds"] * 2 == c32.metadata_bytes()["bounds"]
    with pytest.raises(ValueError, match="block_bounds_dtype"):
        TierAttention(store, SPEC, block_bounds_dtype=torch.bfloat16)
    # a block's bound still bounds every page's: score it and its pages for random queries
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        q = torch.randn(4, D, generator=g)
        qq = torch.cat([q.clamp_min(0), q.clamp_max(0)], 1).view(2, 2, 2 * D)
        blk = torch.bmm(qq, c16.bounds[0].float().transpose(1, 2)).amax(1)  # [H, N]
        pages = torch.stack(
            [torch.stack(a16._page_bounds(c16, 0, [(b, h) for b in range(48)])).float() for h in range(2)]
        )  # [H, N, Np, 2D]
        ps = torch.einsum("hgf,hnpf->hgnp", qq, pages).amax(1).amax(-1)  # [H, N]
        assert bool((blk >= ps - 1e-4).all())
        # the same selection as with float32 bounds (the needle-free context: the top pages agree)
        assert torch.equal(a16.select(c16, 0, q), a32.select(c32, 0, q))


def test_metadata_bytes_account_the_context_and_the_bounds_buffer_grows_by_a_quarter(tmp_path):
    kv, blocks, keys = context(40, seed=4)
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    att = TierAttention(store, SPEC, budget=64, candidate_blocks=4, full_score_pages=0, prefetch=False)
    ctx = att.open([])
    sizes, caps = [], []
    for i in range(0, 40, 2):
        att.extend(ctx, keys[i : i + 2])
        m = ctx.metadata_bytes()
        assert m["total"] == sum(v for k, v in m.items() if k != "total")
        cap = ctx._bounds_buffer.shape[2]
        assert cap >= ctx.num_blocks and m["bounds"] == SPEC.num_layers * SPEC.num_kv_heads * cap * 2 * SPEC.head_dim * 2
        sizes.append(m["keys"] + m["layouts"])
        caps.append(cap)
    assert caps[0] == 64 and caps[-1] == 64  # 40 blocks fit the first buffer
    assert all(b > a for a, b in zip(sizes, sizes[1:]))  # keys and layouts grow with the blocks
    per_block = (sizes[-1] - sizes[0]) / 38
    assert 100 < per_block < 64 << 10
    assert torch.equal(ctx.bounds, att.open(keys).bounds)
    more = context(60, seed=5)
    store.put(SPEC, more[2], more[1])
    att.extend(ctx, more[2])
    assert ctx.num_blocks == 100 and ctx._bounds_buffer.shape[2] == 100  # grown to what was needed (> 64 + 16)
    q = torch.randn(4, SPEC.head_dim)
    att.decode_layer(ctx, 0, q)
    m = att.memory(ctx)
    assert m["page_cache"] > 0 and m["page_cache_budget"] == 256 << 20 and m["summaries"] > 0
    assert m["metadata"]["candidates"] > 0 and m["metadata"]["page_slots"] > 0 and m["metadata"]["last_pages"] > 0


def test_streamed_prefill_trims_freed_memory_and_reuses_its_buffers(tmp_path):
    from kvtier.retrieval import tier_attention as ta
    from kvtier.retrieval.tier_attention import StreamedPrefill

    T, n = 640, 96
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, T, SPEC.head_dim, generator=g)
    k = torch.randn(2, 2, T, SPEC.head_dim, generator=g)
    v = torch.randn(2, 2, T, SPEC.head_dim, generator=g)
    outs = {}
    for trim in (0, None, 1 << 30):
        store = store_for(tmp_path / str(trim))
        att = TierAttention(store, SPEC, budget=64, candidate_blocks=2, full_score_pages=0, prefetch=False)
        sp = StreamedPrefill(att, resident_tokens=16, trim_bytes=trim)
        out, bufs = [], set()
        for a in range(0, T, n):
            for layer in range(2):
                o, _ = sp.attend(layer, q[layer, :, a : a + n], k[layer, :, a : a + n], v[layer, :, a : a + n])
                out.append(o)
            bufs.add(sp._kbuf[0].data_ptr())
            sp.commit()
            # the resident tokens are what was not stored, in order
            assert torch.equal(sp.k_local(1), k[1, :, sp.stored_tokens : min(T, a + n)])
            assert torch.equal(sp.v_local(0), v[0, :, sp.stored_tokens : min(T, a + n)])
        outs[trim] = torch.cat(out, 1)
        assert len(bufs) <= 2  # the first buffer, and one grown for the chunk that did not fit it
        mem = sp.memory()
        assert mem["resident"] == 2 * 2 * sp._kbuf[0].numel() * 4 and mem["metadata"]["total"] > 0
        expect = (sp.ctx.num_blocks > 0) if trim == 0 else 0
        if ta.malloc_trim():  # glibc
            assert (sp.trims > 0) == bool(expect) and (sp.trims == 0 or sp.trim_seconds > 0)
        att.close()
        store.close()
    assert torch.equal(outs[0], outs[None]) and torch.equal(outs[0], outs[1 << 30])  # trimming changes no result
    with pytest.raises(ValueError, match="trim_bytes"):
        StreamedPrefill(att, trim_bytes=-1)


# -- a bounded metadata budget: evicted block metadata is read again, results unchanged --------------
def _bounded_store(tmp_path, kind, request):
    if kind == "disk":
        return store_for(tmp_path)
    from kvtier.kvstore.tiers.redis import RedisTier

    return TieredStore([TierConfig(RedisTier(request.getfixturevalue("redis_url"), codec="paged"))])


@pytest.mark.parametrize("kind", ["disk", pytest.param("redis", marks=pytest.mark.redis)])
@pytest.mark.parametrize("metadata_bytes", [6000, 40000])
def test_a_small_metadata_budget_selects_and_attends_exactly_as_the_default(tmp_path, request, kind, metadata_bytes):
    """Streamed prefill then decode with the context's block metadata bounded (a few blocks, or
    about 20 of 60: slots, evictions and reads again; with 6,000 bytes a selection needs more blocks
    than fit, read for the call only) equal the default's, bit for bit, over disk and Redis."""
    import sys

    from kvtier.retrieval.tier_attention import StreamedPrefill

    T, n = 60 * 64, 320
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, T, SPEC.head_dim, generator=g)
    k = torch.randn(2, 2, T, SPEC.head_dim, generator=g)
    v = torch.randn(2, 2, T, SPEC.head_dim, generator=g)
    store = _bounded_store(tmp_path, kind, request)
    kw = dict(budget=64, candidate_blocks=4, candidate_groups=3, full_score_pages=0, prefetch=False)
    big = TierAttention(store, SPEC, **kw)
    small = TierAttention(store, SPEC, metadata_bytes=metadata_bytes, **kw)
    sps = [StreamedPrefill(a, resident_tokens=16) for a in (big, small)]
    for a in range(0, T, n):
        outs = []
        for sp in sps:
            for layer in range(2):
                outs.append(sp.attend(layer, q[layer, :, a : a + n], k[layer, :, a : a + n], v[layer, :, a : a + n]))
            sp.commit()
        for (o1, l1), (o2, l2) in zip(outs[:2], outs[2:]):
            assert torch.equal(o1, o2) and torch.equal(l1, l2)
    cb, cs = sps[0].ctx, sps[1].ctx
    assert cb.num_blocks == cs.num_blocks == 59 and torch.equal(cb.groups, cs.groups)
    assert cb.slot_of is None and cb.resident_blocks == 59 and big.stats().metadata_misses == 0
    assert cs.slot_of is not None and cs.resident_blocks == cs.capacity < 59
    m = cs.metadata_bytes()
    assert m["bounds"] + m["layouts"] - sys.getsizeof(cs.layouts) <= metadata_bytes  # the budget holds
    # decode from the prefilled contexts, and from contexts opened afresh (opened a capacity at a time)
    fresh = small.open(cs.keys)
    assert fresh.slot_of is not None and torch.equal(fresh.groups, cb.groups)
    for _ in range(3):
        qd = torch.randn(4, SPEC.head_dim, generator=g)
        for layer in range(2):
            ids = big.select(cb, layer, qd)
            assert torch.equal(ids, small.select(cs, layer, qd)) and torch.equal(ids, small.select(fresh, layer, qd))
            ref = big.decode_layer(cb, layer, qd, sps[0].k_local(layer), sps[0].v_local(layer))
            for ctx in (cs, fresh):
                got = small.decode_layer(ctx, layer, qd, sps[1].k_local(layer), sps[1].v_local(layer))
                assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    s = small.stats()
    assert s.metadata_misses > 0 and sum(s.metadata_bytes_read.values()) > 0 and set(s.metadata_bytes_read) == {kind}
    mem = small.memory(cs)
    assert mem["metadata_budget"] == metadata_bytes and mem["metadata_misses"] > 0 and mem["blocks"] == 59
    assert mem["metadata_blocks"] == cs.capacity
    assert big.memory(cb)["metadata_misses"] == 0
    big.close(), small.close()
    store.close()


def test_metadata_budget_validation_and_a_default_context_reads_nothing_again(tmp_path, monkeypatch):
    kv, blocks, keys = context(40, seed=6)
    store = store_for(tmp_path)
    store.put(SPEC, keys, blocks)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="metadata_bytes"):
            TierAttention(store, SPEC, metadata_bytes=bad)
    kw = dict(budget=64, candidate_blocks=4, candidate_groups=3, full_score_pages=0, prefetch=True)
    runs = []
    for mb in (None, 1 << 30):  # unbounded, and the default budget: the same reads
        att = TierAttention(store, SPEC, metadata_bytes=mb, **kw)
        ctx = att.open(keys)
        g = torch.Generator().manual_seed(1)
        outs = [att.decode_layer(ctx, layer, torch.randn(4, SPEC.head_dim, generator=g)) for _ in range(3) for layer in range(2)]
        s = att.stats()
        assert ctx.slot_of is None and s.metadata_misses == 0 and s.metadata_bytes_read == {}
        runs.append((outs, s.reads, s.summary_bytes_read, s.page_bytes_read))
        att.close()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(runs[0][0], runs[1][0])) and runs[0][1:] == runs[1][1:]
    # a budget of one block still works (every selection's blocks read for the call)
    att = TierAttention(store, SPEC, metadata_bytes=0, **kw)
    ctx = att.open(keys)
    assert ctx.capacity == 1 and ctx.resident_blocks == 1
    att.decode_layer(ctx, 0, torch.randn(4, SPEC.head_dim))
    assert att.stats().metadata_misses > 0
    att.close()
    # a capacity guessed before any layout is seen that is too large: the context is cut to the measured one
    from kvtier.retrieval import tier_attention

    ref = TierAttention(store, SPEC, **kw)
    rctx = ref.open(keys)
    monkeypatch.setattr(tier_attention, "_LAYOUT_FIXED_BYTES", 0)
    att = TierAttention(store, SPEC, metadata_bytes=30000, **kw)
    assert att._capacity(None) >= 40 > 30 > att._capacity(rctx.first_layout)  # the 40 blocks are read in one go
    ctx = att.open(keys)
    assert ctx.slot_of is not None and ctx.resident_blocks == ctx.capacity < 30 and torch.equal(ctx.groups, rctx.groups)
    q = torch.randn(4, SPEC.head_dim)
    for layer in range(2):
        assert torch.equal(att.select(ctx, layer, q), ref.select(rctx, layer, q))
    att.close(), ref.close()
