"""Exact eviction orders for hand-made sequences, one block of tests per policy.

Keys are named by one letter; ``order(p)`` spells the whole eviction order as a string, so
``assert order(p) == "cdba"`` pins every position (vLLM style: exact lists, not properties).
"""

from __future__ import annotations

import copy
from collections import OrderedDict, deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.eviction.blocks import (
    CostAwarePolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    TenantFairPolicy,
    available_policies,
    get_policy,
)
from kvtier.eviction.blocks.heap import HeapItem, IndexedHeap


def K(name: str) -> bytes:
    """A 32-byte key for a one-character name."""
    return name.encode().ljust(32, b"\0")


def order(p, n: int | None = None) -> str:
    keys = p.candidates(len(p) if n is None else n)
    return "".join(k.rstrip(b"\0").decode() for k in keys)


def insert(p, names: str, nbytes: int = 1, *, depth: int = 0, tenant: str = "") -> None:
    for name in names:
        p.on_insert(K(name), nbytes, depth=depth, tenant=tenant)


def hit(p, names: str) -> None:
    for name in names:
        p.on_access(K(name))


def evict(p, names: str) -> None:
    for name in names:
        p.on_remove(K(name))


# -- registry ----------------------------------------------------------------------------
def test_registry_names_and_errors():
    assert available_policies() == ["cost", "fifo", "lfu", "lru", "s3fifo", "tenant_fair"]
    assert isinstance(get_policy("LRU"), LRUPolicy)
    with pytest.raises(ValueError, match="known: cost, fifo, lfu, lru, s3fifo, tenant_fair"):
        get_policy("arc")
    with pytest.raises(ValueError, match="unknown option"):
        get_policy("lru", alpha=1.0)
    with pytest.raises(ValueError, match="expected: small_ratio, ghost_ratio, max_freq, promote_threshold"):
        get_policy("s3fifo", small=0.1)


@pytest.mark.parametrize(
    "name,options",
    [
        ("s3fifo", {"small_ratio": 0.0}),
        ("s3fifo", {"small_ratio": 1.0}),
        ("s3fifo", {"small_ratio": "0.1"}),
        ("s3fifo", {"ghost_ratio": -0.1}),
        ("s3fifo", {"max_freq": 0}),
        ("s3fifo", {"max_freq": 2.0}),
        ("s3fifo", {"promote_threshold": 4}),
        ("s3fifo", {"max_freq": 2, "promote_threshold": 3}),
        ("cost", {"alpha": -1.0}),
        ("cost", {"alpha": float("nan")}),
        ("cost", {"alpha": float("inf")}),
        ("tenant_fair", {"inner": "nope"}),
        ("tenant_fair", {"inner": "tenant_fair"}),
        ("tenant_fair", {"inner": 3}),
        ("tenant_fair", {"inner": "cost", "inner_options": {"alpha": -1}}),
        ("tenant_fair", {"inner_options": {"x": 1}}),
        ("tenant_fair", {"weights": {"a": 0}}),
        ("tenant_fair", {"weights": {1: 1.0}}),
        ("tenant_fair", {"weights": [1]}),
        ("tenant_fair", {"default_weight": 0.0}),
    ],
)
def test_bad_options_are_value_errors(name, options):
    with pytest.raises(ValueError):
        get_policy(name, **options)


# -- LRU / FIFO --------------------------------------------------------------------------
def test_lru_order():
    p = LRUPolicy()
    insert(p, "abcd")
    assert order(p) == "abcd"
    hit(p, "b")
    insert(p, "a")  # re-insert of a tracked key = a hit
    assert order(p) == "cdba"
    evict(p, "d")
    hit(p, "z")  # unknown: ignored
    assert order(p) == "cba" and order(p, 2) == "cb"
    assert p.get_priority(K("c")) < p.get_priority(K("b")) < p.get_priority(K("a"))


def test_fifo_ignores_hits():
    p = FIFOPolicy()
    insert(p, "abcd")
    hit(p, "ab")
    insert(p, "a")
    assert order(p) == "abcd"
    evict(p, "a")
    insert(p, "a")  # came back: now the newest
    assert order(p) == "bcda"


# -- LFU ---------------------------------------------------------------------------------
def test_lfu_frequency_then_recency():
    p = LFUPolicy()
    insert(p, "abcd")  # all frequency 1
    assert order(p) == "abcd"
    hit(p, "cc")  # c: 3
    hit(p, "a")  # a: 2
    assert order(p) == "bdac"
    assert [p.get_priority(K(x))[0] for x in "bdac"] == [1, 1, 2, 3]


