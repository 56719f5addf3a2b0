"""The reference model's converted folder carries SmolLM2's own tokenizer settings (``kvtier.refmodel``)."""

from __future__ import annotations

import json

import pytest

from kvtier import refmodel


def test_fix_tokenizer_config_replaces_the_gguf_readers_settings_and_keeps_the_chat_template(tmp_path):
    # what transformers' GGUF reader writes for SmolLM2 (transformers >= 5.1x obeys the class: spaces become token 0)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CodeLlamaTokenizer",
                "eos_token": "<|im_start|>",
                "bos_token": "<|im_start|>",
                "fill_token": "<FILL_ME>",
                "chat_template": "{{ messages }}",
            }
        )
    )
    refmodel.fix_tokenizer_config(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg == {**refmodel.TOKENIZER_CONFIG, "chat_template": "{{ messages }}"}
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["eos_token"] == "<|im_end|>"
    before = (tmp_path / "tokenizer_config.json").stat().st_mtime_ns
    refmodel.fix_tokenizer_config(tmp_path)  # idempotent: nothing rewritten
    assert (tmp_path / "tokenizer_config.json").stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.skipif(not refmodel.is_installed(), reason="reference model not installed (make setup installs it)")
def test_converted_tokenizer_round_trips_text_and_stops_on_im_end():
    tok = refmodel.load_tokenizer()
    text = "The pass key is 12345. Remember it."
    ids = tok(text, add_special_tokens=False).input_ids
    assert 0 not in ids  # no space turned into <|endoftext|>
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
