"""The vLLM KV connector against a fake of vLLM's engine side that follows the documented call order.

vLLM cannot run here. ``FakeEngine`` plays its part: a scheduler that calls
``get_num_new_matched_tokens -> update_state_after_alloc -> build_connector_meta`` and
``request_finished``, and a worker that runs ``bind_connector_metadata -> start_load_kv -> per layer
wait_for_layer_load / (attention writes the step's KV) / save_kv_layer -> wait_for_save ->
get_finished -> clear_connector_metadata`` over a paged KV buffer (noise-filled, random block
tables). The fake model's KV of a token depends on the whole prefix, so a wrong or missing load
shows as a mismatch.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from kvtier.kvstore import HostTier, KVSpec, Namespace, TierConfig, TieredStore, chain_hashes
from kvtier.connectors.vllm import (
    KVConnectorRole,
    KVTierConnector,
    KVTierConnectorMetadata,
    blocks_to_paged,
    gather_layer,
    paged_to_blocks,
    paged_view,
    register_inprocess_store,
)

from .server import ROOT

L, H, D, P, BT = 2, 2, 8, 16, 64  # layers, KV heads, head dim, vLLM block size, kvtier block_tokens (r = 4)
DTYPE = torch.float16


# -- vLLM's objects, as far as the connector reads them -------------------------------------------
class FakeModelConfig:
    def __init__(self, model: str, dtype=DTYPE) -> None:
        self.model, self.dtype = model, dtype

    def get_num_layers(self, parallel_config) -> int:
        return L

    def get_num_kv_heads(self, parallel_config) -> int:
        return H

    def get_head_size(self) -> int:
        return D


def fake_vllm_config(extra: dict, *, model: str, block_size: int = P, kv_role: str = "kv_both", tp: int = 1):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.connectors.vllm",
            kv_role=kv_role,
            kv_connector_extra_config=extra,
        ),
        cache_config=SimpleNamespace(block_size=block_size, cache_dtype="auto"),
        model_config=FakeModelConfig(model),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1),
    )


@dataclass
class FakeRequest:  # vllm.v1.request.Request
    request_id: str
    prompt_token_ids: list[int]
    cache_salt: str | None = None
    lora_request: Any = None
    mm_features: list = field(default_factory=list)
    prompt_embeds: Any = None
    num_computed_tokens: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)


@dataclass
class FakeBlocks:  # vllm.v1.core.kv_cache_manager.KVCacheBlocks
    ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (list(self.ids),)


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int
    lora_request: Any = None


@dataclass
class CachedRequestData:
    req_ids: list[str] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    new_token_ids: list[list[int]] = field(default_factory=list)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    finished_req_ids: set[str]


# -- the fake model and engine ------------------------------------------------------------------
def reference_kv(tokens: list[int]) -> torch.Tensor:
    """The fake model's KV ``[L, 2, H, T, D]``: position t depends on every token up to t."""
    h, acc = [], 7
    for tok in tokens:
        acc = (acc * 1_000_003 + int(tok) + 1) % 2_147_483_629
        h.append(acc % 10_007)
    t = torch.tensor(h, dtype=torch.float64).view(1, 1, 1, -1, 1)
    idx = torch.arange(L * 2 * H * D, dtype=torch.float64).view(L, 2, H, 1, D)
    return torch.sin(t * 0.013 + idx * 0.7).to(DTYPE)


def kvtier_blocks(tokens: list[int], n: int) -> torch.Tensor:
    """The first n kvtier blocks ``[n, L, 2, H, BT, D]`` of the reference KV."""
    ref = reference_kv(tokens)
    return torch.stack([ref[:, :, :, b * BT : (b + 1) * BT] for b in range(n)])


