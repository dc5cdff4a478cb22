"""Guards: signals a running apply reads before each batch, each judged against a hold and an
optional critical threshold (GitLab's health indicators; gh-ost's --max-load / --critical-load),
and the yield to busy sessions that paces the batches by one of them (`Yielding`).

A verdict is normal, hold (no new batch starts; look again later) or stop (the phase stops,
resumably). Every check is one read-only statement under a statement timeout; a check that fails
holds, never passes (an error is not "normal"). The built-in signals are read in the statement
that also reads the run's pause/cancel request: one round trip before each batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import asyncpg

from runner.engine.discovery import read_only
from runner.engine.executor import classify
from runner.ledger import CONTROL_SQL, ControlRequest, control_state
from runner.plan import GUARD_DEFAULTS, CustomGuard, Guards, Limit, parse_condition

State = Literal["normal", "hold", "stop"]

BUILTIN_SQL = """
SELECT
    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::float8
        AS connections,
    current_setting('max_connections')::float8 AS max_connections,
    (SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)
       FROM pg_stat_activity
      WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()
        AND backend_type = 'client backend')::float8 AS longest_transaction_seconds,
    (SELECT count(*) FROM pg_stat_activity AS a
      WHERE a.wait_event_type = 'Lock' AND a.pid <> pg_backend_pid()
        AND EXISTS (SELECT 1 FROM pg_locks AS l WHERE l.pid = a.pid AND l.relation = $1::oid
                      AND l.database = (SELECT oid FROM pg_database
                                        WHERE datname = current_database()))
    )::float8 AS lock_waiters,
    (SELECT count(*) FROM pg_stat_progress_vacuum AS v JOIN pg_stat_activity AS a USING (pid)
      WHERE v.relid = $1::oid AND v.datname = current_database()
        AND a.backend_type = 'autovacuum worker')::float8 AS autovacuum,
    (SELECT count(*) FROM pg_stat_progress_vacuum AS v JOIN pg_stat_activity AS a USING (pid)
      WHERE v.relid = $1::oid AND v.datname = current_database()
        AND a.backend_type = 'autovacuum worker'
        AND a.query LIKE '%(to prevent wraparound)%')::float8 AS wraparound_vacuum,
    (SELECT count(*) FROM pg_stat_replication)::float8 AS replicas,
    (SELECT max(extract(epoch FROM replay_lag)) FROM pg_stat_replication)::float8
        AS replication_lag_seconds,
    (SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)) FROM pg_stat_replication)::float8
        AS replication_lag_bytes,
    pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 AS wal_position,
    (SELECT count(*) FROM pg_stat_activity
      WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
        AND application_name IS DISTINCT FROM 'backfill'
        AND (state LIKE 'idle in transaction%'
             OR (state IN ('active', 'fastpath function call')
                 AND wait_event_type IS DISTINCT FROM 'Timeout')))::float8 AS busy_sessions,
    -- sessions this login may not look at (no pg_monitor / pg_read_all_stats): every column
    -- but a few reads NULL, so they count as neither connected nor busy
    (SELECT count(*) FROM pg_stat_activity WHERE backend_type IS NULL)::float8 AS hidden_sessions
