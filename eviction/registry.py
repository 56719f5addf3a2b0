"""One registry shape for the eviction package: classes selectable by their lower-case ``name``,
built with keyword options that are checked against the class's signature."""

from __future__ import annotations

import inspect
from typing import TypeVar

C = TypeVar("C", bound=type)


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "block policy", "scorer": used in every message
        self._classes: dict[str, type] = {}

    def register(self, cls: C) -> C:
        """Class decorator: make ``cls`` selectable as ``make(cls.name, **options)``."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or name != name.lower():
            raise ValueError(f"a {self.kind} needs a lower-case string `name`, got {name!r}")
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self._classes[name].__qualname__}")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def make(self, name: str, **options):
        """A new instance. ValueError for an unknown name, option, or option value."""
        if not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a str, got {type(name).__name__}")
        cls = self._classes.get(name.strip().lower())
        if cls is None:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        params = inspect.signature(cls).parameters.values()
        accepted = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = sorted(set(options) - {p.name for p in accepted})
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
            expected = ", ".join(p.name for p in accepted) or "no options"
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for {self.kind} {cls.name!r}; expected: {expected}")
        return cls(**options)
