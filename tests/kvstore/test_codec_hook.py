"""The benchmarks' codec hook (``bench.refmodel.codec_hook``) on a fake growing cache: every
completed block goes through the codec once, from its exact values (no error compounding across
chunks), the first block keeps its sink tokens and the tail block its residual window, and the
former tail is stored again without its residual once a later block completes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench import refmodel
from kvtier.kvstore import KVSpec
from kvtier.kvstore.codecs import get_codec
from kvtier.kvstore.codecs.kivi import KiviCodec

L, H, D, BT = 2, 2, 16, 32
MODEL = SimpleNamespace(
    config=SimpleNamespace(num_hidden_layers=L, num_key_value_heads=H, head_dim=D, hidden_size=64, num_attention_heads=4)
)
SPEC = KVSpec(refmodel.MODEL_ID, L, H, D, "float16", BT)


class FakeCache:
    """What ``CacheView`` reads of a transformers cache: ``layers`` with ``keys``/``values``
    ``[1, H, T, D]`` and ``get_seq_length()``."""

    def __init__(self) -> None:
        self.layers = [SimpleNamespace(keys=torch.zeros(1, H, 0, D), values=torch.zeros(1, H, 0, D)) for _ in range(L)]

    def get_seq_length(self) -> int:
        return self.layers[0].keys.shape[2]

    def append(self, kv: torch.Tensor) -> None:  # kv [L, 2, H, n, D]
        for i, lay in enumerate(self.layers):
            lay.keys = torch.cat((lay.keys, kv[i, 0][None]), dim=2)
            lay.values = torch.cat((lay.values, kv[i, 1][None]), dim=2)


def expected(codec, exact: torch.Tensor, total: int, sink: int, residual: int) -> torch.Tensor:
    """The cache after ``total`` tokens: complete blocks round-tripped once (block 0 with its
    sinks, the tail block with its residual), the partial block as it came."""
    want = exact[:, :, :, :total].clone()
    last = total // BT
    for b in range(last):
        options = {}
        if b == 0 and sink:
            options["sink_tokens"] = sink
        if b == last - 1 and residual:
            options["residual_tokens"] = residual
        c = codec.replace(**options) if options else codec
        block = exact[:, :, :, b * BT : (b + 1) * BT].half()
        want[:, :, :, b * BT : (b + 1) * BT] = c.decode(*c.encode(block, SPEC), SPEC).float()
    return want


@pytest.mark.parametrize("chunk", [BT, 24, 2 * BT])
@pytest.mark.parametrize("sink, residual", [(0, 0), (4, 0), (0, 8), (4, 8)])
def test_each_block_is_quantized_once_with_its_sinks_and_residual(chunk, sink, residual):
    codec = KiviCodec(2, group_size=8)  # 2 bits: any second round trip would show
    g = torch.Generator().manual_seed(chunk + sink + residual)
    exact = torch.randn(L, 2, H, 4 * BT + 10, D, generator=g).half().float()  # what the "model" computes
    cache = FakeCache()
    view = refmodel.CacheView(cache)
    hook = refmodel.codec_hook(codec, MODEL, block_tokens=BT, sink_tokens=sink, residual_tokens=residual)
    for start in range(0, exact.shape[3], chunk):
        new = exact[:, :, :, start : start + chunk]
        cache.append(new)
        hook(view, new.shape[3])
        total = view.num_tokens
        assert torch.equal(view.read(), expected(codec, exact, total, sink, residual)), (start, total)
    # a new sequence through the same hook starts afresh (no tail left from the last one)
    cache = FakeCache()
    view = refmodel.CacheView(cache)
    cache.append(exact[:, :, :, :BT])
    hook(view, BT)
    assert torch.equal(view.read(), expected(codec, exact, BT, sink, residual))


def test_sinks_and_residual_need_a_kivi_codec():
    with pytest.raises(ValueError, match="kivi codec"):
        refmodel.codec_hook(get_codec("int8"), MODEL, block_tokens=BT, sink_tokens=4)
    refmodel.codec_hook(get_codec("int8"), MODEL, block_tokens=BT)  # plain round trips: any codec