"""

# the run's control request ($1) beside the signals (the target's oid is $2 here)
WITH_CONTROL_SQL = f"""
SELECT c.action, c.actor, c.db_user, c.note, c.requested_at, g.*
FROM ({BUILTIN_SQL.replace("$1", "$2")}) AS g
LEFT JOIN LATERAL ({CONTROL_SQL}) AS c ON true
"""

# signal → how its value reads in a reason
LABELS: dict[str, tuple[str, str]] = {
    "connections": ("connections in use", "share"),
    "replication_lag_seconds": ("replication lag", "seconds"),
    "replication_lag_bytes": ("replication lag", "bytes"),
    "longest_transaction_seconds": ("longest open transaction", "seconds"),
    "lock_waiters": ("sessions waiting on locks on the target", "count"),
    "wraparound_vacuum": ("anti-wraparound autovacuums on the target", "count"),
    "autovacuum": ("autovacuums on the target", "count"),
    "wal_bytes_per_second": ("WAL", "bytes/s"),
    "busy_sessions": ("busy sessions", "count"),
}
WAL_MIN_SPAN = 0.5  # seconds between WAL positions for a rate worth reading


_WHOLE_SECONDS_FROM = 10.0  # a reading shown in whole seconds from here on


def shown(value: float | None, unit: str) -> str:
    if value is None:
        return "no value"
    match unit:
        case "share":
            return f"{value:.0%}"
        case "seconds":
            return f"{value:,.0f} s" if value >= _WHOLE_SECONDS_FROM else f"{value:.1f} s"
        case "bytes" | "bytes/s":
            suffix = "/s" if unit == "bytes/s" else ""
            for name, size in (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("kiB", 1024.0)):
                if value >= size:
                    return f"{value / size:,.1f} {name}{suffix}"
            return f"{value:,.0f} B{suffix}"
        case _:
            return f"{value:g}"


@dataclass(frozen=True)
class Reading:
    """One signal as read now, and what it means."""

    signal: str
    value: float | None
    state: State
    threshold: str = ""  # the threshold it passed, as shown ("> 80%"), when not normal
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    """The worst of the readings: what the dispatcher does next."""

    state: State
    readings: tuple[Reading, ...] = ()

    @property
    def worst(self) -> Reading | None:
        order = {"stop": 2, "hold": 1, "normal": 0}
        found = max(self.readings, key=lambda r: order[r.state], default=None)
        return found if found is not None and found.state != "normal" else None

    @property
    def reason(self) -> str:
        return self.worst.reason if self.worst else ""


def judge(signal: str, value: float | None, limit: Limit) -> Reading:
    """A built-in signal against its thresholds: at or over critical stops, over hold holds."""
    label, unit = LABELS[signal]
    if value is None:
        return Reading(signal, None, "normal")
    if limit.critical is not None and value >= limit.critical:
        t = f"≥ {shown(limit.critical, unit)} (critical)"
        return Reading(signal, value, "stop", t, f"{label} {shown(value, unit)} {t}")
    if limit.hold is not None and value > limit.hold:
        t = f"> {shown(limit.hold, unit)}"
        return Reading(signal, value, "hold", t, f"{label} {shown(value, unit)} {t}")
    return Reading(signal, value, "normal")


def judge_custom(guard: CustomGuard, value: float | None) -> Reading:
    """A custom guard: its critical_if stops, a failed pass_if holds, no value holds."""
    name = f"custom.{guard.name}"
    if value is None:
        return Reading(name, None, "hold", guard.pass_if, f"guard {guard.name}: no value")
    if guard.critical_if and parse_condition(guard.critical_if).holds(value):
        return Reading(
            name,
            value,
            "stop",
            f"{guard.critical_if} (critical)",
            f"guard {guard.name} = {value:g}, critical when {guard.critical_if}",
        )
    if not parse_condition(guard.pass_if).holds(value):
        return Reading(
            name,
            value,
            "hold",
            f"not {guard.pass_if}",
            f"guard {guard.name} = {value:g}, passes when {guard.pass_if}",
        )
    return Reading(name, value, "normal")


def _as_value(raw: object) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    try:
        return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


@dataclass
class GuardSet:
    """The plan's guards over one target table; remembers the last WAL position for the rate."""

    guards: Guards
    target_oid: int
    _wal: tuple[float, float] | None = field(default=None, init=False)  # (position, when)
    _wal_rate: float | None = field(default=None, init=False)
    hidden_sessions: int = field(default=0, init=False)  # in the last reading (see BUILTIN_SQL)

    @property
    def enabled(self) -> bool:
        return self.guards.enabled

    async def _timed(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            "SELECT set_config('statement_timeout', $1, true)",
            f"{int(self.guards.statement_timeout * 1000)}ms",
        )

    async def with_control(
        self, conn: asyncpg.Connection, run_id: str
    ) -> tuple[ControlRequest | None, list[Reading]]:
        """The run's control request and the built-in signals in one statement (a SELECT of
        the statistics views and the ledger, bounded by the guards' statement timeout on the
        client's side). Signals that cannot be read hold (the request is then read alone); a
        lost connection is raised, for the caller's session to reconnect."""
        try:
            row = await conn.fetchrow(
                WITH_CONTROL_SQL, run_id, self.target_oid, timeout=self.guards.statement_timeout
            )
        except (asyncpg.PostgresError, TimeoutError) as exc:
            if isinstance(exc, asyncpg.PostgresError) and classify(exc) == "connection_lost":
                raise  # the server ended the session (a restart, a failover): reconnect, ask again
            why = (
                f"no answer within guards.statement_timeout ({self.guards.statement_timeout:g} s)"
                if isinstance(exc, TimeoutError)
                else " ".join(str(exc).split())
            )
            unread = Reading("builtin", None, "hold", "", f"guards could not be read: {why}")
            return await control_state(conn, run_id), [unread]
        assert row is not None
        self.hidden_sessions = int(row["hidden_sessions"] or 0)
        control = None if row["action"] is None else ControlRequest.from_row(row)
        return control, self._judged(row)

    def _judged(self, row: asyncpg.Record) -> list[Reading]:
        values = {
            "connections": row["connections"] / row["max_connections"]
            if row["max_connections"]
            else None,
            "longest_transaction_seconds": row["longest_transaction_seconds"],
            "lock_waiters": row["lock_waiters"],
            "autovacuum": row["autovacuum"],
            "wraparound_vacuum": row["wraparound_vacuum"],
            "replication_lag_seconds": row["replication_lag_seconds"] if row["replicas"] else None,
            "replication_lag_bytes": row["replication_lag_bytes"] if row["replicas"] else None,
            "wal_bytes_per_second": self._rate(row["wal_position"]),
            "busy_sessions": row["busy_sessions"],
        }
        return [judge(s, values[s], self.guards.limit(s)) for s in GUARD_DEFAULTS]

    def _rate(self, position: float | None) -> float | None:
        now = time.monotonic()
        if position is None:
            return self._wal_rate
        if self._wal is None:
            self._wal = (position, now)
        elif now - self._wal[1] >= WAL_MIN_SPAN:
            self._wal_rate = max(position - self._wal[0], 0.0) / (now - self._wal[1])
            self._wal = (position, now)
        return self._wal_rate

    async def custom(self, conn: asyncpg.Connection) -> list[Reading]:
        """The plan's custom guards, each one statement in a READ ONLY transaction."""
        readings: list[Reading] = []
        for guard in self.guards.custom:
            try:
                async with read_only(conn):
                    await self._timed(conn)
                    value = _as_value(await conn.fetchval(guard.sql))
            except (asyncpg.PostgresError, OSError) as exc:
                why = " ".join(str(exc).split())
                readings.append(
                    Reading(
                        f"custom.{guard.name}",
                        None,
                        "hold",
                        guard.pass_if,
                        f"guard {guard.name} could not be checked: {why}",
                    )
                )
                continue
            readings.append(judge_custom(guard, value))
        return readings


