"""The argument checks and the base every built-in block policy shares, and their registry.

The ``BlockPolicy`` protocol itself is kvstore's (``kvtier.kvstore.policy``), re-exported here.

The contract every policy keeps (side-effect-free ``candidates``, eviction-order consistency, bounded
memory) is written there, and ``tests/contracts/test_block_policy_contract.py`` checks it for every
registered policy.

Policies are not thread-safe: the store serialises calls to one instance.
"""

from __future__ import annotations

import operator
from typing import Any, TypeVar

from kvtier.checks import check_int, check_real  # noqa: F401  (re-exported for the policies)
from kvtier.kvstore.policy import BlockPolicy  # noqa: F401  (re-exported)
from kvtier.registry import Registry


class PolicyBase:
    """What the built-in policies share: argument checks and the ``candidates`` front door.

    Subclasses implement ``_candidates(n)`` for ``1 <= n`` on a non-empty policy.
    """

    __slots__ = ()
    name: str = ""

    def candidates(self, n: int) -> list[bytes]:
        try:
            n = operator.index(n)
        except TypeError:
            raise ValueError(f"n must be an int, got {type(n).__name__}") from None
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0 or len(self) == 0:
            return []
        return self._candidates(n)

    def _candidates(self, n: int) -> list[bytes]:
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - every policy overrides it
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self)} keys>"


def check_insert(key: object, nbytes: object, depth: object, tenant: object) -> None:
    """ValueError unless the arguments of ``on_insert`` have the documented types and ranges."""
    if not isinstance(key, bytes):
        raise ValueError(f"key must be bytes (a BlockHash), got {type(key).__name__}")
    check_int("nbytes", nbytes, low=0)
    check_int("depth", depth, low=0)
    if not isinstance(tenant, str):
        raise ValueError(f"tenant must be a str, got {type(tenant).__name__}")


# -- registry --------------------------------------------------------------------------------
_POLICIES: Registry[Any] = Registry("block policy")  # policy classes, each with its own options
P = TypeVar("P", bound=type)


def register_policy(cls: P) -> P:
    """Class decorator: make ``cls`` selectable as ``get_policy(cls.name, **options)``."""
    return _POLICIES.register(cls)


def available_policies() -> list[str]:
    """Names accepted by ``get_policy``, sorted."""
    return _POLICIES.names()


def get_policy(name: str, **options) -> BlockPolicy:
    """A new, empty policy instance. ValueError for an unknown name, option, or option value."""
    return _POLICIES.make(name, **options)
