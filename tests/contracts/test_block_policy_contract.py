"""Every registered block policy through the same contract (see eviction/blocks/base.py).

Random operation sequences drive two copies of a policy: P has ``candidates()`` called after
every step (twice, with several n), Q never until the end. Evictions are chosen from P's
candidates and replayed on Q as plain ``on_remove`` calls. If ``candidates()`` had a side
effect, P and Q would drift apart.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.eviction.blocks import BlockPolicy, available_policies, get_policy

# Each registered policy with its defaults and with a non-default set of options.
CONFIGS = {
    "lru": [{}],
    "fifo": [{}],
    "lfu": [{}],
    "s3fifo": [{}, {"small_ratio": 0.3, "ghost_ratio": 2.0, "max_freq": 2, "promote_threshold": 2}],
    "cost": [{}, {"alpha": 2.0}],
    "tenant_fair": [
        {},
        {"inner": "s3fifo", "inner_options": {"small_ratio": 0.5}, "weights": {"a": 2.0}},
        {"inner": "cost", "default_weight": 0.5},
    ],
}
CASES = [pytest.param(name, opts, id=f"{name}-{i}") for name, optss in CONFIGS.items() for i, opts in enumerate(optss)]

NUM_KEYS = 10
KEYS = [i.to_bytes(2, "big") * 16 for i in range(NUM_KEYS)]  # 32-byte keys
UNKNOWN = b"\xff" * 32

key_ids = st.integers(0, NUM_KEYS - 1)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), key_ids, st.sampled_from([1, 2, 3, 8]), st.integers(0, 6), st.sampled_from(["", "a", "b"])),
        st.tuples(st.just("access"), key_ids),
        st.tuples(st.just("remove"), key_ids),
        st.tuples(st.just("evict"), st.integers(0, 3)),  # evict the j-th candidate (the store skipped j)
    ),
    min_size=10,
    max_size=60,
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_policy_has_a_contract_config():
    assert sorted(CONFIGS) == available_policies()


def check_consistent(p, tracked: set[bytes]) -> list[bytes]:
    """The read-only checks after every step; returns the full eviction order."""
    assert len(p) == len(tracked)
    for k in KEYS:
        assert (k in p) == (k in tracked)
    order = p.candidates(len(tracked) + 3)
    assert p.candidates(len(tracked) + 3) == order  # idempotent
    assert len(order) == len(set(order)) == len(tracked)  # no duplicates, every key
    assert set(order) == tracked
    for k in {0, 1, 2, len(tracked) // 2, len(tracked)}:
        assert p.candidates(k) == order[:k]  # growing n extends the same order
    if hasattr(p, "get_priority"):  # SGLang-style policies: the order is the sort by priority
        assert sorted(tracked, key=p.get_priority) == order
    return order


def apply(p, q, op, tracked: set[bytes]) -> None:
    kind = op[0]
    if kind == "insert":
        _, i, nbytes, depth, tenant = op
        for pol in (p, q):
            pol.on_insert(KEYS[i], nbytes, depth=depth, tenant=tenant)
        tracked.add(KEYS[i])
    elif kind == "access":
        for pol in (p, q):
            pol.on_access(KEYS[op[1]])
    elif kind == "remove":
        for pol in (p, q):
            pol.on_remove(KEYS[op[1]])
        tracked.discard(KEYS[op[1]])
    else:
        order = p.candidates(op[1] + 1)
        if not order:
            return
        victim = order[-1]
        full = p.candidates(len(p))
        for pol in (p, q):
            pol.on_remove(victim)
        tracked.discard(victim)
        if victim == full[0]:  # evicting in order: the rest of the order stands
            assert p.candidates(len(p)) == full[1:]


@pytest.mark.parametrize("name,options", CASES)
@SETTINGS
@given(seq=ops)
def test_candidates_are_side_effect_free(name, options, seq):
    p, q = get_policy(name, **options), get_policy(name, **options)
    tracked: set[bytes] = set()
    for op in seq:
        apply(p, q, op, tracked)
        check_consistent(p, tracked)
    # Q never had candidates() called: same order now, and the same drain afterwards.
    assert q.candidates(NUM_KEYS) == p.candidates(NUM_KEYS)
    while len(p):
        victim = p.candidates(1)[0]
        assert q.candidates(1) == [victim]
        p.on_remove(victim)
        q.on_remove(victim)
    assert len(q) == 0 and q.candidates(5) == []


@pytest.mark.parametrize("name,options", CASES)
@SETTINGS
@given(seq=ops)
def test_evicting_in_order_keeps_the_order(name, options, seq):
    p, q = get_policy(name, **options), get_policy(name, **options)
    tracked: set[bytes] = set()
    for op in seq:
        apply(p, q, op, tracked)
    order = p.candidates(NUM_KEYS)
    for i, victim in enumerate(order):
        p.on_remove(victim)
        assert victim not in p
        assert p.candidates(NUM_KEYS) == order[i + 1 :]


@pytest.mark.parametrize("name,options", CASES)
@SETTINGS
@given(seq=ops)
def test_unknown_keys_are_ignored(name, options, seq):
    p, q = get_policy(name, **options), get_policy(name, **options)
    tracked: set[bytes] = set()
    for op in seq:
        apply(p, q, op, tracked)
    before = p.candidates(NUM_KEYS)
    for junk in (UNKNOWN, b"", "not bytes", 7, None):
        p.on_access(junk)
        p.on_remove(junk)
        assert junk not in p
    assert p.candidates(NUM_KEYS) == before
    assert len(p) == len(tracked)
    # and the policy goes on exactly like one that never saw them
    for pol in (p, q):
        pol.on_insert(UNKNOWN, 4, depth=1, tenant="a")
    assert p.candidates(NUM_KEYS + 1) == q.candidates(NUM_KEYS + 1)


@pytest.mark.parametrize("name,options", CASES)
def test_protocol_and_bounds(name, options):
    p = get_policy(name, **options)
    assert isinstance(p, BlockPolicy)
    assert p.name == name
    assert len(p) == 0 and p.candidates(0) == [] and p.candidates(5) == []
    for bad in (-1, 1.5, "3", None):
        with pytest.raises(ValueError):
            p.candidates(bad)
    for i, k in enumerate(KEYS[:4]):
        p.on_insert(k, 10, depth=i, tenant="t")
    assert len(p.candidates(2)) == 2
    assert sorted(p.candidates(100)) == sorted(KEYS[:4])
    with pytest.raises(ValueError):
        p.candidates(-1)


@pytest.mark.parametrize("name,options", CASES)
def test_reinsert_is_an_access_and_remove_is_honoured(name, options):
    p = get_policy(name, **options)
    p.on_insert(KEYS[0], 10, depth=0, tenant="a")
    p.on_insert(KEYS[1], 10, depth=1, tenant="a")
    p.on_insert(KEYS[0], 10, depth=0, tenant="a")  # no double count
    assert len(p) == 2 and p.candidates(9) in ([KEYS[0], KEYS[1]], [KEYS[1], KEYS[0]])
    p.on_remove(KEYS[0])
    assert KEYS[0] not in p and len(p) == 1 and p.candidates(9) == [KEYS[1]]
    p.on_remove(KEYS[0])  # twice: now unknown, ignored
    p.on_remove(KEYS[1])
    assert len(p) == 0 and p.candidates(9) == []
    if hasattr(p, "tenant_bytes"):
        assert p.tenant_bytes("a") == 0


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize(
    "bad",
    [
        dict(key="not bytes"),
        dict(key=bytearray(32)),
        dict(nbytes=-1),
        dict(nbytes=True),
        dict(nbytes=1.0),
        dict(depth=-1),
        dict(depth=None),
        dict(tenant=None),
    ],
)
def test_bad_insert_arguments_are_value_errors(name, options, bad):
    p = get_policy(name, **options)
    args = dict(key=KEYS[0], nbytes=10, depth=0, tenant="") | bad
    with pytest.raises(ValueError):
        p.on_insert(args["key"], args["nbytes"], depth=args["depth"], tenant=args["tenant"])
    assert len(p) == 0
