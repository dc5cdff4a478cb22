"""What the apply summary says about guards, pauses and batch sizes (issue #13), from the ledger
alone, so that `backfill report` re-renders it byte for byte."""

from __future__ import annotations

import math
import statistics
from typing import Any

import asyncpg

from runner import ledger

CHART_POINTS = 24


def _sampled(values: list[float], points: int = CHART_POINTS) -> list[float]:
    """At most `points` values, each the mean of its stretch of batches (in batch order)."""
    if len(values) <= points:
        return values
    per = math.ceil(len(values) / points)
    return [round(statistics.fmean(values[i : i + per]), 3) for i in range(0, len(values), per)]


def batch_sizes(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """Sizes and times of the committed batches: the figures and the per-batch chart series."""
    done = [o for o in outcomes if o["status"] == "done"]
    sizes = [float(o["selected"]) for o in done]
    if not sizes:
        return {}
    return {
        "first": int(sizes[0]),
        "last": int(sizes[-1]),
        "min": int(min(sizes)),
        "median": int(statistics.median(sizes)),
        "max": int(max(sizes)),
        "varied": min(sizes) != max(sizes),  # a fixed size varies only where discovery ran dry
        "size_series": [round(s) for s in _sampled(sizes)],
        "seconds_series": _sampled([round(o["duration_ms"] / 1000, 3) for o in done]),
        "per_point": math.ceil(len(sizes) / CHART_POINTS) if len(sizes) > CHART_POINTS else 1,
    }


async def watch_context(
    conn: asyncpg.Connection, run_id: str, stage: str, outcomes: list[dict[str, Any]]
) -> dict[str, Any]:
    """`held`: seconds held by signal (a pause is `paused`); `yielded`: the wait for busy
    sessions (ledger.yielded); `sizes`: see batch_sizes."""
    return {
        "held": await ledger.held_seconds(conn, run_id, stage),
        "yielded": await ledger.yielded(conn, run_id, stage),
        "sizes": batch_sizes(outcomes),
    }
