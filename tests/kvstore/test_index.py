import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.kvstore import PrefixIndex
from kvtier.kvstore.index import NO_PARENT


def k(i: int) -> bytes:
    return i.to_bytes(32, "little")


def build_chain(index, n, tier=0, start=0):
    parent = NO_PARENT
    slots = []
    for i in range(start, start + n):
        s = index.add(k(i), parent, depth=i - start)
        index.set_resident(s, tier, True)
        slots.append(s)
        parent = s
    return slots


def test_longest_prefix_overall_and_per_tier():
    idx = PrefixIndex(num_tiers=2)
    slots = build_chain(idx, 5)
    idx.set_resident(slots[3], 0, False)  # a hole at 3 (still resident below? no: gone)
    idx.set_resident(slots[1], 1, True)
    keys = [k(i) for i in range(6)]
    assert idx.longest_prefix(keys) == 3
    assert idx.longest_prefix(keys, tier=1) == 0
    assert idx.longest_prefix(keys[1:], tier=1) == 1
    assert idx.longest_prefix([]) == 0
    idx.check_invariants()


def test_leaf_first_and_pins():
    idx = PrefixIndex(num_tiers=2)
    a, b, c = build_chain(idx, 3)
    assert [idx.is_evictable(s, 0) for s in (a, b, c)] == [False, False, True]
    idx.set_resident(c, 1, True)  # c also below: still a child of b in tier 0
    assert not idx.is_evictable(b, 0)
    idx.set_resident(c, 0, False)
    assert idx.is_evictable(b, 0) and idx.is_evictable(b, 1) is not False
    idx.pin(b)
    assert not idx.is_evictable(b, 0)
    idx.unpin(b)
    with pytest.raises(RuntimeError):
        idx.unpin(b)
    idx.check_invariants()


def test_ghost_ancestors_are_collected():
    idx = PrefixIndex(num_tiers=1)
    a, b, c = build_chain(idx, 3)
    idx.set_resident(a, 0, False)
    idx.set_resident(b, 0, False)
    assert len(idx) == 3  # a and b are ghosts: c is still resident below them
    idx.check_invariants()
    idx.set_resident(c, 0, False)
    assert len(idx) == 0 and idx.longest_prefix([k(0)]) == 0
    # slots are reused
    assert build_chain(idx, 2, start=10)[0] in (a, b, c)
    idx.check_invariants()


def test_grows_past_initial_capacity():
    idx = PrefixIndex(num_tiers=3, initial_capacity=16)
    build_chain(idx, 100, tier=2)
    assert idx.capacity >= 100 and idx.longest_prefix([k(i) for i in range(100)], tier=2) == 100
    idx.check_invariants()


def test_tenant_leaves_oldest_first():
    idx = PrefixIndex(num_tiers=1)
    for t, start in ((1, 0), (2, 10), (1, 20)):
        parent = NO_PARENT
        for i in range(start, start + 2):
            s = idx.add(k(i), parent, tenant_id=t)
            idx.set_resident(s, 0, True)
            parent = s
    assert [idx.key(s) for s in idx.tenant_leaves_oldest_first(1)] == [k(1), k(21)]
    idx.touch(idx.slot(k(1)))
    assert [idx.key(s) for s in idx.tenant_leaves_oldest_first(1)] == [k(21), k(1)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 2), st.booleans()), max_size=60))
def test_invariants_hold_under_any_residency_changes(ops):
    idx = PrefixIndex(num_tiers=3)
    # a small tree: 0-1-2-3, 1-4-5, 0-6, and separate roots 7..11
    parents = {0: None, 1: 0, 2: 1, 3: 2, 4: 1, 5: 4, 6: 0, 7: None, 8: 7, 9: None, 10: 9, 11: 10}
    for node, tier, on in ops:
        chain = []
        n = node
        while n is not None:
            chain.append(n)
            n = parents[n]
        parent = NO_PARENT
        for n in reversed(chain):  # (re-)add ancestors as an engine would: the chain is known
            s = idx.add(k(n), parent)
            parent = s
        s = idx.slot(k(node))
        idx.set_resident(s, tier, on)
        for n in chain[1:]:
            idx.release_if_unused(idx.slot(k(n))) if idx.slot(k(n)) is not None else None
        idx.release_if_unused(s) if idx.slot(k(node)) is not None else None
        idx.check_invariants()
