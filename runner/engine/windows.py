"""Windows (`[windows]`): the slices of discovery a run walks one after another.

A window is discovery restricted to `[lower, upper)` of a target column, or to one leaf partition
of a partitioned target. Its SQL is the plan's discovery wrapped once more, so everything that
reads discovery (pages, counts, convergence checks, the quarantine's re-checks) reads the window
unchanged. The list is computed by the database (its calendar, its partitions) once per run and
recorded in the ledger; a resumed run checks that it still computes the same list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import asyncpg

from runner.db import quote_ident
from runner.engine.target import TargetInfo, as_subquery
from runner.errors import InvalidInput
from runner.plan import Windows

MAX_WINDOWS = 10_000

_TIME_TYPES = {
    "date": "timestamp",
    "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz",
}
_INT_TYPES = ("smallint", "integer", "bigint")

_PARTITIONS = """
SELECT format('%I.%I', n.nspname, c.relname) AS qualified, n.nspname || '.' || c.relname AS label
FROM pg_partition_tree($1::oid::regclass) AS t
JOIN pg_class AS c ON c.oid = t.relid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE t.isleaf
ORDER BY pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT', n.nspname, c.relname
"""


@dataclass(frozen=True)
class Window:
    """One slice of the run: its number (1-based, in the order the run walks them), label,
    bounds as the column's text (None for a partition) and its discovery SQL."""

    no: int
    label: str
    lower: str | None
    upper: str | None
    sql: str

    @property
    def identity(self) -> tuple[int, str, str | None, str | None]:
        """What the ledger records and a resumed run must compute again."""
        return (self.no, self.label, self.lower, self.upper)


_MIDNIGHT = re.compile(r" 00:00:00(\+00)?$")


def _label(lower: str, upper: str) -> str:
    """`[lower, upper)`, midnight left out when both bounds are at it (windows are in UTC)."""
    if _MIDNIGHT.search(lower) and _MIDNIGHT.search(upper):
        lower, upper = _MIDNIGHT.sub("", lower), _MIDNIGHT.sub("", upper)
    return f"[{lower}, {upper})"


def _literal(text: str, type_: str) -> str:
    return "'" + text.replace("'", "''") + "'::" + type_


def _restricted(target: TargetInfo, discovery_sql: str, condition: str, table: str) -> str:
    """Discovery's keys whose row of `table` (the same key) satisfies `condition` (over alias
    `w`): a window is a range of the target's own column, or one of its partitions, whatever
    discovery returns beside the keys. With an index on the window column, PostgreSQL can start
    from the window's rows and look each up in discovery by key."""
    keys = ", ".join(f"d.{k.q}" for k in target.key)
    same = " AND ".join(f"w.{k.q} = d.{k.q}" for k in target.key)
    where = f" AND {condition}" if condition else ""
    return (
        f"SELECT {keys} FROM {as_subquery(discovery_sql)} AS d "
        f"WHERE EXISTS (SELECT 1 FROM {table} AS w WHERE {same}{where})"
    )


@dataclass(frozen=True)
class WindowPlan:
    """The windows in the order the run walks them, and discovery over all of them (`span`:
    what the run will do, counted at its start)."""

    windows: list[Window]
    span: str


async def plan_windows(
    conn: asyncpg.Connection, target: TargetInfo, windows: Windows, discovery_sql: str
) -> WindowPlan:
    """The run's windows; an InvalidInput names what does not fit."""
    if windows.by_partition:
        found, span = await _partition_windows(conn, target, discovery_sql), discovery_sql
    else:
        found, span = await _range_windows(conn, target, windows, discovery_sql)
    if windows.order == "newest_first":
        found.reverse()
    return WindowPlan(
        [Window(i, w.label, w.lower, w.upper, w.sql) for i, w in enumerate(found, 1)], span
    )


async def _partition_windows(
    conn: asyncpg.Connection, target: TargetInfo, discovery_sql: str
) -> list[Window]:
    kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = $1", target.oid)
    if kind != "p":
        raise InvalidInput(
            f"windows.by_partition: {target.display} is not a partitioned table",
            hint="remove by_partition, or cut windows from a column (windows.column, since, "
            "until, step)",
        )
    rows = await conn.fetch(_PARTITIONS, target.oid)
    if not rows:
        raise InvalidInput(
            f"windows.by_partition: {target.display} has no partitions",
            hint="attach its partitions first",
        )
    return [
        Window(
            0,
            r["label"],
            None,
            None,
            _restricted(target, discovery_sql, "", r["qualified"]),
        )
        for r in rows
    ]


