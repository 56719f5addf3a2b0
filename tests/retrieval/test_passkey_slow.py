"""The reference model answers a ~2K-token pass-key prompt with Quest at budget 256 as with full attention.

Every decode step attends only the tokens Quest selects per layer and KV head (through the
benchmark's exact gather-softmax stand-in for ``sparse_attn.sparse_decode``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
refmodel = pytest.importorskip("bench.refmodel")  # lands with the codecs branch


@pytest.mark.slow
def test_quest_256_passkey_matches_full_attention():
    from bench.retrieval import _selector_attention, greedy_answer, make_selector
    from bench.model_queries import attention_override

    torch.set_num_threads(1)
    model, tok = refmodel.load_model()
    prompt = refmodel.passkey_prompt(tok, 2048, 0.5, seed=11)
    state = refmodel.prefill(model, prompt.input_ids, chunk_tokens=2048)
    T0 = state.cache.get_seq_length()
    full = tok.decode(greedy_answer(model, tok, state, 6))
    state.cache.crop(T0)
    with attention_override(_selector_attention(make_selector("quest", {}), T0, 256, {})):
        sparse = tok.decode(greedy_answer(model, tok, state, 6))
    assert prompt.key in full
    assert sparse == full
