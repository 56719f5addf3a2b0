"""End to end on the reference model: sparse decode, shared-prefix batches and token policies
inside transformers (service/connectors/hf_attention.py).

    python bench/e2e_attn.py [--quick] [--out FILE] [--threads N]

SmolLM2-135M-Instruct (bench/refmodel.py), CPU, one process, side by side:

(a) **sparse decode**: pass-key prompts (2K and 6K tokens, completion style, the nine generated
    families of ``refmodel.family_suite``; accuracy per family and in total) are prefilled once with
    SDPA; from copies of that cache the model decodes greedily with full attention and with
    ``SparseDecode(quest, budget 512)``: pass-key accuracy of both (the first answer token comes
    from the dense prefill, the rest from decode steps). Decode speed on the 6K prompt, full and
    sparse alternated (full, sparse, full, ...) so both see the same load, with transformers'
    ``DynamicCache`` (which copies the whole cache at every step) and with a preallocated
    ``StaticCache``; then over random caches of 16K and 32K tokens (speed only: the cost does not
    depend on the values). Tokens/s of the median run from process CPU time (1 torch thread: the
    work done, whatever else runs on the box) and wall time; wall time in the attention function.
(a2) **crossover** (also alone: ``--crossover [--lengths ...] [--selectors ...]``): per-layer set-up and
    step costs of each selector vs dense SDPA, then tokens/s of a 32-token answer (set-up included)
    at 1K, 2K, 6K, 16K and 32K tokens: full attention vs each selector forced sparse and at its
    defaults (``dense_below="auto"``, index states in the background).
(b) **shared prefix**: 8 sequences share a 4K-token prefix (the first 4,096 tokens of the longest
    prompt, its KV taken from the prefill of (a): computed once), each with its own question of equal
    length. Decoded as one batch three ways: ``shared_prefix_generate`` with Hydragen
    (``shared_prefix_decode``: the prefix read once per batch), the same harness with the prefix
    copied into each sequence's cache (``per_sequence``: ``sparse_decode`` over every token), and
    transformers' own batch decode (SDPA over a batch ``DynamicCache`` holding 8 copies of the
    prefix). Time in the attention function alone and per whole decode step; the outputs must match.
(c) **token policy**: ``TokenPolicy(snapkv, ratio 0.5)`` in ``drop`` and ``demote`` mode vs no
    eviction (``ratio 0``), pass-key accuracy on 1K-token prompts of every family, as a user calls it:
    ``generate(context + question, policy=..., context_tokens=len(context))`` (the context compressed
    once, the question and the answer uncompressed, stopping at EOS).

The functions ``sparse_decode_figures``, ``shared_prefix_figures``, ``token_policy_figures`` and
``run_all`` are what ``bench/e2e.py`` calls; each returns figures (JSON-ready) and a Markdown part.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
from bench.common import md_table, save_results  # noqa: E402

import torch  # noqa: E402

import bench.refmodel as rm  # noqa: E402

BUDGET = 512
SELECTOR = "quest"


# -- helpers ------------------------------------------------------------------------------------------
class Clock:
    """Wall and process CPU time of a block."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


@torch.inference_mode()
def prefill_cache(model, ids):
    """One SDPA prefill: ``(DynamicCache, last logits [V])``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([list(ids)]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1].float()


def copy_cache(cache, upto: int | None = None, batch: int = 1):
    """A fresh ``DynamicCache`` holding (the first ``upto`` tokens of) ``cache``, repeated ``batch`` times."""
    from transformers import DynamicCache

    new = DynamicCache()
    for i, lay in enumerate(cache.layers):
        k, v = lay.keys[:, :, :upto], lay.values[:, :, :upto]
        new.update(k.repeat(batch, 1, 1, 1), v.repeat(batch, 1, 1, 1), i)
    return new


def dynamic_cache(layers_kv):
    """A ``DynamicCache`` holding (copies of) ``layers_kv`` (per layer ``(k, v)`` ``[1, H_kv, T, D]``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers_kv):
        cache.update(k, v, i)
    return cache


def static_cache(model, layers_kv, extra: int):
    """A ``StaticCache`` (preallocated, written in place) holding ``layers_kv`` (per layer ``(k, v)``
    ``[1, H_kv, T, D]``) with room for ``extra`` more tokens."""
    from transformers import StaticCache

    T = layers_kv[0][0].shape[2]
    cache = StaticCache(config=model.config, max_cache_len=T + extra)
    for i, (k, v) in enumerate(layers_kv):
        cache.update(k, v, i, {"cache_position": torch.arange(T)})
    return cache


