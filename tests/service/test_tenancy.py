"""API keys, tenants, quotas and the admin key, against a real server with two tenants."""

from __future__ import annotations

import httpx
import pytest
import torch

from kvtier.kvstore import chain_hashes
from kvtier.service.client import KVTierClient, KVTierError

from .conftest import ADMIN_KEY, KEYS, TINY

A_KEY, B_KEY = list(KEYS)


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *TINY.block_shape, generator=torch.Generator().manual_seed(seed)).half()


@pytest.fixture
def clients(keyed_server):
    a, b, admin = (KVTierClient(keyed_server.url, api_key=k) for k in (A_KEY, B_KEY, ADMIN_KEY))
    yield a, b, admin
    for c in (a, b, admin):
        c.close()


def test_tenant_b_can_neither_read_nor_detect_a(clients, keyed_server):
    a, b, admin = clients
    model = a.register_spec(TINY)
    tokens = list(range(1000, 1000 + 16 * 4))
    a_keys = a.hashes(model, tokens)
    assert a.put(model, a_keys, _blocks(4, seed=1)) == [True] * 4
    assert a.lookup(model, token_ids=tokens).num_blocks == 4

    # B has not registered the spec: the model id is unknown to it (same answer as a made-up id)
    with pytest.raises(KVTierError) as e:
        b.lookup(model, token_ids=tokens)
    assert e.value.status == 404 and e.value.field == "model"
    assert b.register_spec(TINY) == model
    assert b.hashes(model, tokens) != a_keys  # the server hashes B's tokens under B's namespace

    # by tokens, by A's hashes, get, pin, delete: all misses / no-ops for B
    assert b.lookup(model, token_ids=tokens).num_blocks == 0
    miss = b.lookup(model, hashes=a_keys)
    assert miss.num_blocks == 0 and set(miss.tier_prefix.values()) == {0}
    assert b.get(model, a_keys) == [None] * 4
    assert b.pin(model, a_keys, ttl_s=10)["num_pinned"] == 0
    assert b.delete(model, a_keys) == 0
    assert b.events()["events"] == []
    assert b.stats()["bytes"] == 0 and "tiers" not in b.stats()

    # ... and A still has everything
    got = a.get(model, a_keys)
    assert all(torch.equal(g, x) for g, x in zip(got, _blocks(4, seed=1)))
    assert {e["key"] for e in a.events()["events"] if e["kind"] == "stored"} >= {k.hex() for k in a_keys}

    # B stores the same client keys: its own blocks, A's are untouched
    assert b.put(model, a_keys, _blocks(4, seed=2)) == [True] * 4
    assert all(torch.equal(g, x) for g, x in zip(b.get(model, a_keys), _blocks(4, seed=2)))
    assert all(torch.equal(g, x) for g, x in zip(a.get(model, a_keys), _blocks(4, seed=1)))

    # admin sees every tenant
    s = admin.stats()
    assert {"acme", "globex"} <= set(s["tenants"]) and "tiers" in s


def test_keys_are_checked(keyed_server):
    url = keyed_server.url
    for headers, field in [
        ({}, "authorization"),
        ({"Authorization": "Bearer wrong-key-123"}, "authorization"),
        ({"Authorization": "Basic abc"}, "authorization"),
        ({"X-API-Key": "nope"}, "authorization"),
    ]:
        r = httpx.get(url + "/v1/stats", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["field"] == field
    assert httpx.get(url + "/v1/stats", headers={"X-API-Key": A_KEY}).status_code == 200
    assert httpx.get(url + "/metrics", headers={"X-API-Key": A_KEY}).status_code == 403
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    assert httpx.get(url + "/healthz").status_code == 200  # probes need no key


def test_quota_evicts_the_tenants_own_blocks(clients):
    a, b, admin = clients
    model = b.register_spec(TINY)
    a.register_spec(TINY)
    a_keys = chain_hashes(TINY, list(range(5000, 5000 + 16 * 8)))
    a.put(model, a_keys, _blocks(8, seed=3))
    # globex has a 64 KiB quota: 32 blocks of 2 KiB. Write 3x that.
    for i in range(6):
        keys = chain_hashes(TINY, list(range(i * 10_000, i * 10_000 + 16 * 16)))
        b.put(model, keys, _blocks(16, seed=4 + i))
        assert b.stats()["bytes"] <= 64 << 10
    assert b.stats()["quota_bytes"] == 64 << 10
    assert a.lookup(model, hashes=a_keys).num_blocks == 8  # the other tenant lost nothing
    assert admin.stats()["quota_evictions"] > 0