def test_lfu_ties_are_least_recent_first():
    p = LFUPolicy()
    insert(p, "abc")
    hit(p, "cab")  # all frequency 2, last used c < a < b
    assert order(p) == "cab"
    hit(p, "c")
    insert(p, "d")
    assert order(p) == "dabc"
    evict(p, "c")
    insert(p, "c")  # its frequency restarts at 1, newest among the ones
    assert order(p) == "dcab"


# -- S3-FIFO -----------------------------------------------------------------------------
def test_s3fifo_one_hit_wonders_leave_first():
    p, lru = S3FIFOPolicy(), LRUPolicy()
    for q in (p, lru):
        insert(q, "hi")
        hit(q, "hi")  # reused blocks (a shared system prompt)
        insert(q, "01234567")  # a scan of blocks used once
    assert order(lru) == "hi01234567"  # LRU would drop the reused blocks first
    assert order(p) == "01234567hi"  # S3-FIFO promotes them to main while the scan drains
    evict(p, "0")
    assert p.queue_of(K("h")) == "main" and p.queue_of(K("0")) == "ghost"
    assert order(p) == "1234567hi"


def test_s3fifo_ghost_hit_goes_to_main():
    p = S3FIFOPolicy()
    insert(p, "abcd")
    assert order(p) == "abcd"
    evict(p, "a")
    assert p.queue_of(K("a")) == "ghost" and p.num_ghost == 1
    insert(p, "a")  # re-inserted while remembered: straight to main
    assert p.queue_of(K("a")) == "main" and p.num_ghost == 0
    insert(p, "ef")
    assert order(p) == "bcdefa"  # the small queue drains first; a, older than e and f, stays
    q = S3FIFOPolicy(ghost_ratio=0.0)  # no ghost: a comes back as a newcomer
    insert(q, "abcd")
    evict(q, "a")
    insert(q, "a")
    insert(q, "ef")
    assert q.queue_of(K("a")) == "small" and order(q) == "bcdaef"


def _main_only(p, names: str, nbytes: int = 1) -> None:
    """Put ``names`` in main, in that order, with frequency 0, through the ghost queue.

    Ten filler blocks stay tracked meanwhile: the ghost remembers at most ``ghost_ratio`` keys
    per tracked key.
    """
    fillers = "0123456789"
    insert(p, fillers)
    insert(p, names, nbytes)
    evict(p, names)
    insert(p, names, nbytes)
    evict(p, fillers)
    assert all(p.queue_of(K(x)) == "main" for x in names) and len(p) == len(names)


def test_s3fifo_main_reinsertion_and_lazy_commit():
    p = S3FIFOPolicy()
    _main_only(p, "abc")
    hit(p, "aab")  # a: 2, b: 1, c: 0
    # a -> end (1), b -> end (0), c evicted; a -> end (0), b evicted; a evicted
    assert order(p) == "cba"
    assert order(p) == "cba"  # nothing was applied by asking
    evict(p, "c")  # commits a and b moving to the end (a: 1, b: 0), then removes c
    assert order(p) == "ba"
    hit(p, "b")  # b: 1 now, after the commit
    assert order(p) == "ab"


def test_s3fifo_frequency_is_capped():
    capped, uncapped = S3FIFOPolicy(), S3FIFOPolicy(max_freq=15)
    for p in (capped, uncapped):
        _main_only(p, "xw")
        hit(p, "x" * 10 + "w" * 4)
    assert order(capped) == "xw"  # both capped at 3: x is older
    assert order(uncapped) == "wx"  # x: 10 reinsertions, w: 4


def test_s3fifo_small_queue_share_is_in_bytes():
    p = S3FIFOPolicy()
    _main_only(p, "abcdefghi")  # 9 blocks of 1 byte in main
    insert(p, "s")  # 1 of 10 bytes in small: >= 10%, small goes first
    assert order(p) == "sabcdefghi"
    q = S3FIFOPolicy()
    _main_only(q, "abcdefghi", nbytes=10)  # 9 blocks of 10 bytes in main
    insert(q, "s")  # 1 of 91 bytes: under 10%, main goes first
    assert order(q) == "abcdefghis"


