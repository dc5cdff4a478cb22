"""Adaptive batch size: move the page size toward batches of a target duration.

Modelled on GitLab's `BatchOptimizer`: the measured cost is smoothed (an exponential moving
average of seconds per row, so one slow batch does not halve the size), a size within a band
around the target is left alone, a step up is at most +20 % per batch and a step down at most
-50 % (slowing down quickly is the safe direction), and the size always stays within
`min_size`..`max_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMOOTHING = 0.3  # weight of the newest batch in the moving average
BAND = 0.1  # within ±10 % of the target, the size stays
MAX_GROWTH = 1.2
MAX_SHRINK = 0.5


@dataclass
class BatchSizer:
    """The size the batch source is asked for next; `observe` each committed batch."""

    size: int
    min_size: int
    max_size: int
    target_seconds: float | None  # None: a fixed size
    seconds_per_row: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.size = self._clamp(self.size)

    def _clamp(self, size: float) -> int:
        return max(self.min_size, min(self.max_size, int(size)))

    def observe(self, rows: int, seconds: float) -> int:
        """Take one batch's size and duration into account; returns the next size."""
        if self.target_seconds is None or rows <= 0 or seconds < 0:
            return self.size
        per_row = seconds / rows
        previous = self.seconds_per_row
        self.seconds_per_row = (
            per_row if previous is None else SMOOTHING * per_row + (1 - SMOOTHING) * previous
        )
        expected = self.size * self.seconds_per_row  # a batch of today's size, at today's cost
        if abs(expected - self.target_seconds) <= BAND * self.target_seconds:
            return self.size
        ideal = self.target_seconds / self.seconds_per_row if self.seconds_per_row > 0 else 1e12
        step = min(max(ideal / self.size, MAX_SHRINK), MAX_GROWTH)
        self.size = self._clamp(round(self.size * step))
        return self.size