class TimedSDPA:
    """Full attention through transformers' own SDPA function, timed: the baseline as an AttentionHook."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def attach(self, model):
        from kvtier.connectors.hf_dispatch import bind

        return bind(model, "kvtier_bench_timed_sdpa", self._attend, sdpa_mask=True)

    def _attend(self, module, query, key, value, attention_mask, **kwargs):
        from kvtier.connectors.hf_dispatch import sdpa

        t0 = time.perf_counter()
        out = sdpa(module, query, key, value, attention_mask, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


@torch.inference_mode()
def decode(model, cache, logits, position: int, num_tokens: int, hook=None) -> list[int]:
    """Greedy ``num_tokens`` from a prefilled ``cache`` (its last ``logits``), through ``hook`` if any."""
    import contextlib

    out = []
    nxt = int(logits.argmax())
    with hook.attach(model) if hook is not None else contextlib.nullcontext():
        for i in range(num_tokens):
            out.append(nxt)
            if i + 1 == num_tokens:
                break
            lg = model(
                input_ids=torch.tensor([[nxt]]),
                past_key_values=cache,
                use_cache=True,
                cache_position=torch.tensor([position]),
                logits_to_keep=1,
            ).logits
            position += 1
            nxt = int(lg[0, -1].argmax())
    return out


def correct(answer: str, key: str) -> bool:
    m = re.search(r"\d+", answer)
    return m is not None and m.group() == key


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


# -- (a) sparse decode ----------------------------------------------------------------------------------
def time_decode(model, make_cache, logits, position: int, *, steps: int, repeats: int, budget: int, selector: str) -> dict:
    """Full vs sparse decode from fresh caches (``make_cache()``), alternated, ``repeats`` times each:
    median tokens/s (wall and process CPU time) and attention ms per step (all layers)."""
    from kvtier.connectors.hf_attention import SparseDecode

    runs = {"full": [], "sparse": []}
    read = None
    for _ in range(repeats):
        for name in ("full", "sparse"):
            hook = TimedSDPA() if name == "full" else SparseDecode(selector=selector, budget=budget, dense_below=0)
            cache = make_cache()
            with Clock() as clk:
                decode(model, cache, logits, position, steps + 1, hook)  # steps forwards (the first token is given)
            del cache
            att = hook.seconds if name == "full" else hook.stats.attention_seconds
            runs[name].append({"wall": clk.wall, "cpu": clk.cpu, "attention": att})
            if name == "sparse":
                read = hook.stats.read_fraction
    out = {"context_tokens": position, "decode_steps": steps, "repeats": repeats, "sparse_read_fraction": read, "runs": runs}
    for name in ("full", "sparse"):
        out[f"{name}_tokens_per_s_wall"] = _median([steps / r["wall"] for r in runs[name]])
        out[f"{name}_tokens_per_s_cpu"] = _median([steps / r["cpu"] for r in runs[name]])
        out[f"{name}_attention_ms_per_step"] = 1e3 * _median([r["attention"] / steps for r in runs[name]])
    out["speedup_wall"] = out["sparse_tokens_per_s_wall"] / out["full_tokens_per_s_wall"]
    out["speedup_cpu"] = out["sparse_tokens_per_s_cpu"] / out["full_tokens_per_s_cpu"]
    out["attention_speedup"] = out["full_attention_ms_per_step"] / out["sparse_attention_ms_per_step"]
    return out


def _speed_line(label: str, s: dict) -> str:
    return (
        f"{label} at {s['context_tokens']}: full {s['full_tokens_per_s_cpu']:.1f} tok/s, sparse {s['sparse_tokens_per_s_cpu']:.1f} tok/s "
        f"(x{s['speedup_cpu']:.2f} CPU time, x{s['speedup_wall']:.2f} wall); attention {s['full_attention_ms_per_step']:.1f} vs "
        f"{s['sparse_attention_ms_per_step']:.1f} ms/step (x{s['attention_speedup']:.2f}); sparse reads {s['sparse_read_fraction']:.3f}"
    )


def sparse_decode_figures(
    model,
    tok,
    prompts,
    *,
    budget: int = BUDGET,
    selector: str = SELECTOR,
    decode_tokens: int = 32,
    repeats: int = 3,
    answer_tokens: int = 8,
    synthetic_contexts=(),
    progress=print,
    keep_cache_of: int | None = None,
):
    """Pass-key accuracy of full vs sparse decode on every prompt; decode speed on the longest prompt
    (transformers' ``DynamicCache``, which copies the whole cache at every step, and a preallocated
    ``StaticCache``); and decode speed over random caches of ``synthetic_contexts`` tokens (speed only:
    the cost of attention does not depend on the values).

    Returns ``(figures, markdown, kept)`` where ``kept`` is ``(cache, prompt)`` of prompt index
    ``keep_cache_of`` (its prefill, for the shared-prefix part), or ``None``."""
    from kvtier.connectors.hf_attention import SparseDecode

    longest = max(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    rows, speed, kept = [], {}, None
    for i, p in enumerate(prompts):
        T = len(p.input_ids)
        with Clock() as c:
            cache, logits = prefill_cache(model, p.input_ids)
        answers = {}
        for name in ("full", "sparse"):
            hook = SparseDecode(selector=selector, budget=budget, dense_below=0) if name == "sparse" else None
            answers[name] = tok.decode(
                decode(model, dynamic_cache([(lay.keys, lay.values) for lay in cache.layers]), logits, T, answer_tokens, hook)
            )
            rows.append(
                {
                    "tokens": T,
                    "depth": p.depth,
                    "key": p.key,
                    "family": p.family,
                    "attention": name,
                    "answer": answers[name],
                    "correct": correct(answers[name], p.key),
                }
            )
        progress(f"  (a) {T} tokens, depth {p.depth}: full {answers['full']!r}, sparse {answers['sparse']!r} (prefill {c.wall:.1f} s)")
        if i == longest:
            layers_kv = [(lay.keys, lay.values) for lay in cache.layers]
            speed["dynamic"] = time_decode(
                model, lambda: dynamic_cache(layers_kv), logits, T, steps=decode_tokens, repeats=repeats, budget=budget, selector=selector
            )
            progress("  (a) " + _speed_line("DynamicCache", speed["dynamic"]))
            speed["static"] = time_decode(
                model,
                lambda: static_cache(model, layers_kv, decode_tokens + 1),
                logits,
                T,
                steps=decode_tokens,
                repeats=repeats,
                budget=budget,
                selector=selector,
            )
            progress("  (a) " + _speed_line("StaticCache", speed["static"]))
            del layers_kv
        if keep_cache_of == i:
            kept = (cache, p)
        del cache
    d = model.config
    head_dim = getattr(d, "head_dim", None) or d.hidden_size // d.num_attention_heads
    synthetic = []
    for T in synthetic_contexts:
        g = torch.Generator().manual_seed(T)
        layers_kv = [
            (
                torch.randn(1, d.num_key_value_heads, T, head_dim, generator=g),
                torch.randn(1, d.num_key_value_heads, T, head_dim, generator=g),
            )
            for _ in range(d.num_hidden_layers)
        ]
        s = time_decode(
            model,
            lambda: dynamic_cache(layers_kv),
            torch.zeros(d.vocab_size),
            T,
            steps=decode_tokens,
            repeats=max(1, repeats - 1),
            budget=budget,
            selector=selector,
        )
        synthetic.append(s)
        progress("  (a) " + _speed_line("DynamicCache, random KV", s))
        del layers_kv
    acc, fam_acc = {}, {}
    for name in ("full", "sparse"):
        sel = [r for r in rows if r["attention"] == name]
        acc[name] = {"correct": sum(r["correct"] for r in sel), "total": len(sel)}
        for f in sorted({r["family"] for r in sel}):
            fs = [r for r in sel if r["family"] == f]
            fam_acc.setdefault(f, {})[name] = {"correct": sum(r["correct"] for r in fs), "total": len(fs)}
    figures = {
        "selector": selector,
        "budget": budget,
        "accuracy": acc,
        "accuracy_per_family": fam_acc,
        "runs": rows,
        "speed": speed,
        "synthetic": synthetic,
    }
    lens = sorted({r["tokens"] for r in rows})

    def row(label, s):
        return [
            label,
            s["context_tokens"],
            f"{s['full_tokens_per_s_cpu']:.1f}",
            f"{s['sparse_tokens_per_s_cpu']:.1f} (x{s['speedup_cpu']:.2f})",
            f"x{s['speedup_wall']:.2f}",
            f"{s['full_attention_ms_per_step']:.1f}",
            f"{s['sparse_attention_ms_per_step']:.1f} (x{s['attention_speedup']:.2f})",
        ]

    table = [row("DynamicCache (pass-key prompt)", speed["dynamic"]), row("StaticCache (pass-key prompt)", speed["static"])]
    table += [row("DynamicCache, random KV", s) for s in synthetic]
    md = [
        f"**(a) Sparse decode**: `SparseDecode(selector={selector!r}, budget={budget})` vs full attention (SDPA); prefill dense.",
        "",
        f"Pass-key accuracy ({len(prompts)} prompts of {', '.join(map(str, lens))} tokens, {answer_tokens} tokens decoded): "
        f"full {acc['full']['correct']}/{acc['full']['total']}, sparse {acc['sparse']['correct']}/{acc['sparse']['total']} (in total; "
        "per family: "
        + ", ".join(
            f"{f} {v['full']['correct']}/{v['full']['total']} vs {v['sparse']['correct']}/{v['sparse']['total']}"
            for f, v in fam_acc.items()
        )
        + "). Sparse at every length here (`dense_below=0`).",
        "",
        f"Decode speed ({decode_tokens} steps per run, median of alternated runs; tokens/s from process CPU time, 1 thread; "
        "attention = wall time in the attention function, all 30 layers):",
        "",
        md_table(
            ["cache", "context", "full tok/s", "sparse tok/s", "sparse (wall)", "full attention ms/step", "sparse attention ms/step"], table
        ),
    ]
    return figures, "\n".join(md), kept


# -- (a) accuracy only, every selector --------------------------------------------------------------------
ACCURACY_SELECTORS = ("quest", "ann", "topk_exact")


def family_table(rows, key: str, names) -> tuple[list[str], list[list]]:
    """``(header, table)``: one row per ``names`` entry (``rows[i][key]``), one column per family, then the total."""
    fams = sorted({r["family"] for r in rows})
    table = []
    for n in names:
        sel = [r for r in rows if r[key] == n]
        cells = []
        for f in [*fams, None]:
            fs = [r for r in sel if f is None or r["family"] == f]
            cells.append(f"{sum(r['correct'] for r in fs)}/{len(fs)}")
        table.append([n, *cells])
    return [key, *fams, "total"], table


def selector_accuracy_figures(
    model, tok, prompts, *, selectors=ACCURACY_SELECTORS, budget: int = BUDGET, answer_tokens: int = 8, progress=print, on_prompt=None
):
    """Pass-key accuracy of full attention vs ``SparseDecode(selector, budget)`` for every selector, its
    other options at their defaults but forced sparse (``dense_below=0``, state built inline: the
    default would decode these lengths densely), on every prompt: one SDPA prefill per prompt, then
    ``answer_tokens`` greedy tokens from a copy of its cache per configuration. ``on_prompt(figures,
    markdown)`` gets the report so far after each prompt (a checkpoint)."""
    from kvtier.connectors.hf_attention import SparseDecode

    rows: list[dict] = []
    for p in prompts:
        T = len(p.input_ids)
        with Clock() as c:
            cache, logits = prefill_cache(model, p.input_ids)
        answers = {}
        for name in ("full", *selectors):
            hook = None if name == "full" else SparseDecode(selector=name, budget=budget, dense_below=0, build="inline")
            ans = tok.decode(decode(model, dynamic_cache([(lay.keys, lay.values) for lay in cache.layers]), logits, T, answer_tokens, hook))
            answers[name] = ans
            rows.append(
                {
                    "tokens": T,
                    "depth": p.depth,
                    "key": p.key,
                    "family": p.family,
                    "attention": name,
                    "answer": ans,
                    "correct": correct(ans, p.key),
                }
            )
        del cache
        progress(
            f"  (a) {p.family} {T} tokens, depth {p.depth}, key {p.key}: "
            + ", ".join(f"{k} {v!r}" for k, v in answers.items())
            + f" (prefill {c.wall:.1f} s)"
        )
        if on_prompt is not None:
            on_prompt(*selector_accuracy_report(rows, selectors, budget, answer_tokens))
    return selector_accuracy_report(rows, selectors, budget, answer_tokens)


def selector_accuracy_report(rows, selectors, budget: int, answer_tokens: int) -> tuple[dict, str]:
    """``selector_accuracy_figures``' figures and Markdown from its rows."""
    names = ["full", *selectors]
    acc = {
        n: {"correct": sum(r["correct"] for r in rows if r["attention"] == n), "total": sum(r["attention"] == n for r in rows)}
        for n in names
    }
    header, table = family_table(rows, "attention", names)
    lens = sorted({r["tokens"] for r in rows})
    md = [
        f"**(a) Sparse decode, pass-key accuracy**: full attention (SDPA) vs `SparseDecode(selector, budget={budget})` per selector "
        f"(its defaults, forced sparse: `dense_below=0`, state built inline), {len(rows) // len(names)} prompts of "
        f"{lens[0]}-{lens[-1]} tokens, {answer_tokens} tokens decoded greedily; per family (filler/wording) and in total:",
        "",
        md_table(header, table),
    ]
    return {"selectors": list(selectors), "budget": budget, "accuracy": acc, "runs": rows}, "\n".join(md)