def test_s3fifo_promote_threshold():
    p, strict = S3FIFOPolicy(), S3FIFOPolicy(promote_threshold=2)
    for q in (p, strict):
        insert(q, "abc")
        hit(q, "aab")
    assert order(p) == "cab"  # a and b promoted, c evicted, then main in order
    assert order(strict) == "bca"  # b (one hit) is not promoted


def test_s3fifo_skipped_candidate_stays_first():
    """The store skips a pinned candidate and evicts the next one."""
    p = S3FIFOPolicy()
    insert(p, "abcd")
    hit(p, "a")
    assert order(p) == "bcda"  # a is promoted to main before b is evicted
    evict(p, "c")  # b pinned: c goes; a's promotion (before b) is committed
    assert p.queue_of(K("a")) == "main" and p.queue_of(K("c")) == "ghost"
    assert order(p) == "bda"


def test_s3fifo_ghost_is_bounded():
    p = S3FIFOPolicy()  # ghost_ratio 0.9
    names = [bytes([i]) * 32 for i in range(100)]
    for k in names:
        p.on_insert(k, 1)
    for k in names[:50]:
        assert p.candidates(1) == [k]
        p.on_remove(k)
    assert len(p) == 50 and p.num_ghost == 45  # int(0.9 * 50), the most recent ones
    assert p.queue_of(names[4]) is None and p.queue_of(names[5]) == "ghost"
    for k in names[50:]:
        p.on_remove(k)
    assert len(p) == 0 and p.num_ghost == 0


# A direct, mutating S3-FIFO to check the virtual simulation against.
class NaiveS3FIFO:
    def __init__(self, small_ratio=0.1, ghost_ratio=0.9, max_freq=3, promote_threshold=1):
        self.small_ratio, self.ghost_ratio = small_ratio, ghost_ratio
        self.max_freq, self.threshold = max_freq, promote_threshold
        self.small: deque[list] = deque()  # [key, nbytes, freq], oldest first
        self.main: deque[list] = deque()
        self.ghost: OrderedDict[bytes, None] = OrderedDict()

    def keys(self):
        return [e[0] for e in self.small] + [e[0] for e in self.main]

    def insert(self, key, nbytes):
        if key in self.keys():
            return self.access(key)
        if key in self.ghost:
            del self.ghost[key]
            self.main.append([key, nbytes, 0])
        else:
            self.small.append([key, nbytes, 0])

    def access(self, key):
        for e in (*self.small, *self.main):
            if e[0] == key:
                e[2] = min(e[2] + 1, self.max_freq)

    def _step(self, apply_eviction: bool):
        """One step of the loop; returns the victim (removed only if ``apply_eviction``) or None."""
        total = sum(e[1] for e in (*self.small, *self.main))
        small_bytes = sum(e[1] for e in self.small)
        if self.small and (not self.main or small_bytes >= self.small_ratio * total):
            e = self.small[0]
            if e[2] >= self.threshold:
                self.small.popleft()
                self.main.append([e[0], e[1], 0])
                return None
            if apply_eviction:
                self.small.popleft()
            return e[0]
        e = self.main[0]
        if e[2] > 0:
            self.main.rotate(-1)
            e[2] -= 1
            return None
        if apply_eviction:
            self.main.popleft()
        return e[0]

    def order(self):
        c = copy.deepcopy(self)
        out = []
        while c.small or c.main:
            victim = c._step(apply_eviction=True)
            if victim is not None:
                out.append(victim)
        return out

    def remove(self, key):
        if key not in self.keys():
            return
        while (self.small or self.main) and self._step(apply_eviction=False) is None:
            pass  # the moves before the first victim
        for e in self.small:
            if e[0] == key:
                self.small.remove(e)
                self.ghost[key] = None
                while len(self.ghost) > int(self.ghost_ratio * len(self.keys())):
                    self.ghost.popitem(last=False)
                return
        self.main.remove(next(e for e in self.main if e[0] == key))


NAIVE_KEYS = [bytes([i]) * 32 for i in range(8)]
naive_ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 7), st.sampled_from([1, 2, 5])),
        st.tuples(st.just("access"), st.integers(0, 7)),
        st.tuples(st.just("remove"), st.integers(0, 7)),
        st.tuples(st.just("evict"), st.integers(0, 2)),
    ),
    min_size=15,
    max_size=80,
)


