"""Retrieval benchmark: selectors and key indexes on the reference model's real queries, and at 1M keys.

    python bench/retrieval.py [--quick] [--out FILE] [--threads N]

Side by side in one run:
  1. recall per selector on real KV and decode queries of SmolLM2-135M (every layer and KV head,
     contexts 2K/4K/8K of held-out text; the decode queries are those of the 16 positions after
     the context): attention-mass recall (share of the exact softmax mass on the selected tokens)
     and top-100 recall, at budgets 64/256/1024 and 10% of the context, with the fraction of keys
     (or key-sized summaries) each selector reads;
     goal: quest at a 10% budget covers >= 95% of the attention mass;
  2. ANN indexes alone on the same real queries: top-100 recall vs fraction of keys scanned
     (IVF with key-trained lists, IVF with query-aware lists trained on the prefill queries, HNSW);
     goal: some backend reaches top-100 recall >= 0.9 scanning <= 5% of the keys;
  3. synthetic 1M keys (clustered, anisotropic; queries drawn out of the keys' distribution):
     search latency per query per head and recall@100 per faiss backend (CPU; no GPU here);
  4. end to end: pass-key accuracy (completion-style prompt, repeated filler, depths 0.1/0.5/0.9,
     ~2K and ~6K tokens) when every decode step attends only the tokens a selector picks, at
     budgets 128/256/512, vs full attention;
     goal: quest at 256 (2K) / 512 (6K) matches full attention.

Writes bench/results/retrieval.json, .md and retrieval_recall.png, retrieval_ann.png (--quick: retrieval_quick.*).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# This file is named like the package it measures: take its own folder off the path (Python put it
# first) so that ``import retrieval`` is the package, and import the bench helpers as ``bench.*``.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench.common import RESULTS, md_table, save_results  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvtier.retrieval import CachedSelector, get_selector, make_index  # noqa: E402
from kvtier.retrieval.index import IVFIndex  # noqa: E402

NUM_SINK, NUM_RECENT = 4, 32
N_DECODE_Q = 16  # decode queries per context: the positions right after it

# (row label, selector name, options) measured for recall and end to end
SELECTORS = [
    ("topk_exact", "topk_exact", {}),
    ("tokenselect", "tokenselect", {}),
    ("quest", "quest", {}),
    # the inner-product graph (measured first) and the L2-reduced one (HNSWIndex's default since)
    ("ann(hnsw)", "ann", {"backend": "hnsw", "index_options": {"m": 32, "ef_construction": 64, "ef_search": 64, "mips_to_l2": False}}),
    ("ann(hnsw-l2)", "ann", {"backend": "hnsw", "index_options": {"m": 32, "ef_construction": 64, "ef_search": 64, "mips_to_l2": True}}),
    ("ann(ivf)", "ann", {"backend": "ivf", "index_options": {"nprobe": 32, "min_train": 512}}),
    ("centroids", "centroids", {"tokens_per_cluster": 16}),
    ("sink_window", "sink_window", {}),
]


def log(*a):
    print(*a, flush=True)


def make_selector(name, opts):
    return get_selector(name, num_sink=NUM_SINK, num_recent=NUM_RECENT, **opts)


# ------------------------------------------------------------------ stand-in for sparse_decode
def gather_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of ``q [B, H_q, D]`` over the tokens ``indices [B, H_kv, K]`` (-1 = padding) of
    ``k, v [B, H_kv, T, D]`` -> ``(o [B, H_q, D], lse [B, H_q])``.

    This stands in for ``sparse_attn.sparse_decode`` (branch ``sparse``, not merged yet): it is
    mathematically what sparse_decode computes (GQA: query heads h*G..h*G+G-1 use KV head h's
    selection), as a small float32 torch gather + softmax.
    """
    B, H_q, D = q.shape
    H_kv = k.shape[1]
    G = H_q // H_kv
    valid = indices >= 0  # [B, H_kv, K]
    idx = indices.clamp_min(0)[..., None].expand(-1, -1, -1, D)
    k_sel = torch.gather(k.float(), 2, idx)  # [B, H_kv, K, D]
    v_sel = torch.gather(v.float(), 2, idx)
    s = (q.float().view(B, H_kv, G, D) @ k_sel.transpose(-1, -2)) * scale  # [B, H_kv, G, K]
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)  # [B, H_kv, G]
    o = torch.softmax(s, -1) @ v_sel  # [B, H_kv, G, D]
    return o.view(B, H_q, D), lse.view(B, H_q)


