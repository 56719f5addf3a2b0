"""End to end on the reference model: a transformers model reusing its prompt's KV through kvtier.

    python bench/e2e.py [--quick] [--out FILE] [--threads N]

SmolLM2-135M-Instruct (float32, CPU) generates through ``connectors.generate`` with a
``KVTierCache``: the prompt's longest cached prefix is loaded from kvtier, the rest prefilled, the
new full blocks saved. In one run:

1. **Prefix reuse** (SCBench's shared context): one document of ~6K tokens (``--quick``: ~1K) of
   held-out prose, then a question. A cold request (``doc + q1``, empty store) prefills everything;
   the next requests (``doc + q2``, ``doc + q3``, ...) load the document's full blocks and prefill
   only the last partial block and the question. Time to first token (lookup + load + prefill +
   first token; the save that follows is not in it) cold vs warm, through an in-process store
   (the tiers ``kvtier serve`` builds by default: device, host, disk) and through a real
   ``kvtier serve`` process over REST (goal: warm >= 5x faster than cold).
2. **Exactness**: greedy tokens of ``doc + q2`` without any cache (a cold float32-block run,
   which loads nothing) vs with the cached prefix: float32 blocks (exact), float32 blocks through a
   lossless ``identity+zstd`` host tier, float16 blocks (the serving precision: K and V rounded
   once), float16 through ``identity+zstd``, float16 through the service.
3. **Pass key**: completion-style pass-key prompts (~2K and ~6K tokens; ``--quick``: ~768), answered
   once cold (without the cache) and once with the prompt's cached prefix (float16 blocks).

4. **Attention** (``bench/e2e_attn.py``, also runnable alone): decode tokens/s at 6K with
   ``SparseDecode(quest, budget 512)`` vs full attention and the pass key of both; a batch of 8
   sequences sharing a 4K prefix decoded with ``shared_prefix_decode`` (Hydragen) vs per sequence
   vs transformers' batch; ``TokenPolicy`` drop vs demote.

``PARTS`` lists the parts (``--parts`` runs some); each takes the shared ``Context`` (model,
tokenizer, the service started on first use) and returns a ``Part`` (figures, Markdown, optional plot).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# bench/ holds scripts named like packages (bench/service.py): take this folder off the path and
# import the bench helpers as ``bench.*`` from the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
from bench.common import RESULTS, KVTierServe, md_table, save_results  # noqa: E402

import torch  # noqa: E402

import bench.refmodel as rm  # noqa: E402
from kvtier.kvstore import HostTier, TieredStore, chain_hashes  # noqa: E402
from kvtier.connectors.generate import GenerateResult, generate  # noqa: E402

QUESTIONS = (
    "Question: In one sentence, what does the import statement do? Answer:",
    "Question: What is a name binding, according to the text above? Answer:",
    "Question: Which special method is called to create a new instance? Answer:",
    "Question: What happens when an exception is raised inside a try statement? Answer:",
)


# -- the shared context and the parts --------------------------------------------------------------
@dataclass
class Context:
    args: argparse.Namespace
    model: object
    tokenizer: object
    tmp: Path
    _service: KVTierServe | None = None
    _client: object = None

    @property
    def quick(self) -> bool:
        return self.args.quick

    def spec(self, dtype: str = "float16"):
        return rm.kv_spec(self.model, 256, dtype)

    def default_store(self, name: str) -> TieredStore:
        """The tiers ``kvtier serve`` runs on by default (device, host, disk under a temporary directory)."""
        from kvtier.service.settings import Settings
        from kvtier.service.storebuild import build_store

        return build_store(Settings(data_dir=self.tmp / name, grpc_port=None))

    def client(self):
        """An SDK client of a real ``kvtier serve`` process, started on first use."""
        if self._client is None:
            from kvtier.service.client import KVTierClient

            self._service = KVTierServe(log_level="error")  # embedded default tiers
            self._client = KVTierClient(self._service.url, timeout=120)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._service is not None:
            self._service.close()


@dataclass
class Part:
    figures: dict
    markdown: str
    plot: Callable | None = None  # plot(ax) draws the part's figure on one matplotlib axis
    summary: list[str] = field(default_factory=list)  # lines printed at the end (ratios side by side)


def _run(ctx: Context, ids: list[int], label: str, **kw) -> GenerateResult:
    r = generate(ctx.model, ids, tokenizer=ctx.tokenizer, max_new_tokens=ctx.args.max_new_tokens, stop_tokens=(), **kw)
    print(
        f"  {label:<34} prompt {r.num_prompt_tokens:>5}  cached {r.num_cached_tokens:>5}  TTFT {r.ttft_s:7.3f} s"
        f"  load {r.cache.load_s if r.cache else 0:.3f} s",
        flush=True,
    )
    return r


def _run_figures(r: GenerateResult) -> dict:
    c = r.cache
    return {
        "ttft_s": r.ttft_s,
        "num_prompt_tokens": r.num_prompt_tokens,
        "num_cached_tokens": r.num_cached_tokens,
        "num_prefilled_tokens": r.num_prefilled_tokens,
        "tier_hits": r.tier_hits,
        "tier_bytes": r.tier_bytes,
        "lookup_s": c.lookup_s if c else None,
        "load_s": c.load_s if c else None,
        "save_s": c.save_s if c else None,
        "num_saved_blocks": c.num_saved_blocks if c else None,
        "decode_s": r.decode_s,
        "text": r.text,
    }


def _copy_prefix(src: TieredStore, dst: TieredStore, spec, ids: list[int]) -> int:
    """Copy the blocks a request over ``ids`` would load from ``src`` into ``dst`` (same keys)."""
    keys = chain_hashes(spec, ids[: (len(ids) - 1) // spec.block_tokens * spec.block_tokens])
    blocks = src.get(spec, keys)
    if any(b is None for b in blocks):
        raise RuntimeError("the source store lost a block")
    return sum(dst.put(spec, keys, torch.stack(blocks)))


def part_prefix_reuse(ctx: Context) -> Part:
    tok = ctx.tokenizer
    doc = rm.heldout_ids(tok, ctx.args.doc_tokens)
    prompts = [doc + tok("\n\n" + q, add_special_tokens=False).input_ids for q in QUESTIONS]
    num_warm = 2 if ctx.quick else 3
    spec16, spec32 = ctx.spec("float16"), ctx.spec("float32")
    runs: dict[str, dict] = {}
    tokens: dict[str, list[int]] = {}

    print(f"prefix reuse: document of {len(doc)} tokens, blocks of {spec16.block_tokens} tokens", flush=True)
    # in process, the default tiers, float16 blocks
    s16 = ctx.default_store("s16")
    cold = _run(ctx, prompts[0], "in-process cold (doc + q1)", kv=s16, spec=spec16)
    warm = [_run(ctx, prompts[i], f"in-process warm (doc + q{i + 1})", kv=s16, spec=spec16) for i in range(1, 1 + num_warm)]
    runs["in-process cold"], runs["in-process warm"] = _run_figures(cold), [_run_figures(r) for r in warm]
    tokens["float16, identity (in process)"] = warm[0].token_ids
    # without any cache: a cold run loads nothing (float32 blocks, so that the warm runs below are exact)
    s32 = TieredStore([HostTier(4 << 30)])
    ref = _run(ctx, prompts[1], "no cache (doc + q2), float32", kv=s32, spec=spec32)
    warm32 = _run(ctx, prompts[1], "float32 blocks (doc + q2)", kv=s32, spec=spec32)
    runs["no cache"], runs["float32 warm"] = _run_figures(ref), _run_figures(warm32)
    tokens["float32, identity"] = warm32.token_ids
    # the same blocks through a lossless zstd stage on the host tier
    z_ratio = {}
    for label, src, spec in (("float32, identity+zstd", s32, spec32), ("float16, identity+zstd", s16, spec16)):
        z = TieredStore([HostTier(4 << 30, codec="identity+zstd")])
        n = _copy_prefix(src, z, spec, prompts[1])
        z_ratio[label] = {"blocks": n, "stored_bytes": z.stats()["tiers"][0]["bytes"], "block_bytes": n * spec.block_nbytes}
        r = _run(ctx, prompts[1], label, kv=z, spec=spec)
        tokens[label] = r.token_ids
        z.close()
    s16.close()
    s32.close()
    # through a real kvtier serve process
    client = ctx.client()
    svc_cold = _run(ctx, prompts[0], "service cold (doc + q1)", kv=client, spec=spec16)
    svc_warm = [_run(ctx, prompts[i], f"service warm (doc + q{i + 1})", kv=client, spec=spec16) for i in range(1, 1 + num_warm)]
    runs["service cold"], runs["service warm"] = _run_figures(svc_cold), [_run_figures(r) for r in svc_warm]
    tokens["float16, identity (service)"] = svc_warm[0].token_ids

    ttft = {}
    for name, c, w in (("in-process", cold, warm), ("service", svc_cold, svc_warm)):
        med = statistics.median(r.ttft_s for r in w)
        ttft[name] = {
            "cold_s": c.ttft_s,
            "warm_s": med,
            "speedup": c.ttft_s / med,
            "goal": 5.0,
            "met": c.ttft_s / med >= 5.0,
            "num_cached_tokens": w[0].num_cached_tokens,
            "num_prompt_tokens": w[0].num_prompt_tokens,
            "warm_load_s": statistics.median(r.cache.load_s for r in w),
            "warm_lookup_s": statistics.median(r.cache.lookup_s for r in w),
            "tier_hits": w[0].tier_hits,
        }
    exact = {
        label: {
            "identical": t == ref.token_ids,
            "first_difference": next((i for i, (a, b) in enumerate(zip(t, ref.token_ids)) if a != b), None),
        }
        for label, t in tokens.items()
    }
    exact["float16, identity+zstd"]["same_as_identity"] = tokens["float16, identity+zstd"] == tokens["float16, identity (in process)"]
    exact["float16, identity (service)"]["same_as_identity"] = (
        tokens["float16, identity (service)"] == tokens["float16, identity (in process)"]
    )

    rows = [
        [
            name,
            f"{d['cold_s']:.2f}",
            f"{d['warm_s']:.3f}",
            f"**{d['speedup']:.1f}x**",
            f"{d['num_cached_tokens']} / {d['num_prompt_tokens']}",
            f"{d['warm_lookup_s'] * 1e3:.1f} + {d['warm_load_s'] * 1e3:.0f}",
            ", ".join(f"{k} {v}" for k, v in d["tier_hits"].items() if v),
        ]
        for name, d in ttft.items()
    ]
    md = [
        f"Document of {len(doc)} tokens + a question; blocks of 256 tokens, float16; warm = median of {num_warm} requests "
        f"(doc + another question each).",
        "",
        md_table(
            ["path", "cold TTFT s", "warm TTFT s", "speed-up", "cached / prompt tokens", "lookup + load ms", "blocks hit per tier"], rows
        ),
        "",
        f"Greedy tokens ({ctx.args.max_new_tokens}) of doc + q2 with the cached prefix vs without any cache "
        f"(a cold run of {ref.num_prompt_tokens} tokens):",
        "",
        md_table(
            ["blocks, codec", "identical to no cache", "first differing token"],
            [
                [k, "yes" if v["identical"] else "no", "-" if v["first_difference"] is None else v["first_difference"]]
                for k, v in exact.items()
            ],
        ),
    ]
    figures = {
        "doc_tokens": len(doc),
        "questions": list(QUESTIONS[: 1 + num_warm]),
        "ttft": ttft,
        "exact": exact,
        "runs": runs,
        "zstd_host_tier": z_ratio,
    }

    def plot(ax):
        names = list(ttft)
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [ttft[n]["cold_s"] for n in names], 0.4, label="cold (no cached prefix)")
        ax.bar([i + 0.2 for i in x], [ttft[n]["warm_s"] for n in names], 0.4, label="warm (cached prefix)")
        for i, n in enumerate(names):
            ax.annotate(f"{ttft[n]['speedup']:.1f}x", (i + 0.2, ttft[n]["warm_s"]), ha="center", va="bottom")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("time to first token, s")
        ax.set_title(f"{len(doc)}-token document + question")
        ax.legend(fontsize=8)

    goal = "goal >= 5x on the full run's 6K document" if ctx.quick else "goal >= 5x: "
    summary = [
        f"TTFT cold / warm ({name}): {d['cold_s']:.2f} s / {d['warm_s']:.3f} s = {d['speedup']:.1f}x ("
        f"{goal if ctx.quick else goal + ('met' if d['met'] else 'NOT met')})"
        for name, d in ttft.items()
    ]
    summary += [f"greedy tokens identical to no cache, {k}: {v['identical']}" for k, v in exact.items()]
    return Part(figures, "\n".join(md), plot, summary)


def part_passkey(ctx: Context) -> Part:
    if ctx.quick:
        prompts = rm.passkey_suite(ctx.tokenizer, lengths=(768,), depths=(0.25, 0.75), num_keys=1)
    else:
        prompts = rm.passkey_suite(ctx.tokenizer, lengths=(2048,), depths=(0.1, 0.5, 0.9), num_keys=1)
        prompts += rm.passkey_suite(ctx.tokenizer, lengths=(6144,), depths=(0.25, 0.75), num_keys=1)
    spec = ctx.spec("float16")
    store = ctx.default_store("passkey")
    rows, table = [], []
    print(f"pass key: {len(prompts)} prompts", flush=True)
    try:
        for i, p in enumerate(prompts):
            salt = f"passkey-{i}"  # prompts share their intro and filler: keep each its own chain
            kw = dict(kv=store, spec=spec, salt=salt, max_new_tokens=8, stop_tokens=())
            without = generate(ctx.model, list(p.input_ids), tokenizer=ctx.tokenizer, **kw)
            with_ = generate(ctx.model, list(p.input_ids), tokenizer=ctx.tokenizer, **kw)
            ok = [re.search(r"\d+", r.text or "") for r in (without, with_)]
            ok = [m is not None and m.group() == p.key for m in ok]
            row = {
                "tokens": p.num_tokens,
                "depth": p.depth,
                "key": p.key,
                "cached_tokens": with_.num_cached_tokens,
                "answer_without": without.text,
                "answer_with": with_.text,
                "correct_without": ok[0],
                "correct_with": ok[1],
                "same_tokens": without.token_ids == with_.token_ids,
                "ttft_without_s": without.ttft_s,
                "ttft_with_s": with_.ttft_s,
            }
            rows.append(row)
            print(
                f"  {p.num_tokens:>5} tokens, depth {p.depth}: without {without.text!r} ({ok[0]}), with {with_.text!r} ({ok[1]}), "
                f"{with_.num_cached_tokens} cached",
                flush=True,
            )
            table.append(
                [
                    p.num_tokens,
                    p.depth,
                    p.key,
                    repr(without.text),
                    repr(with_.text),
                    "yes" if ok[0] else "no",
                    "yes" if ok[1] else "no",
                    "yes" if row["same_tokens"] else "no",
                ]
            )
    finally:
        store.close()
    acc = {k: sum(r[f"correct_{k}"] for r in rows) / len(rows) for k in ("without", "with")}
    md = "\n".join(
        [
            "Pass-key prompts answered without any cache (a cold request) and again with their cached prefix "
            "(float16 blocks); 8 greedy tokens.",
            "",
            md_table(["tokens", "depth", "key", "answer without", "answer with", "right without", "right with", "same tokens"], table),
            "",
            f"Accuracy: {acc['without']:.2f} without, {acc['with']:.2f} with the cached prefix.",
        ]
    )
    summary = [
        f"pass-key accuracy without / with the cached prefix: {acc['without']:.2f} / {acc['with']:.2f} "
        f"({sum(r['same_tokens'] for r in rows)} of {len(rows)} answers token-identical)"
    ]
    return Part({"accuracy": acc, "prompts": rows}, md, None, summary)


def part_attention(ctx: Context) -> Part:
    """Sparse decode (quest, budget 512) vs full at 6K, 8 sequences over a 4K shared prefix (Hydragen vs
    per sequence vs transformers), token policies drop vs demote: ``bench/e2e_attn.py``'s ``run_all``."""
    from bench import e2e_attn

    figures, md = e2e_attn.run_all(ctx.model, ctx.tokenizer, quick=ctx.quick, progress=lambda s: print(f"  {s}", flush=True))
    return Part(figures, md, None, e2e_attn.summary_lines(figures))


