"""Codec benchmark: size, speed and model fidelity of every codec, on the reference model's real KV.

    python bench/codecs.py [--quick] [--out FILE] [--threads N] [--sections ...] [--merge]
                           [--size-codecs ...] [--fidelity-codecs ...] [--passkey-codecs ...]

Side by side in one run, every figure against the uncompressed cache of the same run:
  1. size: compression ratio vs fp16 and bits/element (scales, zero points, exact tokens
     included), CPU encode and decode throughput (GB/s of fp16 KV), for every codec and lossless
     stage, on real KV blocks of SmolLM2-135M-Instruct (256 tokens x 30 layers x 3 KV heads x 64
     = 5.9 MB per fp16 block), and the relative reconstruction error ||x̂ - x|| / ||x|| of K and V;
  2. ppl: perplexity on held-out English text (4,096 tokens; prefill in 256-token chunks, every
     full 256-token block stored and read back through the codec between chunks) vs the
     unquantized cache;
  3. passkey: pass-key accuracy (2 keys x depths 10/50/90% x ~2K and ~6K tokens = 12 prompts) per
     codec vs full precision, through the same round trip;
  4. redis: a Redis round trip (RedisTier put + get, encode and decode included) of one 5.9 MB
     block: kivi4+zstd vs identity (and a few more) on the same private redis-server.

Codec labels: a registered codec (``kivi4``, ``int8+zstd``) or a kivi codec with options,
``kivi4/g32`` (groups of 32; 64 by default), ``/kg16`` ``/vg32`` (key / value groups apart), ``/sink4`` (the first
block of a sequence keeps its first 4 tokens exact: the attention sinks), ``/res32`` (the tail
block of a growing sequence keeps its last 32 tokens exact until a later block completes), then
lossless stages: ``kivi4/g32/sink4+zstd``. Sink and residual are options of the blocks at those
two places only (``codec_hook``); the size part reports the interior block and, apart, the first
(or tail) block with its exact tokens.

Goals (issue 3): kivi4 >= 3.5x smaller than fp16 with perplexity +<= 2% and pass-key accuracy equal
to full; kivi2 >= 6x with +<= 10%; int8/fp8 +<= 0.5%; compressed Redis round trip >= 2x faster.

``--merge`` measures only the sections and codecs asked for and merges them into the saved
bench/results/codecs.json (a row measured again replaces its old figures; every row says which
run measured it, and the runs are listed with their commands), then renders codecs.md from the
merged figures. ``--quick`` (under a minute on an idle 2-core box): 512 tokens of text, 2 blocks
of KV, 5 codecs in the size part, 2 in the perplexity part, 2 pass-key prompts of ~1K tokens,
one timing repetition; smoke-check figures, saved apart as codecs_quick.*.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# bench/ holds scripts named like modules (this file shadows the stdlib's codecs): take this folder
# off the path and import the bench helpers as ``bench.*`` from the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
from bench.common import RESULTS, LocalRedis, best_of, md_table, save_results  # noqa: E402

import torch  # noqa: E402

import bench.refmodel as refmodel  # noqa: E402
from kvtier.kvstore.codecs import codec_bits_per_element, get_codec, lossless  # noqa: E402

SIZE_CODECS = [
    "identity",
    "identity+zstd",
    "identity+lz4",
    "fp8",
    "fp8+zstd",
    "int8",
    "int8+zstd",
    "int8+lz4",
    "kivi4",
    "kivi4+zstd",
    "kivi4+lz4",
    "kivi4/sink4",
    "kivi4/g32",
    "kivi4/g32+zstd",
    "kivi4/g32+lz4",
    "kivi2",
    "kivi2+zstd",
    "kivi2/g32",
    "kivi2/g32+zstd",
    "kivi2h",
    "kivi2h+zstd",
    "kivi2h/sink4/res128",
    "kivi2h/g32",
    "kivi2h/g32+zstd",
]
FIDELITY_CODECS = [
    "identity",
    "fp8",
    "int8",
    "kivi4",
    "kivi4/sink4",
    "kivi4/g32",
    "kivi2",
    "kivi2/sink4/res128",
    "kivi2h",
    "kivi2h/sink4/res128",
]
PASSKEY_CODECS = ["fp8", "int8", "kivi4", "kivi4/sink4", "kivi2", "kivi2h", "kivi2h/sink4/res128"]
REDIS_CODECS = ["identity", "kivi4+zstd", "kivi4", "kivi4+lz4", "int8", "kivi2h+zstd"]
QUICK = {
    "size": ["identity", "int8", "kivi4", "kivi4+zstd", "kivi2h"],
    "ppl": ["kivi4", "kivi2h"],
    "passkey": ["kivi4"],
}
SECTIONS = ("size", "ppl", "passkey", "redis")
STAGES = {"zstd": lossless.ZstdStage, "lz4": lossless.Lz4Stage}


# -- codec labels ---------------------------------------------------------------------------------
def parse_label(label: str):
    """``(interior codec, hook options)`` of a codec label (see the module docstring).

    The codec is what interior blocks are stored with; the hook options (``sink_tokens``,
    ``residual_tokens``) are what the first and the tail block add to it."""
    base, *stages = label.split("+")
    name, *opts = base.split("/")
    codec_opts, hook = {}, {}
    for opt in opts:
        m = re.fullmatch(r"(g|kg|vg|sink|res)(\d+)", opt)
        if m is None or not name.startswith("kivi"):
            raise ValueError(f"bad codec label {label!r}: options are /g<N>, /kg<N>, /vg<N>, /sink<N>, /res<N> on a kivi codec")
        key, n = m.group(1), int(m.group(2))
        if key == "g":
            codec_opts["key_group_size"] = codec_opts["value_group_size"] = n
        elif key in ("kg", "vg"):
            codec_opts[{"kg": "key_group_size", "vg": "value_group_size"}[key]] = n
        else:
            hook[{"sink": "sink_tokens", "res": "residual_tokens"}[key]] = n
    codec = get_codec(name)
    if codec_opts:
        codec = codec.replace(**codec_opts)
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"bad codec label {label!r}: unknown stage {stage!r}")
        codec = STAGES[stage](codec)
    return codec, hook


def with_exact_tokens(codec, **options):
    """``codec`` (maybe inside lossless stages) with kivi options changed."""
    if isinstance(codec, lossless._Stage):
        return type(codec)(with_exact_tokens(codec.inner, **options))
    return codec.replace(**options)


def nbytes(payload) -> int:
    return memoryview(payload).nbytes


# -- 1: size, speed, reconstruction error ---------------------------------------------------------
def size_speed_error(labels: list[str], blocks: list[torch.Tensor], spec, repeat: int, run: str) -> dict:
    rows = {}
    fp16_bytes = spec.block_numel * 2
    for label in labels:
        codec, hook = parse_label(label)
        sizes, num, den = [], torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        for b in blocks:
            payload, meta = codec.encode(b, spec)
            sizes.append(nbytes(payload))
            if "+" not in label:  # stages are bit-exact: the error is the inner codec's
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
            "bits_per_element": 8 * mean_size / spec.block_numel,
            "declared_bits_per_element": codec_bits_per_element(codec, spec),
            "ratio_vs_fp16": fp16_bytes / mean_size,
            "encode_GBps": fp16_bytes / t_enc / 1e9,
            "decode_GBps": fp16_bytes / t_dec / 1e9,
            "run": run,
        }
        if "+" not in label:
            rel = (num / den).sqrt()
            row.update(rel_err_k=float(rel[0]), rel_err_v=float(rel[1]))
        for key, where in (("sink_tokens", "first"), ("residual_tokens", "tail")):
            if key in hook:  # the one block that carries the exact tokens
                c = with_exact_tokens(codec, **{key: hook[key]})
                row[f"{where}_block_bits_per_element"] = 8 * nbytes(c.encode(blocks[0], spec)[0]) / spec.block_numel
        rows[label] = row
        extra = "".join(
            f"  {w} block {row[f'{w}_block_bits_per_element']:.3f} bits" for w in ("first", "tail") if f"{w}_block_bits_per_element" in row
        )
        print(
            f"  {label:18s} {row['bits_per_element']:6.3f} bits/el  {row['ratio_vs_fp16']:5.2f}x  "
            f"enc {row['encode_GBps']:6.3f} GB/s  dec {row['decode_GBps']:6.3f} GB/s"
            + (f"  rel.err K {row['rel_err_k']:.4f} V {row['rel_err_v']:.4f}" if "rel_err_k" in row else "")
            + extra,
            flush=True,
        )
    return rows


def make_hook(label: str, model, block_tokens: int):
    codec, hook = parse_label(label)
    return refmodel.codec_hook(codec, model, block_tokens=block_tokens, **hook)


# -- 2: perplexity --------------------------------------------------------------------------------
def perplexities(model, ids, labels, block_tokens: int, run: str) -> dict:
    t0 = time.perf_counter()
    base = refmodel.perplexity(model, ids, chunk_tokens=block_tokens)
    print(f"  unquantized cache (float32): ppl {base:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    result = {"unquantized": {"ppl": base, "run": run}}
    for label in labels:
        t0 = time.perf_counter()
        ppl = refmodel.perplexity(model, ids, chunk_tokens=block_tokens, hook=make_hook(label, model, block_tokens))
        result[label] = {"ppl": ppl, "increase_pct": 100 * (ppl / base - 1), "run": run}
        print(f"  {label:18s} ppl {ppl:.4f}  ({100 * (ppl / base - 1):+.3f}%)  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


# -- 3: pass key ----------------------------------------------------------------------------------
def passkeys(model, tok, prompts, labels, block_tokens: int, run: str) -> dict:
    result = {}
    for label in [None, *labels]:
        hook = None if label is None else make_hook(label, model, block_tokens)
        t0 = time.perf_counter()
        rows = []
        for p in prompts:
            r = refmodel.score_passkey(model, tok, p, hook=hook, chunk_tokens=block_tokens)
            rows.append({"tokens": p.num_tokens, "depth": p.depth, "key": p.key, "answer": r.answer.strip(), "correct": r.correct})
        name = label or "full"
        result[name] = {"correct": sum(r["correct"] for r in rows), "total": len(rows), "prompts": rows, "run": run}
        print(f"  {name:18s} pass key {result[name]['correct']}/{len(rows)}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


# -- 4: Redis round trip --------------------------------------------------------------------------
def redis_round_trip(labels: list[str], block: torch.Tensor, spec, repeat: int, run: str) -> dict:
    """Put + get of one block per codec through RedisTier, the codecs taking turns trip by trip
    (so that all of them see the same machine load); medians."""
    from kvtier.kvstore.keys import chain_hashes
    from kvtier.kvstore.tiers.redis import RedisTier

    result = {"run": run}
    with LocalRedis() as server:
        tiers = {label: RedisTier(server.url, codec=parse_label(label)[0], socket_timeout_s=30.0) for label in labels}
        keys = iter(chain_hashes(spec, list(range(spec.block_tokens * (repeat + 2) * len(tiers) + spec.block_tokens))))
        out = torch.empty_like(block)
        times = {label: [] for label in tiers}
        for i in range(repeat + 1):  # the first round warms up
            for label, tier in tiers.items():
                k = next(keys)
                t0 = time.perf_counter()
                assert tier.put([k], [block], spec=spec)[0] > 0
                got = tier.get([k], spec=spec, out=[out])[0]
                t = time.perf_counter() - t0
                assert got is not None
                tier.remove([k], spec=spec)
                if i:
                    times[label].append(t)
        for label, tier in tiers.items():
            stored = tier.put([next(keys)], [block], spec=spec)[0]
            t = sorted(times[label])[len(times[label]) // 2]
            result[label] = {"round_trip_ms": 1e3 * t, "frame_bytes": stored}
            print(f"  {label:18s} put+get {1e3 * t:7.2f} ms  frame {stored / 1e6:.2f} MB", flush=True)
            tier.close()
    for label in labels:
        if label != "identity" and "identity" in result:
            result[label]["speedup_vs_identity"] = result["identity"]["round_trip_ms"] / result[label]["round_trip_ms"]
    if "kivi4+zstd" in result and "identity" in result:
        result["speedup"] = result["kivi4+zstd"]["speedup_vs_identity"]
        print(f"  kivi4+zstd round trip is {result['speedup']:.2f}x faster than identity")
    return result


# -- merging with saved results -------------------------------------------------------------------
def upgrade(old: dict) -> dict:
    """Saved figures of the first full run (one run, untagged) in the tagged layout (run "A")."""
    if "runs" in old:
        return old
    run = "A"
    # run A measured kivi with groups of 32 by default: its labels in today's names (groups of 64)
    renamed = {"kivi4/g64": "kivi4", "kivi4/g64+zstd": "kivi4+zstd"}
    for name in ("kivi4", "kivi2", "kivi2h"):
        for stage in ("", "+zstd", "+lz4"):
            renamed[name + stage] = f"{name}/g32{stage}"

    def new(label):
        return renamed.get(label, label)

    rows = {new(r.pop("codec")): {**r, "run": run} for r in old.get("codecs", [])}
    base = old["perplexity"]["unquantized"]
    ppl = {
        new(k): {"ppl": v, "run": run} | ({} if k == "unquantized" else {"increase_pct": 100 * (v / base - 1)})
        for k, v in old["perplexity"].items()
    }
    pk = {new(k): {**v, "run": run} for k, v in old.get("passkey", {}).items()}
    redis = {new(k): v for k, v in old.get("redis_round_trip", {}).items()} | {"run": run}
    for k, v in redis.items():
        if isinstance(v, dict) and k != "identity" and "identity" in redis:
            v["speedup_vs_identity"] = redis["identity"]["round_trip_ms"] / v["round_trip_ms"]
    return {
        "model": old.get("model"),
        "block": old.get("block"),
        "text_tokens": old.get("text_tokens"),
        "runs": {
            run: {
                "date": old.get("date"),
                "command": "python bench/codecs.py --passkey-codecs int8,kivi4,kivi2h",
                "mode": old.get("mode"),
                "threads": old.get("threads"),
                "elapsed_s": old.get("elapsed_s"),
                "sections": list(SECTIONS),
            }
        },
        "codecs": rows,
        "perplexity": ppl,
        "passkey": pk,
        "redis_round_trip": redis,
    }


def merge(old: dict, new: dict) -> dict:
    merged = dict(old)
    merged["runs"] = {**old["runs"], **new["runs"]}
    order = ["unquantized", "full", *dict.fromkeys(SIZE_CODECS + FIDELITY_CODECS + PASSKEY_CODECS)]
    for key in ("codecs", "perplexity", "passkey"):
        both = {**old.get(key, {}), **new.get(key, {})}
        families = ["unquantized", "full", "identity", "fp8", "int8", "kivi4", "kivi2", "kivi2h"]
        rank = {}
        for label in both:
            family = re.split(r"[/+]", label)[0]
            rank[label] = (
                families.index(family) if family in families else len(families),
                order.index(label) if label in order else len(order),
                label,
            )
        merged[key] = dict(sorted(both.items(), key=lambda kv: rank[kv[0]]))
    if new.get("redis_round_trip"):  # the round trips compare codecs within one run: replaced together
        merged["redis_round_trip"] = new["redis_round_trip"]
    return merged


# -- report ---------------------------------------------------------------------------------------
def plot(fig: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_, ax = plt.subplots(figsize=(6, 4))
    for label, v in fig["perplexity"].items():
        interior = re.sub(r"/(sink|res)\d+", "", label)  # first / tail blocks aside: the interior's bits
        if label == "unquantized" or interior not in fig["codecs"]:
            continue
        bits, inc = fig["codecs"][interior]["bits_per_element"], v["increase_pct"]
        ax.scatter(bits, inc)
        ax.annotate(label, (bits, inc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("bits per element of an interior block (scales and zero points included)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("perplexity increase vs unquantized cache (%)")
    ax.set_title("SmolLM2-135M, held-out text, KV round-tripped per 256-token block")
    ax.grid(alpha=0.3)
    fig_.tight_layout()
    fig_.savefig(path, dpi=120)
    plt.close(fig_)


def goals(fig: dict) -> list[list]:
    rows, ppl, pk, redis = fig["codecs"], fig["perplexity"], fig["passkey"], fig.get("redis_round_trip") or {}
    full = pk.get("full")
    out = []

    def add(goal, measured, met):
        out.append([goal, measured, "met" if met else "NOT met"])

    for label in dict.fromkeys([*rows, *ppl]):
        if "+" in label or not label.startswith("kivi"):
            continue
        ratio_goal, ppl_goal = (3.5, 2.0) if label.startswith("kivi4") else (6.0, 10.0)
        interior = re.sub(r"/(sink|res)\d+", "", label)  # the first and tail blocks aside
        if interior in rows:
            r = rows[interior]["ratio_vs_fp16"]
            staged = [rows[n]["ratio_vs_fp16"] for n in rows if n.startswith(interior + "+")]
            best = max([r, *staged])
            note = " (interior blocks)" if interior != label else ""
            add(
                f"{label}: >= {ratio_goal}x smaller than fp16",
                f"{r:.2f}x{note}" + (f", {best:.2f}x with a lossless stage" if staged else ""),
                best >= ratio_goal,
            )
        if label in ppl:
            inc = ppl[label]["increase_pct"]
            add(f"{label}: perplexity +<= {ppl_goal}%", f"{inc:+.3f}%", inc <= ppl_goal)
        if label in pk and full and label.startswith("kivi4"):
            add(
                f"{label}: pass-key accuracy equal to full",
                f"{pk[label]['correct']}/{pk[label]['total']} vs full {full['correct']}/{full['total']}",
                pk[label]["correct"] >= full["correct"],
            )
    for name in ("int8", "fp8"):
        if name in ppl:
            add(f"{name}: perplexity +<= 0.5%", f"{ppl[name]['increase_pct']:+.3f}%", ppl[name]["increase_pct"] <= 0.5)
    if "speedup" in redis:
        add("Redis round trip kivi4+zstd >= 2x faster than identity", f"{redis['speedup']:.2f}x", redis["speedup"] >= 2.0)
    return out


def render(fig: dict, title: str) -> str:
    runs, rows, ppl, pk, redis = fig["runs"], fig["codecs"], fig["perplexity"], fig["passkey"], fig.get("redis_round_trip") or {}
    md = [
        f"# Codecs — {title}",
        "",
        f"Reference model {fig.get('model')}, blocks of {fig['block']['tokens']} tokens "
        f"({fig['block']['bytes_fp16'] / 1e6:.2f} MB in fp16). Runs (each figure below names its run):",
        "",
    ]
    md.append(
        md_table(
            ["run", "date", "command", "threads", "sections", "time"],
            [
                [
                    k,
                    r.get("date"),
                    f"`{r.get('command')}`",
                    r.get("threads"),
                    ", ".join(r.get("sections", [])),
                    f"{r.get('elapsed_s', 0):.0f} s",
                ]
                for k, r in runs.items()
            ],
        )
    )
    if rows:
        md += [
            "",
            "## Size, CPU speed, reconstruction error (real KV)",
            "",
            "Bits per element of an interior block; `/sink`: the first block of a sequence, `/res`: its tail block, apart.",
            "",
            md_table(
                [
                    "codec",
                    "bits/element",
                    "ratio vs fp16",
                    "first / tail block bits",
                    "encode GB/s",
                    "decode GB/s",
                    "rel. err K",
                    "rel. err V",
                    "run",
                ],
                [
                    [
                        k,
                        f"{r['bits_per_element']:.3f}",
                        f"{r['ratio_vs_fp16']:.2f}x",
                        " / ".join(
                            f"{r[f'{w}_block_bits_per_element']:.3f}" if f"{w}_block_bits_per_element" in r else "—"
                            for w in ("first", "tail")
                        ),
                        f"{r['encode_GBps']:.3f}",
                        f"{r['decode_GBps']:.3f}",
                        f"{r['rel_err_k']:.4f}" if "rel_err_k" in r else "(inner)",
                        f"{r['rel_err_v']:.4f}" if "rel_err_v" in r else "(inner)",
                        r["run"],
                    ]
                    for k, r in rows.items()
                ],
            ),
        ]
    if ppl or pk:
        base = ppl.get("unquantized")
        labels = [k for k in ppl if k != "unquantized"] + [k for k in pk if k not in ppl and k != "full"]
        table = []
        if base or "full" in pk:
            table.append(
                [
                    "unquantized (float32)",
                    f"{base['ppl']:.4f}" if base else "—",
                    "—",
                    f"{pk['full']['correct']}/{pk['full']['total']}" if "full" in pk else "—",
                    ", ".join(sorted({x["run"] for x in (base, pk.get("full")) if x})),
                ]
            )
        for k in labels:
            p, q = ppl.get(k), pk.get(k)
            table.append(
                [
                    k,
                    f"{p['ppl']:.4f}" if p else "—",
                    f"{p['increase_pct']:+.3f}%" if p else "—",
                    f"{q['correct']}/{q['total']}" if q else "—",
                    ", ".join(sorted({x["run"] for x in (p, q) if x})),
                ]
            )
        md += [
            "",
            f"## Perplexity ({fig.get('text_tokens')} tokens) and pass key",
            "",
            md_table(["cache", "perplexity", "increase", "pass key", "run"], table),
        ]
        fails = {k: [f"{x['tokens']}/{x['depth']:.0%}" for x in v["prompts"] if not x["correct"]] for k, v in pk.items()}
        md += [
            "",
            "Missed pass-key prompts (tokens/needle depth): " + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in fails.items()),
        ]
    if redis:
        md += [
            "",
            f"## Redis round trip (put + get of one block, encode/decode included, median; run {redis['run']})",
            "",
            md_table(
                ["codec", "round trip ms", "frame MB", "vs identity"],
                [
                    [
                        k,
                        f"{v['round_trip_ms']:.2f}",
                        f"{v['frame_bytes'] / 1e6:.2f}",
                        f"{v['speedup_vs_identity']:.2f}x" if "speedup_vs_identity" in v else "—",
                    ]
                    for k, v in redis.items()
                    if isinstance(v, dict)
                ],
            ),
        ]
    md += ["", "## Goals", "", md_table(["goal", "measured", "status"], goals(fig))]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter text, fewer prompts and codecs (under a minute)")
    ap.add_argument("--out", help="also write the figures as JSON to this file")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"what to measure (default: {','.join(SECTIONS)})")
    ap.add_argument("--size-codecs", default=",".join(SIZE_CODECS), help="codec labels of the size part")
    ap.add_argument("--fidelity-codecs", default=",".join(FIDELITY_CODECS), help="codec labels of the perplexity part")
    ap.add_argument("--passkey-codecs", default=",".join(PASSKEY_CODECS), help="codec labels of the pass-key part")
    ap.add_argument(
        "--redis-codecs", default=",".join(REDIS_CODECS), help="codec labels of the Redis part (identity and kivi4+zstd give the goal)"
    )
    ap.add_argument("--merge", action="store_true", help="merge into the saved bench/results/codecs.json instead of replacing it")
    ap.add_argument(
        "--render", action="store_true", help="measure nothing: render codecs.md and codecs.png again from the saved codecs.json"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core box a second thread mostly waits)")
    args = ap.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    if set(sections) - set(SECTIONS):
        raise SystemExit(f"--sections takes {','.join(SECTIONS)}, got {args.sections}")
    lists = {k: [c for c in getattr(args, f"{k}_codecs").split(",") if c] for k in ("size", "fidelity", "passkey", "redis")}
    for labels in lists.values():
        for label in labels:
            parse_label(label)  # a bad label fails now, not after an hour
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    quick = args.quick
    name = "codecs_quick" if quick else "codecs"
    block_tokens = 256
    text_tokens = 512 if quick else 4096
    repeat = 1 if quick else 5
    command = "python bench/codecs.py " + " ".join(sys.argv[1:])
    saved = RESULTS / "codecs.json"
    previous = upgrade(json.loads(saved.read_text())) if (args.merge or args.render) and not quick else None
    if args.render:  # no measurement: the saved figures, rendered again
        previous = merge(previous, {"runs": {}})
        md = render(previous, "`python bench/codecs.py`, merged runs")
        previous["goals"] = [{"goal": g, "measured": m, "status": s} for g, m, s in goals(previous)]
        plot(previous, RESULTS / "codecs.png")
        save_results("codecs", previous, md, args.out)
        return
    run = next(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if previous is None or c not in previous["runs"])
    if previous is not None:  # run A's zstd rows were level 3 (level 1 since): none may stay under today's name
        stale = [
            k for k, v in previous["codecs"].items() if "+zstd" in k and v["run"] == "A" and not ("size" in sections and k in lists["size"])
        ]
        if stale:
            raise SystemExit(f"--merge: measure the zstd rows of run A again (level 3 then, 1 now): --size-codecs {','.join(stale)}")

    print(f"loading the reference model ({refmodel.MODEL_ID}) ...", flush=True)
    model, tok = refmodel.load_model()
    spec = refmodel.kv_spec(model, block_tokens, "float16")
    ids = refmodel.heldout_ids(tok, text_tokens)
    fig = {
        "model": refmodel.MODEL_ID,
        "block": {"tokens": block_tokens, "bytes_fp16": spec.block_nbytes, "shape": list(spec.block_shape)},
        "text_tokens": len(ids),
        "codecs": {},
        "perplexity": {},
        "passkey": {},
        "redis_round_trip": {},
    }
    blocks = []
    if "size" in sections or "redis" in sections:
        kv = refmodel.collect_kv(model, ids)  # [L, 2, H, T, D] float32
        blocks = [
            kv[:, :, :, s : s + block_tokens].to(torch.float16).contiguous() for s in range(0, kv.shape[3] - block_tokens + 1, block_tokens)
        ]
        print(
            f"{len(blocks)} real KV blocks of {spec.block_nbytes / 1e6:.2f} MB (fp16) from {kv.shape[3]} tokens of held-out text",
            flush=True,
        )

    if "size" in sections:
        print("\n1. size, CPU speed (GB/s of fp16 KV), reconstruction error", flush=True)
        fig["codecs"] = size_speed_error(QUICK["size"] if quick else lists["size"], blocks, spec, repeat, run)
    if "ppl" in sections:
        print(f"\n2. perplexity, {len(ids)} tokens of held-out text, {block_tokens}-token chunks and blocks", flush=True)
        fig["perplexity"] = perplexities(model, ids, QUICK["ppl"] if quick else lists["fidelity"], block_tokens, run)
    if "passkey" in sections:
        if quick:
            prompts = refmodel.passkey_suite(tok, lengths=(1024,), depths=(0.5,), num_keys=2)
        else:
            prompts = refmodel.passkey_suite(tok, lengths=(2048, 6144), depths=(0.1, 0.5, 0.9), num_keys=2)
        print(f"\n3. pass key, {len(prompts)} prompts of {sorted({p.num_tokens for p in prompts})} tokens", flush=True)
        fig["passkey"] = passkeys(model, tok, prompts, QUICK["passkey"] if quick else lists["passkey"], block_tokens, run)
    if "redis" in sections:
        print("\n4. Redis round trip of one real block", flush=True)
        fig["redis_round_trip"] = redis_round_trip(lists["redis"], blocks[0], spec, 3 if quick else 9, run)

    elapsed = time.perf_counter() - started
    fig["runs"] = {
        run: {
            "date": time.strftime("%Y-%m-%d"),
            "command": command,
            "mode": "quick" if quick else "full",
            "threads": args.threads,
            "elapsed_s": elapsed,
            "sections": sections,
        }
    }
    if previous is not None:
        fig = merge(previous, fig)
    title = "`python bench/codecs.py`, merged runs" if args.merge and not quick else f"`{command}`"
    md = render(fig, title)
    fig["goals"] = [{"goal": g, "measured": m, "status": s} for g, m, s in goals(fig)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    if fig["codecs"] and fig["perplexity"]:
        plot(fig, RESULTS / f"{name}.png")
    print("\n" + md_table(["goal", "measured", "status"], goals(fig)))
    print(f"\n{'quick' if quick else 'full'}; {elapsed:.0f} s")
    save_results(name, fig, md, args.out)


if __name__ == "__main__":
    main()