@pytest.mark.parametrize("options", [{}, {"small_ratio": 0.4, "ghost_ratio": 0.5, "max_freq": 2, "promote_threshold": 2}])
@settings(max_examples=80, deadline=None)
@given(seq=naive_ops)
def test_s3fifo_matches_a_direct_implementation(options, seq):
    p, ref = S3FIFOPolicy(**options), NaiveS3FIFO(**options)
    for op in seq:
        if op[0] == "insert":
            p.on_insert(NAIVE_KEYS[op[1]], op[2])
            ref.insert(NAIVE_KEYS[op[1]], op[2])
        elif op[0] == "access":
            p.on_access(NAIVE_KEYS[op[1]])
            ref.access(NAIVE_KEYS[op[1]])
        else:
            cands = p.candidates(op[1] + 1)
            key = NAIVE_KEYS[op[1]] if op[0] == "remove" else (cands[-1] if cands else None)
            if key is not None:
                p.on_remove(key)
                ref.remove(key)
        assert p.candidates(len(p)) == ref.order()
        assert [k for k in NAIVE_KEYS if p.queue_of(k) == "ghost"] == [k for k in NAIVE_KEYS if k in ref.ghost]


# -- cost-aware --------------------------------------------------------------------------
def test_cost_keeps_deep_blocks():
    p = CostAwarePolicy(alpha=0.5)
    for d, name in enumerate("ABCD"):  # one chain, depths 0..3
        p.on_insert(K(name), 100, depth=d)
    for d, name in enumerate("xy"):  # another chain, depths 0..1
        p.on_insert(K(name), 100, depth=d)
    assert order(p) == "AxByCD"  # shallow first; equal cost: least recent first
    assert p.recompute_cost(0) == 1.5 and p.recompute_cost(3) == 3.0
    assert p.get_priority(K("D")) == (3.0 / 100, 4)


def test_cost_prefers_keeping_small_blocks_of_equal_cost():
    p = CostAwarePolicy()
    p.on_insert(K("f"), 1000, depth=4)  # full precision
    p.on_insert(K("q"), 250, depth=4)  # the same block quantised: 4x the value per byte
    p.on_insert(K("s"), 250, depth=0)
    assert order(p) == "fsq"


def test_cost_aging_lets_old_expensive_blocks_go():
    p = CostAwarePolicy(alpha=0.5)
    p.on_insert(K("D"), 1, depth=9)  # H = 0 + 6.0
    for i, name in enumerate("123"):
        p.on_insert(K(name), 1, depth=0)  # H = L + 1.5
        assert order(p) == name + "D"
        evict(p, name)
        assert p.inflation == 1.5 * (i + 1)  # L rises to each victim's H
    p.on_insert(K("4"), 1, depth=0)  # H = 4.5 + 1.5 = 6.0: ties with D, which is older
    assert order(p) == "D4"
    hit(p, "D")  # H = 4.5 + 6.0
    assert order(p) == "4D" and p.get_priority(K("D"))[0] == 10.5


def test_cost_deletion_does_not_age_past_the_lowest_block():
    p = CostAwarePolicy(alpha=0.5)
    p.on_insert(K("a"), 1, depth=0)  # 1.5
    p.on_insert(K("b"), 1, depth=9)  # 6.0
    evict(p, "b")  # not the first candidate (a delete, or a pinned a)
    assert p.inflation == 1.5
    p.on_insert(K("c"), 1, depth=0)  # 3.0
    assert order(p) == "ac"


class NaiveGreedyDual:
    """GreedyDual-Size as the module docstring states it, with a dict and min()."""

    def __init__(self, alpha):
        self.alpha, self.L, self.tick, self.h = alpha, 0.0, 0, {}  # key -> [H, tick, value]

    def insert(self, key, nbytes, depth):
        if key in self.h:
            return self.access(key)
        self.tick += 1
        value = (1 + self.alpha * (depth + 1)) / max(nbytes, 1)
        self.h[key] = [self.L + value, self.tick, value]

    def access(self, key):
        if key in self.h:
            self.tick += 1
            e = self.h[key]
            e[0], e[1] = self.L + e[2], self.tick

    def remove(self, key):
        if key in self.h:
            self.L = min(e[0] for e in self.h.values())
            del self.h[key]

    def order(self):
        return sorted(self.h, key=lambda k: self.h[k][:2])


