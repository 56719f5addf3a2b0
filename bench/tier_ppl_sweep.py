"""Where the perplexity of decoding over the tiers goes: a sweep of TierAttention's selection
options on the reference model, simulated in one forward.

``bench/tier_fidelity.py`` measures perplexity the way a user decodes: one teacher-forced step at a
time through ``SparseDecode(store=...)``. That takes minutes per configuration. This script
computes the same thing in one forward pass over the last ``N`` tokens: each query row attends
exactly what ``TierAttention`` would select at its step (the blocks stored at that step, level 1
over block bounds, level 2 over page bounds, the sink page, the resident tail, ``dense_layers``),
and since the K/V of each token is computed from the same sparse attention in the layers below,
the logits equal those of the step-by-step decode (checked: the ``default`` row reproduces
``tier_fidelity.py``'s figure). Used to find which option costs the perplexity; the chosen
defaults are then measured through ``SparseDecode`` by ``tier_fidelity.py``.

Options per row: ``budget`` (tokens per KV head, tail included), ``resident`` (resident_tokens),
``C`` (candidate_blocks; 0 = one level), ``dense`` (dense_layers), ``agg`` (how a GQA group's
query heads score a page: ``max`` of their Quest bounds, or ``sum``; ``mean``: the mean key's score instead of the bound; ``mix``/``mix25``: the bound and
the mean key's score weighted 1:1 / 3:1), ``oracle`` (pages by their
true attention mass instead of Quest bounds: the ceiling of page selection), ``agg=smax``/``ssum``
(each query head's bounds turned into a softmax over the pages before the group's max / sum),
``comp`` (1: every page not selected still attends through its mean key and mean value, weighted
by its ``P`` tokens; 2: the same, with blocks outside the candidates by their block means: an
estimate of the mass selection leaves out, measured to make perplexity worse, not better).
``SWEEP_PAGE_TOKENS`` in the environment sets the page size (default 16).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import refmodel  # noqa: E402
from bench.common import md_table, save_results  # noqa: E402
from kvtier.connectors.hf_dispatch import bind, sdpa  # noqa: E402

P = int(__import__("os").environ.get("SWEEP_PAGE_TOKENS", "16"))


def allowed_tokens(q, k, start: int, cfg: dict, BT: int, layer: int, scale: float) -> torch.Tensor:
    """``[H, n, T]`` bool: the tokens each KV head attends at each of the ``n`` steps (vectorised
    over the steps): the pages TierAttention selects among the blocks stored at that step, plus
    the resident tail up to the step's own token."""
    H, G, n, D = q.shape
    T = k.shape[1]
    Np = BT // P
    pos = torch.arange(start, start + n)  # the token each step decodes (the cache holds 0..pos)
    stored = (pos - cfg["resident"]).clamp_min(0) // BT * BT  # [n]: tokens in the store at that step
    want = ((cfg["budget"] - (pos + 1 - stored)) // P).clamp_min(1)  # [n] pages from the tiers
    tok = torch.arange(T)
    allowed = (tok >= stored[:, None]) & (tok <= pos[:, None])  # the resident tail, causal
    allowed = allowed.expand(H, n, T).clone()
    N = int(stored.max()) // BT  # blocks stored at the last step
    if N == 0:
        return allowed, None
    total = N * Np
    ks = k[:, : N * BT].view(H, total, P, D)
    page_ok = (torch.arange(total) * P)[None, :] < stored[:, None]  # [n, total]: the page was stored at that step
    cand_blocks = None
    if layer < cfg["dense"]:
        sel = page_ok.expand(H, n, total)
    elif cfg["oracle"]:
        logits = torch.einsum("hgnd,htd->hgnt", q, k[:, : N * BT]) * scale
        logits = logits.masked_fill(~page_ok.repeat_interleave(P, 1)[None, None], float("-inf"))
        mass = logits.softmax(-1).view(H, G, n, total, P).sum(-1)
        s2 = mass.amax(1) if cfg["agg"] == "max" else mass.sum(1)  # [H, n, total]
        sel = _top(s2, page_ok, want)
    else:
        pos_q, neg_q = q.clamp_min(0), q.clamp_max(0)

        def score(hi, lo, mean=None, w=0.0):  # [H, X, D] -> [H, n, X]
            s = torch.einsum("hgnd,hxd->hgnx", pos_q, hi) + torch.einsum("hgnd,hxd->hgnx", neg_q, lo)
            if mean is not None:
                s = (1 - w) * s + w * torch.einsum("hgnd,hxd->hgnx", q, mean)
            if cfg["agg"] in ("smax", "ssum"):  # each query head's bounds as a softmax over the pages, then the group's max / sum
                ok = page_ok if s.shape[-1] == total else (torch.arange(s.shape[-1]) * BT)[None, :] < stored[:, None]
                s = (s * scale).masked_fill(~ok[None, None], float("-inf")).softmax(-1)
                return s.amax(1) if cfg["agg"] == "smax" else s.sum(1)
            return s.amax(1) if cfg["agg"] != "sum" else s.sum(1)

        kmax, kmin = ks.amax(2), ks.amin(2)  # [H, total, D]
        w = {"mean": 1.0, "mix": 0.5, "mix25": 0.25}.get(cfg["agg"], 0.0)  # weight of the page's mean key in its score
        s2 = score(kmax, kmin, ks.mean(2) if w else None, w)  # [H, n, total]
        C = cfg["C"]
        if C:
            block_ok = (torch.arange(N) * BT)[None, :] < stored[:, None]  # [n, N]
            s1 = score(kmax.view(H, N, Np, D).amax(2), kmin.view(H, N, Np, D).amin(2))
            s1[..., 0] = float("inf")
            s1 = s1.masked_fill(~block_ok, float("-inf"))
            Cn = torch.clamp(-(-want // Np), min=C)  # [n]
            rank = s1.argsort(-1, descending=True).argsort(-1)  # [H, n, N]
            cand = (rank < Cn[None, :, None]) & block_ok  # kept blocks (all when fewer than C are stored)
            s2 = s2.masked_fill(~cand.repeat_interleave(Np, -1), float("-inf"))
            cand_blocks = cand
        sel = _top(s2, page_ok, want)
    return allowed | _pad(sel.repeat_interleave(P, -1), T), (sel, page_ok, N, cand_blocks)


def _top(s2, page_ok, want):
    """The ``want[i]`` best stored pages of each step (the sink page always)."""
    s2 = s2.masked_fill(~page_ok, float("-inf")).clone()
    s2[..., 0] = float("inf")
    rank = s2.argsort(-1, descending=True).argsort(-1)
    return (rank < want[None, :, None]) & page_ok


def _pad(x, T):
    return torch.nn.functional.pad(x, (0, T - x.shape[-1]))


def make_handler(cfg: dict, start: int, BT: int):
    def handler(module, query, key, value, attention_mask, *, cache=None, cache_position=None, scaling=None, **kw):
        B, Hq, n, D = query.shape
        if n != cfg["n"]:  # the prefill
            return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kw)
        H = key.shape[1]
        G = Hq // H
        q = query[0].view(H, G, n, D)
        k, v = key[0], value[0]
        allowed, info = allowed_tokens(q, k, start, cfg, BT, module.layer_idx, scaling)  # [H, n, T]
        s = torch.einsum("hgnd,htd->hgnt", q, k) * scaling
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        if cfg.get("comp") and info is not None:
            # the pages not selected, each stood for by its mean key and mean value with the weight
            # of its P tokens (log P added to the logit); blocks outside the candidates by their
            # block means when comp=2
            sel, page_ok, N, cand = info
            total = N * (BT // P)
            kp = k[:, : N * BT].reshape(H, total, P, D).mean(2)
            vp = v[:, : N * BT].reshape(H, total, P, D).mean(2)
            cs = torch.einsum("hgnd,hxd->hgnx", q, kp) * scaling + math.log(P)
            rest = page_ok[None] & ~sel  # [H, n, total]
            if cfg["comp"] == 2 and cand is not None:
                Np = BT // P
                kb = k[:, : N * BT].reshape(H, N, BT, D).mean(2)
                vb = v[:, : N * BT].reshape(H, N, BT, D).mean(2)
                bs = torch.einsum("hgnd,hxd->hgnx", q, kb) * scaling + math.log(BT)
                block_ok = (torch.arange(N) * BT)[None, :] < ((torch.arange(start, start + n) - cfg["resident"]).clamp_min(0) // BT * BT)[
                    :, None
                ]
                nonc = block_ok[None] & ~cand  # [H, n, N]
                rest = rest & cand.repeat_interleave(Np, -1)
                bs = bs.masked_fill(~nonc[:, None], float("-inf"))
            else:
                bs = None
            cs = cs.masked_fill(~rest[:, None], float("-inf"))
            parts = [s, cs] + ([bs] if bs is not None else [])
            att = torch.cat(parts, -1).softmax(-1)
            T = s.shape[-1]
            out = torch.einsum("hgnt,htd->hgnd", att[..., :T], v) + torch.einsum("hgnx,hxd->hgnd", att[..., T : T + total], vp)
            if bs is not None:
                out = out + torch.einsum("hgnx,hxd->hgnd", att[..., T + total :], vb)
            out = out.reshape(Hq, n, D).transpose(0, 1)
            return out[None], None
        att = s.softmax(-1)
        out = torch.einsum("hgnt,htd->hgnd", att, v).reshape(Hq, n, D).transpose(0, 1)
        return out[None], None

    return handler


ROWS = {
    "default": dict(budget=512, resident=64, C=32, dense=0, agg="max", oracle=False),
    "one_level": dict(budget=512, resident=64, C=0, dense=0, agg="max", oracle=False),
    "dense2": dict(budget=512, resident=64, C=32, dense=2, agg="max", oracle=False),
    "sum": dict(budget=512, resident=64, C=32, dense=0, agg="sum", oracle=False),
    "oracle": dict(budget=512, resident=64, C=0, dense=0, agg="max", oracle=True),
    "b1024": dict(budget=1024, resident=64, C=32, dense=0, agg="max", oracle=False),
    "resident256": dict(budget=512, resident=256, C=32, dense=0, agg="max", oracle=False),
}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1K tokens, 32 steps, three rows")
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--block-tokens", type=int, default=64)
    ap.add_argument("--rows", nargs="+", default=None, help=f"rows to run (default all: {' '.join(ROWS)}); extra: name:key=val,...")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.time()
    model, tok = refmodel.load_model()
    tokens, steps = (1024, 32) if args.quick else (args.tokens, args.steps)
    rows = args.rows or (["default", "one_level", "dense2"] if args.quick else list(ROWS))
    ids = torch.tensor(refmodel.heldout_ids(tok, tokens)[:tokens])
    start = ids.numel() - steps
    state = refmodel.prefill(model, ids[:start], chunk_tokens=512)
    first = -torch.log_softmax(state.last_logits.double(), -1)[ids[start]]
    chunk = ids[start:-1]

    def nll_of(cfg):
        import copy

        cache = copy.deepcopy(state.cache)
        if cfg is None:
            logits = refmodel._forward(model, cache, chunk, start, all_logits=True)
        else:
            with bind(model, "kvtier_sparse", make_handler({**cfg, "n": chunk.numel()}, start, args.block_tokens), sdpa_mask=True):
                logits = refmodel._forward(model, cache, chunk, start, all_logits=True)
        nll = -torch.log_softmax(logits.double(), -1).gather(1, ids[start + 1 :].view(-1, 1)).view(-1)
        return torch.cat([first.view(1), nll])

    full = float(torch.exp(nll_of(None).mean()))
    print(f"full attention: ppl {full:.4f} over the last {steps} of {tokens} tokens", flush=True)
    results = {"full": {"ppl": full}}
    for name in rows:
        if ":" in name:
            name, opts = name.split(":", 1)
            cfg = dict(ROWS["default"])
            for kv in opts.split(","):
                k, v = kv.split("=")
                cfg[k] = v if k == "agg" else (v == "1") if k == "oracle" else int(v)
            ROWS[name] = cfg
        cfg = ROWS[name]
        t0 = time.time()
        ppl = float(torch.exp(nll_of(cfg).mean()))
        results[name] = {**cfg, "ppl": ppl, "ratio": ppl / full}
        print(f"{name:>14}: ppl {ppl:.4f} ({ppl / full:.4f}x)  {cfg}  {time.time() - t0:.0f} s", flush=True)
    md = [
        f"## bench/tier_ppl_sweep.py {' '.join(sys.argv[1:])}",
        "",
        f"SmolLM2-135M, perplexity of the last {steps} of {tokens} held-out tokens with each step attending what "
        f"TierAttention selects ({args.block_tokens}-token blocks, 16-token pages), simulated in one forward. "
        f"{args.threads} torch threads.",
        "",
        md_table(
            [
                "row",
                "budget",
                "resident",
                "candidate_blocks",
                "dense_layers",
                "group score",
                "pages by",
                "pages not selected",
                "ppl",
                "vs full",
            ],
            [["full", "-", "-", "-", "-", "-", "-", "-", f"{full:.4f}", "-"]]
            + [
                [
                    n,
                    r["budget"],
                    r["resident"],
                    r["C"] or "all",
                    r["dense"],
                    r["agg"],
                    "attention mass" if r["oracle"] else "Quest bounds",
                    {0: "left out", 1: "mean K/V per page", 2: "mean K/V per page / block"}[int(r.get("comp", 0))],
                    f"{r['ppl']:.4f}",
                    f"{r['ratio']:.4f}x",
                ]
                for n, r in results.items()
                if n != "full"
            ],
        ),
    ]
    save_results(
        "tier_ppl_sweep_quick" if args.quick else "tier_ppl_sweep",
        {"tokens": tokens, "steps": steps, "rows": results},
        "\n".join(md),
        args.out,
    )
    print(f"done in {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