# -- (a2) crossover -------------------------------------------------------------------------------------
CROSSOVER_LENGTHS = (1024, 2048, 6144, 16384, 32768)
CROSSOVER_SELECTORS = ("quest", "ann", "topk_exact")  # --selectors adds others (tokenselect, sink_window, centroids)


def random_layers_kv(model, T: int):
    """Random KV of ``T`` tokens per layer (speed only: attention's cost does not depend on the values)."""
    d = model.config
    head_dim = getattr(d, "head_dim", None) or d.hidden_size // d.num_attention_heads
    g = torch.Generator().manual_seed(T)
    return [
        (torch.randn(1, d.num_key_value_heads, T, head_dim, generator=g), torch.randn(1, d.num_key_value_heads, T, head_dim, generator=g))
        for _ in range(d.num_hidden_layers)
    ]


def layer_costs(
    model,
    *,
    lengths=CROSSOVER_LENGTHS,
    selectors=("quest", "ann", "topk_exact"),
    budget: int = BUDGET,
    max_index_tokens: int = 16384,
    repeats: int = 10,
) -> tuple[dict, str]:
    """Per layer, process CPU time: dense SDPA of one decode query vs a selector's ``prepare`` (its
    set-up) and ``select`` + ``sparse_decode`` (its step), on random keys of the model's shape; each
    selector with the options ``SparseDecode`` gives it (``DECODE_SELECTOR_DEFAULTS``)."""
    import torch.nn.functional as F

    from kvtier.connectors.hf_attention import DECODE_SELECTOR_DEFAULTS
    from kvtier.retrieval import get_selector
    from kvtier.sparse_attn import sparse_decode

    d = model.config
    H_q, H_kv = d.num_attention_heads, d.num_key_value_heads
    D = getattr(d, "head_dim", None) or d.hidden_size // H_q
    rows = []
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        k, v, q = (torch.randn(1, H_kv, T, D, generator=g), torch.randn(1, H_kv, T, D, generator=g), torch.randn(1, H_q, D, generator=g))
        c0 = time.process_time()
        for _ in range(repeats):
            F.scaled_dot_product_attention(q.view(1, H_q, 1, D), k, v, enable_gqa=True)
        row = {"context_tokens": T, "dense_ms": 1e3 * (time.process_time() - c0) / repeats}
        for name in selectors:
            if name in ("ann", "centroids") and T > max_index_tokens:
                continue
            sel = get_selector(name, **DECODE_SELECTOR_DEFAULTS.get(name, {}))  # as SparseDecode builds it (Quest: 8-token pages)
            c0 = time.process_time()
            st = sel.prepare(k)
            prep = time.process_time() - c0
            c0 = time.process_time()
            for _ in range(repeats):
                sparse_decode(q, k, v, sel.select(q, k, budget, st), check_indices=False)
            row[name] = {"prepare_ms": 1e3 * prep, "step_ms": 1e3 * (time.process_time() - c0) / repeats}
        rows.append(row)
    figures = {"rows": rows, "selectors": list(selectors), "budget": budget, "shape": [H_q, H_kv, D], "quest_page_tokens": 8}
    return figures, layer_costs_markdown(figures)


