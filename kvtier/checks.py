"""Argument checks shared by every room: a caller's mistake is a ``ValueError`` that says what was
expected and what came. ``bool`` is never accepted as a number. Imports nothing of kvtier's."""

from __future__ import annotations

import math


def check_int(name: str, value: object, *, low: int | float = -math.inf, high: int | float = math.inf) -> int:
    """``value`` itself, or ValueError unless it is an int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{_fmt(low)}, {_fmt(high)}], got {value!r}")
    return value


def check_real(
    name: str, value: object, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a float, or ValueError unless it is a finite real number in the given range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {lo}{_fmt(low)}, {_fmt(high)}{hi}, got {value!r}")
    return float(value)


def _fmt(x: int | float) -> str:
    return str(x) if math.isfinite(x) else ("-inf" if x < 0 else "inf")
