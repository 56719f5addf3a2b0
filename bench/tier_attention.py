"""Sparse decode attention over KV that stays in the tiers (``retrieval.TierAttention``).

Synthetic KV shaped like Llama-3-8B (8 KV heads, 32 query heads, D = 128, float16, blocks of 256
tokens), stored with the ``paged`` codec in the disk tier and in Redis (a private redis-server).
Fewer layers than Llama's 32 are stored (``--layers``, said in the output): the per-layer work is
what each figure measures, and 1M tokens x 32 layers would need 128 GiB of disk.

Per decode step (every stored layer once, the queries drifting a little from step to step as a
model's do) it measures, for each context length and tier:

- bytes read per tier (pages and summaries), against the physical minimum (the selected pages'
  stored bytes), the page-cache hit rate, and ms per step;
- (a) the same selection over fully resident KV (``sparse_decode`` over the same token ids);
- (b) dense attention reading all the KV of each layer from the same tier (one span per block and
  layer, 64 blocks at a time, states merged by LSE);
- and the goal's yardstick: dense attention over 4K resident tokens with the same heads.

``--quick`` (under a minute): 32K tokens, 1 layer, disk and Redis. The full run: 32K and 128K
(2 layers, disk and Redis), 1M (1 layer, disk). Saves bench/results/tier_attention{_quick}.json/.md
and a plot of bytes/step and ms/step against context length.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import RESULTS, LocalRedis, md_table, save_results  # noqa: E402
from kvtier.kvstore import DiskTier, KVSpec, TierConfig, TieredStore  # noqa: E402
from kvtier.retrieval.tier_attention import TierAttention  # noqa: E402
from kvtier.sparse_attn import merge_states, sparse_decode  # noqa: E402

H_Q, H_KV, D, BT = 32, 8, 128, 256
MiB = 1 << 20


def make_spec(layers: int) -> KVSpec:
    return KVSpec("llama3-8b-synthetic", num_layers=layers, num_kv_heads=H_KV, head_dim=D, dtype="float16", block_tokens=BT)


def fill(store: TieredStore, spec: KVSpec, num_tokens: int, seed: int, keep_resident: bool):
    """Store ``num_tokens`` of synthetic KV block by block (bounded memory); returns the keys and,
    when asked, the resident copy ``[L, 2, H_kv, T, D]`` for the resident baseline."""
    g = torch.Generator().manual_seed(seed)
    n = num_tokens // BT
    keys = [bytes(torch.randint(0, 256, (32,), generator=g, dtype=torch.uint8).tolist()) for _ in range(n)]
    resident = torch.empty(spec.num_layers, 2, H_KV, num_tokens, D, dtype=torch.float16) if keep_resident else None
    step = 32
    parent = None
    for i in range(0, n, step):
        m = min(step, n - i)
        blocks = torch.randn(m, *spec.block_shape, generator=g).to(torch.float16)
        # a few pages per block with larger keys, so that page scores differ as in real models
        blocks[:, :, 0] *= 1 + 2 * (torch.rand(m, spec.num_layers, H_KV, BT // 16, 1, 1, generator=g) > 0.9).float().repeat_interleave(
            16, 3
        ).view(m, spec.num_layers, H_KV, BT, 1)
        ok = store.put(spec, keys[i : i + m], blocks, parent=parent)
        if not all(ok):
            raise SystemExit(f"the store refused blocks at {i}: not enough room (disk or Redis memory)")
        parent = keys[i + m - 1]
        if resident is not None:
            resident[:, :, :, i * BT : (i + m) * BT] = blocks.permute(1, 2, 3, 0, 4, 5).reshape(spec.num_layers, 2, H_KV, m * BT, D)
    return keys, resident


def queries(spec: KVSpec, steps: int, seed: int) -> list[torch.Tensor]:
    """``[L, H_q, D]`` per step: a base query per layer that drifts (correlated steps)."""
    g = torch.Generator().manual_seed(seed + 1)
    base = torch.randn(spec.num_layers, H_Q, D, generator=g)
    out = []
    for _ in range(steps):
        base = base + 0.3 * torch.randn(base.shape, generator=g)
        out.append(base.clone())
    return out


def dense_4k(layers: int):
    """A function running dense decode attention over 4K resident tokens for ``layers`` layers
    (the goal's yardstick; float32: CPUs have no fast float16 arithmetic)."""
    g = torch.Generator().manual_seed(7)
    k = torch.randn(1, H_KV, 4096, D, generator=g)
    v = torch.randn(1, H_KV, 4096, D, generator=g)
    q = torch.randn(1, H_Q, D, generator=g)

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(layers):
            sparse_decode(q, k, v)
        return (time.perf_counter() - t0) * 1e3

    return run


def run_steps(att: TierAttention, ctx, qs, tail_k, tail_v, yardstick=None) -> list[dict]:
    """One entry per step: ms, bytes by tier and kind, hits; with ``yardstick`` (a function
    returning ms), it runs right after each step, so both see the same load of the machine."""
    rows = []
    L = att.spec.num_layers
    for q in qs:
        before = att.stats()
        t0 = time.perf_counter()
        for layer in range(L):
            att.decode_layer(ctx, layer, q[layer], tail_k, tail_v)
        ms = (time.perf_counter() - t0) * 1e3
        after = att.stats()
        rows.append(
            {
                "ms": ms,
                "page_bytes": sum(after.page_bytes_read.values()) - sum(before.page_bytes_read.values()),
                "summary_bytes": sum(after.summary_bytes_read.values()) - sum(before.summary_bytes_read.values()),
                "selected_bytes": after.selected_bytes - before.selected_bytes,
                "hits": after.page_hits - before.page_hits,
                "misses": after.page_misses - before.page_misses,
                "prefetched": after.prefetched - before.prefetched,
            }
        )
        if yardstick is not None:
            rows[-1]["dense_4k_ms"] = yardstick()
    return rows


def resident_step(att: TierAttention, ctx, qs, resident, tail_k, tail_v) -> float:
    """ms per step of the same selection over resident KV (selection included)."""
    L = att.spec.num_layers
    times = []
    for q in qs:
        t0 = time.perf_counter()
        for layer in range(L):
            ids = att.select(ctx, layer, q[layer])
            tok = att.token_ids(ctx, ids)
            qf = q[layer][None].half()
            o, lse = sparse_decode(qf, resident[layer, 0][None], resident[layer, 1][None], tok[None], check_indices=False)
            o2, lse2 = sparse_decode(qf, tail_k[None], tail_v[None])
            merge_states(o.float(), lse, o2.float(), lse2)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def dense_from_tier_step(store: TieredStore, spec: KVSpec, layouts, q, tail_k, tail_v) -> tuple[float, int]:
    """(ms, bytes) of one decode step of dense attention reading every layer's KV from the tier:
    per block one span (a layer of a block is contiguous in a paged frame), 64 blocks at a time."""
    from kvtier.kvstore.pages import Pages

    P = layouts[0].page_tokens
    Np = BT // P
    nbytes = 0
    t0 = time.perf_counter()
    for layer in range(spec.num_layers):
        qf = q[layer][None]
        o, lse = sparse_decode(qf, tail_k.float()[None], tail_v.float()[None])
        for g in range(0, len(layouts), 64):
            group = layouts[g : g + 64]
            res = store.read_pieces(spec, [(lay, [Pages(lay.range_id(layer, 0, 0), H_KV * Np)]) for lay in group])
            nbytes += sum(res.bytes_by_tier.values())
            pages = torch.stack([lay.decode_pages(p[0], H_KV * Np, torch.float32) for lay, p in zip(group, res.pieces)])
            kv = pages.view(len(group), H_KV, Np, 2, P, D).permute(3, 1, 0, 2, 4, 5).reshape(2, H_KV, len(group) * BT, D)
            o2, lse2 = sparse_decode(qf, kv[0][None], kv[1][None])
            o, lse = merge_states(o.float(), lse, o2.float(), lse2)
    return (time.perf_counter() - t0) * 1e3, nbytes


def bench_one(store: TieredStore, tier: str, spec: KVSpec, num_tokens: int, args, *, dense_steps: int, keep_resident: bool) -> dict:
    t0 = time.perf_counter()
    keys, resident = fill(store, spec, num_tokens, seed=num_tokens, keep_resident=keep_resident)
    fill_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(3)
    tail_k = torch.randn(H_KV, 64, D, generator=g).half()  # the resident recent window
    tail_v = torch.randn(H_KV, 64, D, generator=g).half()
    att = TierAttention(
        store,
        spec,
        budget=args.budget,
        candidate_blocks=args.candidate_blocks,
        page_cache_bytes=args.page_cache_mib * MiB,
        summary_bytes=args.summary_mib * MiB,
        metadata_bytes=metadata_bytes(args),
    )
    t0 = time.perf_counter()
    ctx = att.open(keys)
    open_ms = (time.perf_counter() - t0) * 1e3
    qs = queries(spec, args.steps, seed=num_tokens)
    steps = run_steps(att, ctx, qs, tail_k, tail_v, yardstick=dense_4k(spec.num_layers))
    cold, warm = steps[0], steps[1:]
    avg = {k: sum(s[k] for s in warm) / len(warm) for k in warm[0]}
    hit_rate = sum(s["hits"] for s in warm) / max(1, sum(s["hits"] + s["misses"] for s in warm))
    cold_ratio = cold["page_bytes"] / cold["selected_bytes"]
    att_stats = att.stats()
    att.close()
    row = {
        "tier": tier,
        "tokens": num_tokens,
        "layers": spec.num_layers,
        "fill_s": fill_s,
        "open_ms": open_ms,
        "cold": cold,
        "warm": avg,
        "hit_rate": hit_rate,
        "cold_bytes_over_min": cold_ratio,
        "warm_bytes_over_min": (avg["page_bytes"]) / avg["selected_bytes"],
        "ms_per_step": sorted(s["ms"] for s in warm)[len(warm) // 2],
        "pages_scored_per_layer": att_stats.pages_scored / max(1, att_stats.steps),
        "blocks_scored_per_layer": att_stats.blocks_scored / max(1, att_stats.steps),
        "metadata_budget_mib": args.metadata_mib,
        "metadata_blocks_resident": ctx.resident_blocks,
        "metadata_misses": att_stats.metadata_misses,
    }
    if resident is not None:
        ra = TierAttention(
            store, spec, budget=args.budget, candidate_blocks=args.candidate_blocks, prefetch=False, summary_bytes=args.summary_mib * MiB
        )
        rctx = ra.open(keys)
        row["resident_ms_per_step"] = resident_step(ra, rctx, qs, resident, tail_k, tail_v)
        ra.close()
    if dense_steps:
        d = [dense_from_tier_step(store, spec, ctx.layouts, q, tail_k, tail_v) for q in qs[:dense_steps]]
        row["dense_tier_ms_per_step"] = sorted(ms for ms, _ in d)[len(d) // 2]
        row["dense_tier_bytes_per_step"] = d[0][1]
    row["dense_4k_resident_ms_per_step"] = sorted(s["dense_4k_ms"] for s in warm)[len(warm) // 2]
    # the ratio of each step to the dense yardstick run right after it (same machine load), median
    ratios = sorted(s["ms"] / s["dense_4k_ms"] for s in warm)
    row["step_over_dense_4k"] = ratios[len(ratios) // 2]
    print(
        f"  {tier:5s} {num_tokens:>8,} tokens x {spec.num_layers} layer(s): {row['ms_per_step']:.1f} ms/step warm, "
        f"{avg['page_bytes'] / MiB:.2f} MiB pages + {avg['summary_bytes'] / MiB:.2f} MiB summaries read/step "
        f"(selected {avg['selected_bytes'] / MiB:.2f} MiB), hit rate {hit_rate:.2f}, cold read {cold_ratio:.2f}x the minimum"
        + (f"; resident {row['resident_ms_per_step']:.1f} ms" if "resident_ms_per_step" in row else "")
        + (f"; dense from tier {row['dense_tier_ms_per_step']:.0f} ms" if "dense_tier_ms_per_step" in row else "")
        + f"; dense 4K resident {row['dense_4k_resident_ms_per_step']:.1f} ms",
        flush=True,
    )
    return row


def metadata_bytes(args) -> int | None:
    """``TierAttention(metadata_bytes=...)`` from ``--metadata-mib`` (negative: unbounded)."""
    return None if args.metadata_mib < 0 else int(args.metadata_mib * MiB)


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process, MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open("/proc/self/statm") as f:
        cur = int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") / MiB)
    return cur, peak


def _prefill_run(args) -> dict:
    """One streamed prefill (in this process: RSS is the process's); returns its row, with RSS and
    the memory breakdown sampled every ``num_tokens / --prefill-samples`` tokens."""
    from kvtier.retrieval.tier_attention import StreamedPrefill

    num_tokens = (64 << 10) if args.quick else args.prefill_tokens
    layers, chunk, g_heads = 1, args.prefill_chunk, args.prefill_query_heads
    spec = make_spec(layers)
    root = Path(args.dir or tempfile.mkdtemp(prefix="kvtier-tier-prefill-"))
    store = TieredStore([TierConfig(DiskTier(root / "disk", 64 << 30, codec="paged"))])
    bounds_dtype = {"float16": torch.float16, "float32": torch.float32}[args.prefill_bounds]
    att = TierAttention(
        store,
        spec,
        budget=args.budget,
        candidate_blocks=args.candidate_blocks,
        page_cache_bytes=args.page_cache_mib * MiB,
        summary_bytes=args.summary_mib * MiB,
        prefetch=False,
        block_bounds_dtype=bounds_dtype,
        metadata_bytes=metadata_bytes(args),
    )
    trim = None if args.prefill_trim_mib < 0 else int(args.prefill_trim_mib * MiB)
    sp = StreamedPrefill(att, trim_bytes=trim)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(g_heads, D, generator=g)
    rss0, _ = rss_mib()
    every = max(chunk, num_tokens // args.prefill_samples // chunk * chunk)
    samples = []
    hi = 0.0
    import resource

    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    last = t0
    checksum = 0.0
    try:
        for a in range(0, num_tokens, chunk):
            n = min(chunk, num_tokens - a)
            for layer in range(layers):
                k = torch.randn(H_KV, n, D, generator=g).half()
                v = torch.randn(H_KV, n, D, generator=g).half()
                q = base[:, None] + 0.5 * torch.randn(g_heads, n, D, generator=g)
                o, _ = sp.attend(layer, q, k, v)
                checksum += float(o[:, -1].sum())
            hi = max(hi, rss_mib()[0])  # before the commit: what was freed since the last trim still counts
            sp.commit()
            done = a + n
            if done % every == 0 or done == num_tokens:
                cur, peak = rss_mib()
                m = sp.memory()
                md_ = m["metadata"]
                samples.append(
                    {
                        "tokens": done,
                        "seconds": time.perf_counter() - t0,
                        "rss_mib": cur,  # after the commit (and its trim, when one was due)
                        "rss_max_mib": max(hi, cur),  # the most over the interval, read before each commit
                        "peak_rss_mib": peak,
                        "page_cache_mib": m["page_cache"] / MiB,
                        "summaries_mib": m["summaries"] / MiB,
                        "resident_mib": m["resident"] / MiB,
                        "metadata_mib": md_["total"] / MiB,
                        "metadata": {k_: v_ for k_, v_ in md_.items()},
                        "blocks": sp.ctx.num_blocks,
                        "metadata_blocks": m["metadata_blocks"],
                        "metadata_misses": m["metadata_misses"],
                    }
                )
                hi = 0.0
            if time.perf_counter() - last > 30:
                last = time.perf_counter()
                cur, peak = rss_mib()
                print(f"    {done:>9,} tokens, {last - t0:.0f} s, RSS {cur:.0f} MiB (peak {peak:.0f})", flush=True)
        secs = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        cur, peak = rss_mib()
        st = att.stats()
    finally:
        att.close()
        store.close()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    for s in samples:  # what the accounted structures explain, and the rest (allocator, store index, Python)
        s["accounted_mib"] = rss0 + s["page_cache_mib"] + s["summaries_mib"] + s["resident_mib"] + s["metadata_mib"]
        s["unaccounted_mib"] = s["rss_max_mib"] - s["accounted_mib"]
    last_s = samples[-1]
    half = [s for s in samples if s["tokens"] >= num_tokens // 2]
    slope = 0.0  # least squares over the second half, MiB per 1M tokens
    if len(half) > 1:
        xs, ys = [s_["tokens"] / (1 << 20) for s_ in half], [s_["rss_max_mib"] for s_ in half]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x_ - mx) * (y_ - my) for x_, y_ in zip(xs, ys)) / max(1e-12, sum((x_ - mx) ** 2 for x_ in xs))
    return {
        "tokens": num_tokens,
        "layers": layers,
        "query_heads": g_heads,
        "chunk_tokens": chunk,
        "budget": args.budget,
        "trim_bytes": trim,
        "block_bounds_dtype": args.prefill_bounds,
        "metadata_budget_mib": args.metadata_mib,
        "metadata_misses": st.metadata_misses,
        "metadata_bytes_read": sum(st.metadata_bytes_read.values()),
        "page_cache_budget_mib": args.page_cache_mib,
        "summary_budget_mib": args.summary_mib,
        "seconds": secs,
        "tokens_per_s": num_tokens / secs,
        "rss_before_mib": rss0,
        "rss_after_mib": cur,
        "peak_rss_mib": max(peak, *(s_["rss_max_mib"] for s_ in samples)),  # getrusage's, and the samples'
        "kv_mib": num_tokens * layers * 2 * H_KV * D * 2 / MiB,
        "stored_tokens": sp.stored_tokens,
        "page_bytes_read": sum(st.page_bytes_read.values()),
        "summary_bytes_read": sum(st.summary_bytes_read.values()),
        "page_hit_rate": st.hit_rate,
        "minor_page_faults": faults,
        "trims": sp.trims,
        "trim_seconds": sp.trim_seconds,
        "ms_per_trim": 1e3 * sp.trim_seconds / sp.trims if sp.trims else 0.0,
        "metadata_bytes_per_block": last_s["metadata"]["total"] / max(1, last_s["blocks"]),
        "rss_slope_mib_per_mtoken_second_half": slope,
        "max_unaccounted_mib": max(s["unaccounted_mib"] for s in samples),
        "samples": samples,
        "checksum": checksum,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # glibc: a fixed threshold returns freed buffers
    }


def plot_prefill(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r, style in zip(rows, ("o-", "s--", "^:")):
        x = [s["tokens"] / 1024 for s in r["samples"]]
        ax.plot(x, [s["rss_max_mib"] for s in r["samples"]], style, ms=3, label=f"RSS (most per interval): {r['label']}")
        if r is rows[0]:
            ax.plot(x, [s["accounted_mib"] for s in r["samples"]], ":", color="gray", label="before + caches + metadata + resident (first)")
            ax.plot(
                x,
                [r["rss_before_mib"] + s["metadata_mib"] for s in r["samples"]],
                "-.",
                color="black",
                lw=0.8,
                label="before + metadata (first)",
            )
    ax.set_xlabel("prompt tokens prefilled (K)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("Streamed prefill into the disk tier: resident memory against tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_prefill(args) -> None:
    """``--prefill``: a streamed prefill of ``--prefill-tokens`` synthetic tokens into the disk tier
    (``retrieval.StreamedPrefill``), chunk by chunk; RSS against tokens and the memory breakdown.
    ``--prefill-baseline``: also, in a child process, the same prefill with freed memory kept by
    the allocator and float32 block bounds (the configuration before ``trim_bytes``)."""
    if args.prefill_child:  # a configuration run for the parent: its row only
        Path(args.out).write_text(json.dumps(_prefill_run(args), default=float))
        return

    def child(extra: list[str], label: str) -> dict:  # a child forked from a small parent (getrusage's peak survives exec)
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "child.json"
            cmd = [sys.executable, __file__, "--prefill", "--prefill-child", "--out", str(out)]
            cmd += ["--prefill-tokens", str(args.prefill_tokens), "--prefill-chunk", str(args.prefill_chunk)]
            cmd += ["--prefill-query-heads", str(args.prefill_query_heads), "--threads", str(args.threads)]
            cmd += ["--page-cache-mib", str(args.page_cache_mib), "--summary-mib", str(args.summary_mib), "--budget", str(args.budget)]
            cmd += ["--candidate-blocks", str(args.candidate_blocks)] + (["--quick"] if args.quick else []) + extra
            subprocess.run(cmd, check=True)
            r = json.loads(out.read_text())
        r["label"] = label
        return r

    others = []
    if args.prefill_unbounded:
        others.append(
            child(
                ["--prefill-trim-mib", str(args.prefill_trim_mib), "--prefill-bounds", args.prefill_bounds, "--metadata-mib", "-1"],
                f"unbounded metadata (trim {args.prefill_trim_mib:g} MiB, {args.prefill_bounds} bounds)",
            )
        )
    if args.prefill_baseline:
        others.append(
            child(
                ["--prefill-trim-mib", "-1", "--prefill-bounds", "float32", "--metadata-mib", "-1"],
                "no trim, float32 bounds, unbounded metadata (before)",
            )
        )
    row = _prefill_run(args)
    mb = "unbounded" if args.metadata_mib < 0 else f"{args.metadata_mib:g} MiB"
    row["label"] = f"metadata {mb} (trim {args.prefill_trim_mib:g} MiB, {args.prefill_bounds} bounds)"
    rows = [row] + others
    num_tokens, layers, chunk, g_heads = row["tokens"], row["layers"], row["chunk_tokens"], row["query_heads"]
    load = os.getloadavg()
    name = "tier_prefill_quick" if args.quick else "tier_prefill"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_prefill(rows, RESULTS / f"{name}.png")
    for r in rows:
        print(
            f"  [{r['label']}] {num_tokens:,} tokens x {layers} layer: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB "
            f"(before {r['rss_before_mib']:.0f}), final {r['rss_after_mib']:.0f}; metadata {r['samples'][-1]['metadata_mib']:.1f} MiB "
            f"({r['metadata_bytes_per_block']:.0f} B/block); RSS slope over the second half {r['rss_slope_mib_per_mtoken_second_half']:.0f} "
            f"MiB/M tokens; {r['trims']} trims, {r['ms_per_trim']:.1f} ms each; {r['minor_page_faults']:,} minor page faults"
        )
    for r in rows[1:]:
        print(
            f"  peak RSS ratio [{r['label']}] / first: {r['peak_rss_mib'] / row['peak_rss_mib']:.2f}x; "
            f"time ratio first / [{r['label']}]: {row['seconds'] / r['seconds']:.2f}x"
        )
    s_last = row["samples"][-1]
    bound = (
        row["rss_before_mib"]
        + row["page_cache_budget_mib"]
        + row["summary_budget_mib"]
        + s_last["resident_mib"]
        + max(0.0, row["max_unaccounted_mib"])
    )
    smd = s_last["metadata"]
    md_bounded = smd["bounds"] + smd["layouts"]
    md_per_block = (smd["keys"] + smd.get("slots", 0)) / max(1, s_last["blocks"])
    md_last = smd["candidates"] + smd["page_slots"] + smd["last_pages"]
    md = [
        "## " + " ".join(["bench/tier_attention.py"] + sys.argv[1:]),
        "",
        f"Streamed prefill (`retrieval.StreamedPrefill`) of synthetic KV shaped like Llama-3-8B (8 KV heads, D=128, float16, "
        f"256-token blocks, `paged` codec, disk tier): **{layers} layer instead of 32 and {g_heads} query heads instead of 32** "
        f"(the CPU computes every chunk's attention: 32 layers x 32 heads would take hours here). Chunks of {chunk} tokens; each "
        f"attends {args.budget} selected tokens per KV head of the stored context plus the resident tokens (causal); finished "
        f"blocks are written and released. Page cache {args.page_cache_mib} MiB, hot summaries {args.summary_mib} MiB, "
        f"block metadata {mb} per context (`TierAttention(metadata_bytes=...)`). "
        f"{args.threads} torch threads, shared CPU box, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
        + (f"; glibc `MALLOC_MMAP_THRESHOLD_={row['malloc_mmap_threshold']}`." if row["malloc_mmap_threshold"] else "."),
        "",
        md_table(
            [
                "configuration",
                "tokens",
                "seconds",
                "tokens/s",
                "RSS before (MiB)",
                "peak RSS (MiB)",
                "metadata at the end (MiB)",
                "metadata B/block",
                "RSS slope, 2nd half (MiB/M tokens)",
                "trims (ms each)",
                "KV written (MiB)",
                "pages + summaries read (MiB)",
                "metadata read again: blocks (MiB)",
            ],
            [
                [
                    r["label"],
                    f"{r['tokens']:,}",
                    f"{r['seconds']:.0f}",
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['rss_before_mib']:.0f}",
                    f"{r['peak_rss_mib']:.0f}",
                    f"{r['samples'][-1]['metadata_mib']:.1f}",
                    f"{r['metadata_bytes_per_block']:,.0f}",
                    f"{r['rss_slope_mib_per_mtoken_second_half']:.0f}",
                    f"{r['trims']} ({r['ms_per_trim']:.1f})",
                    f"{r['kv_mib']:,.0f}",
                    f"{r['page_bytes_read'] / MiB:,.0f} + {r['summary_bytes_read'] / MiB:,.0f}",
                    f"{r.get('metadata_misses', 0):,} ({r.get('metadata_bytes_read', 0) / MiB:,.1f})",
                ]
                for r in rows
            ],
        ),
        "",
        f"RSS against tokens ({row['label']}; MiB; accounted = before + page cache + hot summaries + resident tokens + "
        "`TierContext.metadata_bytes`; the rest is the allocator's free lists, the store's index and Python objects):",
        "",
        md_table(
            [
                "tokens",
                "RSS (most in the interval)",
                "RSS after the commit",
                "page cache",
                "summaries",
                "resident",
                "metadata",
                "of which bounds",
                "blocks resident / stored",
                "metadata read again (blocks)",
                "accounted",
                "rest",
            ],
            [
                [
                    f"{s['tokens']:,}",
                    f"{s['rss_max_mib']:.0f}",
                    f"{s['rss_mib']:.0f}",
                    f"{s['page_cache_mib']:.0f}",
                    f"{s['summaries_mib']:.0f}",
                    f"{s['resident_mib']:.1f}",
                    f"{s['metadata_mib']:.1f}",
                    f"{s['metadata']['bounds'] / MiB:.1f}",
                    f"{s.get('metadata_blocks', s['blocks']):,} / {s['blocks']:,}",
                    f"{s.get('metadata_misses', 0):,}",
                    f"{s['accounted_mib']:.0f}",
                    f"{s['unaccounted_mib']:.0f}",
                ]
                for s in row["samples"]
            ],
        ),
        "",
        f"Bound (first configuration): RSS <= before ({row['rss_before_mib']:.0f}) + page-cache budget ({args.page_cache_mib}) + "
        f"summary budget ({args.summary_mib}) + resident ({s_last['resident_mib']:.1f}) + metadata + rest (at most "
        f"{row['max_unaccounted_mib']:.0f} measured) = {bound:.0f} MiB + metadata; metadata at {num_tokens:,} tokens = "
        f"{s_last['metadata_mib']:.1f} MiB: block bounds and layouts {md_bounded / MiB:.1f} MiB (bounded by `metadata_bytes`, {mb}), "
        f"level 0's group bounds {s_last['metadata']['groups'] / MiB:.1f} MiB (O(sqrt(blocks))), block keys and slot tables "
        f"{md_per_block:.0f} B per block (O(blocks)), the last chunk's candidates and pages {md_last / MiB:.1f} MiB. "
        f"Plot: [{name}.png]({name}.png).",
        "",
        "Goal: a 1M-token streamed prefill completes with bounded memory (peak RSS reported).",
    ]
    save_results(
        name, {"quick": args.quick, "threads": args.threads, "load_average": load, "row": row, "rows": rows}, "\n".join(md), args.out
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for tier in sorted({r["tier"] for r in rows}):
        rs = sorted((r for r in rows if r["tier"] == tier), key=lambda r: r["tokens"])
        x = [r["tokens"] for r in rs]
        per_layer = [r["layers"] for r in rs]
        a.plot(x, [r["warm"]["page_bytes"] / MiB / n for r, n in zip(rs, per_layer)], "o-", label=f"{tier}: pages read (warm)")
        a.plot(x, [r["cold"]["page_bytes"] / MiB / n for r, n in zip(rs, per_layer)], "s--", label=f"{tier}: pages read (cold)")
        a.plot(x, [r["warm"]["summary_bytes"] / MiB / n for r, n in zip(rs, per_layer)], "^:", label=f"{tier}: summaries read")
        b.plot(x, [r["ms_per_step"] / n for r, n in zip(rs, per_layer)], "o-", label=f"{tier}: tier attention")
        d = [(r["tokens"], r["dense_tier_ms_per_step"] / r["layers"]) for r in rs if "dense_tier_ms_per_step" in r]
        if d:
            b.plot(*zip(*d), "x--", label=f"{tier}: dense from tier")
    b.axhline(rows[0]["dense_4k_resident_ms_per_step"] / rows[0]["layers"], color="gray", ls=":", label="dense, 4K resident")
    for ax, title in ((a, "MiB read per layer and step"), (b, "ms per layer and step")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32K tokens, 1 layer (under a minute)")
    ap.add_argument("--out", help="also write the figures as JSON to this file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=512, help="tokens per KV head from the stored context")
    ap.add_argument("--candidate-blocks", type=int, default=32)
    ap.add_argument("--page-cache-mib", type=int, default=64)
    ap.add_argument("--summary-mib", type=int, default=64)
    ap.add_argument(
        "--metadata-mib", type=float, default=1024, help="TierAttention(metadata_bytes=...) in MiB, per open context; negative: unbounded"
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--dir", help="where the disk tier lives (default: a temporary directory)")
    ap.add_argument("--no-1m", action="store_true", help="skip the 1M-token context in the full run")
    ap.add_argument(
        "--no-1m-redis",
        action="store_true",
        help="the 1M-token context in the disk tier only (in Redis it needs about 4.5 GiB of memory for redis-server)",
    )
    ap.add_argument("--contexts", type=int, nargs="+", help="run only these contexts of the full run, in K tokens (32 128 1024)")
    ap.add_argument("--prefill", action="store_true", help="only the streamed prefill (1M tokens; --quick: 64K)")
    ap.add_argument("--prefill-tokens", type=int, default=1 << 20)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--prefill-query-heads", type=int, default=8)
    ap.add_argument("--prefill-trim-mib", type=float, default=16, help="StreamedPrefill(trim_bytes=...) in MiB; negative: never")
    ap.add_argument("--prefill-bounds", choices=["float16", "float32"], default="float16", help="TierAttention(block_bounds_dtype=...)")
    ap.add_argument("--prefill-samples", type=int, default=32, help="RSS samples over the prefill")
    ap.add_argument("--prefill-baseline", action="store_true", help="also run, in a child process, no trim and float32 bounds")
    ap.add_argument(
        "--prefill-unbounded", action="store_true", help="also run, in a child process, the same prefill with unbounded metadata"
    )
    ap.add_argument("--prefill-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.prefill:
        bench_prefill(args)
        return
    args.steps = args.steps or (4 if args.quick else 8)
    t_all = time.time()
    if args.quick:
        plan = [(32 << 10, 1, ("disk", "redis"), 2, True)]
    else:
        plan = [(32 << 10, 2, ("disk", "redis"), 2, True), (128 << 10, 2, ("disk", "redis"), 1, True)]
        if not args.no_1m:
            plan.append((1 << 20, 1, ("disk",) if args.no_1m_redis else ("disk", "redis"), 1, False))
        if args.contexts:
            plan = [p for p in plan if p[0] >> 10 in args.contexts]
    rows = []
    root = Path(args.dir or tempfile.mkdtemp(prefix="kvtier-tier-att-"))
    redis = None
    try:
        for num_tokens, layers, tiers, dense_steps, keep_resident in plan:
            spec = make_spec(layers)
            for tier in tiers:
                if tier == "disk":
                    d = root / f"disk-{num_tokens}"
                    store = TieredStore([TierConfig(DiskTier(d, 64 << 30, codec="paged"))])
                else:
                    from kvtier.kvstore.tiers.redis import RedisTier

                    if redis is None:
                        redis = LocalRedis()
                    store = TieredStore([TierConfig(RedisTier(redis.url, codec="paged", socket_timeout_s=30.0))])
                rows.append(bench_one(store, tier, spec, num_tokens, args, dense_steps=dense_steps, keep_resident=keep_resident))
                if tier == "disk":
                    store.close()
                    shutil.rmtree(root / f"disk-{num_tokens}", ignore_errors=True)
                else:
                    store._tiers[0].tier._call(lambda c: c.flushall())
                    store.close()
    finally:
        if redis is not None:
            redis.close()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    name = "tier_attention_quick" if args.quick else "tier_attention"
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    for r in rows:
        r["commit"], r["date"] = commit, time.strftime("%Y-%m-%d %H:%M")
    if args.contexts and (RESULTS / f"{name}.json").exists():  # a partial run replaces its rows only
        new = {(r["tier"], r["tokens"]) for r in rows}
        old = json.loads((RESULTS / f"{name}.json").read_text()).get("rows", [])
        rows = sorted([r for r in old if (r["tier"], r["tokens"]) not in new] + rows, key=lambda r: (r["tokens"], r["tier"]))
    plot(rows, RESULTS / f"{name}.png")
    table = []
    for r in rows:
        table.append(
            [
                r["tier"],
                f"{r['tokens']:,}",
                r["layers"],
                f"{r['ms_per_step']:.1f}",
                f"{r.get('resident_ms_per_step', float('nan')):.1f}",
                f"{r['dense_tier_ms_per_step']:.0f}" if "dense_tier_ms_per_step" in r else "-",
                f"{r['dense_4k_resident_ms_per_step']:.1f}",
                f"{r['step_over_dense_4k']:.2f}x",
                f"{r['cold']['page_bytes'] / MiB:.2f} / {r['cold']['selected_bytes'] / MiB:.2f}",
                f"{r['warm']['page_bytes'] / MiB:.2f}",
                f"{r['warm']['summary_bytes'] / MiB:.2f}",
                f"{r['dense_tier_bytes_per_step'] / MiB:.0f}" if "dense_tier_bytes_per_step" in r else "-",
                f"{r['hit_rate']:.2f}",
                f"{r['blocks_scored_per_layer']:.0f} / {r['pages_scored_per_layer']:.0f}",
                r.get("commit", "?"),
            ]
        )
    md = [
        f"## bench/tier_attention.py{' --quick' if args.quick else ''}",
        "",
        f"Synthetic KV shaped like Llama-3-8B (8 KV heads, 32 query heads, D=128, float16, 256-token blocks, `paged` codec); "
        f"**{', '.join(sorted({str(r['layers']) for r in rows}))} layer(s) stored instead of 32** (per-layer work is what is measured; "
        f"1M x 32 layers would be 128 GiB). Budget {args.budget} tokens per KV head, {args.candidate_blocks} candidate blocks, "
        f"page cache {args.page_cache_mib} MiB, hot summaries {args.summary_mib} MiB, {args.steps} steps (first cold), "
        f"{args.threads} torch threads, shared CPU box.",
        "",
        md_table(
            [
                "tier",
                "tokens",
                "layers",
                "ms/step",
                "(a) resident, same selection",
                "(b) dense from tier",
                "dense 4K resident",
                "step / dense 4K",
                "cold MiB read / selected",
                "warm MiB pages",
                "warm MiB summaries",
                "(b) MiB/step",
                "hit rate",
                "scored blocks / pages per layer",
                "commit",
            ],
            table,
        ),
        "",
        "Goals: bytes read <= 1.5x the selected pages' bytes (+ summaries); at 1M on disk a step <= 2x dense attention over "
        "4K resident tokens.",
        "",
        f"![bytes and ms per step]({name}.png)",
    ]
    figures = {
        "quick": args.quick,
        "budget": args.budget,
        "candidate_blocks": args.candidate_blocks,
        "steps": args.steps,
        "page_cache_mib": args.page_cache_mib,
        "summary_mib": args.summary_mib,
        "threads": args.threads,
        "rows": rows,
    }
    save_results(name, figures, "\n".join(md), args.out)
    print(f"done in {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
