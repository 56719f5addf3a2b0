"""``kvtier demo``: its session (document, questions, turns through kvtier) on the reference tokenizer and a tiny
random Llama, the option checks, and one end-to-end run on the reference model (slow)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvtier.kvstore import HostTier, KVSpec, TieredStore  # noqa: E402
from kvtier.service import cli  # noqa: E402
from kvtier.service.client import KVTierClient  # noqa: E402
from kvtier import demo, refmodel  # noqa: E402

needs_refmodel = pytest.mark.skipif(not refmodel.is_installed(), reason="reference model not installed (make setup installs it)")


@pytest.fixture(scope="module")
def tokenizer():
    if not refmodel.is_installed():
        pytest.skip("reference model not installed (make setup installs it)")
    return refmodel.load_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A random 2-layer Llama over the reference tokenizer's vocabulary, and its spec (blocks of 64 tokens)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(cfg).eval(), KVSpec("demo-tiny", 2, 2, 16, "float16", 64)


def test_session_shares_the_document_and_hides_one_key_per_turn(tokenizer):
    s = demo.build_session(tokenizer, 600, 3)
    assert 450 <= len(s.document_ids) <= 600 and len(s.questions) == len(s.answers) == 3
    text = tokenizer.decode(s.document_ids)
    for key, question in zip(s.answers, s.questions):
        assert text.count(key) == 2 and question.endswith("room is")
    prompts = [s.prompt_ids(tokenizer, i) for i in range(3)]
    assert all(p[: len(s.document_ids)] == s.document_ids for p in prompts) and prompts[0] != prompts[1]
    assert demo.build_session(tokenizer, 600, 3) == s  # deterministic
    for tokens, turns in ((100, 2), (600, 0), (600, 9), (10**6, 2)):
        with pytest.raises(ValueError):
            demo.build_session(tokenizer, tokens, turns)


def test_turns_after_the_first_load_the_document(tokenizer, tiny):
    model, spec = tiny
    session = demo.build_session(tokenizer, 600, 3)
    store = TieredStore([HostTier(1 << 26)])
    try:
        turns = demo.run_session(model, tokenizer, session, store=store, spec=spec, max_new_tokens=3, progress=False)
    finally:
        store.close()
    n_doc = len(session.document_ids) // 64 * 64
    assert [t.result.num_cached_tokens for t in turns] == [0, n_doc, n_doc]
    assert [t.result.tier_hits.get("host", 0) for t in turns] == [0, n_doc // 64, n_doc // 64]
    assert demo.cold_ttft(turns) == turns[0].result.ttft_s
    table = demo.render(turns, ["host"])
    assert "cached / prompt" in table and "host hits" in table and "host MiB" in table
    assert "without the cached prefix" in table and "x faster" in table
    rows = table.splitlines()[2:5]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    assert " cold " in rows[0] and " cold " not in rows[1] + rows[2] and "x " in rows[1]


def test_the_demo_session_through_the_service(tokenizer, tiny, open_server):
    model, spec = tiny
    session = demo.build_session(tokenizer, 400, 2, seed=1)
    with KVTierClient(open_server.url) as client:
        turns = demo.run_session(model, tokenizer, session, client=client, spec=spec, max_new_tokens=2, progress=False, baseline=True)
    assert turns[0].result.num_cached_tokens == 0 and turns[1].result.num_cached_tokens == len(session.document_ids) // 64 * 64
    assert all(t.baseline_ttft_s is not None for t in turns)
    assert "no cache s" in demo.render(turns, list(turns[1].result.tier_hits))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "100"], "--tokens"),
        (["--turns", "0"], "--turns"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--threads", "0"], "--threads"),
        (["--block-tokens", "24"], "--block-tokens"),
    ],
)
def test_bad_options_exit_2_before_loading_anything(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(refmodel, "load_model", lambda: pytest.fail("the model must not load for bad options"))
    assert cli.main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@needs_refmodel
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed")
def test_kvtier_demo_on_the_reference_model(capsys, tmp_path):
    assert cli.main(["demo", "--tokens", "600", "--turns", "2", "--max-new-tokens", "4", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "without the cached prefix" in out and "device hits" in out and "disk MiB" in out
    rows = [line.split() for line in out.splitlines() if line[:2] in ("1 ", "2 ")]
    assert rows[0][1] == "0" and rows[1][1] == "512"  # turn 2 loads the document's two full blocks
