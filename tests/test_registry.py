"""kvtier.registry: the one registry shape behind codecs, stages, policies, scorers, selectors, indexes, kernels."""

from __future__ import annotations

import pytest

from kvtier.checks import check_int, check_real
from kvtier.registry import Registry


class Alpha:
    name = "alpha"

    def __init__(self, size: int = 1, *, ratio: float = 0.5) -> None:
        self.size, self.ratio = size, ratio


def test_register_get_make_and_sorted_names():
    reg: Registry[type] = Registry("widget")
    reg.register(Alpha)
    reg.register(lambda: "z", name="zeta")
    reg.register(Alpha, name="beta")
    assert reg.names() == ["alpha", "beta", "zeta"] == list(reg)
    assert reg.get(" Alpha ") is Alpha and reg["beta"] is Alpha and "zeta" in reg and len(reg) == 3
    made = reg.make("alpha", size=3, ratio=0.25)
    assert (made.size, made.ratio) == (3, 0.25)


def test_decorator_forms():
    reg: Registry[type] = Registry("widget")

    @reg.register
    class A:
        name = "a"

    @reg.register(name="b")
    class B:
        pass

    assert reg.names() == ["a", "b"] and reg.get("b") is B and reg.get("a") is A


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda r: r.get("nope"), r"unknown widget 'nope'; known: alpha"),
        (lambda r: r.get(3), "widget name must be a str, got int"),
        (lambda r: r.make("alpha", sise=2), r"unknown option\(s\) sise for widget 'alpha'; expected: size, ratio"),
        (lambda r: r.register(Alpha, name="Alpha"), "lower-case name"),
        (lambda r: r.register(object(), name=""), "lower-case name"),
        (lambda r: r.register(lambda: None, name="alpha"), "widget 'alpha' is already registered"),
    ],
)
def test_caller_mistakes_are_value_errors_that_change_nothing(call, match):
    reg: Registry[type] = Registry("widget")
    reg.register(Alpha)
    reg.register(Alpha)  # the same object again is a no-op, not a duplicate
    with pytest.raises(ValueError, match=match):
        call(reg)
    assert reg.names() == ["alpha"]


def test_every_family_uses_the_registry():
    from kvtier.eviction.blocks.base import _POLICIES
    from kvtier.eviction.tokens.base import _SCORERS
    from kvtier.kvstore.codecs.base import _CODECS, _STAGES
    from kvtier.retrieval.index import _INDEXES
    from kvtier.retrieval.selectors import _SELECTORS
    from kvtier.sparse_attn.registry import KERNELS

    for reg in (_POLICIES, _SCORERS, _CODECS, _STAGES, _INDEXES, _SELECTORS, KERNELS):
        assert isinstance(reg, Registry) and reg.names() == sorted(reg.names()) and len(reg) > 0


def test_checks():
    assert check_int("n", 3, low=0, high=4) == 3
    assert check_real("x", 1, low=0.0) == 1.0
    for bad in (True, 2.0, "3", 5):
        with pytest.raises(ValueError, match=r"n must be an int in \[0, 4\]"):
            check_int("n", bad, low=0, high=4)
    with pytest.raises(ValueError, match=r"x must lie in \(0, inf\]"):
        check_real("x", 0, low=0, low_open=True)
    with pytest.raises(ValueError, match="x must be a finite number"):
        check_real("x", float("nan"))