@settings(max_examples=60, deadline=None)
@given(
    seq=st.lists(
        st.one_of(
            st.tuples(st.just("insert"), st.integers(0, 7), st.sampled_from([0, 1, 3, 64]), st.integers(0, 9)),
            st.tuples(st.just("access"), st.integers(0, 7)),
            st.tuples(st.just("remove"), st.integers(0, 7)),
            st.tuples(st.just("evict"), st.integers(0, 2)),
        ),
        min_size=10,
        max_size=60,
    )
)
def test_cost_matches_a_direct_implementation(seq):
    p, ref = CostAwarePolicy(alpha=0.7), NaiveGreedyDual(0.7)
    for op in seq:
        if op[0] == "insert":
            p.on_insert(NAIVE_KEYS[op[1]], op[2], depth=op[3])
            ref.insert(NAIVE_KEYS[op[1]], op[2], op[3])
        elif op[0] == "access":
            p.on_access(NAIVE_KEYS[op[1]])
            ref.access(NAIVE_KEYS[op[1]])
        else:
            cands = p.candidates(op[1] + 1)
            key = NAIVE_KEYS[op[1]] if op[0] == "remove" else (cands[-1] if cands else None)
            p.on_remove(key)
            ref.remove(key)
        assert p.candidates(8) == ref.order()
        assert p.inflation == ref.L
        assert [p.get_priority(k) for k in ref.order()] == [tuple(ref.h[k][:2]) for k in ref.order()]


# -- the indexed heap under the cost and tenant policies ------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    seq=st.lists(
        st.tuples(st.sampled_from(["push", "update", "remove"]), st.integers(0, 30), st.integers(0, 50)), min_size=20, max_size=120
    )
)
def test_indexed_heap_keeps_order_and_positions(seq):
    heap, live = IndexedHeap(), {}
    for step, (kind, i, prio) in enumerate(seq):
        item = live.get(i)
        if kind == "push" and item is None:
            live[i] = item = HeapItem((prio, step))
            heap.push(item)
        elif kind == "update" and item is not None:
            heap.update(item, (prio, step))
        elif kind == "remove" and item is not None:
            heap.remove(live.pop(i))
            assert item.pos == -1
        items = heap._items
        assert all(it.pos == j for j, it in enumerate(items))
        assert all(not items[j].prio < items[(j - 1) // 2].prio for j in range(1, len(items)))
        assert [it.prio for it in heap.ordered()] == sorted(it.prio for it in live.values())
        assert heap.peek() is (items[0] if items else None)


# -- tenant fairness ---------------------------------------------------------------------
def test_tenant_fair_takes_from_the_heaviest_tenant():
    p = TenantFairPolicy()
    insert(p, "abc", 10, tenant="A")  # 30 bytes
    insert(p, "xy", 10, tenant="B")  # 20 bytes
    # A 30 -> a; A 20 = B 20, tie by name -> b; B 20 -> x; A 10 = B 10 -> c; y
    assert order(p) == "abxcy"
    assert p.tenant_bytes("A") == 30 and p.tenant_bytes("B") == 20 and p.tenant_bytes("C") == 0
    lru = LRUPolicy()
    insert(lru, "abcxy")
    assert order(lru) == "abcxy"


def test_tenant_fair_weights_and_inner_order():
    p = TenantFairPolicy(weights={"A": 2.0})
    insert(p, "abcd", 10, tenant="A")  # load 40 / 2 = 20
    insert(p, "xy", 10, tenant="B")  # load 20
    hit(p, "a")  # within A, LRU: b c d a
    assert order(p) == "bxcdya"  # A 20=B 20 -> b; B -> x; A 15 -> c; A 10=B 10 -> d; B -> y; a
    evict(p, "b")
    assert order(p) == "xcdya"


def test_tenant_fair_flooding_tenant_is_evicted_alone():
    p = TenantFairPolicy(inner="lfu")
    insert(p, "pq", 10, tenant="quiet")
    insert(p, "0123456789", 10, tenant="noisy")
    hit(p, "0")  # within noisy, LFU: 1..9 then 0
    # noisy loses 8 blocks before quiet loses any; then 20 = 20, and ties go by name
    assert order(p) == "12345678" + "9p0q"


def test_tenant_fair_forgets_empty_tenants():
    p = get_policy("tenant_fair", inner="s3fifo", inner_options={"small_ratio": 0.5})
    insert(p, "ab", 5, tenant="t")
    insert(p, "c", 5, tenant="u")
    assert p.num_tenants == 2 and p.tenant_bytes("t") == 10
    evict(p, "ab")
    assert p.num_tenants == 1 and p.tenant_bytes("t") == 0 and order(p) == "c"