async def _range_windows(
    conn: asyncpg.Connection, target: TargetInfo, windows: Windows, discovery_sql: str
) -> tuple[list[Window], str]:
    assert windows.column is not None
    assert windows.since is not None
    assert windows.until is not None
    assert windows.step is not None
    column = next(
        (c for c in (*target.key, *target.columns, *target.others) if c.name == windows.column),
        None,
    )
    if column is None:
        raise InvalidInput(
            f"windows.column: {target.display} has no column {windows.column!r}",
            hint="name a date, timestamp or integer column of the target",
        )
    base = re.sub(r"\(\d+\)", "", column.type)
    if base in _TIME_TYPES:
        series, step_type = _TIME_TYPES[base], "interval"
    elif base in _INT_TYPES:
        series, step_type = "bigint", "bigint"
    else:
        raise InvalidInput(
            f"windows.column: {target.display}.{windows.column} is {column.type}; windows are "
            "cut from a date, timestamp, timestamptz or integer column",
            hint="choose another column, or walk partitions with by_partition = true",
        )
    t = column.type
    since, until, step = (f"${i}::text::{ty}" for i, ty in ((1, t), (2, t), (3, step_type)))
    sql = f"""
SELECT g::{t}::text AS lower, least(g + {step}, {until}::{series})::{t}::text AS upper
FROM generate_series({since}::{series}, {until}::{series}, {step}) AS g
WHERE g < {until}::{series}
LIMIT {MAX_WINDOWS + 1}"""
    try:
        # in UTC: a window's bounds (and where `since` without an offset starts) do not depend
        # on the session's time zone, so a resumed run computes the same windows
        async with conn.transaction():
            zone = await conn.fetchval("SELECT current_setting('TimeZone')")
            await conn.execute("SET LOCAL TimeZone = 'UTC'")
            if await conn.fetchval(
                f"SELECT $1::text::{step_type} <= '0'::{step_type}", windows.step
            ):
                raise InvalidInput(
                    f"windows.step = {windows.step!r} is not positive",
                    hint="give a positive step, e.g. '1 day', '1 month' (or 1000 for an integer "
                    "column)",
                )
            rows = await conn.fetch(sql, windows.since, windows.until, windows.step)
            # a savepoint's SET LOCAL outlives it: the caller's transaction keeps its zone
            await conn.execute("SELECT set_config('TimeZone', $1, true)", zone)
    except (asyncpg.DataError, asyncpg.InvalidDatetimeFormatError) as e:
        raise InvalidInput(
            f"windows: since = {windows.since!r}, until = {windows.until!r}, step = "
            f"{windows.step!r} do not fit {windows.column} ({t}): {' '.join(str(e).split())}",
            hint="give since and until as values of the column's type, and step as an "
            + ("interval ('1 day', '1 month')" if step_type == "interval" else "integer"),
        ) from None
    if not rows:
        raise InvalidInput(
            f"windows: since ({windows.since}) is not before until ({windows.until}): no window",
            hint="set since before until",
        )
    if len(rows) > MAX_WINDOWS:
        raise InvalidInput(
            f"windows: more than {MAX_WINDOWS:,} windows of {windows.step} between "
            f"{windows.since} and {windows.until}",
            hint="take a larger step",
        )
    col = quote_ident(windows.column)

    def within(lower: str, upper: str) -> str:
        cond = f"w.{col} >= {_literal(lower, t)} AND w.{col} < {_literal(upper, t)}"
        return _restricted(target, discovery_sql, cond, target.table)

    found = [
        Window(
            0,
            _label(r["lower"], r["upper"]),
            r["lower"],
            r["upper"],
            within(r["lower"], r["upper"]),
        )
        for r in rows
    ]
    return found, within(rows[0]["lower"], rows[-1]["upper"])


COUNTED_WINDOWS = 100  # windows the dry run and prod health count one by one


async def count_windows(conn: asyncpg.Connection, walk: WindowPlan) -> list[dict[str, Any]]:
    """Discovery's count in each of the first COUNTED_WINDOWS windows (read-only)."""
    return [
        {
            "no": w.no,
            "label": w.label,
            "rows": int(await conn.fetchval(f"SELECT count(*) FROM {as_subquery(w.sql)} AS d")),
        }
        for w in walk.windows[:COUNTED_WINDOWS]
    ]
