"""generate() on the reference model, as a user calls it: a token policy that compresses the
context only (``context_tokens``), stop at EOS under every policy, honest timings.

Slow (loads SmolLM2-135M-Instruct: ~8 s from the cached safetensors copy; 1K-token prompts).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("transformers", reason="the reference model needs transformers (make setup installs it)")
    from bench import refmodel

    torch.set_num_threads(2)
    model, tok = refmodel.load_model()
    return refmodel, model, tok


def test_context_only_compression_answers_and_stops_at_eos(ref):
    from kvtier.connectors.generate import generate
    from kvtier.connectors.hf_tokens import TokenPolicy

    refmodel, model, tok = ref
    p = refmodel.family_prompt(tok, 768, 0.5, seed=11, filler="grammar", wording="vault")  # not the original family
    ctx, question = refmodel.split_context(tok, p)
    ids = ctx + question
    eos = model.generation_config.eos_token_id
    plain = generate(model, ids, tokenizer=tok, max_new_tokens=24)
    assert plain.text.strip().startswith(p.key)
    assert plain.finish_reason == "stop" and plain.token_ids[-1] in ([eos] if isinstance(eos, int) else eos)
    # nothing evicted: the same tokens, the same stop
    keep_all = generate(model, ids, tokenizer=tok, max_new_tokens=24, policy=TokenPolicy("snapkv", ratio=0.0), context_tokens=len(ctx))
    assert keep_all.token_ids == plain.token_ids and keep_all.finish_reason == "stop"
    # half of the context evicted, once; the question and the answer never. (Whether the key survives
    # is bench/fidelity.py's measure, not this test's: SnapKV at 0.5 answers " 1313." here.)
    policy = TokenPolicy("snapkv", ratio=0.5)
    r = generate(model, ids, tokenizer=tok, max_new_tokens=24, policy=policy, context_tokens=len(ctx))
    assert r.finish_reason == "stop" and r.token_ids[-1] == plain.token_ids[-1] and len(r.token_ids) < 24
    kv = policy.last_kv
    for layer in (0, 29):
        pos = kv.fast_positions(layer, 0)
        assert int((pos < len(ctx)).sum()) == len(ctx) - len(ctx) // 2
        assert pos[pos >= len(ctx)].tolist() == list(range(len(ctx), len(ids) + len(r.token_ids) - 1))
    # timings: the first token after the prefill and the compression, decode after it
    assert 0 < r.ttft_s < r.total_s and r.decode_s == pytest.approx(r.total_s - r.ttft_s, abs=0.05)
    assert r.decode_tokens_per_s == pytest.approx((len(r.token_ids) - 1) / r.decode_s)