# ------------------------------------------------------------------ 1. selector recall on real queries
def ids_to_mask(ids: torch.Tensor, T: int) -> torch.Tensor:
    """``ids [..., K]`` (-1 padding) -> ``[..., T]`` bool. Padding goes to a spare column T, never onto token 0."""
    mask = torch.zeros(*ids.shape[:-1], T + 1, dtype=torch.bool)
    mask.scatter_(-1, torch.where(ids >= 0, ids, T), True)
    return mask[..., :T]


def recall_rows(cap, contexts, budgets_fixed, layers, log_every=10, selectors=None):
    """Per context and selector and budget: attention-mass recall, top-100 recall, scanned fraction."""
    out = []
    scale = cap.scaling
    for T0 in contexts:
        budgets = sorted(set(budgets_fixed) | {round(0.1 * T0)})
        acc = {}  # (label, budget) -> lists
        for li, l in enumerate(layers):
            k = cap.kv[l, 0, :, :T0][None].float()  # [1, H_kv, T0, D]
            q = cap.queries[l, :, T0 : T0 + N_DECODE_Q].float().permute(1, 0, 2).contiguous()  # [n_q, H_q, D]
            n_q, H_q, D = q.shape
            H_kv = k.shape[1]
            G = H_q // H_kv
            s = (q.view(n_q, H_kv, G, D) @ k.transpose(-1, -2)) * scale  # [n_q, H_kv, G, T0]
            p = torch.softmax(s, -1)
            top = s.topk(100, -1).indices  # [n_q, H_kv, G, 100]
            for label, name, opts in selectors or SELECTORS:
                sel = make_selector(name, opts)
                state = sel.prepare(k)
                for b in budgets:
                    ids = sel.select(q, k, b, state)  # [n_q, H_kv, b]
                    mask = ids_to_mask(ids, T0)  # [n_q, H_kv, T0]
                    mass = (p * mask[:, :, None]).sum(-1)  # [n_q, H_kv, G]
                    r100 = mask[:, :, None].expand(-1, -1, G, -1).gather(-1, top).float().mean(-1)
                    a = acc.setdefault((label, b), {"mass": [], "r100": [], "scanned": [], "layer_mass": []})
                    a["mass"].append(mass.flatten())
                    a["r100"].append(r100.flatten())
                    a["scanned"].append(sel.last_scanned)
                    a["layer_mass"].append(float(mass.mean()))
            if li % log_every == 0:
                log(f"  recall: context {T0}, layer {l} done")
        for (label, b), a in acc.items():
            mass = torch.cat(a["mass"])
            out.append(
                {
                    "context": T0,
                    "selector": label,
                    "budget": b,
                    "budget_share": b / T0,
                    "mass_recall": float(mass.mean()),
                    "mass_recall_p10": float(mass.quantile(0.1)),
                    "worst_layer_mass": min(a["layer_mass"]),
                    "top100_recall": float(torch.cat(a["r100"]).mean()),
                    "scanned": float(np.mean(a["scanned"])),
                }
            )
    return out


