"""Attention next to the data: `/v1/attention` and `/v1/retrieve` vs fetching the KV and attending locally.

    python bench/attention_service.py [--quick] [--out FILE]

In one run on loopback, one decode step of a SmolLM2-135M-shaped cache (30 layers, 3 KV heads,
head_dim 64, float16, 256-token blocks; one query per layer, 9 query heads) over a cached chain:
  - local: `get` every block of the chain through the REST SDK, then `sparse_decode` (dense) here;
  - `/v1/attention` dense (no budget), over REST and gRPC;
  - `/v1/attention` with a budget (tokens per layer and KV head selected by StoreRetriever), REST and gRPC;
  - `/v1/retrieve` with the same budget (ids only).
Figures: median latency per call, bytes on the wire per call (request + answer bodies), and the
ratio local / remote. Random KV: this measures cost, not fidelity (bench/sparse.py measures the
fidelity of sparse decode on the reference model). Server and client run with one torch thread.
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.modules.pop("service", None)
from bench.common import md_table, median_of, save_results  # noqa: E402
from bench.common import KVTierServe  # noqa: E402

import msgpack  # noqa: E402
import torch  # noqa: E402

from kvtier.kvstore import KVSpec, chain_hashes  # noqa: E402

SPEC = KVSpec("smollm2-135m", num_layers=30, num_kv_heads=3, head_dim=64, dtype="float16", block_tokens=256)  # 5.6 MiB blocks
H_Q = 9
BUDGET = 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 blocks (2K tokens), few repeats: under a minute")
    ap.add_argument("--out", help="also write the figures (JSON) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from kvtier.service.client import KVTierClient, _query_body
    from kvtier.service.grpc_client import KVTierGrpcClient
    from kvtier.sparse_attn import sparse_decode

    num_blocks, repeat = (8, 5) if args.quick else (32, 15)
    srv = KVTierServe({"OMP_NUM_THREADS": "1", "KVTIER_DISK_CAPACITY_BYTES": "0", "KVTIER_HOST_CAPACITY_BYTES": "1GiB"}, grpc=True)
    try:
        rest, grpc_c = KVTierClient(srv.url, timeout=120), KVTierGrpcClient(f"127.0.0.1:{srv.grpc_port}", timeout=120)
        model = rest.register_spec(SPEC)
        grpc_c.register_spec(SPEC)
        tokens = list(range(num_blocks * SPEC.block_tokens))
        keys = chain_hashes(SPEC, tokens)
        g = torch.Generator().manual_seed(0)
        for i in range(0, num_blocks, 4):
            rest.put(model, keys[i : i + 4], torch.randn(min(4, num_blocks - i), *SPEC.block_shape, generator=g).half())
        q = torch.randn(SPEC.num_layers, H_Q, SPEC.head_dim, generator=g)

        def local():
            blocks = torch.stack(rest.get(model, keys))  # [N, L, 2, H_kv, BT, D]
            kv = blocks.float().permute(1, 2, 3, 0, 4, 5).reshape(SPEC.num_layers, 2, SPEC.num_kv_heads, -1, SPEC.head_dim)
            return sparse_decode(q, kv[:, 0], kv[:, 1])

        calls = {
            "local: get all blocks + sparse_decode": local,
            "REST /v1/attention dense": lambda: rest.attention(model, q, hashes=keys),
            "gRPC Attention dense": lambda: grpc_c.attention(model, q, hashes=keys),
            f"REST /v1/attention budget={BUDGET}": lambda: rest.attention(model, q, hashes=keys, budget=BUDGET),
            f"gRPC Attention budget={BUDGET}": lambda: grpc_c.attention(model, q, hashes=keys, budget=BUDGET),
            f"REST /v1/retrieve budget={BUDGET}": lambda: rest.retrieve(model, q, BUDGET, hashes=keys),
        }
        # bytes on the wire (bodies) per call
        body = lambda budget: len(msgpack.packb(_query_body(model, q, budget, None, keys, "", (), None), use_bin_type=True))  # noqa: E731
        dense_ans = SPEC.num_layers * H_Q * (SPEC.head_dim + 1) * 4
        wire = {
            "local: get all blocks + sparse_decode": 32 * num_blocks + num_blocks * SPEC.block_nbytes,
            "REST /v1/attention dense": body(None) + dense_ans,
            "gRPC Attention dense": body(None) + dense_ans,
            f"REST /v1/attention budget={BUDGET}": body(BUDGET) + dense_ans,
            f"gRPC Attention budget={BUDGET}": body(BUDGET) + dense_ans,
            f"REST /v1/retrieve budget={BUDGET}": body(BUDGET) + SPEC.num_layers * SPEC.num_kv_heads * BUDGET * 8,
        }
        # the answers agree: remote dense = local dense; sparse within the budget reads fewer blocks
        o_loc, lse_loc = local()
        st = rest.attention(model, q, hashes=keys)
        err_dense = float((st.o - o_loc.float()).abs().max())
        sp = rest.attention(model, q, hashes=keys, budget=BUDGET)
        times = {name: median_of(fn, repeat) for name, fn in calls.items()}
    finally:
        srv.close()
    base = times["local: get all blocks + sparse_decode"]
    rows = [[name, f"{t * 1e3:.1f}", f"{wire[name] / 2**20:.2f}", f"{base / t:.2f}x"] for name, t in times.items()]
    T = num_blocks * SPEC.block_tokens
    md = (
        f"Cached chain of {num_blocks} blocks ({T} tokens, {num_blocks * SPEC.block_nbytes / 2**20:.0f} MiB), one decode step "
        f"q [{SPEC.num_layers}, {H_Q}, {SPEC.head_dim}]; median of {repeat}; 2-core CPU box, loopback, 1 torch thread each side.\n\n"
        + md_table(["call", "ms", "MiB on the wire", "speed-up vs local"], rows)
        + f"\n\nRemote dense vs local dense: max |o diff| = {err_dense:.1e}. Budget {BUDGET}: "
        f"{len(sp.fetched)} of {num_blocks} blocks read, {sp.attended} tokens attended per (layer, KV head).\n"
    )
    print(md)
    figures = {
        "num_blocks": num_blocks,
        "num_tokens": T,
        "budget": BUDGET,
        "repeat": repeat,
        "median_s": times,
        "wire_bytes": wire,
        "speedup_vs_local": {k: base / t for k, t in times.items()},
        "max_abs_o_diff_dense": err_dense,
        "sparse_blocks_read": len(sp.fetched),
    }
    # a smoke run never overwrites the full results
    save_results("attention_service_quick" if args.quick else "attention_service", figures, md, args.out)


if __name__ == "__main__":
    main()