def layer_costs_markdown(figures: dict) -> str:
    """``layer_costs``' Markdown from its figures (a saved run without ``shape`` was SmolLM2's 9 / 3 / 64)."""
    rows = figures["rows"]
    selectors = figures.get("selectors") or [n for n in rows[0] if n not in ("context_tokens", "dense_ms")]
    H_q, H_kv, D = figures.get("shape") or (9, 3, 64)
    pages = figures.get("quest_page_tokens", 16)
    table = [
        [
            r["context_tokens"],
            f"{r['dense_ms']:.2f}",
            *[(f"{r[n]['prepare_ms']:.1f} / {r[n]['step_ms']:.2f}" if n in r else "not run") for n in selectors],
        ]
        for r in rows
    ]
    md = [
        f"Per layer ({H_q} query heads, {H_kv} KV heads, head dim {D}, budget {figures.get('budget', BUDGET)}, Quest on {pages}-token "
        "pages; process CPU ms): dense SDPA step vs each selector's set-up / step (`prepare` / `select` + `sparse_decode`):",
        "",
        md_table(["context", "dense step", *[f"{n} set-up / step" for n in selectors]], table),
    ]
    return "\n".join(md)


def crossover_figures(
    model,
    *,
    lengths=CROSSOVER_LENGTHS,
    selectors=CROSSOVER_SELECTORS,
    answer_tokens: int = 32,
    budget: int = BUDGET,
    max_inline_index_tokens: int = 2048,
    repeats: int = 5,
    progress=print,
):
    """Tokens/s of a ``answer_tokens``-token answer (``answer_tokens`` decode steps from a prefilled
    ``DynamicCache`` of random KV), set-up included (the selector's state is built in the first
    step): full attention vs each selector forced sparse (``dense_below=0``, state built inline)
    and each selector at its defaults (``dense_below="auto"``, index states in the background).

    Every length runs ``repeats`` rounds; a round runs full attention and every configuration once,
    in an order rotated from round to round (so no configuration always follows another), and each
    configuration's tokens/s is divided by the full run of the same round: the paired ratio, whose
    median over the rounds is the figure and whose min-max is its spread. Times are process CPU time
    (background index builds included; the box is shared, so CPU time is steadier than wall time),
    wall time recorded too. A selector whose forced inline index build takes minutes (``ann``,
    ``centroids`` above ``max_inline_index_tokens``) is not forced there."""
    from kvtier.connectors.hf_attention import SparseDecode

    vocab = model.config.vocab_size
    rows = []
    for T in lengths:
        layers_kv = random_layers_kv(model, T)
        configs = [("full", lambda: None)]
        for sel in selectors:
            if not (sel in ("ann", "centroids") and T > max_inline_index_tokens):
                configs.append((f"{sel} forced", lambda sel=sel: SparseDecode(selector=sel, budget=budget, dense_below=0, build="inline")))
            configs.append((f"{sel} default", lambda sel=sel: SparseDecode(selector=sel, budget=budget)))
        runs: dict[str, list] = {name: [] for name, _ in configs}
        load0 = os.getloadavg()[0]
        for rnd in range(repeats):
            k = rnd % len(configs)
            for name, make in configs[k:] + configs[:k]:
                hook, cache = make(), dynamic_cache(layers_kv)
                with Clock() as clk:
                    decode(model, cache, torch.zeros(vocab), T, answer_tokens + 1, hook)
                del cache
                run = {"wall": clk.wall, "cpu": clk.cpu}
                if hook is not None:
                    st = hook.stats
                    run.update(sparse_calls=st.sparse_calls, dense_calls=st.dense_calls, state_builds=st.state_builds)
                    hook.reset()  # a background build of this run stops now
                runs[name].append(run)
        row = {"context_tokens": T, "answer_tokens": answer_tokens, "budget": budget, "repeats": repeats}
        row["load_average"] = [load0, os.getloadavg()[0]]
        full_runs = runs["full"]
        for name, rs in runs.items():
            ratios = sorted((f["cpu"] / r["cpu"]) for r, f in zip(rs, full_runs))  # paired: tokens/s over the same round's full
            ratios_wall = sorted((f["wall"] / r["wall"]) for r, f in zip(rs, full_runs))
            row[name] = {
                "tokens_per_s_cpu": _median([answer_tokens / r["cpu"] for r in rs]),
                "tokens_per_s_wall": _median([answer_tokens / r["wall"] for r in rs]),
                "vs_full_cpu": _median(ratios),
                "vs_full_cpu_min": ratios[0],
                "vs_full_cpu_max": ratios[-1],
                "vs_full_wall": _median(ratios_wall),
                "sparse_calls": rs[-1].get("sparse_calls"),
                "dense_calls": rs[-1].get("dense_calls"),
                "runs": rs,
            }
            progress(
                f"  (a2) {T} tokens, {name}: {row[name]['tokens_per_s_cpu']:.2f} tok/s CPU (x{row[name]['vs_full_cpu']:.2f} of full, "
                f"x{ratios[0]:.2f}-x{ratios[-1]:.2f}), {row[name]['tokens_per_s_wall']:.2f} tok/s wall"
            )
        rows.append(row)
        del layers_kv
    return crossover_report(rows, answer_tokens=answer_tokens, budget=budget, repeats=repeats)