# ------------------------------------------------------------------ 2. ANN indexes on real queries
class QueryAwareIVF(IVFIndex):
    """Experimental, measured here only (RetrievalAttention's idea, IVF form): the coarse centroids are
    k-means centroids of the prefill queries; each key sits in the list of the query centroid that
    scores it highest, and a decode query scans the lists of the query centroids that score it
    highest (inner product). It measured worse than key-trained lists at equal scanned fraction
    (a probe by L2 distance among the query centroids measured worse still), so the library does
    not offer it.
    """

    def train_queries(self, q) -> None:
        q = np.ascontiguousarray(q.float().numpy())
        self._query_centroids = self._kmeans(q, max(1, min(self.nlist or int(round(4 * math.sqrt(q.shape[0]))), q.shape[0])))

    def _centroids(self, x):
        return self._query_centroids


def ann_rows(cap, contexts, layers, heads_every=1, only_l2_hnsw=False):
    """Top-100 recall vs scanned fraction per backend and setting, averaged over layers and KV heads."""
    out = []
    for T0 in contexts:
        sq = math.sqrt(T0)
        l2_hnsw = [
            ("hnsw m=32 mips->l2", "hnsw", {"m": 32, "ef_construction": 64, "mips_to_l2": True}, {"ef_search": ef}, f"ef={ef}")
            for ef in (100, 200, 400, 800)
        ]
        configs = []
        for nl_mult in (1, 4):
            nlist = int(round(nl_mult * sq))
            for nprobe in (1, 2, 4, 8, 16, 32):
                if nprobe <= nlist:
                    configs.append(
                        (f"ivf nlist={nl_mult}sqrtT", "ivf", {"nlist": nlist, "min_train": 1}, {"nprobe": nprobe}, f"nprobe={nprobe}")
                    )
                    configs.append(
                        (
                            f"ivf-query-aware nlist={nl_mult}sqrtT",
                            "ivf-qa",
                            {"nlist": nlist, "min_train": 1},
                            {"nprobe": nprobe},
                            f"nprobe={nprobe}",
                        )
                    )
        for ef in (100, 200, 400, 800):
            configs.append(("hnsw m=32", "hnsw", {"m": 32, "ef_construction": 64, "mips_to_l2": False}, {"ef_search": ef}, f"ef={ef}"))
        configs = l2_hnsw if only_l2_hnsw else configs + l2_hnsw
        acc = {}
        for l in layers:
            H_kv = cap.kv.shape[2]
            G = cap.queries.shape[1] // H_kv
            for h in range(0, H_kv, heads_every):
                keys = cap.kv[l, 0, h, :T0].float()  # [T0, D]
                q = cap.queries[l, h * G : (h + 1) * G, T0 : T0 + N_DECODE_Q].float().reshape(-1, keys.shape[1])  # [G*n_q, D]
                pre = cap.queries[l, h * G : (h + 1) * G, :T0:2].float().reshape(-1, keys.shape[1])  # prefill queries
                truth = (q @ keys.T).topk(100, -1).indices
                built = {}
                for label, backend, build_opts, search_opts, setting in configs:
                    key = (label, backend, tuple(sorted(build_opts.items())))
                    idx = built.get(key)
                    if idx is None:
                        if backend == "ivf-qa":
                            idx = QueryAwareIVF(keys.shape[1], **build_opts)
                            idx.train_queries(pre)
                        else:
                            idx = make_index(backend, keys.shape[1], **build_opts)
                        idx.add(keys)
                        built[key] = idx
                    for a, v in search_opts.items():
                        setattr(idx, a, v)
                    _, ids = idx.search(q, 100)
                    rec = float((ids[:, :, None] == truth[:, None, :]).any(-1).float().mean())
                    a = acc.setdefault((label, setting), {"recall": [], "scanned": []})
                    a["recall"].append(rec)
                    a["scanned"].append(idx.last_scanned)
        for (label, setting), a in acc.items():
            out.append(
                {
                    "context": T0,
                    "index": label,
                    "setting": setting,
                    "top100_recall": float(np.mean(a["recall"])),
                    "scanned": float(np.mean(a["scanned"])),
                }
            )
        log(f"  ann: context {T0} done")
    return out


