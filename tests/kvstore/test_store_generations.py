"""A copy of a block's old bytes in flight (demotion, promotion) never lands under a block written
again under the same key (delete, then put of other bytes): the store's generations and its
refusal to rewrite a key while a copy of its old bytes is in flight (issue 17: a stale block).

The interleaving is forced with a real ``HostTier`` whose ``put`` waits at a gate once.
"""

from __future__ import annotations

import threading

import torch

from kvtier.kvstore import HostTier, KVSpec, Namespace, TieredStore, TierConfig, chain_hashes

SPEC = KVSpec("gen", num_layers=1, num_kv_heads=1, head_dim=16, dtype="float32", block_tokens=16)  # 2 KiB blocks


def _block(seed: int) -> torch.Tensor:
    return torch.randn(SPEC.block_shape, generator=torch.Generator().manual_seed(seed))


def _key(salt: str) -> bytes:
    return chain_hashes(SPEC, list(range(16)), Namespace(salt=salt))[0]


class GatedHostTier(HostTier):
    """A host tier whose first ``put`` of ``key`` once ``armed`` stops until ``release`` is set
    (``entered`` says it is there)."""

    def __init__(self, *args, key: bytes, after_write: bool = False, **kw) -> None:
        super().__init__(*args, **kw)
        self.key, self.entered, self.release = key, threading.Event(), threading.Event()
        self.armed, self.after_write = False, after_write

    def put(self, keys, blocks, *, spec, first=None):
        gate = self.armed and self.key in [bytes(k) for k in keys] and not self.entered.is_set()
        if gate and not self.after_write:
            self.entered.set()
            assert self.release.wait(10)
        sizes = super().put(keys, blocks, spec=spec, first=first)
        if gate and self.after_write:
            self.entered.set()
            assert self.release.wait(10)
        return sizes


def test_a_demotion_in_flight_never_lands_old_bytes_under_a_rewritten_key():
    n = SPEC.block_nbytes
    key = _key("victim")
    lower = GatedHostTier(64 * n, key=key, name="lower")
    store = TieredStore([TierConfig(HostTier(4 * n, name="upper")), TierConfig(lower)])
    old, new = _block(1), _block(2)
    assert store.put(SPEC, [key], old[None]) == [True]
    lower.armed = True

    # other puts push the victim out of the upper tier: its demotion stops at the lower tier's gate
    filler = threading.Thread(target=lambda: [store.put(SPEC, [_key(f"fill-{i}")], _block(10 + i)[None]) for i in range(6)])
    filler.start()
    assert lower.entered.wait(10)
    assert store.remove(SPEC, [key]) == 1
    rewrite = store.put(SPEC, [key], new[None])
    lower.release.set()
    filler.join(10)
    for i in range(8):  # push the key out of the upper tier: read from the lower one
        store.put(SPEC, [_key(f"push-{i}")], _block(50 + i)[None])
    got = store.get(SPEC, [key])[0]
    assert got is None or not torch.equal(got, old)  # never the deleted bytes under the rewritten key
    # how: a rewrite while the old bytes are being copied is refused (not acknowledged), and the
    # copy of the deleted block is not kept
    assert rewrite == [False] and got is None

    assert store.put(SPEC, [key], new[None]) == [True]  # the copy is done: the rewrite goes through
    for i in range(8):  # push it down to the lower tier and read it from there
        store.put(SPEC, [_key(f"more-{i}")], _block(100 + i)[None])
    got = store.get(SPEC, [key])[0]
    assert got is not None and torch.equal(got, new)
    store.close()


def test_a_promotion_planned_before_a_delete_and_rewrite_is_dropped():
    n = SPEC.block_nbytes
    key = _key("promoted")
    upper = GatedHostTier(8 * n, key=key, name="upper", after_write=True)
    lower = HostTier(64 * n, name="lower")
    store = TieredStore([TierConfig(upper), TierConfig(lower)])
    old, new = _block(1), _block(2)
    assert store.put(SPEC, [key], old[None]) == [True]
    for i in range(10):  # push the block down to the lower tier only
        store.put(SPEC, [_key(f"fill-{i}")], _block(10 + i)[None])
    assert store.lookup(SPEC, [key]).tier_hits == {"upper": 0, "lower": 1}
    upper.armed = True

    reader = threading.Thread(target=lambda: store.get(SPEC, [key]))  # reads the old bytes, then promotes them
    reader.start()
    assert upper.entered.wait(10)  # the promotion wrote the old bytes into the upper tier, not yet committed
    assert store.remove(SPEC, [key]) == 1
    rewrite = store.put(SPEC, [key], new[None])
    upper.release.set()
    reader.join(10)
    got = store.get(SPEC, [key])[0]
    assert got is None or not torch.equal(got, old)  # never the deleted bytes under the rewritten key
    assert rewrite == [False] and got is None  # refused while the old bytes were copied; the copy dropped
    assert store.put(SPEC, [key], new[None]) == [True]
    got = store.get(SPEC, [key])[0]
    assert got is not None and torch.equal(got, new)
    store.close()
