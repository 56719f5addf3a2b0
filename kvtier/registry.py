"""One registry shape for every pluggable family of kvtier: codecs and lossless stages, block
policies, token scorers, selectors, key indexes and kernels.

A ``Registry`` maps a name to an implementation (a class, a factory, or an entry object):

- names are lower-case strings, listed sorted by ``names()``;
- registering a second, different implementation under a taken name is a ``ValueError``;
- ``make(name, **options)`` calls the implementation with options checked against its signature
  first, so a typo is a ``ValueError`` that lists the accepted options, never a ``TypeError``;
- ``get(name)`` returns the registered object itself; an unknown name is a ``ValueError`` that lists
  the known ones. A registry also reads like a mapping (``reg[name]``, ``in``, sorted iteration, ``items()``, ``values()``).

This module imports nothing of kvtier's, so every room (``kvstore`` and ``sparse_attn`` included) may use it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, Callable, Generic, TypeVar, cast, overload

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations of one kind (``kind`` names it in every message: "codec", "selector")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, obj: T, *, name: str | None = None) -> T: ...
    @overload
    def register(self, obj: None = None, *, name: str | None = None) -> Callable[[T], T]: ...

    def register(self, obj=None, *, name=None):
        """Register ``obj`` under ``name`` (default: its ``name`` attribute). Used directly or as a
        decorator (``@reg.register`` or ``@reg.register(name="x")``); returns ``obj`` unchanged."""
        if obj is None:
            return lambda o: self.register(o, name=name)
        key = name if name is not None else getattr(obj, "name", None)
        if not isinstance(key, str) or not key or key != key.strip().lower():
            raise ValueError(f"a {self.kind} needs a non-empty lower-case name, got {key!r}")
        if key in self._items and self._items[key] is not obj:
            raise ValueError(f"{self.kind} {key!r} is already registered ({_describe(self._items[key])})")
        self._items[key] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plugin unloading, a test cleaning up); a name not registered is a no-op."""
        self._items.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The object registered under ``name``; ValueError for a name that is not registered."""
        if not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a str, got {type(name).__name__}")
        key = name.strip().lower()
        if key not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}")
        return self._items[key]

    def make(self, name: str, **options: Any):
        """Call the implementation registered under ``name`` with ``options`` (checked first)."""
        impl = cast(Callable[..., Any], self.get(name))
        check_options(impl, options, f"{self.kind} {name.strip().lower()!r}")
        return impl(**options)

    # read-only mapping (get() differs from Mapping.get: a miss is an error, never a default)
    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.names()]

    def values(self) -> list[T]:
        return [self._items[n] for n in self.names()]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def check_options(impl: Callable, options: dict, what: str) -> None:
    """ValueError if ``impl`` accepts no keyword argument of some name in ``options``."""
    try:
        params = list(inspect.signature(impl).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {what}; expected: {', '.join(accepted) or 'no options'}")


def _describe(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__