# ------------------------------------------------------------------ 3. synthetic 1M keys
def synthetic(n, D=64, num_q=64, seed=0):
    """Clustered anisotropic keys; queries ``iid`` (more draws of the keys' distribution) and ``ood``
    (another distribution: shifted centres, channels rescaled, as real queries are for keys)."""
    g = torch.Generator().manual_seed(seed)
    C = 1024
    centers = torch.randn(C, D, generator=g) * 2
    scales = torch.ones(D)
    scales[:4] = 6.0  # a few outlier channels, as real keys have
    assign = torch.randint(0, C, (n,), generator=g)
    keys = (centers[assign] + torch.randn(n, D, generator=g)) * scales  # [n, D]
    shift = torch.randn(D, generator=g) * 3
    q_ood = (centers[torch.randint(0, C, (num_q,), generator=g)] + shift + torch.randn(num_q, D, generator=g)) / scales.sqrt()
    q_iid = (centers[torch.randint(0, C, (num_q,), generator=g)] + torch.randn(num_q, D, generator=g)) * scales
    return keys, {"iid": q_iid, "ood": q_ood}


def synthetic_rows(n, threads, only_l2_hnsw=False):
    keys, qsets = synthetic(n)
    t0 = time.perf_counter()
    truths = {name: torch.cat([(qq @ keys.T).topk(100, -1).indices for qq in q.split(8)]) for name, q in qsets.items()}  # [num_q, 100]
    log(f"  synthetic: {n} keys, ground truth in {time.perf_counter() - t0:.1f}s")
    nlist = int(round(math.sqrt(n)))
    rows = []
    plan = [
        ("exact (torch)", "exact", {}, [({}, "")]),
        ("flat", "flat", {}, [({}, "")]),
        (f"ivf nlist={nlist}", "ivf", {"nlist": nlist, "min_train": 1}, [({"nprobe": p}, f"nprobe={p}") for p in (4, 16, 64)]),
        (
            "hnsw m=16",
            "hnsw",
            {"m": 16, "ef_construction": 40, "mips_to_l2": False},
            [({"ef_search": e}, f"ef={e}") for e in (100, 200, 400)],
        ),
        (
            "hnsw m=16 mips->l2",
            "hnsw",
            {"m": 16, "ef_construction": 40, "mips_to_l2": True},
            [({"ef_search": e}, f"ef={e}") for e in (100, 200, 400)],
        ),
    ]
    if only_l2_hnsw:
        plan = plan[-1:]
    for label, backend, build_opts, settings in plan:
        t0 = time.perf_counter()
        idx = make_index(backend, keys.shape[1], **build_opts)
        idx.add(keys)
        build_s = time.perf_counter() - t0
        log(f"  synthetic: built {label} in {build_s:.1f}s")
        for opts, setting in settings:
            for a, v in opts.items():
                setattr(idx, a, v)
            for qname, q in qsets.items():
                idx.search(q[:4], 100)  # warm-up
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    _, ids = idx.search(q, 100)
                    times.append(time.perf_counter() - t0)
                rec = float((ids[:, :, None] == truths[qname][:, None, :]).any(-1).float().mean())
                rows.append(
                    {
                        "keys": n,
                        "queries": qname,
                        "index": label,
                        "setting": setting,
                        "build_s": build_s,
                        "latency_ms_per_query": 1e3 * min(times) / q.shape[0],
                        "top100_recall": rec,
                        "scanned": idx.last_scanned,
                        "threads": threads,
                    }
                )
        del idx
    return rows


