"""A running apply's Prometheus metrics, served while it runs when asked (`--metrics-port`).

The endpoint is one registry per command (not the library's global one), made current for the
command's tasks through a context variable, so the engine reports without being handed it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # prometheus_client is imported only by a command that serves metrics
    from prometheus_client import CollectorRegistry

    from runner.engine.executor import BatchOutcome
    from runner.engine.guards import Reading

_STATE = {"normal": 0.0, "hold": 1.0, "stop": 2.0}


class RunMetrics:
    """What an apply exposes: rows, batches by outcome, batch time and size, guards, remaining."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # ~50 ms of start-up that a command without --metrics-port does not pay
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: PLC0415

        r = self.registry = registry or CollectorRegistry()
        self._rows_done = 0
        self.rows_changed = Counter("backfill_rows_changed", "Rows changed", registry=r)
        self.rows_noop = Counter("backfill_rows_noop", "Rows already at the new value", registry=r)
        self.batches = Counter(
            "backfill_batches", "Batches by outcome (done, failed)", ["outcome"], registry=r
        )
        self.batch_seconds = Histogram(
            "backfill_batch_duration_seconds",
            "Wall time of a batch, retries included",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.batch_size = Gauge("backfill_batch_size", "Keys in the latest batch", registry=r)
        self.next_size = Gauge(
            "backfill_next_batch_size", "Keys the next batch asks discovery for", registry=r
        )
        self.guard_state = Gauge(
            "backfill_guard_state", "Per signal: 0 normal, 1 hold, 2 stop", ["signal"], registry=r
        )
        self.guard_value = Gauge(
            "backfill_guard_value", "Per signal: its value when last read", ["signal"], registry=r
        )
        self.held = Gauge(
            "backfill_held", "1 while no batch may start (a guard holds or a pause)", registry=r
        )
        self.yielded = Counter(
            "backfill_yielded_seconds",
            "Seconds waited after batches while other sessions were busy",
            registry=r,
        )
        self.yield_factor = Gauge(
            "backfill_yield_factor",
            "The wait after a batch, in batch times (guards.yield_to_busy)",
            registry=r,
        )
        self.rows_remaining = Gauge(
            "backfill_rows_remaining_estimate",
            "Rows needing the backfill at the start, less those done since",
            registry=r,
        )

    def batch(self, outcome: BatchOutcome, *, needing_at_start: int) -> None:
        self.batches.labels(outcome=outcome.status).inc()
        self.batch_seconds.observe(outcome.duration_ms / 1000)
        self.batch_size.set(outcome.selected)
        if outcome.status == "done":
            self.rows_changed.inc(outcome.changed)
            self.rows_noop.inc(outcome.noop)
            self._rows_done += outcome.changed + outcome.noop
        self.rows_remaining.set(max(needing_at_start - self._rows_done, 0))

    def readings(self, readings: list[Reading]) -> None:
        for r in readings:
            self.guard_state.labels(signal=r.signal).set(_STATE[r.state])
            if r.value is not None:
                self.guard_value.labels(signal=r.signal).set(r.value)


_current: ContextVar[RunMetrics | None] = ContextVar("backfill_metrics", default=None)


def current() -> RunMetrics | None:
    """The metrics of the running command, if it serves them."""
    return _current.get()


@contextlib.contextmanager
def serve(port: int | None, addr: str = "127.0.0.1") -> Iterator[RunMetrics | None]:
    """Serve a fresh registry on `addr:port` for the duration (nothing when `port` is None)."""
    if port is None:
        yield None
        return
    from prometheus_client import start_http_server  # noqa: PLC0415

    metrics = RunMetrics()
    server, thread = start_http_server(port, addr, registry=metrics.registry)
    token = _current.set(metrics)
    try:
        yield metrics
    finally:
        _current.reset(token)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