# name -> part; each runs once per invocation, in this order, on the shared Context
PARTS: dict[str, Callable[[Context], Part]] = {
    "prefix_reuse": part_prefix_reuse,
    "passkey": part_passkey,
    "attention": part_attention,  # also alone: python bench/e2e_attn.py
}


def plot(parts: dict[str, Part], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(name, p) for name, p in parts.items() if p.plot is not None]
    if not drawn:
        return
    fig, axes = plt.subplots(1, len(drawn), figsize=(6 * len(drawn), 4.5), squeeze=False)
    for ax, (_, p) in zip(axes[0], drawn):
        p.plot(ax)
    fig.suptitle("kvtier end to end: SmolLM2-135M on the CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: a ~1K-token document, 2 warm requests, 8 new tokens, 2 pass-key prompts of 768; writes bench/results/e2e_quick.*",
    )
    ap.add_argument("--out", help="also write the figures as JSON to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), help="run only these parts (default: all)")
    args = ap.parse_args()
    args.doc_tokens = 1000 if args.quick else 6000
    args.max_new_tokens = 8 if args.quick else 32
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = rm.load_model()
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-e2e-"))
    ctx = Context(args, model, tok, tmp)
    parts: dict[str, Part] = {}
    try:
        for name in args.parts or PARTS:
            parts[name] = PARTS[name](ctx)
    finally:
        ctx.close()
        shutil.rmtree(tmp, ignore_errors=True)
    name = "e2e_quick" if args.quick else "e2e"
    figures = {
        "quick": args.quick,
        "threads": args.threads,
        "model": rm.MODEL_ID,
        "seconds": time.time() - t0,
        **{k: p.figures for k, p in parts.items()},
    }
    md = [
        f"## bench/e2e.py{' --quick' if args.quick else ''}",
        "",
        f"Reference model {rm.MODEL_ID} (float32, CPU, {args.threads} torch thread(s)); {figures['seconds']:.0f} s in all.",
        "",
    ]
    for k, p in parts.items():
        md += [f"### {k}", "", p.markdown, ""]
    save_results(name, figures, "\n".join(md), args.out)
    plot(parts, RESULTS / f"{name}.png")
    print()
    for p in parts.values():
        for line in p.summary:
            print(line)
    print(f"({figures['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
