"""The pace of a phase: batches per minute and/or rows per second, as steady leaky buckets."""

from __future__ import annotations

from aiolimiter import AsyncLimiter


class Throttle:
    """Waits before each batch so the achieved rate matches the configured one.

    Each bucket holds one batch, so there is no initial burst: 20 batches/minute means one batch
    every 3 s from the first, which is what an operator who wrote "20/minute" expects.
    """

    def __init__(
        self, batches_per_minute: float | None, rows_per_second: float | None, batch_size: int
    ) -> None:
        self.batches_per_minute = batches_per_minute
        self.rows_per_second = rows_per_second
        self._batches = AsyncLimiter(1, 60.0 / batches_per_minute) if batches_per_minute else None
        self._rows = (
            AsyncLimiter(batch_size, batch_size / rows_per_second) if rows_per_second else None
        )
        self._batch_size = batch_size

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def limited(self) -> bool:
        return self._batches is not None or self._rows is not None

    async def wait(self, rows: int) -> None:
        if self._batches is not None:
            await self._batches.acquire()
        if self._rows is not None and rows > 0:
            await self._rows.acquire(min(rows, self._batch_size))

    def seconds_for(self, batches: int, rows: int) -> float:
        """The least wall time the throttle allows for this much work."""
        floor = 0.0
        if self.batches_per_minute:
            floor = max(floor, max(batches - 1, 0) * 60.0 / self.batches_per_minute)
        if self.rows_per_second:
            floor = max(floor, rows / self.rows_per_second)
        return floor
