"""The one rule of every pass/fail judgement in yitrt: a check that meets NaN, nothing measured or an empty input
fails; it never passes.

A comparison with NaN is False, so ``value > bound`` "passes" a NaN; ``None`` skipped as "not measured" passes
too; a fraction over zero items defaults to something. Every judge (verify's thresholds, the pipeline check, the
quantize record, bench's SLO, goodput and best point, plan's fits, the recipe smoke) goes through ``measured``
and ``bound_failure`` so that none of them can.
"""

from __future__ import annotations

import math
from typing import Any


def measured(value: Any) -> bool:
    """Whether ``value`` is a real, finite number (not None, not a bool, not NaN or ±Inf)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def finite_or_none(value: Any) -> Any:
    """``value``, or None where it is a float that is not finite (JSON has no NaN/Inf)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def bound_failure(label: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                  magnitude: bool = False, fmt: str = ".4g", unit: str = "") -> str | None:
    """Why ``value`` fails its bound, or None when it holds.

    Args:
        label: what the value is (e.g. "top-1 agreement").
        value: the figure judged; not a finite number always fails.
        minimum / maximum: the bounds (None: that side unbounded). A bound that is itself not finite fails too.
        magnitude: judge ``abs(value)`` against ``maximum`` (a ± bound).
        fmt / unit: how the value and bound are shown.

    Returns:
        A one-line failure, or None.
    """
    if not measured(value):
        return f"{label} is {value!r}: not a number (nothing was measured, or the computation diverged)"
    for bound in (minimum, maximum):
        if bound is not None and not measured(bound):
            return f"{label}: the bound {bound!r} is not a number"
    shown = f"{value:{fmt}}{unit}"
    if minimum is not None and value < minimum:
        return f"{label} {shown} < {minimum:{fmt}}{unit}"
    if maximum is not None and (abs(value) if magnitude else value) > maximum:
        return f"{label} {shown} exceeds {'±' if magnitude else ''}{maximum:{fmt}}{unit}"
    return None


def nothing_judged(what: str, count: int) -> str | None:
    """A failure when a judgement covered no items (``count`` == 0), else None."""
    return f"nothing was judged: {what} is 0" if count <= 0 else None