def crossover_report(rows, *, answer_tokens: int, budget: int, repeats: int) -> tuple[dict, str]:
    """The crossover's figures and Markdown from its rows (``--render-crossover`` redraws a saved run).

    The guarantee is read per default configuration: one that decoded sparsely (``sparse_calls`` > 0)
    must reach 0.9 of full attention's tokens/s (median of its paired ratios); one below its
    crossover ran the same SDPA as ``full``, so its ratios measure the box's noise plus the hook's
    own overhead: all of them, pooled over lengths and selectors, must have a median of at least 0.9
    (a single noisy cell does not decide it, a systematic overhead does)."""
    names = list(dict.fromkeys(n for r in rows for n in r if isinstance(r[n], dict)))

    def sparse_path(c: dict) -> bool:
        return bool(c.get("sparse_calls"))

    table = []
    for r in rows:
        cells = []
        for n in names:
            if n not in r:
                cells.append("not run")
            elif n == "full":
                cells.append(f"{r[n]['tokens_per_s_cpu']:.1f}")
            else:
                c = r[n]
                mark = "" if not n.endswith("default") else (" S" if sparse_path(c) else " D")
                cells.append(
                    f"{c['tokens_per_s_cpu']:.1f} (x{c['vs_full_cpu']:.2f}, x{c['vs_full_cpu_min']:.2f}-{c['vs_full_cpu_max']:.2f}){mark}"
                )
        load = r.get("load_average")
        table.append([r["context_tokens"], *cells, f"{load[0]:.1f} / {load[1]:.1f}" if load else ""])
    sparse_defaults = [
        (r[n]["vs_full_cpu"], r["context_tokens"], n)
        for r in rows
        for n in r
        if isinstance(r.get(n), dict) and n.endswith("default") and sparse_path(r[n])
    ]

    def paired(r: dict, n: str) -> list[float]:  # a cell's per-round ratios (its median alone when the runs were not kept)
        if "runs" in r[n] and "runs" in r["full"]:
            return [f["cpu"] / x["cpu"] for x, f in zip(r[n]["runs"], r["full"]["runs"])]
        return [r[n]["vs_full_cpu"]]

    dense_ratios = sorted(
        x for r in rows for n in r if isinstance(r.get(n), dict) and n.endswith("default") and not sparse_path(r[n]) for x in paired(r, n)
    )
    worst = min(sparse_defaults, default=None)
    dense_median = _median(dense_ratios) if dense_ratios else None
    md = [
        f"**(a2) Crossover**: tokens/s of a {answer_tokens}-token answer over a cache of random KV (set-up included), budget {budget}, "
        f"{repeats} rounds per length, each round running every configuration once in a rotated order; a cell is the median tokens/s "
        "(process CPU time, which counts background index builds too), then (x median, min-max) of the per-round ratio to the same "
        'round\'s full attention. `forced`: `dense_below=0` (sparse at every length, state built inline); `default`: `dense_below="auto"` '
        "and index states built in the background, marked S where it decoded sparsely and D where the length is below its "
        "crossover (it then runs the same SDPA as `full`: its spread is the box's noise). Last column: the 1-minute load average "
        "at the start / end of the length's rounds.",
        "",
        md_table(["context", *names, "load"], table),
        "",
    ]
    ok = (worst is None or worst[0] >= 0.9) and (dense_median is None or dense_median >= 0.9)
    if worst is not None:
        md.append(
            f"Slowest default configuration that decoded sparsely: x{worst[0]:.2f} of full attention ({worst[2]} at {worst[1]} tokens, "
            "median of its paired ratios)."
        )
    if dense_median is not None:
        md.append(
            f"Default configurations below their crossover (the hook's dense path, the same SDPA as `full`), {len(dense_ratios)} "
            f"paired ratios pooled over lengths and selectors: median x{dense_median:.2f}, x{dense_ratios[0]:.2f}-x{dense_ratios[-1]:.2f}."
        )
    md.append(f"Guarantee (defaults never slower than full attention by more than 10%): {'holds' if ok else 'VIOLATED'}.")
    return {
        "rows": rows,
        "lengths": [r["context_tokens"] for r in rows],
        "answer_tokens": answer_tokens,
        "budget": budget,
        "repeats": repeats,
        "worst_sparse_default": {"vs_full_cpu": worst[0], "context_tokens": worst[1], "config": worst[2]} if worst else None,
        "dense_default_vs_full_median": dense_median,
        "guarantee_holds": ok,
    }, "\n".join(md)


# -- (b) shared prefix ----------------------------------------------------------------------------------
def questions(tok, batch: int) -> list[list[int]]:
    """``batch`` suffixes of equal token length (a transformers batch needs no padding then)."""
    texts = [f"\n\nReader {i + 1} asks: what is the pass key? The pass key is" for i in range(batch)]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    n = min(map(len, ids))
    return [x[:n] for x in ids]


