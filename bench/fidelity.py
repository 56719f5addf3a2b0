"""Token-eviction fidelity on the reference model: kvtier (drop, demote) vs kvpress, same prompts.

    python bench/fidelity.py [--quick] [--out FILE] [--threads N] [--lengths N ...] [--depths D ...] [--keys K]
                             [--families all|diagonal] [--scorers NAME ...] [--ratios R ...] [--perplexity-tokens N]

Reference model SmolLM2-135M-Instruct (bench/refmodel.py). Pass-key prompts in nine generated
families (``refmodel.family_suite``: three fillers -- the original repeated sentences, sentences
from a seeded grammar, held-out prose at a seeded offset -- times three needle/question wordings --
"pass key", "secret code that opens the vault", "special number"); by default ~2K tokens, needle
at depth 0.5, one key each: 9 prompts, compression ratios 0.5 and 0.9 (sized to finish within an
hour on a loaded shared 2-core box: ~300 answers; ``--lengths 2048 6144 --depths 0.3 0.7 --ratios
0.5 0.75 0.9`` is the 36-prompt set, about eight times longer). Completion style, split into a context
(intro, filler, needle, filler) and a question. The context is compressed, the question is not
(query-agnostic compression, as kvpress's pipeline does it), then 8 tokens are decoded greedily.
Accuracy is reported per family and in total; the totals are the headline figures.

One uncompressed prefill of each context is captured (per layer: the attention block's input
hidden states, RoPE tables and KV). Then, for every method and compression ratio (share of the
context's KV off the fast tier):

- **kvpress 0.5.5**: the press's own ``forward_hook`` runs on each layer with the captured inputs
  and a copy of the cache, exactly what ``with press(model): model(context)`` does (kvpress
  compresses each layer after its attention, so later layers see the uncompressed run's hidden
  states); the question and the answer then run through the model on the compressed cache.
- **kvtier drop**: ``EvictingKV`` loaded with the context's KV and its last 64 queries, one
  ``compress()``, then the question and answer through kvtier's attention (a transformers
  attention function that calls ``EvictingKV.step``). Sinks 4 and window 64 always kept.
- **kvtier demote**: the same, but evicted tokens go to the lower tier and every query of the
  question and answer recalls ``--recall-budget`` of them per KV head through a retrieval
  selector over the demoted keys (``--recall-selector``, default ``ann``: a faiss HNSW index per
  layer and KV head, rebuilt when the demoted set changes), then ``sparse_decode`` over exactly
  those, LSE-merged with the fast tier. ``quest`` was the first choice and is worse here: its page
  bounds are taken over 16 consecutive *demoted* slots, whose positions are scattered once a
  scorer has picked the survivors, so the bounds are loose (it recalled 85% of the exact top 32
  at a 512-token budget on a 2K prompt and missed its pass key at ratio 0.5).
- **kvtier drop, adakv / duo**: SnapKV scores with AdaKV head budgets, or with a DuoAttention-style
  head profile measured on two other pass-key prompts (``--retrieval-fraction`` of the KV heads
  are retrieval heads; streaming heads keep sinks + window only).
- **full**: no compression (through the same attention function: a check of the glue).

Plus a natural-text task: perplexity of held-out text prefilled in chunks of 256 with kvtier
evicting between chunks (fast tier bounded by ``(1 - ratio)`` of the text), drop vs demote vs full.
kvpress has no chunked-eviction equivalent, so it is not in that table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# bench/ holds scripts named like the packages they measure (bench/retrieval.py): take this folder
# off the path (Python put it first) so that ``import retrieval`` is the package, and import the
# bench helpers as ``bench.*`` from the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
from bench.common import md_table, save_results  # noqa: E402

import torch  # noqa: E402

import bench.refmodel as rm  # noqa: E402

SCORERS = {  # kvtier scorer -> kvpress press class name
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
    "pyramidkv": "PyramidKVPress",
}
SINKS, WINDOW = 4, 64


# -- capture one uncompressed prefill ------------------------------------------------------------
class Captured:
    def __init__(self, model, ids: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.ids = ids
        self.config = model.config
        self.layers: list[dict] = []
        self._queries: dict[tuple[int, int], torch.Tensor] = {}
        mods = [layer.self_attn for layer in model.model.layers]

        def hook(module, args, kwargs, output):
            cos, sin = kwargs["position_embeddings"]
            self.layers.append(
                {"hidden_states": kwargs["hidden_states"].detach().clone(), "cos": cos.detach().clone(), "sin": sin.detach().clone()}
            )

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in mods]
        try:
            self.cache = DynamicCache(config=model.config)
            with torch.inference_mode():
                model(input_ids=ids.view(1, -1), past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        for i, lay in enumerate(self.cache.layers):
            self.layers[i]["keys"] = lay.keys.detach().clone()  # [1, H_kv, T, D] after RoPE
            self.layers[i]["values"] = lay.values.detach().clone()

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    def cache_copy(self):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for i, lay in enumerate(self.layers):
            cache.update(lay["keys"].clone(), lay["values"].clone(), i)
        return cache

    @torch.inference_mode()
    def window_queries(self, model, layer: int, w: int) -> torch.Tensor:
        """Queries (after RoPE) of the last ``w`` context tokens: ``[H_q, w, D]`` (computed once per
        layer and window, then shared by every method run on this capture)."""
        cached = self._queries.get((layer, w))
        if cached is None:
            cached = self._queries[(layer, w)] = self._window_queries(model, layer, w)
        return cached

    def _window_queries(self, model, layer: int, w: int) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = model.model.layers[layer].self_attn
        lay = self.layers[layer]
        hs = lay["hidden_states"][:, -w:]
        q = attn.q_proj(hs).view(1, w, -1, attn.head_dim).transpose(1, 2)
        k_dummy = torch.zeros_like(q[:, :1])
        q, _ = apply_rotary_pos_emb(q, k_dummy, lay["cos"][:, -w:], lay["sin"][:, -w:])
        return q[0]


# -- running the question + answer ---------------------------------------------------------------
# The model runs through an EvictingKV with the connector's pieces (connectors.hf_tokens):
# a registered attention function that calls EvictingKV.step, explicit position ids, no HF cache.
def answer_with_kv(model, tok, kv, question_ids: list[int], start: int, max_new_tokens: int = 8) -> str:
    """Question then greedy answer, attention through ``kv`` (an EvictingKV)."""
    from kvtier.connectors.hf_tokens import greedy_evicting

    return tok.decode(greedy_evicting(model, kv, question_ids, start, max_new_tokens))


@torch.inference_mode()
def answer_with_cache(model, tok, cache, question_ids: list[int], start: int, max_new_tokens: int = 8) -> str:
    """Question then greedy answer on a (compressed) transformers cache, as kvpress's pipeline does.

    The question goes in one token at a time: a press may leave layers of different lengths
    (PyramidKV), and transformers builds one causal mask from the first layer's length; a single
    query needs no mask, and the result is the same attention."""
    for i, t in enumerate(question_ids):
        logits = rm._forward(model, cache, torch.tensor([t]), start + i, all_logits=False)
    state = rm.Prefill(cache, start + len(question_ids), logits[-1])
    return tok.decode(rm.greedy(model, state, max_new_tokens))


def correct(answer: str, key: str) -> bool:
    import re

    m = re.search(r"\d+", answer)
    return m is not None and m.group() == key


# -- methods ------------------------------------------------------------------------------------
# kvtier variants beyond a plain scorer: name -> (scorer, Compressor options); "duo" gets the head profile
VARIANTS = {"adakv": ("snapkv", {"head_budgets": "adaptive"}), "duo": ("snapkv", {})}


@torch.inference_mode()
def make_kv(
    model, cap: Captured, *, scorer: str | None, ratio: float, mode: str, recall_budget: int, profile=None, recall_selector: str = "ann"
):
    from kvtier.eviction.tokens import Compressor
    from kvtier.retrieval import get_selector
    from kvtier.connectors.hf_tokens import make_evicting_kv

    options = {}
    if scorer in VARIANTS:
        options = dict(VARIANTS[scorer][1], **({"head_profile": profile} if scorer == "duo" else {}))
        scorer = VARIANTS[scorer][0]
    comp = Compressor(scorer or "streaming_llm", ratio=ratio if scorer else 0.0, sink_tokens=SINKS, window_tokens=WINDOW, **options)
    kv = make_evicting_kv(
        model,
        comp,
        mode=mode,
        observation_window=WINDOW,
        recall_budget=recall_budget,
        recall=get_selector(recall_selector, num_sink=0, num_recent=0) if mode == "demote" else None,
    )
    for i, lay in enumerate(cap.layers):
        kv.append(i, lay["keys"][0], lay["values"][0], cap.window_queries(model, i, WINDOW))
    if scorer:
        kv.compress()
    return kv


@torch.inference_mode()
def kvpress_cache(model, cap: Captured, press_name: str, ratio: float):
    import kvpress

    press = getattr(kvpress, press_name)(compression_ratio=ratio)
    press.post_init_from_model(model)
    cache = cap.cache_copy()
    T = cap.num_tokens
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn.rotary_emb = model.model.rotary_emb
        lay = cap.layers[i]
        kwargs = {
            "hidden_states": lay["hidden_states"],
            "past_key_values": cache,
            "cache_position": torch.arange(T),
            "position_embeddings": (lay["cos"], lay["sin"]),
            "attention_mask": None,
        }
        press.forward_hook(attn, [], kwargs, (None, None))
    return cache


def split_prompt(tok, prompt) -> tuple[list[int], list[int]]:
    return rm.split_context(tok, prompt)


@torch.inference_mode()
def measure_head_profile(model, tok, retrieval_fraction: float, num_tokens: int = 1024):
    """DuoAttention-style profile: share of each KV head's attention (last 64 queries) outside
    sinks + window, on two synthetic pass-key prompts that are not in the evaluation set."""
    from kvtier.eviction.tokens import HeadProfiler

    cfg = model.config
    prof = HeadProfiler(cfg.num_hidden_layers, cfg.num_key_value_heads, sink_tokens=SINKS, window_tokens=WINDOW)
    for seed in (101, 202):
        p = rm.passkey_prompt(tok, num_tokens, 0.3, seed=seed)
        cap = Captured(model, torch.tensor(p.input_ids))
        for i, lay in enumerate(cap.layers):
            prof.observe(i, cap.window_queries(model, i, WINDOW).unsqueeze(0), lay["keys"])
    return prof.profile(retrieval_fraction)


def run_passkey(
    model, tok, prompts, ratios, methods, recall_budget, progress, profile=None, checkpoint=None, recall_selector: str = "ann"
) -> list[dict]:
    rows = []
    for num_done, p in enumerate(prompts):
        if checkpoint is not None and num_done:
            checkpoint(rows, num_done)
        ctx, question = split_prompt(tok, p)
        cap = Captured(model, torch.tensor(ctx))
        T = cap.num_tokens
        full = answer_with_kv(
            model, tok, make_kv(model, cap, scorer=None, ratio=0.0, mode="drop", recall_budget=recall_budget), question, T
        )
        rows.append(
            {
                "method": "full",
                "ratio": 0.0,
                "tokens": T,
                "depth": p.depth,
                "key": p.key,
                "family": p.family,
                "answer": full,
                "correct": correct(full, p.key),
            }
        )
        progress(rows[-1])
        for ratio in ratios:
            for method in methods:
                family, name = method.split(":")
                if family == "kvpress":
                    ans = answer_with_cache(model, tok, kvpress_cache(model, cap, SCORERS[name], ratio), question, T)
                else:
                    kv = make_kv(
                        model,
                        cap,
                        scorer=name,
                        ratio=ratio,
                        mode=family.split("-")[1],
                        recall_budget=recall_budget,
                        profile=profile,
                        recall_selector=recall_selector,
                    )
                    ans = answer_with_kv(model, tok, kv, question, T)
                rows.append(
                    {
                        "method": method,
                        "ratio": ratio,
                        "tokens": T,
                        "depth": p.depth,
                        "key": p.key,
                        "family": p.family,
                        "answer": ans,
                        "correct": correct(ans, p.key),
                    }
                )
                progress(rows[-1])
        del cap
    return rows


@torch.inference_mode()
def run_perplexity(
    model, tok, num_tokens: int, ratios, scorer: str, recall_budget: int, progress, recall_selector: str = "ann"
) -> list[dict]:
    """Held-out text in chunks of 256, kvtier evicting between chunks; NLL of every token."""
    from kvtier.eviction.tokens import Compressor
    from kvtier.retrieval import get_selector
    from kvtier.connectors.hf_tokens import evicting_attention, forward_evicting, make_evicting_kv

    ids = torch.tensor(rm.heldout_ids(tok, num_tokens))
    cfg = model.config
    rows = []
    for ratio, mode in [(0.0, "full")] + [(r, m) for r in ratios for m in ("drop", "demote")]:
        budget = num_tokens - math.floor(num_tokens * ratio)
        comp = Compressor(scorer, budget=budget, sink_tokens=SINKS, window_tokens=WINDOW)
        kv = make_evicting_kv(
            model,
            comp,
            mode="demote" if mode == "demote" else "drop",
            observation_window=WINDOW,
            trigger_tokens=None if mode == "full" else budget,
            recall_budget=recall_budget,
            recall=get_selector(recall_selector, num_sink=0, num_recent=0) if mode == "demote" else None,
        )
        nll = []
        with evicting_attention(model, kv):
            for a in range(0, num_tokens, 256):
                chunk = ids[a : a + 256]
                logits = forward_evicting(model, chunk, a, all_logits=True)
                targets = ids[a + 1 : a + 1 + chunk.numel()]
                logp = torch.log_softmax(logits[: targets.numel()].double(), -1)
                nll.append(-logp.gather(1, targets.view(-1, 1)).view(-1))
        ppl = float(torch.exp(torch.cat(nll).mean()))
        rows.append(
            {
                "mode": mode,
                "ratio": ratio,
                "scorer": scorer,
                "tokens": num_tokens,
                "perplexity": ppl,
                "max_fast_tokens": max(max(kv.fast_tokens(i)) for i in range(cfg.num_hidden_layers)),
            }
        )
        progress(rows[-1])
    return rows


def summarise(rows, ratios, methods) -> tuple[dict, list[list]]:
    acc: dict[str, dict[str, float]] = {}
    n_full = [r for r in rows if r["method"] == "full"]
    acc["full"] = {str(r): sum(x["correct"] for x in n_full) / len(n_full) for r in ratios}
    table = [["full", *[f"{sum(x['correct'] for x in n_full)}/{len(n_full)}"] * len(ratios)]]
    for m in methods:
        acc[m] = {}
        cells = []
        for r in ratios:
            sel = [x for x in rows if x["method"] == m and x["ratio"] == r]
            acc[m][str(r)] = sum(x["correct"] for x in sel) / len(sel)
            cells.append(f"{sum(x['correct'] for x in sel)}/{len(sel)}")
        table.append([m, *cells])
    return acc, table


def per_family(rows, ratio, methods) -> tuple[list[str], list[list]]:
    """``(families, table)``: one row per method (full first), one column per family, at ``ratio``."""
    fams = sorted({x.get("family", "repeat/passkey") for x in rows})
    table = []
    for m in ["full", *methods]:
        cells = []
        for f in fams:
            sel = [x for x in rows if x["method"] == m and (m == "full" or x["ratio"] == ratio) and x.get("family", "repeat/passkey") == f]
            cells.append(f"{sum(x['correct'] for x in sel)}/{len(sel)}" if sel else "")
        table.append([m, *cells])
    return fams, table


# -- where a scorer ranks the needle ------------------------------------------------------------------
RANK_SCORERS = (("expected_attention", {}), ("expected_attention", {"cov": False}), ("tova", {}), ("knorm", {}), ("snapkv", {}))


@torch.inference_mode()
def needle_ranks(model, tok, prompts, ratio: float, progress=print) -> tuple[dict, str]:
    """Per prompt and scorer (``RANK_SCORERS``), over every (layer, KV head): the share of heads that
    keep every token of the pass key at ``ratio`` (sinks and window always kept, as ``drop`` does),
    the share that keep at least one, and the median rank of the key's tokens as a share of the
    context (0 = the scorer's best token). Diagnoses a scorer that drops the needle: is it scored
    like the filler, or just below the cut?"""
    from kvtier.eviction.tokens import ScoreInputs, get_scorer

    rows = []
    for p in prompts:
        enc = tok(p.context_text, add_special_tokens=False, return_offsets_mapping=True)
        a = p.context_text.index(p.key)
        pos = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < a + len(p.key) and e > a]
        cap = Captured(model, torch.tensor(enc["input_ids"]))
        T = cap.num_tokens
        keep = T - math.floor(T * ratio)
        for name, opts in RANK_SCORERS:
            scorer = get_scorer(name, **opts)
            every = anyone = 0
            ranks = []
            for i, lay in enumerate(cap.layers):
                q = cap.window_queries(model, i, WINDOW).unsqueeze(0)
                sc = scorer.score(ScoreInputs(keys=lay["keys"], values=lay["values"], queries=q, layer=i, num_layers=len(cap.layers)))[0]
                sc = sc.clone()  # [H_kv, T]
                sc[:, :SINKS] = float("inf")
                sc[:, T - WINDOW :] = float("inf")
                rank = torch.empty_like(sc, dtype=torch.long)
                rank.scatter_(1, sc.argsort(dim=-1, descending=True), torch.arange(T).expand(sc.shape[0], T).contiguous())
                r = rank[:, pos]  # [H_kv, key tokens]
                every += int((r < keep).all(dim=1).sum())
                anyone += int((r < keep).any(dim=1).sum())
                ranks += (r.float().mean(dim=1) / T).tolist()
            heads = len(ranks)
            label = name + "".join(f" {k}={v}" for k, v in opts.items())
            rows.append(
                {
                    "family": p.family,
                    "tokens": T,
                    "key": p.key,
                    "scorer": label,
                    "keep_every_key_token": every / heads,
                    "keep_any_key_token": anyone / heads,
                    "median_rank_share": sorted(ranks)[heads // 2],
                }
            )
            progress(rows[-1])
        del cap
    table = [
        [r["family"], r["scorer"], f"{r['keep_every_key_token']:.2f}", f"{r['keep_any_key_token']:.2f}", f"{r['median_rank_share']:.2f}"]
        for r in rows
    ]
    md = (
        f"Where each scorer ranks the pass key's tokens at ratio {ratio} (over every layer and KV head; sinks {SINKS} and window "
        f"{WINDOW} kept; rank as a share of the context, 0 = best):\n\n"
        + md_table(["family", "scorer", "heads keeping every key token", "heads keeping one", "median rank of the key"], table)
    )
    return {"ratio": ratio, "rows": rows}, md


def plot(acc: dict, ratios, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    colors = plt.cm.tab20.colors
    for i, (m, per) in enumerate(acc.items()):
        style = "-" if m.startswith("kvtier") else ("--" if m.startswith("kvpress") else ":")
        ax.plot(
            ratios,
            [per[str(r)] for r in ratios],
            style,
            marker="osD^v<>"[i % 7],
            markersize=5,
            label=m,
            color="black" if m == "full" else colors[i % len(colors)],
            linewidth=2.5 if "demote" in m else 1.2,
        )
    ax.set_xlabel("compression ratio (share of context KV off the fast tier)")
    ax.set_ylabel("pass-key accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the low lines sit at 0
    ax.set_title("SmolLM2-135M pass key: kvtier vs kvpress")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def paired(rows, names, ratios) -> dict:
    """kvtier drop vs kvpress per press and ratio: accuracies, and prompt by prompt how many only
    one of the two answers (the same prompts, so these counts show whether a gap is a prompt or two)."""
    out = {}
    for n in names:
        for r in ratios:
            ours = {
                (x.get("family"), x["tokens"], x["depth"], x["key"]): x["correct"]
                for x in rows
                if x["method"] == f"kvtier-drop:{n}" and x["ratio"] == r
            }
            theirs = {
                (x.get("family"), x["tokens"], x["depth"], x["key"]): x["correct"]
                for x in rows
                if x["method"] == f"kvpress:{n}" and x["ratio"] == r
            }
            common = ours.keys() & theirs.keys()
            if not common:
                continue
            out[f"{n}@{r}"] = {
                "kvtier_drop": sum(ours[k] for k in common) / len(common),
                "kvpress": sum(theirs[k] for k in common) / len(common),
                "only_kvtier": sum(ours[k] and not theirs[k] for k in common),
                "only_kvpress": sum(theirs[k] and not ours[k] for k in common),
                "prompts": len(common),
            }
    return out


def _ratios(figures: dict) -> list[float]:
    """The compression ratios of a saved run (older runs saved them only as accuracy keys)."""
    return figures.get("ratios") or [float(r) for r in next(iter(figures["accuracy"].values()))]


def render(figures: dict) -> str:
    """The Markdown of a run, from its figures alone (``--render`` redraws a saved run)."""
    rows, prompts = figures["runs"], figures["prompts"]
    methods = figures.get("methods") or [m for m in figures["accuracy"] if m != "full"]
    ratios = _ratios(figures)
    depths = tuple(figures.get("depths") or sorted({p["depth"] for p in prompts}))
    lens = sorted({p["tokens"] for p in prompts})
    keys_per = figures.get("keys_per_depth") or max(1, len(prompts) // max(1, len(lens) * len(depths)))
    _, table = summarise(rows, ratios, methods)
    ppl_rows = figures.get("perplexity") or []
    quick, partial = figures.get("quick"), figures.get("partial")
    name = "fidelity_quick" if quick else "fidelity"
    duo = figures["head_profile"]["retrieval"]
    n_ret, n_heads = sum(map(sum, duo)), sum(map(len, duo))
    parts = [
        f"## bench/fidelity.py{' --quick' if quick else ''}" + (" (partial: stopped early)" if partial else ""),
        "",
        f"Pass-key accuracy, SmolLM2-135M-Instruct, {len(prompts)} prompts ({', '.join(map(str, lens))} tokens; depths {depths};"
        f" {keys_per} key(s) per length and depth; families {', '.join(sorted({p.get('family', 'repeat/passkey') for p in prompts}))}), total over"
        f" the families; query-agnostic compression of the context (sinks {figures['sinks']},"
        f" window {figures['window']} kept by kvtier); demote recall {figures['recall_budget']} tokens per KV head and query"
        f" through `{figures['recall_selector']}`; duo: {n_ret}/{n_heads} retrieval heads.",
        "",
        md_table(["method", *[f"ratio {r}" for r in ratios]], table),
        "",
    ]
    if figures.get("command"):
        la = figures.get("load_average") or []
        parts += [
            f"Command: `{figures['command']}` ({figures.get('threads', 1)} torch thread(s), {figures.get('seconds', 0):.0f} s"
            + (f"; 1-min load average {la[0][0]:.1f} at the start, {la[-1][0]:.1f} at the end" if la else "")
            + ").",
            "",
        ]
    fams = sorted({x.get("family", "repeat/passkey") for x in rows})
    if len(fams) > 1:
        for r in ratios:
            names, ft = per_family(rows, r, methods)
            parts += [f"Per family (filler/wording) at ratio {r}:", "", md_table(["method", *names], ft), ""]
    comp = figures.get("drop_vs_kvpress") or {}
    if comp and "only_kvtier" in next(iter(comp.values())):
        prs = sorted({k.split("@")[0] for k in comp}, key=list(SCORERS).index)
        cells = [
            [
                n,
                *[
                    (f"{comp[f'{n}@{r}']['only_kvtier']} / {comp[f'{n}@{r}']['only_kvpress']}" if f"{n}@{r}" in comp else "")
                    for r in ratios
                ],
            ]
            for n in prs
        ]
        parts += [
            "Prompt by prompt, kvtier `drop` vs kvpress's same-named press: prompts only kvtier answers / only kvpress answers:",
            "",
            md_table(["press", *[f"ratio {r}" for r in ratios]], cells),
            "",
        ]
    if ppl_rows:
        base = ppl_rows[0]["perplexity"]
        ppl_table = [
            [r["mode"], r["ratio"], f"{r['perplexity']:.3f}", f"{100 * (r['perplexity'] / base - 1):+.2f}%", r["max_fast_tokens"]]
            for r in ppl_rows
        ]
        parts += [
            f"Perplexity of {ppl_rows[0]['tokens']} tokens of held-out text, chunks of 256, kvtier `{ppl_rows[0]['scorer']}`"
            " evicting between chunks (fast tier bounded by (1 - ratio) of the text):",
            "",
            md_table(["mode", "ratio", "perplexity", "vs full", "max fast-tier tokens/head"], ppl_table),
            "",
        ]
    parts.append(f"![accuracy vs ratio]({name}.png)")
    return "\n".join(parts)


def save_figures(figures: dict, out: str | None) -> None:
    """Plot, render and write a run's figures (a quick run never overwrites the full results)."""
    name = "fidelity_quick" if figures.get("quick") else "fidelity"
    ratios = _ratios(figures)
    png = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.png")
    os.makedirs(os.path.dirname(png), exist_ok=True)
    plot(figures["accuracy"], ratios, png)
    save_results(name, figures, render(figures), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1K-token prompts, 3 depths, ratio 0.5, SnapKV (kvpress, drop, adakv, duo, demote); 512-token perplexity; writes bench/results/fidelity_quick.*",
    )
    ap.add_argument("--out", help="also write the figures as JSON to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core box a second thread mostly waits)")
    ap.add_argument("--lengths", type=int, nargs="+", help="prompt lengths in tokens (default: 2048; quick: 1024)")
    ap.add_argument("--depths", type=float, nargs="+", help="needle depths in [0, 1] (default and quick: 0.5)")
    ap.add_argument("--keys", type=int, help="pass keys per length and depth, each its own prompt (default: 1)")
    ap.add_argument(
        "--families",
        choices=("all", "diagonal"),
        help="prompt families: all 3 fillers x 3 wordings (default), or "
        "the diagonal (each filler and each wording once; --quick's default)",
    )
    ap.add_argument("--ratios", type=float, nargs="+", help="compression ratios (default: 0.5 0.9; quick: 0.5)")
    ap.add_argument(
        "--perplexity-tokens",
        type=int,
        help="tokens of held-out text for the perplexity part (default 4096; quick 512; 0 skips it)",
    )
    ap.add_argument("--scorers", nargs="+", help=f"only these scorers (kvpress, drop, demote): among {list(SCORERS)}")
    ap.add_argument("--retrieval-fraction", type=float, default=0.5, help="share of KV heads the 'duo' profile marks as retrieval heads")
    ap.add_argument("--recall-budget", type=int, default=256, help="demoted tokens recalled per KV head and query (demote mode)")
    ap.add_argument(
        "--recall-selector",
        default="ann",
        help="retrieval selector that recalls demoted tokens (demote mode): ann (default), quest, tokenselect, topk_exact, centroids",
    )
    ap.add_argument(
        "--needle-ranks",
        action="store_true",
        help="only the diagnosis: where each scorer ranks the pass key's tokens (one 1K-token prompt per filler, the diagonal "
        "families, --ratios' first ratio, default 0.5); writes bench/results/fidelity_needle_ranks.*",
    )
    ap.add_argument("--render", metavar="JSON", help="measure nothing: redraw the Markdown table and plot from a saved run (its JSON)")
    args = ap.parse_args()
    if args.render:
        import json

        with open(args.render) as f:
            saved = json.load(f)
        if saved.get("benchmark") not in ("fidelity", "fidelity_quick") or "runs" not in saved:
            ap.error(f"{args.render} is not a saved bench/fidelity.py run")
        names = sorted({m.split(":")[1] for m in saved["accuracy"] if m.startswith("kvpress:")}, key=list(SCORERS).index)
        ratios = _ratios(saved)
        saved["drop_vs_kvpress"] = paired(saved["runs"], names, ratios)
        save_figures(saved, args.out)
        return
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(["bench/fidelity.py", *sys.argv[1:]])
    load0 = os.getloadavg()
    t0 = time.time()
    if args.needle_ranks:
        model, tok = rm.load_model()
        diag = [(f, w) for i, f in enumerate(rm.FILLERS) for j, w in enumerate(rm.WORDINGS) if i == j]
        lengths = tuple(args.lengths or (1024,))
        depths = tuple(args.depths or (0.5,))
        prompts = [p for f, w in diag for p in rm.family_suite(tok, lengths=lengths, depths=depths, fillers=(f,), wordings=(w,))]
        fig, md = needle_ranks(model, tok, prompts, (args.ratios or [0.5])[0], progress=print)
        seconds, la = time.time() - t0, os.getloadavg()
        fig.update({"command": command, "threads": args.threads, "seconds": seconds, "load_average": [load0, la]})
        head = f"## bench/fidelity.py --needle-ranks\n\nSmolLM2-135M-Instruct. Command: `{command}` ({seconds:.0f} s).\n\n"
        save_results("fidelity_needle_ranks", fig, head + md, args.out)
        print(md)
        return
    args.families = args.families or ("diagonal" if args.quick else "all")
    t0 = time.time()
    model, tok = rm.load_model()
    if args.quick:  # a smoke run: 1K-token prompts, one ratio, SnapKV only
        lengths, depths, keys_per, ratios = (1024,), (0.5,), 1, [0.5]
        names = ["snapkv"]
        demoted = ["snapkv"]
        ppl_tokens = 512
    else:
        lengths, depths, keys_per, ratios = (2048,), (0.5,), 1, [0.5, 0.9]
        names = list(SCORERS)
        demoted = ["snapkv", "expected_attention"]
        ppl_tokens = 4096
    if args.scorers:
        unknown = [n for n in args.scorers if n not in SCORERS]
        if unknown:
            ap.error(f"--scorers must be among {list(SCORERS)}, got {unknown}")
        names, demoted = list(args.scorers), [n for n in demoted if n in args.scorers]
    methods = (
        [f"kvpress:{n}" for n in names]
        + [f"kvtier-drop:{n}" for n in names]
        + [f"kvtier-drop:{v}" for v in VARIANTS]
        + [f"kvtier-demote:{n}" for n in demoted]
    )
    profile = measure_head_profile(model, tok, args.retrieval_fraction, num_tokens=512 if args.quick else 1024)
    print(
        f"head profile: {int(profile.retrieval.sum())} of {profile.retrieval.numel()} KV heads are retrieval heads "
        f"(outside-mass range {float(profile.mass.min()):.3f}..{float(profile.mass.max()):.3f})"
    )
    lengths = tuple(args.lengths) if args.lengths else lengths
    ratios = list(args.ratios) if args.ratios else ratios
    if any(not 0.0 < r < 1.0 for r in ratios):
        ap.error(f"--ratios must lie in (0, 1), got {ratios}")
    depths = tuple(args.depths) if args.depths else depths
    keys_per = args.keys if args.keys is not None else keys_per
    if any(not 0.0 <= d <= 1.0 for d in depths):
        ap.error(f"--depths must lie in [0, 1], got {list(depths)}")
    if keys_per < 1:
        ap.error(f"--keys must be >= 1, got {keys_per}")
    if any(n < 256 for n in lengths):
        ap.error(f"--lengths must be >= 256 tokens (the needle and question need room), got {list(lengths)}")
    families = [(f, w) for f in rm.FILLERS for w in rm.WORDINGS]
    if args.families == "diagonal":  # each filler once and each wording once
        families = [(f, w) for i, f in enumerate(rm.FILLERS) for j, w in enumerate(rm.WORDINGS) if i == j]
    prompts = [
        p for f, w in families for p in rm.family_suite(tok, lengths=lengths, depths=depths, num_keys=keys_per, fillers=(f,), wordings=(w,))
    ]
    total = len(prompts) * (1 + len(ratios) * len(methods))
    from tqdm import tqdm

    bar = tqdm(total=total, desc="pass key", unit="run", file=sys.stderr)

    def progress(row):
        bar.update(1)
        bar.set_postfix_str(f"{row['method']}@{row['ratio']}: {'ok' if row['correct'] else 'miss'}")

    def report(rows, prompts_done, ppl_rows=None, partial=False):
        done = prompts[:prompts_done]
        acc, _ = summarise(rows, ratios, methods)
        comparisons = paired(rows, names, ratios)
        figures = {
            "command": command,
            "load_average": [load0, os.getloadavg()],
            "quick": args.quick,
            "partial": partial,
            "threads": args.threads,
            "recall_budget": args.recall_budget,
            "recall_selector": args.recall_selector,
            "lengths": list(lengths),
            "depths": list(depths),
            "keys_per_depth": keys_per,
            "ratios": ratios,
            "methods": methods,
            "sinks": SINKS,
            "window": WINDOW,
            "head_profile": profile.to_dict(),
            "prompts": [{"tokens": len(p.input_ids), "depth": p.depth, "key": p.key, "family": p.family} for p in done],
            "families": [f"{f}/{w}" for f, w in families],
            "accuracy": acc,
            "drop_vs_kvpress": comparisons,
            "runs": rows,
            "perplexity": ppl_rows or [],
            "seconds": time.time() - t0,
        }
        save_figures(figures, args.out)

    rows = run_passkey(
        model,
        tok,
        prompts,
        ratios,
        methods,
        args.recall_budget,
        progress,
        profile,
        checkpoint=lambda rows, n: report(rows, n, partial=True),
        recall_selector=args.recall_selector,
    )
    bar.close()
    report(rows, len(prompts))  # the pass-key table is saved before the perplexity part starts
    ppl_tokens = args.perplexity_tokens if args.perplexity_tokens is not None else ppl_tokens
    ppl_rows = (
        []
        if ppl_tokens <= 0
        else run_perplexity(
            model,
            tok,
            ppl_tokens,
            ratios,
            "snapkv",
            args.recall_budget,
            recall_selector=args.recall_selector,
            progress=lambda r: print(
                f"perplexity {r['mode']}@{r['ratio']}: {r['perplexity']:.3f} (fast tier <= {r['max_fast_tokens']} tokens)"
            ),
        )
    )
    report(rows, len(prompts), ppl_rows)
    print(md_table(["method", *[f"ratio {r}" for r in ratios]], summarise(rows, ratios, methods)[1]))
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