def verdict(readings: list[Reading]) -> Verdict:
    states = {r.state for r in readings}
    state: State = "stop" if "stop" in states else "hold" if "hold" in states else "normal"
    return Verdict(state, tuple(readings))


class Yielding:
    """Leaves the server to the application while its sessions are busy (guards.yield_to_busy).

    The wait after a batch is the batch's time times a factor: `per_session` * the sessions
    seen busy (smoothed over the last readings, as one reading is a snapshot of sessions that
    come and go within milliseconds; under half a session on average counts as none), at most
    `max_factor`. With `workers` batches at a time,
    batches start at most every (batch time * (1 + factor)) / workers, so each worker works
    at most 1 / (1 + factor) of the time. A pure clock-and-numbers object: the watch feeds it.
    """

    SMOOTHING = 0.3  # the weight of the newest reading (and of the newest batch's time)
    LEAST_BUSY = 0.5  # fewer sessions busy on average count as none: no wait

    def __init__(self, per_session: float, max_factor: float, workers: int) -> None:
        self.per_session = per_session
        self.max_factor = max_factor
        self.workers = max(workers, 1)
        self.busy: float | None = None  # smoothed sessions seen busy
        self.batch_seconds: float | None = None  # smoothed time of a committed batch
        self._last_start: float | None = None

    @property
    def on(self) -> bool:
        return self.per_session > 0 and self.max_factor > 0

    @property
    def factor(self) -> float:
        if not self.on or self.busy is None or self.busy < self.LEAST_BUSY:
            return 0.0
        return min(self.per_session * self.busy, self.max_factor)

    def seen(self, busy: float | None) -> None:
        """A reading of the busy sessions (None: not read; the last smoothing stands)."""
        if busy is not None:
            self.busy = busy if self.busy is None else _smoothed(self.busy, busy)

    def batch(self, seconds: float) -> None:
        """A batch committed after taking `seconds`."""
        self.batch_seconds = (
            seconds if self.batch_seconds is None else _smoothed(self.batch_seconds, seconds)
        )

    def due(self, now: float) -> float:
        """Seconds to wait before the next batch starts (0: it may start now)."""
        if self._last_start is None or self.batch_seconds is None or self.factor == 0:
            return 0.0
        spacing = self.batch_seconds * (1 + self.factor) / self.workers
        return max(self._last_start + spacing - now, 0.0)

    def started(self, now: float) -> None:
        self._last_start = now


def _smoothed(old: float, new: float) -> float:
    return (1 - Yielding.SMOOTHING) * old + Yielding.SMOOTHING * new