def shared_prefix_figures(model, tok, prefix_cache, prefix_tokens: int, *, batch: int = 8, new_tokens: int = 16, progress=print):
    """Batch decode over a shared prefix: Hydragen vs per-sequence copies vs transformers' batch SDPA."""
    from kvtier.connectors.hf_shared_prefix import SharedPrefixStats, shared_prefix_generate

    prefix_kv = [(lay.keys[:, :, :prefix_tokens], lay.values[:, :, :prefix_tokens]) for lay in prefix_cache.layers]
    suffixes = questions(tok, batch)
    prefix_ids = [0] * prefix_tokens  # only its length is used: the KV is given
    results = {}
    for name in ("shared", "per_sequence"):
        st = SharedPrefixStats()
        with Clock() as clk:
            out = shared_prefix_generate(
                model, prefix_ids, suffixes, max_new_tokens=new_tokens, prefix_kv=prefix_kv, attention=name, stats=st
            )
        results[name] = {
            "tokens": out,
            "decode_step_s": st.decode_seconds / st.decode_steps,
            "attention_per_step_s": st.decode_attention_seconds / st.decode_steps,
            "suffix_prefill_s": st.suffix_seconds,
            "total_s": clk.wall,
        }
        progress(
            f"  (b) {name}: {1e3 * results[name]['decode_step_s']:.1f} ms per decode step, "
            f"{1e3 * results[name]['attention_per_step_s']:.1f} ms in attention"
        )
    # transformers' own batch decode over a batch cache that holds the prefix once per sequence
    n = len(suffixes[0])
    cache = copy_cache(prefix_cache, prefix_tokens, batch)
    timed = TimedSDPA()

    toks = [[] for _ in range(batch)]
    with torch.inference_mode(), timed.attach(model):
        lg = model(
            input_ids=torch.tensor(suffixes),
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.arange(prefix_tokens, prefix_tokens + n),
            logits_to_keep=1,
        ).logits[:, -1]
        pos = prefix_tokens + n
        timed.seconds = 0.0
        t0 = time.perf_counter()
        for step in range(new_tokens):
            nxt = lg.argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                toks[b].append(t)
            if step + 1 == new_tokens:
                break
            lg = model(
                input_ids=nxt.view(batch, 1), past_key_values=cache, use_cache=True, cache_position=torch.tensor([pos]), logits_to_keep=1
            ).logits[:, -1]
            pos += 1
        steps = new_tokens - 1
        results["transformers_sdpa"] = {
            "tokens": toks,
            "decode_step_s": (time.perf_counter() - t0) / steps,
            "attention_per_step_s": timed.seconds / steps,
        }
    del cache
    progress(
        f"  (b) transformers batch SDPA: {1e3 * results['transformers_sdpa']['decode_step_s']:.1f} ms per decode step, "
        f"{1e3 * results['transformers_sdpa']['attention_per_step_s']:.1f} ms in attention"
    )
    ref = results["transformers_sdpa"]["tokens"]
    for name in ("shared", "per_sequence"):
        results[name]["sequences_matching_transformers"] = sum(a == b for a, b in zip(results[name]["tokens"], ref))
    hyd = results["shared"]
    figures = {
        "batch": batch,
        "prefix_tokens": prefix_tokens,
        "suffix_tokens": n,
        "new_tokens": new_tokens,
        "attention_speedup_vs_per_sequence": results["per_sequence"]["attention_per_step_s"] / hyd["attention_per_step_s"],
        "attention_speedup_vs_transformers": results["transformers_sdpa"]["attention_per_step_s"] / hyd["attention_per_step_s"],
        "step_speedup_vs_per_sequence": results["per_sequence"]["decode_step_s"] / hyd["decode_step_s"],
        "step_speedup_vs_transformers": results["transformers_sdpa"]["decode_step_s"] / hyd["decode_step_s"],
        "outputs_match": all(results[k]["sequences_matching_transformers"] == batch for k in ("shared", "per_sequence")),
        "results": results,
    }
    label = {
        "shared": "Hydragen (`shared_prefix_decode`)",
        "per_sequence": "per-sequence copies (`sparse_decode`, all tokens)",
        "transformers_sdpa": "transformers batch cache (SDPA)",
    }
    rows = []
    for k in ("shared", "per_sequence", "transformers_sdpa"):
        r = results[k]
        match = "reference" if k == "transformers_sdpa" else f"{r['sequences_matching_transformers']}/{batch}"
        rows.append(
            [
                label[k],
                f"{1e3 * r['attention_per_step_s']:.1f} (x{r['attention_per_step_s'] / hyd['attention_per_step_s']:.2f})",
                f"{1e3 * r['decode_step_s']:.1f} (x{r['decode_step_s'] / hyd['decode_step_s']:.2f})",
                match,
            ]
        )
    md = [
        f"**(b) Shared prefix**: batch of {batch}, shared prefix {prefix_tokens} tokens, own suffix {n} tokens each, "
        f"{new_tokens} tokens generated (per decode step of the whole batch, all 30 layers; x = time / Hydragen's):",
        "",
        md_table(["decode attention", "attention ms/step", "whole step ms", "outputs equal to transformers'"], rows),
    ]
    return figures, "\n".join(md)


