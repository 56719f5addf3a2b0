"""Block-store benchmark: host and Redis tiers vs raw copies, prefix lookup, index metadata.

    python bench/store.py [--quick] [--out FILE] [--threads N] [--redis-url URL]

Side by side in one run (ratios are what to read; absolute times move with the machine):
  1. host-tier get into a caller's buffer  vs  torch.Tensor.copy_ of the same bytes (goal >= 0.7x)
  2. Redis-tier put/get                    vs  raw redis-py SET/GET, same bytes, same server (goal >= 0.8x)
  3. longest-prefix lookup of a 1M-token chain (4,096 blocks), all cached (goal <= 5 ms), hashing reported apart
  4. index metadata bytes per cached block with 1M blocks (goal <= 300 B)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LocalRedis, best_of, md_table, paired_medians, save_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvtier.kvstore import HostTier, KVSpec, PrefixIndex, TierConfig, TieredStore, chain_hashes  # noqa: E402

MIB = 1 << 20
# (label, spec) with blocks of 1, 6 and 32 MiB (256 tokens, head_dim 128, fp16)
SIZES = [
    ("1 MiB", KVSpec("bench-1m", num_layers=4, num_kv_heads=2, head_dim=128, dtype="float16", block_tokens=256)),
    ("6 MiB", KVSpec("bench-6m", num_layers=24, num_kv_heads=2, head_dim=128, dtype="float16", block_tokens=256)),
    ("32 MiB", KVSpec("bench-32m", num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16", block_tokens=256)),
]


def rand_blocks(spec: KVSpec, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(spec.block_shape, generator=g).to(spec.torch_dtype) for _ in range(n)]


def bench_host(quick: bool) -> list[dict]:
    rows = []
    for label, spec in SIZES:
        n = 4
        keys = chain_hashes(spec, np.arange(spec.block_tokens * n) % 50000)
        blocks = rand_blocks(spec, n)
        tier = HostTier(n * spec.block_nbytes)
        tier.put(keys, blocks, spec=spec)
        out = [torch.empty_like(b) for b in blocks]
        repeat = 30 if quick else 200
        # alternating runs (same cache and load state for both), medians
        t_tier, t_copy = paired_medians(
            lambda: tier.get(keys, spec=spec, out=out), lambda: [o.copy_(b) for o, b in zip(out, blocks)], repeat, warmup=3
        )
        gbps = n * spec.block_nbytes / t_tier / 1e9
        rows.append({"size": label, "tier_get_s": t_tier, "copy_s": t_copy, "ratio": t_copy / t_tier, "tier_GBps": gbps})
        print(
            f"host get {label:>7}: tier {t_tier * 1e3:7.2f} ms  copy_ {t_copy * 1e3:7.2f} ms  ratio {t_copy / t_tier:.2f}x  ({gbps:.1f} GB/s)"
        )
    return rows


def bench_redis(url: str, quick: bool) -> list[dict]:
    import redis

    from kvtier.kvstore.tiers.redis import RedisTier

    raw = redis.Redis.from_url(url)
    rows = []
    for label, spec in SIZES:
        n = 4 if spec.block_nbytes <= 6 * MIB else 2
        keys = chain_hashes(spec, np.arange(spec.block_tokens * n) % 50000)
        blocks = rand_blocks(spec, n)
        payloads = [b.view(torch.uint8).numpy().tobytes() for b in blocks]
        out = [torch.empty_like(b) for b in blocks]
        tier = RedisTier(url)
        raw_keys = [f"raw:{i}" for i in range(n)]
        repeat = 5 if quick else 25

        def tier_put():
            tier.remove(keys, spec=spec)
            tier.put(keys, blocks, spec=spec)

        def raw_put():
            raw.delete(*raw_keys)
            p = raw.pipeline(transaction=False)
            for k, v in zip(raw_keys, payloads):
                p.set(k, v)
            p.execute()

        def raw_get():
            vals = raw.mget(raw_keys)
            for o, v in zip(out, vals):  # the same end state as the tier: KV in the caller's tensor
                o.view(torch.uint8).view(-1).numpy()[:] = np.frombuffer(v, dtype=np.uint8)

        # alternate tier and raw runs so both see the same machine load; medians, since loopback
        # I/O is noisy
        t_tier_put, t_raw_put = paired_medians(tier_put, raw_put, repeat)
        t_tier_get, t_raw_get = paired_medians(lambda: tier.get(keys, spec=spec, out=out), raw_get, repeat)
        got = tier.get(keys, spec=spec)
        assert all(torch.equal(a, b) for a, b in zip(got, blocks)), "redis tier returned wrong KV"
        rows.append(
            {
                "size": label,
                "blocks": n,
                "tier_put_s": t_tier_put,
                "raw_set_s": t_raw_put,
                "put_ratio": t_raw_put / t_tier_put,
                "tier_get_s": t_tier_get,
                "raw_get_s": t_raw_get,
                "get_ratio": t_raw_get / t_tier_get,
            }
        )
        print(
            f"redis {label:>7}: put {t_tier_put * 1e3:7.2f} ms vs SET {t_raw_put * 1e3:7.2f} ms ({t_raw_put / t_tier_put:.2f}x) | "
            f"get {t_tier_get * 1e3:7.2f} ms vs GET {t_raw_get * 1e3:7.2f} ms ({t_raw_get / t_tier_get:.2f}x)"
        )
        tier.remove(keys, spec=spec)
        raw.delete(*raw_keys)
        tier.close()
    return rows


def bench_lookup(quick: bool) -> dict:
    spec = KVSpec("bench-lookup", num_layers=1, num_kv_heads=1, head_dim=16, dtype="float16", block_tokens=256)
    tokens = (np.arange(1 << 20, dtype=np.uint32) * 2654435761 % 49152).astype(np.uint32)
    t_hash = best_of(lambda: chain_hashes(spec, tokens), 3 if quick else 10)
    keys = chain_hashes(spec, tokens)
    store = TieredStore([TierConfig(HostTier(len(keys) * spec.block_nbytes), high_watermark=1.0, low_watermark=1.0)])
    block = torch.zeros(spec.block_shape, dtype=torch.float16)
    for i in range(0, len(keys), 512):
        store.put(spec, keys[i : i + 512], [block] * len(keys[i : i + 512]), parent=keys[i - 1] if i else None)
    r = store.lookup(spec, keys)
    assert r.num_blocks == len(keys), r
    t_lookup = best_of(lambda: store.lookup(spec, keys), 10 if quick else 50)
    t_both = best_of(lambda: store.lookup_tokens(spec, tokens), 3 if quick else 10)
    print(
        f"lookup of a 1M-token chain ({len(keys)} blocks): lookup {t_lookup * 1e3:.2f} ms, hashing {t_hash * 1e3:.2f} ms, both {t_both * 1e3:.2f} ms"
    )
    return {
        "blocks": len(keys),
        "tokens": int(tokens.size),
        "lookup_ms": t_lookup * 1e3,
        "hash_ms": t_hash * 1e3,
        "hash_and_lookup_ms": t_both * 1e3,
    }


def bench_index_memory(quick: bool) -> dict:
    n = 1 << 20
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(num_tiers=4)
    rng = np.random.default_rng(0)
    raw = rng.bytes(32 * n)
    parent = -1
    for i in range(n):
        slot = index.add(raw[32 * i : 32 * i + 32], parent, depth=i % 4096)
        index.set_resident(slot, 0, True)
        parent = slot if (i + 1) % 4096 else -1  # chains of 4,096 blocks (1M tokens each)
    del raw
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    per_block = used / n
    print(f"index metadata: {per_block:.0f} B per cached block with {n:,} blocks (4 tiers)")
    return {"blocks": n, "bytes_per_block": per_block, "num_tiers": 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (finishes within a minute)")
    ap.add_argument("--out", help="also write the figures as JSON to this file")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: copies are memory-bound, and a second thread stalls on a shared box)",
    )
    ap.add_argument("--redis-url", help="use this Redis instead of starting a private redis-server")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    host = bench_host(args.quick)
    if args.redis_url:
        redis_rows = bench_redis(args.redis_url, args.quick)
    else:
        with LocalRedis() as r:
            redis_rows = bench_redis(r.url, args.quick)
    lookup = bench_lookup(args.quick)
    memory = bench_index_memory(args.quick)
    figures = {
        "quick": args.quick,
        "threads": args.threads,
        "host": host,
        "redis": redis_rows,
        "lookup": lookup,
        "index_memory": memory,
        "goals": {"host_ratio": 0.7, "redis_ratio": 0.8, "lookup_ms": 5.0, "bytes_per_block": 300},
    }
    md = [
        "## bench/store.py" + (" --quick" if args.quick else ""),
        "",
        md_table(
            ["block", "host get vs copy_", "Redis put vs SET", "Redis get vs GET"],
            [[h["size"], f"{h['ratio']:.2f}x", f"{r['put_ratio']:.2f}x", f"{r['get_ratio']:.2f}x"] for h, r in zip(host, redis_rows)],
        ),
        "",
        md_table(
            ["1M-token chain (4,096 blocks)", "ms"],
            [
                ["longest-prefix lookup", f"{lookup['lookup_ms']:.2f}"],
                ["hashing token ids", f"{lookup['hash_ms']:.2f}"],
                ["hashing + lookup", f"{lookup['hash_and_lookup_ms']:.2f}"],
            ],
        ),
        "",
        f"Index metadata: **{memory['bytes_per_block']:.0f} B per cached block** with {memory['blocks']:,} blocks.",
        "",
        "Goals: host >= 0.7x, Redis >= 0.8x, lookup <= 5 ms, metadata <= 300 B. Ratios > 1 mean faster than the raw baseline.",
    ]
    # a smoke run never overwrites the full results
    save_results("store_quick" if args.quick else "store", figures, "\n".join(md), args.out)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