class FakeEngine:
    """One vLLM instance: a scheduler-side and a worker-side connector, and a paged KV buffer."""

    def __init__(
        self,
        extra: dict,
        *,
        model: str,
        num_blocks: int = 96,
        seed: int = 0,
        layout: str = "kv_first",
        kv_role: str = "kv_both",
        device: str = "cpu",
    ) -> None:
        # this fake runs vLLM's synchronous path; the asynchronous one is tested in the real engine (test_vllm_engine.py)
        cfg = fake_vllm_config({"async_loads": False, "async_saves": False, **extra}, model=model, kv_role=kv_role)
        self.scheduler = KVTierConnector(cfg, KVConnectorRole.SCHEDULER)
        self.worker = KVTierConnector(cfg, KVConnectorRole.WORKER)
        g = torch.Generator().manual_seed(seed)
        shape = (2, num_blocks, P, H, D) if layout == "kv_first" else (num_blocks, 2, P, H, D)
        # noise: a slot that nobody wrote never equals the reference
        self.kv = {f"model.layers.{l}.self_attn.attn": torch.randn(shape, generator=g).to(device, DTYPE) for l in range(L)}
        self.layout = layout
        self.worker.register_kv_caches(self.kv)
        self.free = torch.randperm(num_blocks, generator=g).tolist()  # random block tables
        self.tables: dict[str, list[int]] = {}
        self.computed: dict[str, list[int]] = {}  # positions the fake model computed, per request
        self.finished: set[str] = set()
        self.metas: list[KVTierConnectorMetadata] = []
        self.load_errors: set[int] = set()
        self.calls_save_kv_layer = True  # False: as when vLLM replays a CUDA graph, which skips the per-layer hooks

    def view(self, name: str) -> torch.Tensor:
        return paged_view(self.kv[name], self.layout)  # [2, N, P, H, D]

    def run(self, req: FakeRequest, *, chunk: int = 1 << 30, decode_steps: int = 0, local: tuple[int, list[int]] = (0, [])) -> int:
        """Schedule ``req`` alone until its prompt (in chunks) and ``decode_steps`` tokens are computed; finish it.

        ``local``: tokens and blocks vLLM's own prefix cache already holds. Returns the external
        tokens the connector matched.
        """
        rid = req.request_id
        num_local, table = local[0], list(local[1])
        ext, load_async = self.scheduler.get_num_new_matched_tokens(req, num_local)
        while ext is None:  # a service lookup in flight: vLLM asks again on a later step
            time.sleep(0.005)
            ext, load_async = self.scheduler.get_num_new_matched_tokens(req, num_local)
        assert load_async is False
        num_computed = num_local + ext
        first = True
        while True:
            n = min(chunk, len(req.all_token_ids) - num_computed)
            new_ids = [self.free.pop() for _ in range(max(0, -(-(num_computed + n) // P) - len(table)))]
            table += new_ids
            if first:
                self.scheduler.update_state_after_alloc(req, FakeBlocks(table), ext)
                out = SchedulerOutput(
                    [NewRequestData(rid, list(req.prompt_token_ids), (list(table),), num_computed)],
                    CachedRequestData(),
                    {rid: n},
                    self.finished,
                )
            else:
                cached = CachedRequestData([rid], set(), [], [(new_ids,) if new_ids else None], [num_computed])
                out = SchedulerOutput([], cached, {rid: n}, self.finished)
            self.finished = set()
            meta = self.scheduler.build_connector_meta(out)
            self.metas.append(meta)
            self.forward(meta, rid, table, num_computed, n, list(req.all_token_ids))
            num_computed += n
            req.num_computed_tokens = num_computed
            first = False
            if num_computed == len(req.all_token_ids):
                if decode_steps == 0:
                    break
                decode_steps -= 1
                req.all_token_ids.append((num_computed * 7919 + 13) % 50_000)  # the "sampled" token
        assert self.scheduler.request_finished(req, table) == (False, None)
        self.finished.add(rid)
        self.tables[rid] = table
        return ext

    def forward(self, meta, rid: str, table: list[int], start: int, n: int, tokens: list[int]) -> None:
        w = self.worker
        w.bind_connector_metadata(meta)
        w.start_load_kv(SimpleNamespace(attn_metadata=None))
        dev = next(iter(self.kv.values())).device
        ref = reference_kv(tokens[: start + n]).to(dev)
        pos = torch.arange(start, start + n)
        bids, offs = torch.tensor(table)[pos // P].to(dev), (pos % P).to(dev)
        for l, name in enumerate(self.kv):
            w.wait_for_layer_load(name)
            self.view(name)[:, bids, offs] = ref[l, :, :, start : start + n].permute(0, 2, 1, 3)  # attention writes [2, n, H, D]
            if self.calls_save_kv_layer:
                w.save_kv_layer(name, self.kv[name], None)
        w.wait_for_save()
        assert w.get_finished(set()) == (None, None)
        self.load_errors |= w.get_block_ids_with_load_errors()
        w.clear_connector_metadata()
        self.computed.setdefault(rid, []).extend(range(start, start + n))

    def paged_kv(self, rid: str, num_tokens: int) -> torch.Tensor:
        """The request's KV ``[L, 2, H, T, D]`` read from the paged buffer through its block table."""
        dev = next(iter(self.kv.values())).device
        pos = torch.arange(num_tokens)
        bids, offs = torch.tensor(self.tables[rid])[pos // P].to(dev), (pos % P).to(dev)
        return torch.stack([self.view(name)[:, bids, offs].permute(0, 2, 1, 3) for name in self.kv]).cpu()


def tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


def new_store(num_blocks: int = 64) -> TieredStore:
    spec = KVSpec("x", L, H, D, "float16", BT)
    return TieredStore([TierConfig(HostTier(num_blocks * spec.block_nbytes), high_watermark=1.0, low_watermark=1.0)])


@pytest.fixture
def inprocess():
    """A fresh store registered under a fresh name; (extra config, store, model id)."""
    name = "test-" + uuid.uuid4().hex[:8]
    store = new_store()
    register_inprocess_store(name, store)
    return {"url": f"inprocess://{name}", "block_tokens": BT, "namespace": "team-a"}, store, "model-" + name


def spec_of(model: str) -> KVSpec:
    return KVSpec(model, L, H, D, "float16", BT)


# -- layout conversion ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["kv_first", "blocks_first"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_paged_layout_roundtrip_is_exact(layout, dtype):
    g = torch.Generator().manual_seed(1)
    N, r, n = 40, BT // P, 5
    shape = (2, N, P, H, D) if layout == "kv_first" else (N, 2, P, H, D)
    layers = [torch.randn(shape, generator=g).to(dtype) for _ in range(L)]
    ids = torch.randperm(N, generator=g)[: n * r].view(n, r)
    blocks = paged_to_blocks(layers, ids, layout)
    assert blocks.shape == (n, L, 2, H, BT, D) and blocks.dtype == dtype
    # token t of kvtier block i is slot t % P of vLLM block ids[i, t // P]
    for i in range(n):
        for t in (0, P - 1, P, BT - 1):
            for l in range(L):
                exp = paged_view(layers[l], layout)[:, ids[i, t // P], t % P]  # [2, H, D]
                assert torch.equal(blocks[i, l, :, :, t], exp)
    fresh = [torch.zeros(shape, dtype=dtype) for _ in range(L)]
    blocks_to_paged(blocks, fresh, ids, layout)
    assert torch.equal(paged_to_blocks(fresh, ids, layout), blocks)  # gather(scatter(x)) == x
    for l in range(L):  # scatter(gather(paged)) == paged on those blocks, untouched elsewhere
        v, w = paged_view(layers[l], layout), paged_view(fresh[l], layout)
        assert torch.equal(w[:, ids.reshape(-1)], v[:, ids.reshape(-1)])
        rest = torch.ones(N, dtype=torch.bool)
        rest[ids.reshape(-1)] = False
        assert not w[:, rest].any()
    skip = ids.clone()
    skip[0, :2] = -1  # a load that leaves vLLM's own first two blocks alone
    again = [torch.zeros(shape, dtype=dtype) for _ in range(L)]
    blocks_to_paged(blocks, again, skip, layout)
    for l in range(L):
        w = paged_view(again[l], layout)
        assert not w[:, ids[0, :2]].any() and torch.equal(w[:, ids[0, 2:]], paged_view(layers[l], layout)[:, ids[0, 2:]])


# -- configuration ----------------------------------------------------------------------------------
def test_block_size_must_divide_block_tokens(inprocess):
    extra, _, model = inprocess
    with pytest.raises(ValueError, match=r"block_tokens=64 is not a multiple of vLLM block_size=48"):
        KVTierConnector(fake_vllm_config(extra, model=model, block_size=48), KVConnectorRole.SCHEDULER)
    with pytest.raises(ValueError, match=r"block_tokens=40 is not a multiple of vLLM block_size=16"):
        KVTierConnector(fake_vllm_config({**extra, "block_tokens": 40}, model=model), KVConnectorRole.WORKER)
    ok = KVTierConnector(fake_vllm_config({**extra, "block_tokens": 32}, model=model, block_size=32), KVConnectorRole.WORKER)
    assert ok.blocks_per_kvtier_block == 1


def test_bad_configuration_is_a_clear_value_error(inprocess):
    extra, _, model = inprocess
    with pytest.raises(ValueError, match=r"unknown kv_connector_extra_config keys \['blocktokens'\]"):
        KVTierConnector(fake_vllm_config({**extra, "blocktokens": 64}, model=model), KVConnectorRole.SCHEDULER)
    with pytest.raises(ValueError, match="url must be"):
        KVTierConnector(fake_vllm_config({**extra, "url": "redis://x"}, model=model), KVConnectorRole.SCHEDULER)
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        KVTierConnector(fake_vllm_config(extra, model=model, tp=2), KVConnectorRole.SCHEDULER)
    w = KVTierConnector(fake_vllm_config(extra, model=model), KVConnectorRole.WORKER)
    with pytest.raises(ValueError, match="spec has 2 layers"):
        w.register_kv_caches({"a": torch.zeros(2, 4, P, H, D, dtype=DTYPE)})
    with pytest.raises(ValueError, match="H_kv=2"):
        w.register_kv_caches({str(l): torch.zeros(2, 4, P, H + 1, D, dtype=DTYPE) for l in range(L)})
    with pytest.raises(ValueError, match="dtype float16"):
        w.register_kv_caches({str(l): torch.zeros(2, 4, P, H, D) for l in range(L)})
    with pytest.raises(ValueError, match="paged_layout"):
        w.register_kv_caches({str(l): torch.zeros(2, 2, P, H, D, dtype=DTYPE) for l in range(L)})


# -- end to end through an in-process store ----------------------------------------------------------
def test_second_request_loads_the_first_ones_prefix(inprocess):
    extra, store, model = inprocess
    eng = FakeEngine(extra, model=model)
    prompt1 = tokens(4 * BT + 40, seed=1)  # 4 full kvtier blocks and a partial one
    assert eng.run(FakeRequest("r1", prompt1), chunk=100, decode_steps=30) == 0  # chunked prefill, then decode
    r1_tokens = prompt1 + [(n * 7919 + 13) % 50_000 for n in range(len(prompt1), len(prompt1) + 30)]
    T1 = len(prompt1) + 30  # 326 computed tokens: 5 full blocks (320), 6 tokens of a sixth
    assert torch.equal(eng.paged_kv("r1", T1), reference_kv(r1_tokens[:T1]))
    # exactly the full blocks were saved, under the chain of the request's tokens and namespace
    spec = spec_of(model)
    keys = chain_hashes(spec, r1_tokens[:T1], Namespace(extra_keys=("ns:team-a",)))
    assert len(keys) == 5 and store.lookup(spec, keys).num_blocks == 5
    assert eng.worker.stats["saved_blocks"] == 5
    got = torch.stack(store.get(spec, keys))
    assert torch.equal(got, kvtier_blocks(r1_tokens, 5))
    saves = [t for m in eng.metas for rt in m.requests for t in rt.saves]
    assert [t.key for t in saves] == keys  # each block saved once, in chain order
    assert all(len(t.block_ids) == BT // P for t in saves)

    # request 2: the same first 3 blocks and 10 tokens, then something else
    prompt2 = prompt1[: 3 * BT + 10] + tokens(50, seed=2)
    ext = eng.run(FakeRequest("r2", prompt2))
    assert ext == 3 * BT
    assert eng.computed["r2"] == list(range(3 * BT, len(prompt2)))  # the model computed only the rest
    loads = [t for rt in eng.metas[-1].requests for t in rt.loads]
    assert [t.key for t in loads] == keys[:3] and eng.worker.stats["loaded_blocks"] == 3
    assert list(loads[0].block_ids) == eng.tables["r2"][: BT // P]  # its own (random) blocks
    kv2 = eng.paged_kv("r2", len(prompt2))
    assert torch.equal(kv2, reference_kv(prompt2))
    assert torch.equal(kv2[:, :, :, : 3 * BT], eng.paged_kv("r1", 3 * BT))  # bit for bit request 1's prefix
    assert not eng.load_errors


@pytest.mark.gpu
def test_cuda_paged_buffers(inprocess):
    extra, _, model = inprocess
    for layerwise in (False, True):
        eng = FakeEngine({**extra, "layerwise": layerwise}, model=model, device="cuda", seed=int(layerwise))
        prompt = tokens(3 * BT + 7, seed=20)
        eng.run(FakeRequest("a", prompt), chunk=70)
        assert eng.run(FakeRequest("b", list(prompt))) == 3 * BT
        assert torch.equal(eng.paged_kv("b", len(prompt)), reference_kv(prompt))


def test_never_matches_the_whole_prompt(inprocess):
    extra, _, model = inprocess
    eng = FakeEngine(extra, model=model)
    prompt = tokens(3 * BT, seed=3)  # exactly 3 blocks
    eng.run(FakeRequest("a", prompt))
    assert eng.worker.stats["saved_blocks"] == 3
    ext = eng.run(FakeRequest("b", list(prompt)))
    assert ext == 2 * BT  # the third block would leave vLLM nothing to compute
    assert eng.computed["b"] == list(range(2 * BT, 3 * BT))
    assert torch.equal(eng.paged_kv("b", 3 * BT), reference_kv(prompt))
    short = eng.scheduler.get_num_new_matched_tokens(FakeRequest("c", prompt[:BT]), 0)
    assert short == (0, False)


def test_loads_only_what_vllm_has_not_computed(inprocess):
    extra, _, model = inprocess
    eng = FakeEngine(extra, model=model)
    prompt = tokens(3 * BT + 5, seed=4)
    eng.run(FakeRequest("a", prompt))
    # vLLM's own prefix cache holds request a's first 6 vLLM blocks (1.5 kvtier blocks): shared with b
    local_ids = eng.tables["a"][:6]
    before = [eng.view(n)[:, local_ids].clone() for n in eng.kv]
    ext = eng.run(FakeRequest("b", list(prompt)), local=(6 * P, local_ids))
    assert ext == 3 * BT - 6 * P
    loads = [t for rt in eng.metas[-1].requests for t in rt.loads]
    assert len(loads) == 2  # kvtier blocks 1 and 2; block 0 is all local
    table = eng.tables["b"]
    assert list(loads[0].block_ids) == [-1, -1] + table[6:8]  # the local half is left alone
    assert list(loads[1].block_ids) == table[8:12]
    assert all(b not in local_ids for t in loads for b in t.block_ids)
    assert eng.computed["b"] == list(range(3 * BT, len(prompt)))
    assert torch.equal(eng.paged_kv("b", len(prompt)), reference_kv(prompt))
    assert all(torch.equal(eng.view(n)[:, local_ids], b) for n, b in zip(eng.kv, before))
    # vLLM already holds all that kvtier has: nothing to load, no lookup needed
    assert eng.scheduler.get_num_new_matched_tokens(FakeRequest("c", list(prompt)), 3 * BT) == (0, False)


def test_partial_blocks_are_never_saved(inprocess):
    extra, store, model = inprocess
    eng = FakeEngine(extra, model=model)
    prompt = tokens(2 * BT + BT // 2, seed=5)
    eng.run(FakeRequest("a", prompt), chunk=17)
    spec = spec_of(model)
    ns = Namespace(extra_keys=("ns:team-a",))
    assert store.lookup(spec, chain_hashes(spec, prompt + [0] * (BT // 2), ns)).num_blocks == 2
    assert eng.worker.stats["saved_blocks"] == 2 and store.stats()["blocks"] == 2


def test_namespaces_do_not_share(inprocess):
    extra, _, model = inprocess
    eng = FakeEngine(extra, model=model)
    prompt = tokens(2 * BT + 8, seed=6)
    eng.run(FakeRequest("a", prompt, cache_salt="s1", lora_request=SimpleNamespace(lora_name="sql", lora_int_id=1)))
    ask = lambda e, **kw: e.scheduler.get_num_new_matched_tokens(FakeRequest(uuid.uuid4().hex, list(prompt), **kw), 0)[0]
    sql = SimpleNamespace(lora_name="sql", lora_int_id=7)
    assert ask(eng, cache_salt="s1", lora_request=sql) == 2 * BT  # same namespace: shared
    assert ask(eng, cache_salt="s2", lora_request=sql) == 0  # another cache salt
    assert ask(eng, cache_salt="s1") == 0  # no LoRA
    assert ask(eng, cache_salt="s1", lora_request=SimpleNamespace(lora_name="chat", lora_int_id=1)) == 0
    assert ask(eng, cache_salt="s1", lora_request=sql, mm_features=[SimpleNamespace(identifier="img-1")]) == 0
    other = FakeEngine({**extra, "namespace": "team-b"}, model=model, seed=1)
    assert ask(other, cache_salt="s1", lora_request=sql) == 0  # another configured namespace
    assert other.scheduler.stats["lookups"] == 1


def test_a_block_gone_before_the_load_is_reported_and_recomputed(inprocess):
    extra, store, model = inprocess
    eng = FakeEngine(extra, model=model)
    prompt = tokens(3 * BT + 1, seed=7)
    eng.run(FakeRequest("a", prompt))
    spec = spec_of(model)
    keys = chain_hashes(spec, prompt, Namespace(extra_keys=("ns:team-a",)))
    req = FakeRequest("b", list(prompt))
    ext, _ = eng.scheduler.get_num_new_matched_tokens(req, 0)
    assert ext == 3 * BT
    store.remove(spec, [keys[1]])  # evicted between the lookup and the load
    table = [eng.free.pop() for _ in range(-(-len(prompt) // P))]
    eng.scheduler.update_state_after_alloc(req, FakeBlocks(table), ext)
    meta = eng.scheduler.build_connector_meta(
        SchedulerOutput([NewRequestData("b", prompt, (table,), ext)], CachedRequestData(), {"b": 1}, set())
    )
    eng.worker.bind_connector_metadata(meta)
    eng.worker.start_load_kv(None)
    eng.worker.wait_for_save()
    assert eng.worker.get_block_ids_with_load_errors() == set(table[4:12])  # block 1 and everything after it
    assert eng.worker.get_block_ids_with_load_errors() == set()  # reported once
    ref = reference_kv(prompt)
    for l, name in enumerate(eng.kv):  # block 0 did load
        assert torch.equal(gather_layer(eng.view(name), torch.tensor([table[:4]]))[0], ref[l, :, :, :BT])
    eng.worker.clear_connector_metadata()


def test_kv_roles(inprocess):
    extra, store, model = inprocess
    prompt = tokens(2 * BT + 3, seed=8)
    consumer = FakeEngine(extra, model=model, kv_role="kv_consumer")
    consumer.run(FakeRequest("a", prompt))
    assert consumer.worker.stats["saved_blocks"] == 0 and store.stats()["blocks"] == 0
    producer = FakeEngine(extra, model=model, kv_role="kv_producer", seed=1)
    producer.run(FakeRequest("a", prompt))
    assert store.stats()["blocks"] == 2
    assert producer.run(FakeRequest("b", list(prompt))) == 0  # a producer never loads
    assert consumer.run(FakeRequest("b", list(prompt))) == 2 * BT
    assert torch.equal(consumer.paged_kv("b", len(prompt)), reference_kv(prompt))


def test_layerwise_loading_and_the_blocks_first_layout(inprocess):
    extra, _, model = inprocess
    extra = {**extra, "layerwise": True, "paged_layout": "auto"}
    assert KVTierConnector.requires_piecewise_for_cudagraph(extra) is True
    writer = FakeEngine(extra, model=model, layout="blocks_first")
    prompt = tokens(2 * BT + 20, seed=9)
    writer.run(FakeRequest("a", prompt), chunk=50)
    reader = FakeEngine(extra, model=model, seed=3)  # another engine, kv_first, same store
    assert reader.worker._layout == "kv_first" and writer.worker._layout == "blocks_first"
    assert reader.run(FakeRequest("b", list(prompt))) == 2 * BT
    assert torch.equal(reader.paged_kv("b", len(prompt)), reference_kv(prompt))


def test_saves_without_the_per_layer_hook(inprocess):
    extra, store, model = inprocess
    eng = FakeEngine(extra, model=model)
    eng.calls_save_kv_layer = False  # wait_for_save reads the registered buffers itself
    prompt = tokens(2 * BT + 9, seed=15)
    eng.run(FakeRequest("a", prompt), chunk=40)
    spec = spec_of(model)
    keys = chain_hashes(spec, prompt, Namespace(extra_keys=("ns:team-a",)))
    assert torch.equal(torch.stack(store.get(spec, keys)), kvtier_blocks(prompt, 2))


def test_preempted_request_resumes_with_new_blocks(inprocess):
    extra, store, model = inprocess
    eng = FakeEngine(extra, model=model)
    prompt = tokens(3 * BT + 4, seed=10)
    req = FakeRequest("a", prompt)
    sched = eng.scheduler
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    t1 = [eng.free.pop() for _ in range(8)]
    sched.update_state_after_alloc(req, FakeBlocks(t1), 0)
    m1 = sched.build_connector_meta(SchedulerOutput([NewRequestData("a", prompt, (t1,), 0)], CachedRequestData(), {"a": BT}, set()))
    assert [t.block_ids for rt in m1.requests for t in rt.saves] == [tuple(t1[:4])]
    # preempted, then resumed from scratch with a new block list; block 0 is already in kvtier (saved above)
    t2 = [eng.free.pop() for _ in range(13)]
    cached = CachedRequestData(["a"], {"a"}, [], [(t2,)], [0])
    m2 = sched.build_connector_meta(SchedulerOutput([], cached, {"a": 3 * BT}, set()))
    (rt,) = m2.requests
    assert [t.block_ids for t in rt.saves] == [tuple(t2[4:8]), tuple(t2[8:12])]
    assert rt.save_parent == m1.requests[0].saves[0].key


# -- through a real kvtier service ----------------------------------------------------------------
def test_two_engines_share_blocks_through_the_service(open_server):
    model = "svc-" + uuid.uuid4().hex[:8]
    extra = {"url": open_server.url, "block_tokens": BT, "namespace": "svc", "timeout_s": 10.0}
    first = FakeEngine(extra, model=model)
    prompt = tokens(5 * BT + 30, seed=11)
    assert first.run(FakeRequest("a", prompt), chunk=128) == 0
    assert first.worker.stats["saved_blocks"] == 5 and first.worker.stats["backend_errors"] == 0
    second = FakeEngine(extra, model=model, seed=5)  # another vLLM instance, its own buffer and block tables
    prompt2 = prompt[: 4 * BT + 1] + tokens(20, seed=12)
    assert second.run(FakeRequest("b", prompt2)) == 4 * BT
    assert second.computed["b"] == list(range(4 * BT, len(prompt2)))
    assert torch.equal(second.paged_kv("b", len(prompt2)), reference_kv(prompt2))
    assert torch.equal(second.paged_kv("b", 4 * BT), first.paged_kv("a", 4 * BT))
    assert second.run(FakeRequest("c", tokens(3 * BT, seed=13))) == 0  # another prompt: no match
    other_ns = FakeEngine({**extra, "namespace": "other"}, model=model, seed=6)
    assert other_ns.run(FakeRequest("d", list(prompt))) == 0
    for e in (first, second, other_ns):
        e.scheduler.shutdown()
        e.worker.shutdown()


def test_a_restarted_service_gets_the_spec_again():
    from .server import ServiceProcess

    server = ServiceProcess({"KVTIER_DISK_CAPACITY_BYTES": "0"})  # memory only: a restart forgets blocks and specs
    try:
        extra = {"url": server.url, "block_tokens": BT, "timeout_s": 10.0}
        eng = FakeEngine(extra, model="restart-" + uuid.uuid4().hex[:8])
        prompt = tokens(2 * BT + 5, seed=16)
        eng.run(FakeRequest("a", prompt))
        assert eng.worker.stats["saved_blocks"] == 2
        server.stop()
        server.start()
        assert eng.run(FakeRequest("b", list(prompt))) == 0  # the blocks are gone, and no call failed
        assert eng.worker.stats["saved_blocks"] == 4 and eng.worker.stats["backend_errors"] == 0
        assert eng.scheduler.stats["backend_errors"] == 0
        assert eng.run(FakeRequest("c", list(prompt))) == 2 * BT
        assert torch.equal(eng.paged_kv("c", len(prompt)), reference_kv(prompt))
    finally:
        server.stop()


def test_an_unreachable_service_is_a_miss_not_a_failure():
    from tests.redis_servers import free_port

    extra = {"url": f"http://127.0.0.1:{free_port()}", "block_tokens": BT, "timeout_s": 1.0}
    eng = FakeEngine(extra, model="down")
    prompt = tokens(2 * BT + 5, seed=14)
    assert eng.run(FakeRequest("a", prompt)) == 0  # lookup failed: nothing matched
    assert eng.worker.stats["saved_blocks"] == 0 and eng.worker.stats["backend_errors"] >= 1
    assert eng.scheduler.stats["backend_errors"] >= 1
    assert torch.equal(eng.paged_kv("a", len(prompt)), reference_kv(prompt))  # vLLM computed it all


def test_kvtier_imports_without_vllm():
    code = (
        "import sys, kvtier.kvstore, kvtier.service.client, kvtier.connectors\n"
        "assert 'vllm' not in sys.modules and 'kvtier.connectors.vllm' not in sys.modules\n"
        "import kvtier.connectors.vllm as c\n"
        "has = c.HAS_VLLM\n"
        "assert has or c.KVTierConnector.__mro__[1] is c._StandInBase\n"
        "print('ok', has)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


# -- vLLM >= 0.2x 4-d layouts: the views against the attention backends' own K/V split expressions ---------
@pytest.mark.parametrize("physical", ["HND", "NHD"])
def test_kv_in_content_view_matches_flash_attention_split(physical):
    from kvtier.connectors.vllm import kernel_block_ids  # noqa: F401

    N, Hh, Pp, Dd = 5, 3, 16, 8
    g = torch.Generator().manual_seed(1)
    if physical == "HND":  # LBHNC: [N, H, P, 2D] in memory
        kv = torch.randn(N, Hh, Pp, 2 * Dd, generator=g)
    else:  # LBNHC: [N, P, H, 2D] in memory, seen as the logical [N, H, P, 2D]
        kv = torch.randn(N, Pp, Hh, 2 * Dd, generator=g).permute(0, 2, 1, 3)
    view = paged_view(kv, "kv_in_content")  # [2, N, P, H, D]
    k_ref, v_ref = kv.transpose(1, 2).split(Dd, dim=-1)  # flash_attn.py / triton_attn.py: [N, P, H, D] each
    assert torch.equal(view[0], k_ref) and torch.equal(view[1], v_ref)
    view[1, 2, 3, 1] = 7.0  # a view: writes reach vLLM's buffer
    assert torch.all(kv[2, 1, 3, Dd:] == 7.0)


def test_kv_in_rows_view_matches_cpu_attention_split():
    N, Hh, Pp, Dd = 4, 3, 32, 8
    kv = torch.randn(N, Hh, Pp, 2 * Dd, generator=torch.Generator().manual_seed(2))
    view = paged_view(kv, "kv_in_rows")
    k_ref, v_ref = kv.view(N, Hh, 2 * Pp, Dd).chunk(2, dim=2)  # cpu_attn.py: [N, H, P, D] each
    assert torch.equal(view[0], k_ref.transpose(1, 2)) and torch.equal(view[1], v_ref.transpose(1, 2))
    blocks = torch.tensor([[3, 1]])
    got = gather_layer(view, blocks)  # [1, 2, H, 2P, D]
    assert torch.equal(got[0, 0, :, :Pp], k_ref[3]) and torch.equal(got[0, 1, :, Pp:], v_ref[1])
    # a slab that is not contiguous (NHD) cannot be read as rows: refused, never guessed
    with pytest.raises(ValueError, match="contiguous"):
        paged_view(torch.zeros(N, Pp, Hh, 2 * Dd).permute(0, 2, 1, 3), "kv_in_rows")


def test_unknown_backend_is_refused_by_name():
    from kvtier.connectors.vllm import detect_layout

    assert detect_layout(torch.zeros(2, 3, 16, 16), "CPU_ATTN") == "kv_in_rows"
    assert detect_layout(torch.zeros(2, 3, 16, 16), "FLASH_ATTN") == "kv_in_content"
    with pytest.raises(ValueError, match="ROCM_AITER_FA"):
        detect_layout(torch.zeros(2, 3, 16, 16), "ROCM_AITER_FA")
    with pytest.raises(ValueError, match="None"):
        detect_layout(torch.zeros(2, 3, 16, 16), None)


def test_kernel_block_ids_split_each_block():
    from kvtier.connectors.vllm import kernel_block_ids

    ids = torch.tensor([[5, -1], [0, 2]])
    assert kernel_block_ids(ids, 1) is ids
    assert kernel_block_ids(ids, 2).tolist() == [[10, 11, -1, -1], [0, 1, 4, 5]]


def test_async_load_finishes_through_get_finished_and_reports_a_block_evicted_since_the_lookup(inprocess):
    extra, store, model = inprocess
    eng = FakeEngine(extra, model=model)  # the synchronous fake fills the store: 3 blocks of request a
    toks = tokens(3 * BT + 5, seed=41)
    eng.run(FakeRequest("a", toks))
    cfg = fake_vllm_config(extra, model=model)  # the defaults: asynchronous loads and saves
    sched, worker = KVTierConnector(cfg, KVConnectorRole.SCHEDULER), KVTierConnector(cfg, KVConnectorRole.WORKER)
    worker.register_kv_caches(eng.kv)
    req = FakeRequest("b", toks)
    assert sched.get_num_new_matched_tokens(req, 0) == (3 * BT, True)
    store.remove(worker.spec, sched._states["b"].keys[2:3])  # evicted between the lookup and the load
    table = [eng.free.pop() for _ in range(3 * BT // P)]
    sched.update_state_after_alloc(req, FakeBlocks(table), 3 * BT)
    meta = sched.build_connector_meta(SchedulerOutput([], CachedRequestData(), {}, set()))  # b waits: not scheduled
    assert [(rt.req_id, rt.load_async, len(rt.loads)) for rt in meta.requests] == [("b", True, 3)]
    assert sched.request_finished(req, table) == (True, None)  # aborted while loading: vLLM keeps its blocks
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    worker.wait_for_save()
    done, errors, deadline = set(), set(), time.monotonic() + 30
    while not done and time.monotonic() < deadline:
        errors |= worker.get_block_ids_with_load_errors()
        done = worker.get_finished(set())[1] or set()
        time.sleep(0.01)
    errors |= worker.get_block_ids_with_load_errors()
    assert done == {"b"} and errors == set(table[2 * BT // P :])  # the evicted block's vLLM blocks: recomputed
    eng.tables["b"] = table
    assert torch.equal(eng.paged_kv("b", 2 * BT), reference_kv(toks)[:, :, :, : 2 * BT])  # the others loaded exactly
    sched.update_connector_output(SimpleNamespace(finished_recving={"b"}, kv_cache_events=None))
    assert sched.request_finished(req, table) == (False, None)
    worker.shutdown()


def test_async_saves_are_written_by_the_saver_thread(inprocess):
    extra, store, model = inprocess
    eng = FakeEngine({**extra, "async_saves": True}, model=model)
    toks = tokens(2 * BT + 3, seed=42)
    eng.run(FakeRequest("a", toks))
    assert eng.worker.flush(30)
    assert store.lookup(eng.worker.spec, eng.scheduler._keys(eng.scheduler._state(FakeRequest("a2", toks)), toks, 2)).num_blocks == 2
    assert eng.worker.stats["saved_blocks"] == 2


def test_inprocess_store_is_refused_under_a_multiprocess_executor(inprocess):
    extra, _, model = inprocess
    cfg = fake_vllm_config(extra, model=model)
    cfg.parallel_config.distributed_executor_backend = "mp"  # vLLM's default on CPU: scheduler and worker apart
    with pytest.raises(ValueError, match="distributed_executor_backend='uni'"):
        KVTierConnector(cfg, KVConnectorRole.SCHEDULER)
    cfg.parallel_config.distributed_executor_backend = "uni"
    KVTierConnector(cfg, KVConnectorRole.SCHEDULER)
    svc = fake_vllm_config({**extra, "url": "http://127.0.0.1:9"}, model=model)
    svc.parallel_config.distributed_executor_backend = "mp"
    KVTierConnector(svc, KVConnectorRole.SCHEDULER)  # a service is shared by every process