# -- (c) token policy -----------------------------------------------------------------------------------
def token_policy_figures(
    model, tok, prompts, *, ratio: float = 0.5, scorer: str = "snapkv", answer_tokens: int = 8, progress=print, on_prompt=None
):
    """Pass-key accuracy with TokenPolicy drop / demote at ``ratio`` vs no eviction, as a user calls it:
    ``generate(model, context + question, policy=..., context_tokens=len(context))`` (the context
    compressed once, the question and the answer uncompressed), stopping at EOS. ``on_prompt(figures,
    markdown)`` gets the report so far after each prompt (a checkpoint)."""
    from kvtier.connectors.generate import generate
    from kvtier.connectors.hf_tokens import TokenPolicy

    rows = []
    for p in prompts:
        ctx, question = rm.split_context(tok, p)
        for name, policy in (
            ("none", TokenPolicy(scorer=scorer, ratio=0.0)),
            ("drop", TokenPolicy(scorer=scorer, ratio=ratio, mode="drop")),
            ("demote", TokenPolicy(scorer=scorer, ratio=ratio, mode="demote")),
        ):
            r = generate(model, ctx + question, tokenizer=tok, policy=policy, context_tokens=len(ctx), max_new_tokens=answer_tokens)
            kv = policy.last_kv
            rows.append(
                {
                    "tokens": len(ctx) + len(question),
                    "depth": p.depth,
                    "key": p.key,
                    "family": p.family,
                    "mode": name,
                    "answer": r.text,
                    "correct": correct(r.text, p.key),
                    "ttft_s": r.ttft_s,
                    "decode_s": r.decode_s,
                    "finish_reason": r.finish_reason,
                    "evicted": kv.stats.evicted_tokens,
                    "recalled": kv.stats.recalled_tokens,
                    "max_fast_tokens": max(max(kv.fast_tokens(i)) for i in range(kv.num_layers)),
                }
            )
            progress(
                f"  (c) {p.family} {rows[-1]['tokens']} tokens, depth {p.depth}, {name}: {r.text!r} "
                f"(ttft {r.ttft_s:.1f} s, {r.finish_reason})"
            )
        if on_prompt is not None:
            on_prompt(*token_policy_report(rows, scorer, ratio))
    return token_policy_report(rows, scorer, ratio)


def token_policy_report(rows, scorer: str, ratio: float) -> tuple[dict, str]:
    """``token_policy_figures``' figures and Markdown from its rows."""
    from kvtier.connectors.hf_tokens import TokenPolicy

    acc = {
        m: {"correct": sum(r["correct"] for r in rows if r["mode"] == m), "total": sum(r["mode"] == m for r in rows)}
        for m in ("none", "drop", "demote")
    }
    table = [
        [
            m if m == "none" else f"{m}, ratio {ratio}",
            f"{acc[m]['correct']}/{acc[m]['total']}",
            max(r["max_fast_tokens"] for r in rows if r["mode"] == m),
        ]
        for m in ("none", "drop", "demote")
    ]
    lens = sorted({r["tokens"] for r in rows})
    fams = sorted({r["family"] for r in rows})
    demote = TokenPolicy(scorer=scorer, ratio=ratio, mode="demote")
    md = [
        f"**(c) Token policy** (`generate(..., policy=TokenPolicy({scorer!r}, ratio={ratio}), context_tokens=len(context))`: the "
        f"context compressed once, the question and answer uncompressed; demote recall {demote.recall_budget} tokens per KV head and "
        f"query through `{demote.recall_selector}`), prompts of {', '.join(map(str, lens))} tokens, families {', '.join(fams)}:",
        "",
        md_table(["eviction", "pass-key correct", "max fast-tier tokens per head"], table),
    ]
    if len(fams) > 1:
        header, ft = family_table(rows, "mode", ("none", "drop", "demote"))
        md += ["", "Per family (filler/wording):", "", md_table(header, ft)]
    return {
        "scorer": scorer,
        "ratio": ratio,
        "recall_selector": demote.recall_selector,
        "recall_budget": demote.recall_budget,
        "accuracy": acc,
        "runs": rows,
    }, "\n".join(md)


# -- everything -----------------------------------------------------------------------------------------
def run_all(model, tok, *, quick: bool = False, progress=print):
    """(a), (b), (c) in one run: ``(figures, markdown)``."""
    diagonal = [(f, w) for i, f in enumerate(rm.FILLERS) for j, w in enumerate(rm.WORDINGS) if i == j]
    every = [(f, w) for f in rm.FILLERS for w in rm.WORDINGS]

    def suite(families, lengths, depths):
        return [p for f, w in families for p in rm.family_suite(tok, lengths=lengths, depths=depths, fillers=(f,), wordings=(w,))]

    if quick:
        lengths, depths, decode_tokens, repeats, prefix_tokens, new_tokens = (768,), (0.5,), 6, 2, 768, 4
        synthetic = ()
        prompts = suite(diagonal[:1], lengths, depths)
        policy_prompts = suite(diagonal[1:2], (320,), (0.5,))
        xo = dict(lengths=(1024,), selectors=("quest", "ann"), answer_tokens=8, repeats=3)
    else:
        lengths, depths, decode_tokens, repeats, prefix_tokens, new_tokens = (2048, 6144), (0.5,), 32, 3, 4096, 16
        synthetic = (16384, 32768)
        prompts = suite(every, lengths, depths)
        policy_prompts = suite(every, (1024,), (0.5,))
        xo = {}
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    t0 = time.time()
    fa, ma, kept = sparse_decode_figures(
        model,
        tok,
        prompts,
        decode_tokens=decode_tokens,
        repeats=repeats,
        progress=progress,
        synthetic_contexts=synthetic,
        keep_cache_of=longest,
    )
    prefix_tokens = min(prefix_tokens, len(kept[1].input_ids))
    fb, mb = shared_prefix_figures(model, tok, kept[0], prefix_tokens, new_tokens=new_tokens, progress=progress)
    del kept
    fc, mc = token_policy_figures(model, tok, policy_prompts, progress=progress)
    fx, mx = crossover_figures(model, progress=progress, **xo)
    figures = {"sparse_decode": fa, "crossover": fx, "shared_prefix": fb, "token_policy": fc, "seconds": time.time() - t0}
    return figures, "\n\n".join([ma, mx, mb, mc])


def summary_lines(figures: dict) -> list[str]:
    """The ratios of ``run_all``'s figures, one line each (printed at the end of a run)."""
    a, b = figures["sparse_decode"], figures["shared_prefix"]
    lines = [
        f"sparse decode vs full, {label} at {sp['context_tokens']}: x{sp['speedup_cpu']:.2f} tokens/s (CPU time), "
        f"x{sp['speedup_wall']:.2f} (wall), attention x{sp['attention_speedup']:.2f}"
        for label, sp in [("DynamicCache", a["speed"]["dynamic"]), ("StaticCache", a["speed"]["static"])]
        + [("random KV", x) for x in a["synthetic"]]
    ]
    lines.append(
        f"Hydragen attention x{b['attention_speedup_vs_per_sequence']:.2f} vs per-sequence, "
        f"x{b['attention_speedup_vs_transformers']:.2f} vs transformers SDPA; whole step "
        f"x{b['step_speedup_vs_transformers']:.2f} vs transformers; outputs match: {b['outputs_match']}"
    )
    return lines


