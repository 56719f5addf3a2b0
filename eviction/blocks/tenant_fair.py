"""Per-tenant isolation: victims come from the tenant holding the most bytes per unit of share.

Each tenant has its own inner policy (``inner``, e.g. ``"lru"``) over its own keys. The order
is built one victim at a time: take the tenant with the highest load ``bytes / weight`` (ties:
the smaller tenant name), take its inner policy's next victim, lower that tenant's load by the
victim's bytes, repeat. So a tenant that floods the tier is evicted first and alone until it
is down to the others' load; within a tenant, the inner policy decides.

Structure: tenants in an indexed heap on ``(-load, tenant)`` (O(log T) per update). A tenant
and its inner policy are dropped when its last key leaves, so memory is bounded by the keys.
``candidates(n)`` merges the real tenant order (best-first walk of the heap, read-only) with a
small private heap of the tenants already drawn from, whose loads it lowers virtually: O(n log n)
plus the inner policies' own ``candidates`` cost for the keys drawn (fetched in doubling batches).
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import Mapping

from .base import PolicyBase, check_insert, check_real, get_policy, register_policy
from .heap import HeapItem, IndexedHeap


class _Tenant(HeapItem):
    __slots__ = ("tenant", "weight", "nbytes", "policy")

    def __init__(self, tenant: str, weight: float, policy) -> None:
        super().__init__((-0.0, tenant))
        self.tenant = tenant
        self.weight = weight
        self.nbytes = 0
        self.policy = policy


class _Cursor:
    """One tenant during ``candidates()``: its virtual load and its inner victims drawn so far."""

    __slots__ = ("tenant", "nbytes", "left", "_keys", "_next")

    def __init__(self, tenant: _Tenant) -> None:
        self.tenant = tenant
        self.nbytes = tenant.nbytes
        self.left = len(tenant.policy)
        self._keys: list[bytes] = []
        self._next = 0

    def prio(self) -> tuple[float, str]:
        return (-self.nbytes / self.tenant.weight, self.tenant.tenant)

    def take(self) -> bytes:
        if self._next == len(self._keys):  # candidates(k) is a prefix of candidates(2k)
            self._keys = self.tenant.policy.candidates(max(8, 2 * len(self._keys)))
            if self._next == len(self._keys):
                raise RuntimeError(f"inner policy of tenant {self.tenant.tenant!r} lists fewer keys than it tracks")
        key = self._keys[self._next]
        self._next += 1
        self.left -= 1
        return key


@register_policy
class TenantFairPolicy(PolicyBase):
    """Evict from the tenant with the most bytes per share, in its inner policy's order.

    Options:
      ``inner`` (default ``"lru"``): the policy used within each tenant (any registered name
          but ``"tenant_fair"``);
      ``inner_options`` (dict, default none): options for ``get_policy(inner, ...)``;
      ``weights`` (dict tenant -> float > 0, default none): a tenant's share; load = bytes / weight;
      ``default_weight`` (float > 0, default 1.0): the share of tenants not in ``weights``.
    """

    __slots__ = ("inner", "inner_options", "weights", "default_weight", "_tenants", "_heap", "_entry_of")
    name = "tenant_fair"

    def __init__(
        self,
        *,
        inner: str = "lru",
        inner_options: Mapping[str, object] | None = None,
        weights: Mapping[str, float] | None = None,
        default_weight: float = 1.0,
    ) -> None:
        if not isinstance(inner, str):
            raise ValueError(f"inner must be a policy name, got {type(inner).__name__}")
        if inner.strip().lower() == self.name:
            raise ValueError("inner cannot be 'tenant_fair' itself")
        if inner_options is not None and not isinstance(inner_options, Mapping):
            raise ValueError(f"inner_options must be a dict, got {type(inner_options).__name__}")
        if weights is not None and not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a dict tenant -> weight, got {type(weights).__name__}")
        self.inner = inner.strip().lower()
        self.inner_options = dict(inner_options or {})
        get_policy(self.inner, **self.inner_options)  # ValueError now, not at the first insert
        self.weights: dict[str, float] = {}
        for tenant, w in (weights or {}).items():
            if not isinstance(tenant, str):
                raise ValueError(f"weights keys must be tenant names (str), got {tenant!r}")
            self.weights[tenant] = check_real(f"weights[{tenant!r}]", w, low=0.0, low_open=True)
        self.default_weight = check_real("default_weight", default_weight, low=0.0, low_open=True)
        self._tenants: dict[str, _Tenant] = {}
        self._heap: IndexedHeap[_Tenant] = IndexedHeap()  # of _Tenant, prio (-bytes / weight, tenant)
        self._entry_of: dict[bytes, tuple[_Tenant, int]] = {}  # key -> (its tenant, its nbytes)

    @property
    def num_tenants(self) -> int:
        """Tenants with at least one tracked key."""
        return len(self._tenants)

    def tenant_bytes(self, tenant: str) -> int:
        """Bytes tracked for ``tenant`` (0 for an unknown tenant)."""
        t = self._tenants.get(tenant)
        return 0 if t is None else t.nbytes

    def _set_bytes(self, t: _Tenant, nbytes: int) -> None:
        t.nbytes = nbytes
        self._heap.update(t, (-nbytes / t.weight, t.tenant))

    def on_insert(self, key: bytes, nbytes: int, *, depth: int = 0, tenant: str = "") -> None:
        check_insert(key, nbytes, depth, tenant)
        if key in self._entry_of:
            self.on_access(key)  # stays with the tenant that inserted it first
            return
        t = self._tenants.get(tenant)
        if t is None:
            t = _Tenant(tenant, self.weights.get(tenant, self.default_weight), get_policy(self.inner, **self.inner_options))
            self._tenants[tenant] = t
            self._heap.push(t)
        t.policy.on_insert(key, nbytes, depth=depth, tenant=tenant)
        self._entry_of[key] = (t, nbytes)
        self._set_bytes(t, t.nbytes + nbytes)

    def on_access(self, key: bytes) -> None:
        entry = self._entry_of.get(key) if isinstance(key, bytes) else None
        if entry is not None:
            entry[0].policy.on_access(key)

    def on_remove(self, key: bytes) -> None:
        entry = self._entry_of.pop(key, None) if isinstance(key, bytes) else None
        if entry is None:
            return
        t, nbytes = entry
        t.policy.on_remove(key)
        if len(t.policy) == 0:
            self._heap.remove(t)
            del self._tenants[t.tenant]
        else:
            self._set_bytes(t, t.nbytes - nbytes)

    def _candidates(self, n: int) -> list[bytes]:
        out: list[bytes] = []
        untouched = self._heap.ordered()  # real order of the tenants not drawn from yet
        nxt = next(untouched, None)
        drawn: list[tuple[tuple[float, str], _Cursor]] = []  # heap; prios are distinct (tenant names)
        while len(out) < n:
            if nxt is not None and (not drawn or nxt.prio < drawn[0][0]):
                heappush(drawn, (nxt.prio, _Cursor(nxt)))
                nxt = next(untouched, None)
                continue
            if not drawn:
                break
            _, cur = heappop(drawn)
            key = cur.take()
            out.append(key)
            cur.nbytes -= self._entry_of[key][1]
            if cur.left:
                heappush(drawn, (cur.prio(), cur))
        return out

    def __len__(self) -> int:
        return len(self._entry_of)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and key in self._entry_of
