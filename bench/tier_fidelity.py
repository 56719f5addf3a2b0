"""Fidelity of decoding with the KV offloaded to the tiers, on the reference model (SmolLM2-135M).

Through ``SparseDecode(budget=512, store=...)`` as a user would call it: the prompt is prefilled
(chunked, full attention), then every decode step writes the full blocks to the store, zeroes them
in the transformers cache, and attends per layer and KV head only the pages it selects from the
tiers (``retrieval.TierAttention``), plus the resident tail. Two stores: the disk tier (a small
host tier in front, ``paged`` codec in both) and Redis (a private redis-server, ``paged`` codec).

- pass key at 6K and 8K tokens (depths 0.25 / 0.5 / 0.75): the answer with the KV in the tiers
  against full attention over the resident cache (the same prefill);
- perplexity with the KV offloaded: a 4K-token held-out text, the first ``4096 - N`` tokens
  prefilled, the last ``N`` teacher-forced one decode step at a time with the KV in the tier,
  against the same steps with full attention (the prefill part is the same for both and is not
  counted: the ratio is over the offloaded steps only).

``--quick``: one 2K pass key and 32 perplexity steps over 1K tokens, disk only.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import refmodel  # noqa: E402
from bench.common import LocalRedis, md_table, save_results  # noqa: E402
from kvtier.kvstore import DiskTier, HostTier, TierConfig, TieredStore  # noqa: E402
from kvtier.connectors.hf_attention import SparseDecode  # noqa: E402

# imported now, not on first use: a long run must not pick up a library file edited meanwhile
import kvtier.kvstore.tiers.redis  # noqa: E402,F401
import kvtier.retrieval.tier_attention  # noqa: E402,F401
import kvtier.sparse_attn  # noqa: E402,F401


def make_store(kind: str, root: Path, redis_url: str | None) -> TieredStore:
    if kind == "disk":
        d = Path(tempfile.mkdtemp(dir=root))
        return TieredStore([TierConfig(HostTier(8 << 20, codec="paged")), TierConfig(DiskTier(d, 8 << 30, codec="paged"))])
    from kvtier.kvstore.tiers.redis import RedisTier

    return TieredStore([TierConfig(RedisTier(redis_url, codec="paged", socket_timeout_s=30.0))])


@torch.inference_mode()
def teacher_forced_nll(model, state, ids: torch.Tensor, start: int, hook=None) -> torch.Tensor:
    """NLL of ``ids[start+1:]`` decoding ``ids[start:-1]`` one token at a time after ``state``
    (the prefill of ``ids[:start]``)."""
    nll = []
    logits = state.last_logits
    ctx = hook.attach(model) if hook is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        for i in range(start, ids.numel()):
            nll.append(-torch.log_softmax(logits.double(), -1)[ids[i]])
            if i + 1 < ids.numel():
                logits = refmodel._forward(model, state.cache, ids[i : i + 1], i, all_logits=False)[-1]
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return torch.stack(nll)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument(
        "--ppl-steps", type=int, default=None, help="teacher-forced offloaded steps of the perplexity run (default 256; quick 32)"
    )
    ap.add_argument(
        "--ppl-budgets",
        type=int,
        nargs="+",
        default=None,
        help="budgets of the perplexity run, each decoded in every tier (default: --budget)",
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[6144, 8192], help="pass-key prompt lengths (full run)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="pass-key depths (full run)")
    ap.add_argument("--ppl-only", action="store_true", help="only the perplexity part (results: tier_fidelity_ppl.*)")
    ap.add_argument("--tiers", nargs="+", choices=["disk", "redis"], help="stores to decode from (default: disk and redis; quick: disk)")
    ap.add_argument("--hook-options", default="", help="more SparseDecode options, key=int,... (default: SparseDecode's defaults)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.time()
    model, tok = refmodel.load_model()
    if args.quick:
        prompts = [refmodel.passkey_prompt(tok, 2048, 0.5, seed=4)]
        kinds, ppl_tokens, ppl_steps = ("disk",), 1024, args.ppl_steps or 32
    else:
        prompts = [refmodel.passkey_prompt(tok, n, d, seed=n + round(d * 100)) for n in args.lengths for d in args.depths]
        kinds, ppl_tokens, ppl_steps = ("disk", "redis"), 4096, args.ppl_steps or 256
    if args.ppl_only:
        prompts = []
    if args.tiers:
        kinds = tuple(args.tiers)
    opts = {k: int(v) for k, v in (kv.split("=") for kv in args.hook_options.split(",") if kv)}
    root = Path(tempfile.mkdtemp(prefix="kvtier-tier-fid-"))
    redis = LocalRedis() if "redis" in kinds else None
    rows, tier_stats = [], {}
    try:
        for p in prompts:
            state = refmodel.prefill(model, p.input_ids, chunk_tokens=512)
            row = {"tokens": len(p.input_ids), "depth": p.depth, "key": p.key}
            for kind in ("full", *kinds):
                s = copy.deepcopy(state)
                hook = None
                if kind != "full":
                    store = make_store(kind, root, redis.url if redis else None)
                    hook = SparseDecode(budget=args.budget, store=store, **opts)
                t0 = time.perf_counter()
                if hook is None:
                    answer = tok.decode(refmodel.greedy(model, s, 8))
                else:
                    with hook.attach(model):
                        answer = tok.decode(refmodel.greedy(model, s, 8))
                found = re.search(r"\d+", answer)
                row[kind] = {
                    "answer": answer.strip(),
                    "correct": found is not None and found.group() == p.key,
                    "decode_s": time.perf_counter() - t0,
                }
                if hook is not None:
                    st = hook.tier_attention.stats()
                    row[kind].update(
                        offloaded_tokens=hook.stats.offloaded_tokens,
                        read_fraction=hook.stats.read_fraction,
                        page_bytes_read=st.page_bytes_read,
                        selected_bytes=st.selected_bytes,
                        hit_rate=st.hit_rate,
                    )
                    tier_stats.setdefault(kind, []).append(st.to_dict())
                    hook.tier_attention.close()
                    store.close()
            print(
                f"  pass key {row['tokens']:>5} tokens depth {p.depth:.2f}: "
                + ", ".join(f"{k} {'ok' if row[k]['correct'] else 'WRONG'} ({row[k]['answer'][:12]!r})" for k in ("full", *kinds)),
                flush=True,
            )
            rows.append(row)

        ids = torch.tensor(refmodel.heldout_ids(tok, ppl_tokens)[:ppl_tokens])
        start = ids.numel() - ppl_steps
        state = refmodel.prefill(model, ids[:start], chunk_tokens=512)
        ppl = {}
        budgets = args.ppl_budgets or [args.budget]
        runs = [("full", "full", None)] + [(kind if len(budgets) == 1 else f"{kind}@{b}", kind, b) for b in budgets for kind in kinds]
        for name_, kind, budget in runs:
            s = copy.deepcopy(state)
            hook = None
            if kind != "full":
                store = make_store(kind, root, redis.url if redis else None)
                hook = SparseDecode(budget=budget, store=store, **opts)
            t0 = time.perf_counter()
            nll = teacher_forced_nll(model, s, ids, start, hook)
            ppl[name_] = {"ppl": float(torch.exp(nll.mean())), "seconds": time.perf_counter() - t0, "budget": budget, "tier": kind}
            if hook is not None:
                ppl[name_]["offloaded_tokens"] = hook.stats.offloaded_tokens
                ppl[name_]["ratio"] = ppl[name_]["ppl"] / ppl["full"]["ppl"]
                hook.tier_attention.close()
                store.close()
            print(
                f"  perplexity ({name_}) over the last {ppl_steps} of {ids.numel()} tokens: {ppl[name_]['ppl']:.4f}"
                + (f" ({ppl[name_]['ratio']:.4f}x)" if hook is not None else "")
                + f"  {ppl[name_]['seconds']:.0f} s",
                flush=True,
            )
    finally:
        if redis is not None:
            redis.close()
        shutil.rmtree(root, ignore_errors=True)

    name = "tier_fidelity_quick" if args.quick else "tier_fidelity_ppl" if args.ppl_only else "tier_fidelity"
    table = [
        [r["tokens"], r["depth"], r["key"]]
        + [("ok" if r[k]["correct"] else f"wrong: {r[k]['answer'][:10]!r}") for k in ("full", *kinds)]
        + [f"{r[kinds[0]]['read_fraction']:.2f}"]
        for r in rows
    ] or [["-"] * (5 + len(kinds))]
    md = [
        f"## bench/tier_fidelity.py{' --quick' if args.quick else ''}",
        "",
        f"SmolLM2-135M (30 layers, 3 KV heads), `SparseDecode(budget=B, store=...{''.join(f', {k}={v}' for k, v in opts.items())})` "
        f"with B = {args.budget} for the pass keys and the budgets in the perplexity table "
        f"(its other options at their defaults; run `{' '.join(sys.argv)}`): the prompt's KV written to the "
        "store in 64-token blocks (`paged` codec) and zeroed in the transformers cache; each decode step reads the selected "
        f"pages from the tier. {args.threads} torch threads, shared CPU box.",
        "",
        md_table(["tokens", "depth", "key", "full attention", *[f"KV in {k}" for k in kinds], "read fraction"], table),
        "",
        md_table(
            ["perplexity", "budget", "ppl", "vs full"],
            [
                [
                    f"{k}: last {ppl_steps} of {ppl_tokens} tokens",
                    "-" if v["budget"] is None else v["budget"],
                    f"{v['ppl']:.4f}",
                    "-" if k == "full" else f"{v['ratio']:.4f}x",
                ]
                for k, v in ppl.items()
            ],
        ),
        "",
        "Goals: pass keys equal to full attention; perplexity within +1% of full attention.",
    ]
    save_results(
        name,
        {
            "quick": args.quick,
            "budget": args.budget,
            "hook_options": opts,
            "command": " ".join(sys.argv),
            "passkey": rows,
            "perplexity": ppl,
            "tier_stats": tier_stats,
        },
        "\n".join(md),
        args.out,
    )
    print(f"done in {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