def render_crossover(fx: dict, out: str | None) -> str:
    """Write bench/results/e2e_attn_crossover.{json,md} from a crossover run's figures; returns the Markdown."""
    figures, md = crossover_report(
        fx["rows"], answer_tokens=fx.get("answer_tokens", 32), budget=fx.get("budget", BUDGET), repeats=fx["rows"][0]["repeats"]
    )
    keep = ("command", "threads", "seconds", "load_average", "layer_costs", "machine", "date")
    figures.update({k: fx[k] for k in keep if k in fx})
    la = fx.get("load_average") or []
    md = (
        f"## bench/e2e_attn.py --crossover\n\nSmolLM2-135M-Instruct, CPU, {fx.get('threads', 1)} torch thread(s). Command: "
        f"`{fx.get('command', 'python bench/e2e_attn.py --crossover')}` ({fx.get('seconds', 0):.0f} s"
        + (f"; 1-min load average {la[0][0]:.1f} at the start, {la[-1][0]:.1f} at the end" if la else "")
        + f").\n\n{layer_costs_markdown(fx['layer_costs'])}\n\n{md}"
    )
    save_results("e2e_attn_crossover", figures, md, out)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (768-token prompt and prefix, one 320-token policy prompt); writes bench/results/e2e_attn_quick.*",
    )
    ap.add_argument("--out", help="also write the figures as JSON to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--crossover", action="store_true", help="only the crossover table (a2); writes bench/results/e2e_attn_crossover.*")
    ap.add_argument(
        "--accuracy",
        action="store_true",
        help="only the pass-key accuracy of (a), every selector, and (c), on the nine prompt families (no timing: run it niced "
        "beside other work); writes bench/results/e2e_attn_accuracy.*",
    )
    ap.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        help="with --crossover: context lengths (default 1024 2048 6144 16384 32768); with --accuracy: prompt lengths (default 2048)",
    )
    ap.add_argument("--depths", type=float, nargs="+", help="with --accuracy: needle depths (default 0.5)")
    ap.add_argument("--selectors", nargs="+", help="with --crossover or --accuracy: selectors (default quest ann topk_exact)")
    ap.add_argument("--rounds", type=int, default=5, help="with --crossover: alternated rounds per length (default 5)")
    ap.add_argument(
        "--render-crossover",
        metavar="JSON",
        help="measure nothing: redraw bench/results/e2e_attn_crossover.md from a saved --crossover run (its JSON)",
    )
    args = ap.parse_args()
    if args.render_crossover:
        import json

        with open(args.render_crossover) as f:
            saved = json.load(f)
        if "rows" not in saved or "layer_costs" not in saved:
            ap.error(f"{args.render_crossover} is not a saved bench/e2e_attn.py --crossover run")
        render_crossover(saved, args.out)
        return
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    command = "python " + " ".join(["bench/e2e_attn.py", *sys.argv[1:]])
    load0 = os.getloadavg()
    model, tok = rm.load_model()
    if args.accuracy:
        every = [(f, w) for f in rm.FILLERS for w in rm.WORDINGS]
        lengths, depths = tuple(args.lengths or (2048,)), tuple(args.depths or (0.5,))
        prompts = [p for f, w in every for p in rm.family_suite(tok, lengths=lengths, depths=depths, fillers=(f,), wordings=(w,))]
        policy_prompts = [p for f, w in every for p in rm.family_suite(tok, lengths=(1024,), depths=(0.5,), fillers=(f,), wordings=(w,))]
        log = lambda s: print(s, flush=True)  # noqa: E731
        parts: dict[str, tuple[dict, str]] = {}

        def save(partial: bool) -> str:
            seconds, la = time.time() - t0, os.getloadavg()
            figures = {"command": command, "partial": partial, "threads": args.threads, "seconds": seconds, "load_average": [load0, la]}
            figures.update({k: f for k, (f, _) in parts.items()})
            md = (
                f"## bench/e2e_attn.py --accuracy{' (partial: stopped early)' if partial else ''}\n\nSmolLM2-135M-Instruct, CPU. "
                f"Command: `{command}` ({args.threads} torch thread(s), {seconds:.0f} s; 1-min load average {load0[0]:.1f} at the "
                f"start, {la[0]:.1f} at the end).\n\n" + "\n\n".join(m for _, m in parts.values())
            )
            save_results("e2e_attn_accuracy", figures, md, args.out)
            return md

        def checkpoint(part: str):
            def on_prompt(f: dict, m: str) -> None:
                parts[part] = (f, m)
                save(partial=True)

            return on_prompt

        selectors = tuple(args.selectors or ACCURACY_SELECTORS)
        parts["sparse_decode"] = selector_accuracy_figures(
            model, tok, prompts, selectors=selectors, progress=log, on_prompt=checkpoint("sparse_decode")
        )
        parts["token_policy"] = token_policy_figures(model, tok, policy_prompts, progress=log, on_prompt=checkpoint("token_policy"))
        print(save(partial=False))
        return
    if args.crossover:
        lengths = tuple(args.lengths or CROSSOVER_LENGTHS)
        fl, ml = layer_costs(model, lengths=lengths)
        print(ml, flush=True)
        fx, _ = crossover_figures(
            model,
            lengths=lengths,
            selectors=tuple(args.selectors or CROSSOVER_SELECTORS),
            repeats=args.rounds,
            progress=lambda s: print(s, flush=True),
        )
        fx.update({"command": command, "threads": args.threads, "seconds": time.time() - t0, "load_average": [load0, os.getloadavg()]})
        fx["layer_costs"] = fl
        print(render_crossover(fx, args.out))
        return
    figures, md = run_all(model, tok, quick=args.quick, progress=lambda s: print(s, flush=True))
    la = os.getloadavg()
    figures.update({"quick": args.quick, "threads": args.threads, "command": command, "load_average": [load0, la]})
    name = "e2e_attn_quick" if args.quick else "e2e_attn"
    head = (
        f"## bench/e2e_attn.py{' --quick' if args.quick else ''}\n\nSmolLM2-135M-Instruct, CPU, {args.threads} torch thread(s). "
        f"Command: `{command}` (1-min load average {load0[0]:.1f} at the start, {la[0]:.1f} at the end).\n\n"
    )
    save_results(name, figures, head + md, args.out)
    print(md)
    print()
    for line in summary_lines(figures):
        print(line)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
