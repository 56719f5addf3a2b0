"""Token eviction on the reference model: demote mode keeps the pass key that drop mode may lose.

Slow (loads SmolLM2-135M-Instruct: ~8 s from the cached safetensors copy, ~30 s the first time).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    pytest.importorskip("transformers", reason="the reference model needs transformers (make setup installs it)")
    from bench import fidelity, refmodel

    torch.set_num_threads(2)
    model, tok = refmodel.load_model()
    return fidelity, refmodel, model, tok


def test_demote_at_half_ratio_answers_the_pass_key(harness):
    fidelity, refmodel, model, tok = harness
    prompt = refmodel.passkey_prompt(tok, 1024, 0.5, seed=3)
    ctx, question = fidelity.split_prompt(tok, prompt)
    cap = fidelity.Captured(model, torch.tensor(ctx))
    kv = fidelity.make_kv(model, cap, scorer="snapkv", ratio=0.5, mode="demote", recall_budget=64)
    # half of the context is off the fast tier, in every layer and head, and nothing is lost
    for layer in (0, 29):
        for head in range(3):
            assert kv.fast_tokens(layer)[head] + kv.demoted_tokens(layer)[head] == cap.num_tokens
            assert kv.fast_tokens(layer)[head] == cap.num_tokens - cap.num_tokens // 2
    answer = fidelity.answer_with_kv(model, tok, kv, question, cap.num_tokens)
    assert fidelity.correct(answer, prompt.key), answer
    assert kv.stats.recalled_tokens > 0
    # and the uncompressed run through the same glue agrees with the model's own attention
    full = fidelity.make_kv(model, cap, scorer=None, ratio=0.0, mode="drop", recall_budget=64)
    assert fidelity.answer_with_kv(model, tok, full, question, cap.num_tokens).strip().startswith(prompt.key)
