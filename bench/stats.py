"""Small statistics used by the harness: percentiles by nearest rank and medians that tolerate gaps."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Return the q-th percentile (0 < q <= 100) of already sorted values by nearest rank, or None."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ms(seconds: float | None) -> float | None:
    """Convert seconds to milliseconds, rounded to microseconds, keeping None."""
    return None if seconds is None else round(seconds * 1000.0, 3)


def median_of(values: Iterable[float | None]) -> float | None:
    """Return the median of the values that are not None, or None when there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
