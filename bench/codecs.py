"""Codec benchmark: size, speed and model fidelity of every codec, on the reference model's real KV.

    python bench/codecs.py [--quick] [--out FILE] [--threads N]

Side by side in one run, every figure against the uncompressed cache of the same run:
  1. compression ratio vs fp16 and bits/element (scales, zero points included), CPU encode and
     decode throughput (GB/s of fp16 KV), for every codec and lossless stage, on real KV blocks of
     SmolLM2-135M-Instruct (256 tokens x 30 layers x 3 KV heads x 64 = 5.9 MB per fp16 block);
  2. relative reconstruction error ||x̂ - x|| / ||x|| of K and of V on that KV;
  3. perplexity on held-out English text (4,096 tokens; prefill in 256-token chunks, every full
     256-token block stored and read back through the codec between chunks) vs the unquantized cache;
  4. pass-key accuracy (2 keys x depths 10/50/90% x ~2K and ~6K tokens = 12 prompts) per codec vs
     full precision, through the same round trip;
  5. a Redis round trip (RedisTier put + get, encode and decode included) of one 5.9 MB block:
     kivi4+zstd vs identity on the same private redis-server.
Goals (issue 3): kivi4 >= 3.5x smaller than fp16 with perplexity +<= 2% and pass-key accuracy equal
to full; kivi2 >= 6x with +<= 10%; int8/fp8 +<= 0.5%; compressed Redis round trip >= 2x faster.

--quick (under a minute on an idle 2-core box): 512 tokens of text (2 blocks of KV), 2 pass-key
prompts of ~1K tokens, kivi4 and kivi2h only in the fidelity part, one timing repetition; its figures
are smoke checks, not the results (saved apart, as codecs-quick.*).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# bench/ holds scripts named like packages (bench/service.py, which bench.refmodel's import of the
# service package must not find): take this folder off the path, import the helpers as ``bench.*``.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
from bench.common import RESULTS, LocalRedis, best_of, md_table, median_of, save_results  # noqa: E402

import torch  # noqa: E402

import bench.refmodel as refmodel  # noqa: E402
from kvstore.codecs import codec_bits_per_element, get_codec  # noqa: E402
from kvstore.codecs.kivi import KiviCodec  # noqa: E402

# Size and speed: every codec, alone and with each lossless stage.
SIZE_CODECS = [
    "identity", "identity+zstd", "identity+lz4",
    "fp8", "fp8+zstd", "int8", "int8+zstd", "int8+lz4",
    "kivi4", "kivi4+zstd", "kivi4+lz4", "kivi4/g64", "kivi4/g64+zstd",
    "kivi2", "kivi2+zstd", "kivi2h", "kivi2h+zstd",
]
# Fidelity: the distinct lossy transforms (a lossless stage changes nothing: tested bit-exact).
FIDELITY_CODECS = ["identity", "fp8", "int8", "kivi4", "kivi4/g64", "kivi2", "kivi2h"]
PASSKEY_CODECS = ["fp8", "int8", "kivi4", "kivi2", "kivi2h"]  # the registered lossy codecs
QUICK_FIDELITY = ["kivi4", "kivi2h"]


def make_codec(name: str):
    """A registered codec, or ``kivi4/g64[+stage]``: kivi4 with groups of 64 (not registered: a tier
    takes it as ``KiviCodec(4, group_size=64)``; frames name it ``kivi4`` and carry the groups)."""
    base, _, stages = name.partition("+")
    if base == "kivi4/g64":
        codec = KiviCodec(4, group_size=64)
        for stage in filter(None, stages.split("+")):
            from kvstore.codecs import lossless

            codec = {"zstd": lossless.ZstdStage, "lz4": lossless.Lz4Stage}[stage](codec)
        return codec
    return get_codec(name)


def nbytes(payload) -> int:
    return memoryview(payload).nbytes


# -- 1 + 2: size, speed, reconstruction error ---------------------------------------------------------
def size_speed_error(blocks: list[torch.Tensor], spec, repeat: int) -> list[dict]:
    rows = []
    fp16_bytes = spec.block_numel * 2
    for name in SIZE_CODECS:
        codec = make_codec(name)
        sizes, num, den = [], torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        for b in blocks:
            payload, meta = codec.encode(b, spec)
            sizes.append(nbytes(payload))
            if "+" not in name:  # stages are bit-exact: the error is the inner codec's
                d = codec.decode(payload, meta, spec).float()
                x = b.float()
                num += ((d - x) ** 2).sum(dim=(0, 2, 3, 4)).double()
                den += (x**2).sum(dim=(0, 2, 3, 4)).double()
        payload, meta = codec.encode(blocks[0], spec)
        out = torch.empty_like(blocks[0])
        t_enc = best_of(lambda: codec.encode(blocks[0], spec), repeat)
        t_dec = best_of(lambda: codec.decode(payload, meta, spec, out=out), repeat)
        mean_size = sum(sizes) / len(sizes)
        row = {
            "codec": name,
            "bits_per_element": 8 * mean_size / spec.block_numel,
            "declared_bits_per_element": codec_bits_per_element(codec, spec),
            "ratio_vs_fp16": fp16_bytes / mean_size,
            "encode_GBps": fp16_bytes / t_enc / 1e9,
            "decode_GBps": fp16_bytes / t_dec / 1e9,
        }
        if "+" not in name:
            rel = (num / den).sqrt()
            row.update(rel_err_k=float(rel[0]), rel_err_v=float(rel[1]))
        rows.append(row)
        print(f"  {name:16s} {row['bits_per_element']:6.3f} bits/el  {row['ratio_vs_fp16']:5.2f}x  "
              f"enc {row['encode_GBps']:6.3f} GB/s  dec {row['decode_GBps']:6.3f} GB/s"
              + (f"  rel.err K {row['rel_err_k']:.4f} V {row['rel_err_v']:.4f}" if "rel_err_k" in row else ""), flush=True)
    return rows


# -- 3: perplexity ------------------------------------------------------------------------------------
def perplexities(model, ids, codecs, block_tokens: int) -> dict:
    t0 = time.perf_counter()
    base = refmodel.perplexity(model, ids, chunk_tokens=block_tokens)
    print(f"  unquantized cache (float32): ppl {base:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    result = {"unquantized": base}
    for name in codecs:
        t0 = time.perf_counter()
        ppl = refmodel.perplexity(model, ids, chunk_tokens=block_tokens, hook=refmodel.codec_hook(make_codec(name), model, block_tokens=block_tokens))
        result[name] = ppl
        print(f"  {name:10s} ppl {ppl:.4f}  ({100 * (ppl / base - 1):+.3f}%)  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


# -- 4: pass key --------------------------------------------------------------------------------------
def passkeys(model, tok, prompts, codecs, block_tokens: int) -> dict:
    result = {}
    for name in [None, *codecs]:
        hook = None if name is None else refmodel.codec_hook(make_codec(name), model, block_tokens=block_tokens)
        t0 = time.perf_counter()
        rows = []
        for p in prompts:
            r = refmodel.score_passkey(model, tok, p, hook=hook, chunk_tokens=block_tokens)
            rows.append({"tokens": p.num_tokens, "depth": p.depth, "key": p.key, "answer": r.answer.strip(), "correct": r.correct})
        label = name or "full"
        result[label] = {"correct": sum(r["correct"] for r in rows), "total": len(rows), "prompts": rows}
        print(f"  {label:10s} pass key {result[label]['correct']}/{len(rows)}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


# -- 5: Redis round trip ------------------------------------------------------------------------------
def redis_round_trip(block: torch.Tensor, spec, repeat: int) -> dict:
    from kvstore.keys import chain_hashes
    from kvstore.tiers.redis import RedisTier

    result = {}
    with LocalRedis() as server:
        tiers = {name: RedisTier(server.url, codec=name, socket_timeout_s=30.0) for name in ("identity", "kivi4+zstd", "kivi4", "kivi2h+zstd")}
        keys = iter(chain_hashes(spec, list(range(spec.block_tokens * (2 * repeat + 4) * len(tiers)))))
        out = torch.empty_like(block)
        for name, tier in tiers.items():
            def trip():
                k = next(keys)
                assert tier.put([k], [block], spec=spec)[0] > 0
                got = tier.get([k], spec=spec, out=[out])[0]
                assert got is not None
                tier.remove([k], spec=spec)

            t = median_of(trip, repeat)
            k = next(keys)
            stored = tier.put([k], [block], spec=spec)[0]
            result[name] = {"round_trip_ms": 1e3 * t, "frame_bytes": stored}
            print(f"  {name:12s} put+get {1e3 * t:7.2f} ms  frame {stored / 1e6:.2f} MB", flush=True)
        for tier in tiers.values():
            tier.close()
    result["speedup"] = result["identity"]["round_trip_ms"] / result["kivi4+zstd"]["round_trip_ms"]
    print(f"  kivi4+zstd round trip is {result['speedup']:.2f}x faster than identity")
    return result


# -- report -------------------------------------------------------------------------------------------
def plot(rows: list[dict], ppl: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = {r["codec"]: r["bits_per_element"] for r in rows}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, value in ppl.items():
        if name == "unquantized" or name not in bits:
            continue
        inc = 100 * (value / ppl["unquantized"] - 1)
        ax.scatter(bits[name], inc)
        ax.annotate(name, (bits[name], inc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bits per element (scales and zero points included)")
    ax.set_ylabel("perplexity increase vs unquantized cache (%)")
    ax.set_title("SmolLM2-135M, held-out text, KV round-tripped per 256-token block")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def goals(rows, ppl, pk, redis) -> list[list]:
    by = {r["codec"]: r for r in rows}
    inc = {k: 100 * (v / ppl["unquantized"] - 1) for k, v in ppl.items() if k != "unquantized"}
    full = pk.get("full", {}).get("correct")
    out = []

    def add(goal, measured, met):
        out.append([goal, measured, "met" if met else "NOT met"])

    for name, ratio_goal, ppl_goal in (("kivi4", 3.5, 2.0), ("kivi4/g64", 3.5, 2.0), ("kivi2", 6.0, 10.0), ("kivi2h", 6.0, 10.0)):
        if name not in inc:
            continue
        r = by[name]["ratio_vs_fp16"]
        best_stage = max((by[n]["ratio_vs_fp16"] for n in by if n.startswith(name + "+")), default=r)
        add(f"{name}: >= {ratio_goal}x smaller than fp16", f"{r:.2f}x ({best_stage:.2f}x with zstd)", best_stage >= ratio_goal)
        add(f"{name}: perplexity +<= {ppl_goal}%", f"{inc[name]:+.3f}%", inc[name] <= ppl_goal)
        if name in pk and name.startswith("kivi4"):
            add(f"{name}: pass-key accuracy equal to full", f"{pk[name]['correct']}/{pk[name]['total']} vs full {full}/{pk[name]['total']}", pk[name]["correct"] >= full)
    for name in ("int8", "fp8"):
        if name in inc:
            add(f"{name}: perplexity +<= 0.5%", f"{inc[name]:+.3f}%", inc[name] <= 0.5)
    if redis:
        add("Redis round trip kivi4+zstd >= 2x faster than identity", f"{redis['speedup']:.2f}x", redis["speedup"] >= 2.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter text, fewer prompts and codecs (under a minute)")
    ap.add_argument("--out", help="also write the figures as JSON to this file")
    ap.add_argument("--passkey-codecs", default=",".join(PASSKEY_CODECS), help=f"codecs measured on the pass-key prompts (default: {','.join(PASSKEY_CODECS)})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core box a second thread mostly waits)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    quick = args.quick
    block_tokens = 256
    text_tokens = 512 if quick else 4096
    repeat = 1 if quick else 5

    print(f"loading the reference model ({refmodel.MODEL_ID}) ...", flush=True)
    model, tok = refmodel.load_model()
    spec = refmodel.kv_spec(model, block_tokens, "float16")
    ids = refmodel.heldout_ids(tok, text_tokens)
    kv = refmodel.collect_kv(model, ids)  # [L, 2, H, T, D] float32
    blocks = [kv[:, :, :, s : s + block_tokens].to(torch.float16).contiguous() for s in range(0, kv.shape[3] - block_tokens + 1, block_tokens)]
    print(f"{len(blocks)} real KV blocks of {spec.block_nbytes / 1e6:.2f} MB (fp16) from {kv.shape[3]} tokens of held-out text", flush=True)

    print("\n1-2. size, CPU speed (GB/s of fp16 KV), reconstruction error", flush=True)
    rows = size_speed_error(blocks, spec, repeat)

    fid_codecs = QUICK_FIDELITY if quick else FIDELITY_CODECS
    print(f"\n3. perplexity, {len(ids)} tokens of held-out text, {block_tokens}-token chunks and blocks", flush=True)
    ppl = perplexities(model, ids, fid_codecs, block_tokens)

    if quick:
        prompts = refmodel.passkey_suite(tok, lengths=(1024,), depths=(0.5,), num_keys=2)
        pk_codecs = ["kivi4"]
    else:
        prompts = refmodel.passkey_suite(tok, lengths=(2048, 6144), depths=(0.1, 0.5, 0.9), num_keys=2)
        pk_codecs = [c for c in args.passkey_codecs.split(",") if c]
    print(f"\n4. pass key, {len(prompts)} prompts of {sorted({p.num_tokens for p in prompts})} tokens", flush=True)
    pk = passkeys(model, tok, prompts, pk_codecs, block_tokens)

    print("\n5. Redis round trip of one real block", flush=True)
    redis = redis_round_trip(blocks[0], spec, 3 if quick else 9)

    elapsed = time.perf_counter() - started
    mode = "quick (smoke check: 512 tokens of text, 2 blocks of KV, 2 pass-key prompts of ~1K tokens, 2 codecs in the fidelity part)" if quick else "full"
    goal_rows = goals(rows, ppl, pk, redis)
    figures = {
        "mode": mode,
        "threads": args.threads,
        "model": refmodel.MODEL_ID,
        "block": {"tokens": block_tokens, "bytes_fp16": spec.block_nbytes, "shape": list(spec.block_shape)},
        "text_tokens": len(ids),
        "codecs": rows,
        "perplexity": ppl,
        "perplexity_increase_pct": {k: 100 * (v / ppl["unquantized"] - 1) for k, v in ppl.items() if k != "unquantized"},
        "passkey": pk,
        "redis_round_trip": redis,
        "goals": [{"goal": g, "measured": m, "status": s} for g, m, s in goal_rows],
        "elapsed_s": elapsed,
    }
    base = ppl["unquantized"]
    md = [
        f"# Codecs — `python bench/codecs.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Mode: {mode}. Reference model {refmodel.MODEL_ID}, blocks of {block_tokens} tokens "
        f"({spec.block_nbytes / 1e6:.2f} MB in fp16), {args.threads} torch threads, {elapsed:.0f} s.",
        "",
        "## Size, CPU speed, reconstruction error (real KV)",
        "",
        md_table(
            ["codec", "bits/element", "ratio vs fp16", "encode GB/s", "decode GB/s", "rel. err K", "rel. err V"],
            [[r["codec"], f"{r['bits_per_element']:.3f}", f"{r['ratio_vs_fp16']:.2f}x", f"{r['encode_GBps']:.3f}", f"{r['decode_GBps']:.3f}",
              f"{r['rel_err_k']:.4f}" if "rel_err_k" in r else "(inner)", f"{r['rel_err_v']:.4f}" if "rel_err_v" in r else "(inner)"] for r in rows],
        ),
        "",
        f"## Perplexity ({len(ids)} tokens) and pass key ({len(prompts)} prompts)",
        "",
        md_table(
            ["cache", "perplexity", "increase", "pass key"],
            [["unquantized (float32)", f"{base:.4f}", "—", f"{pk['full']['correct']}/{pk['full']['total']}"]]
            + [[k, f"{v:.4f}", f"{100 * (v / base - 1):+.3f}%", f"{pk[k]['correct']}/{pk[k]['total']}" if k in pk else "—"] for k, v in ppl.items() if k != "unquantized"],
        ),
        "",
        "## Redis round trip (put + get of one block, encode/decode included, median)",
        "",
        md_table(
            ["codec", "round trip ms", "frame MB"],
            [[k, f"{v['round_trip_ms']:.2f}", f"{v['frame_bytes'] / 1e6:.2f}"] for k, v in redis.items() if isinstance(v, dict)],
        ),
        "",
        f"kivi4+zstd vs identity: {redis['speedup']:.2f}x faster.",
        "",
        "## Goals",
        "",
        md_table(["goal", "measured", "status"], goal_rows),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, ppl, RESULTS / ("codecs-quick.png" if quick else "codecs.png"))
    print("\n" + md_table(["goal", "measured", "status"], goal_rows))
    print(f"\n{mode}; {elapsed:.0f} s")
    save_results("codecs-quick" if quick else "codecs", figures, "\n".join(md), args.out)


if __name__ == "__main__":
    main()
