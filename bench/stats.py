"""Statistics every bench shares, so that "p99" means one thing in every figure.

Import it as `from stats import percentile` (a bench runs as `python bench/NAME.py`,
so bench/ is first on sys.path).
"""
from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `values`, by linear interpolation
    between the closest ranks: the value at position q/100 * (n - 1) of the sorted
    values, interpolated between its two neighbours (Hyndman and Fan's type 7,
    numpy's default). p50 is the median; p0 and p100 are the minimum and maximum.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    position = q / 100 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