# ------------------------------------------------------------------ 4. pass key end to end
def passkey_rows(model, tok, prompts, budgets_by_len, selectors, max_new_tokens=6, baselines=True):
    import re

    from bench import refmodel
    from bench.model_queries import attention_override

    rows = []
    for pi, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        state = refmodel.prefill(model, prompt.input_ids, chunk_tokens=2048)
        T0 = state.cache.get_seq_length()
        log(f"  passkey {pi + 1}/{len(prompts)}: {T0} tokens, depth {prompt.depth}, prefill {time.perf_counter() - t0:.0f}s")

        def run(fn=None):
            if fn is None:
                toks = greedy_answer(model, tok, state, max_new_tokens)
            else:
                with attention_override(fn):
                    toks = greedy_answer(model, tok, state, max_new_tokens)
            state.cache.crop(T0)
            answer = tok.decode(toks)
            found = re.search(r"\d+", answer)
            return answer, bool(found is not None and found.group() == prompt.key)

        if baselines:
            answer, ok = run()
            rows.append(
                {
                    "tokens": T0,
                    "depth": prompt.depth,
                    "key": prompt.key,
                    "selector": "full",
                    "budget": None,
                    "correct": ok,
                    "answer": answer,
                }
            )
            # sanity: the stand-in attention over every token reproduces full attention
            all_ok = run(_selector_attention(None, T0, T0 + max_new_tokens, {}))
            rows.append(
                {
                    "tokens": T0,
                    "depth": prompt.depth,
                    "key": prompt.key,
                    "selector": "all-tokens (gather)",
                    "budget": None,
                    "correct": all_ok[1],
                    "answer": all_ok[0],
                }
            )
        for label, name, opts in selectors:
            states: dict = {}  # per layer, shared by the budgets (built on the prompt's keys once)
            cached = label.endswith("+cache")
            for budget in budgets_by_len(T0):
                sel = make_selector(name, opts)
                if cached:
                    sel = CachedSelector(sel, threshold=0.9)
                answer, ok = run(_selector_attention(sel, T0, budget, states))
                row = {
                    "tokens": T0,
                    "depth": prompt.depth,
                    "key": prompt.key,
                    "selector": label,
                    "budget": budget,
                    "correct": ok,
                    "answer": answer,
                }
                if cached:
                    row["cache_hit_rate"] = sel.stats()["hit_rate"]
                rows.append(row)
        mine = [r for r in rows if r["tokens"] == T0 and r["key"] == prompt.key]
        log(
            f"    done in {time.perf_counter() - t0:.0f}s: "
            + ", ".join(f"{r['selector']}@{r['budget']}={'ok' if r['correct'] else 'x'}" for r in mine)
        )
    return rows


@torch.inference_mode()
def greedy_answer(model, tok, state, max_new_tokens):
    """Greedy decoding (as ``refmodel.greedy``) that stops once a number is complete: the pass key."""
    import re

    from bench import refmodel

    tokens = []
    nxt = int(state.last_logits.argmax())
    position = state.next_position
    for _ in range(max_new_tokens):
        tokens.append(nxt)
        text = tok.decode(tokens)
        if re.search(r"\d{5}", text) or re.search(r"\d\D", text):
            break
        logits = refmodel._forward(model, state.cache, torch.tensor([nxt]), position, all_logits=False)
        position += 1
        nxt = int(logits[-1].argmax())
    return tokens


def _selector_attention(sel, T0, budget, states):
    """Decode attention over the tokens ``sel`` picks (``sel=None``: every token), through the stand-in.

    The selector sees the prompt's ``T0`` keys (its state is built on them once); the tokens
    generated since are in the recent window and always attended, so they count against the budget.
    """

    def fn(module, query, key, value, mask, scale, default):
        if query.shape[2] != 1:
            return default()
        B, H_q, _, D = query.shape
        T = key.shape[2]
        q = query[:, :, 0]  # [B, H_q, D]
        if sel is None:
            ids = torch.arange(T).view(1, 1, T).expand(B, key.shape[1], T)
        else:
            l = module.layer_idx
            k_ctx = key[:, :, :T0]
            inner = sel.selector if isinstance(sel, CachedSelector) else sel
            if l not in states:
                states[l] = inner.prepare(k_ctx)
            n_new = T - T0
            if isinstance(sel, CachedSelector):
                ctx_ids = sel.select(q, k_ctx, budget - n_new, states[l], cache_key=l)
            else:
                ctx_ids = sel.select(q, k_ctx, budget - n_new, states[l])
            new = torch.arange(T0, T).view(1, 1, -1).expand(B, key.shape[1], -1)
            ids = torch.cat([ctx_ids, new], -1)
        o, _ = gather_softmax_attention(q, key, value, ids, scale)
        return o.view(B, 1, H_q, D).to(query.dtype), None

    return fn


