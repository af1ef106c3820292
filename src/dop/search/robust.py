"""How per-sample first-token divergences become one figure (docs/design.md, "Robust
aggregation"): the mean (the paper's), the median, or the trimmed mean; and which samples
are outliers.

A first-token KL over a sample set is often carried by one or two samples whose answer
flips: their divergence is tens of times the others'. The mean then ranks policies by those
few samples. ``median`` and ``trimmed`` (the mean of what is left after dropping the
``TRIM`` fraction of the samples at each end, rounded down: 2 of 25 each side) follow the
bulk of the samples instead.
"""

from __future__ import annotations

import math
from typing import Sequence

AGGREGATES = ("mean", "median", "trimmed")
DEFAULT_AGGREGATE = "mean"
TRIM = 0.1  # fraction of the samples dropped at each end by the trimmed mean
OUTLIER_FACTOR = 10.0  # a sample whose divergence exceeds this many times the median is named


def check_aggregate(how: str) -> str:
    """``how`` if it names an aggregation, else a ValueError naming the choices."""
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; use one of {', '.join(AGGREGATES)}")
    return how


def aggregate(values: Sequence[float], how: str = DEFAULT_AGGREGATE) -> float:
    """The mean, median or trimmed mean (:data:`TRIM` at each end) of ``values``."""
    check_aggregate(how)
    xs = sorted(float(x) for x in values)
    if not xs:
        raise ValueError("aggregate: no values")
    n = len(xs)
    if how == "median":
        return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    if how == "trimmed":
        cut = int(math.floor(TRIM * n))
        xs = xs[cut:n - cut]
    return sum(xs) / len(xs)


def describe(how: str) -> str:
    """``how`` in words, with the trim stated."""
    if how == "trimmed":
        return f"trimmed mean ({TRIM:.0%} of the samples dropped at each end)"
    return how


def outliers(values: Sequence[float], ids: Sequence[str] | None = None,
             factor: float = OUTLIER_FACTOR) -> list[dict]:
    """The samples whose divergence exceeds ``factor`` times the median (none where the median
    is 0), largest first: ``{"sample", "divergence", "ratio"}``. ``ids`` name the samples
    (default: their index)."""
    med = aggregate(values, "median") if len(values) else 0.0
    if med <= 0:
        return []
    names = list(ids) if ids is not None else [f"#{i}" for i in range(len(values))]
    found = [{"sample": names[i] or f"#{i}", "divergence": float(x), "ratio": float(x) / med}
             for i, x in enumerate(values) if x > factor * med]
    return sorted(found, key=lambda o: -o["divergence"])
