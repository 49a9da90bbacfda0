"""`branchwise bench`: offline strategy comparisons and online load against any OpenAI-compatible server."""

from __future__ import annotations

import statistics


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": 0.0 for p in ps} | {"mean": 0.0}
    ordered = sorted(values)
    out = {f"p{p}": ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] for p in ps}
    return out | {"mean": statistics.fmean(values)}