# ------------------------------------------------------------------ plots and tables
def plot(recall, ann, path_recall, path_ann):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    contexts = sorted({r["context"] for r in recall})
    fig, axes = plt.subplots(2, len(contexts), figsize=(5 * len(contexts), 8), squeeze=False)
    for j, T0 in enumerate(contexts):
        for label, _, _ in SELECTORS:
            rs = sorted((r for r in recall if r["context"] == T0 and r["selector"] == label), key=lambda r: r["budget"])
            axes[0][j].plot([r["budget"] for r in rs], [r["mass_recall"] for r in rs], marker="o", label=label)
            axes[1][j].plot([r["budget"] for r in rs], [r["top100_recall"] for r in rs], marker="o", label=label)
        for i, what in enumerate(("attention-mass recall", "top-100 recall")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_title(f"{what}, context {T0}")
            ax.set_xlabel("budget (tokens per KV head)")
            ax.axvline(0.1 * T0, color="grey", lw=0.5, ls="--")
            ax.grid(alpha=0.3)
        axes[0][j].axhline(0.95, color="red", lw=0.5)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M decode queries\nevery layer and KV head (dashed: 10% budget)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path_recall, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for j, T0 in enumerate(contexts):
        ax = axes[0][j]
        for label in sorted({r["index"] for r in ann if r["context"] == T0}):
            rs = sorted((r for r in ann if r["context"] == T0 and r["index"] == label), key=lambda r: r["scanned"])
            ax.plot([r["scanned"] for r in rs], [r["top100_recall"] for r in rs], marker="o", label=label)
        ax.axvline(0.05, color="red", lw=0.5)
        ax.axhline(0.9, color="red", lw=0.5)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"ANN top-100 recall vs scanned, context {T0}")
        ax.set_xlabel("fraction of keys scanned")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_ann, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, finishes within a minute")
    ap.add_argument("--out", help="also write the figures (JSON) here")
    ap.add_argument("--threads", type=int, default=1, help="torch and faiss threads (1: on a shared 2-core box two threads oversubscribe)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: recall,ann,synthetic,passkey")
    ap.add_argument("--tag", default="", help="save as retrieval_<tag>.* (parts run as separate processes)")
    ap.add_argument(
        "--only-l2-hnsw",
        action="store_true",
        help="ANN and synthetic parts: measure only HNSW with mips_to_l2 (added after the first full run)",
    )
    ap.add_argument(
        "--selectors",
        default="",
        help="comma-separated selector labels to measure (recall and pass key; default all); baselines are skipped when given",
    )
    ap.add_argument(
        "--merge", nargs="+", metavar="JSON", help="measure nothing: build the report from the figures of earlier (tagged) runs"
    )
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    t_start = time.perf_counter()

    from bench import refmodel
    from bench.model_queries import capture

    if args.merge:
        model = tok = None
        L = 30
    else:
        model, tok = refmodel.load_model()
        L = model.config.num_hidden_layers
    if args.quick:
        contexts, layers, layers_ann = [1024], list(range(0, L, 10)), [15]
        n_syn = 20_000
        prompts = [refmodel.passkey_prompt(tok, 1024, 0.5, seed=7)] if tok else []
        passkey_budgets = lambda T: [128]  # noqa: E731
        e2e_selectors = [s for s in SELECTORS if s[0] in ("quest", "topk_exact")]
    else:
        contexts, layers, layers_ann = [2048, 8192], list(range(L)), list(range(L))
        n_syn = 1_000_000
        prompts = refmodel.passkey_suite(tok, lengths=(2048, 6144), depths=(0.1, 0.5, 0.9), num_keys=1) if tok else []
        passkey_budgets = lambda T: [128, 256, 512]  # noqa: E731
        e2e_selectors = [s for s in SELECTORS if s[0] not in ("tokenselect", "ann(ivf)")] + [("quest+cache", "quest", {})]

    figures = {
        "config": {
            "num_sink": NUM_SINK,
            "num_recent": NUM_RECENT,
            "decode_queries_per_context": N_DECODE_Q,
            "contexts": contexts,
            "layers": layers,
            "threads": args.threads,
            "quick": args.quick,
            "synthetic_keys": n_syn,
        }
    }
    recall, ann, syn, pk = [], [], [], []
    wanted = set(filter(None, args.selectors.split(",")))

    def chosen(selectors):
        return [s for s in selectors if not wanted or s[0] in wanted]

    def finish(final=False):
        """Tables, goals and files from what has been measured so far (called after every part)."""
        figures.update(recall=recall, ann=ann, synthetic=syn, passkey=pk)
        # ---- goals
        goals = {}
        for T0 in contexts:
            b10 = round(0.1 * T0)
            q10 = [r for r in recall if r["context"] == T0 and r["selector"] == "quest" and r["budget"] == b10]
            if q10:
                goals[f"quest_mass_at_10pct_{T0}"] = {
                    "value": q10[0]["mass_recall"],
                    "worst_layer": q10[0]["worst_layer_mass"],
                    "goal": 0.95,
                    "met": q10[0]["mass_recall"] >= 0.95,
                }
            best = max((r for r in ann if r["context"] == T0 and r["scanned"] <= 0.05), key=lambda r: r["top100_recall"], default=None)
            if best is not None or any(r["context"] == T0 for r in ann):
                goals[f"ann_top100_at_5pct_scan_{T0}"] = {
                    "value": best["top100_recall"] if best else None,
                    "index": best and f"{best['index']} {best['setting']}",
                    "scanned": best and best["scanned"],
                    "goal": 0.9,
                    "met": bool(best and best["top100_recall"] >= 0.9),
                }
        for n_tok, b in ((2048, 256), (6144, 512)):
            full = [r for r in pk if r["selector"] == "full" and abs(r["tokens"] - n_tok) < 400]
            qs = [r for r in pk if r["selector"] == "quest" and r["budget"] == b and abs(r["tokens"] - n_tok) < 400]
            if full and qs:
                fa, qa = sum(r["correct"] for r in full) / len(full), sum(r["correct"] for r in qs) / len(qs)
                goals[f"passkey_quest_{b}_at_{n_tok}"] = {"quest": qa, "full": fa, "met": qa >= fa}
        figures["goals"] = goals

        # ---- tables
        md = [
            "# Retrieval benchmark (`python bench/retrieval.py" + (" --quick" if args.quick else "") + "`)",
            "",
            f"Reference model SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head_dim 64); sinks {NUM_SINK}, recent window {NUM_RECENT} in every budget.",
            "",
        ]
        if recall:
            md += ["## Selector recall on real decode queries (mean over every layer, KV head and query head)", ""]
            rows = [
                [
                    r["context"],
                    r["selector"],
                    r["budget"],
                    f"{r['budget_share']:.1%}",
                    f"{r['mass_recall']:.3f}",
                    f"{r['worst_layer_mass']:.3f}",
                    f"{r['top100_recall']:.3f}",
                    f"{r['scanned']:.3f}",
                ]
                for r in sorted(recall, key=lambda r: (r["context"], r["selector"], r["budget"]))
            ]
            md += [
                md_table(["context", "selector", "budget", "share", "mass recall", "worst layer", "top-100 recall", "scanned"], rows),
                "",
            ]
        if ann:
            md += ["## ANN indexes on real decode queries: top-100 recall vs keys scanned", ""]
            rows = [[r["context"], r["index"], r["setting"], f"{r['scanned']:.3f}", f"{r['top100_recall']:.3f}"] for r in ann]
            md += [md_table(["context", "index", "setting", "scanned", "top-100 recall"], rows), ""]
        if syn:
            md += [
                f"## Synthetic {n_syn:,} keys (D=64; queries iid with the keys, and out of their distribution), CPU, {args.threads} thread(s); GPU not measured (no GPU lent)",
                "",
                "Latency: one search of 64 queries for the top 100, divided by 64 (best of 3).",
                "",
            ]
            rows = [
                [
                    r["index"],
                    r["setting"],
                    r["queries"],
                    f"{r['build_s']:.1f}",
                    f"{r['latency_ms_per_query']:.3f}",
                    f"{r['top100_recall']:.3f}",
                    f"{r['scanned']:.4f}",
                ]
                for r in syn
            ]
            md += [md_table(["index", "setting", "queries", "build s", "ms / query / head", "recall@100", "scanned"], rows), ""]
        if pk:
            md += ["## Pass-key accuracy, decode over the selected tokens only", ""]
            groups = {}
            for r in pk:
                groups.setdefault((r["tokens"] // 1000, r["selector"], r["budget"]), []).append(r)
            rows = []
            for (_kt, s, b), rs in sorted(groups.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] or 0)):
                extra = f" (cache hits {np.mean([r['cache_hit_rate'] for r in rs]):.0%})" if "cache_hit_rate" in rs[0] else ""
                rows.append([f"~{rs[0]['tokens']}", s + extra, b if b is not None else "all", f"{sum(r['correct'] for r in rs)}/{len(rs)}"])
            md += [md_table(["tokens", "selector", "budget", "correct"], rows), ""]
        md += ["## Goals", ""]
        md += [f"- {k}: " + ", ".join(f"{a}={(f'{v:.3f}' if isinstance(v, float) else v)}" for a, v in g.items()) for k, g in goals.items()]
        if not args.merge:
            md += ["", f"Run time of this process {time.perf_counter() - t_start:.0f}s."]
        text = "\n".join(md)
        name = "retrieval" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
        if final:
            print(text)
        if recall and ann:
            plot(recall, ann, RESULTS / f"{name}_recall.png", RESULTS / f"{name}_ann.png")
        save_results(name, figures, text, args.out)

    if args.merge:
        import json

        for path in args.merge:
            d = json.loads(open(path).read())
            recall.extend(d.get("recall", []))
            ann.extend(d.get("ann", []))
            syn.extend(d.get("synthetic", []))
            pk.extend(d.get("passkey", []))
            figures.setdefault("merged_from", []).append({"file": os.path.basename(path), "config": d.get("config")})
        skip = {"recall", "ann", "synthetic", "passkey"}
    if not {"recall", "ann"} <= skip:
        t0 = time.perf_counter()
        ids = refmodel.heldout_ids(tok, max(contexts) + N_DECODE_Q)
        cap = capture(model, ids, chunk_tokens=2048)
        log(f"captured {cap.queries.shape[2]} positions x {L} layers in {time.perf_counter() - t0:.0f}s")
        if "recall" not in skip:
            recall.extend(recall_rows(cap, contexts, [64, 256, 1024], layers, selectors=chosen(SELECTORS)))
            finish()
        if "ann" not in skip:
            ann.extend(ann_rows(cap, contexts, layers_ann, only_l2_hnsw=args.only_l2_hnsw))
            finish()
        del cap
    if "synthetic" not in skip:
        syn.extend(synthetic_rows(n_syn, args.threads, only_l2_hnsw=args.only_l2_hnsw))
        finish()
    if "passkey" not in skip:
        for prompt in prompts:  # results saved after every prompt
            pk.extend(passkey_rows(model, tok, [prompt], passkey_budgets, chosen(e2e_selectors), baselines=not wanted))
            finish()
    finish(final=True)


if __name__ == "__main__":
    main()
