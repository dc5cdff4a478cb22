"""What a backfill will touch, read-only: the size of the rows and the span of a time column
(the dry run's and prod health's impact estimate)."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import asyncpg

from runner.db import quote_ident
from runner.engine.target import TABLE_SIZE_SQL, TargetInfo, as_subquery
from runner.errors import InvalidInput
from runner.plan import Discovery


def size_query(discovery_sql: str, size_sql: str) -> str:
    """`discovery.size_sql` over `discovered`: the rows of `discovery_sql`."""
    return f"WITH discovered AS {as_subquery(discovery_sql)} {size_sql}"


async def estimate_impact(
    conn: asyncpg.Connection,
    target: TargetInfo,
    discovery: Discovery,
    discovery_sql: str,
    needing: int,
) -> dict[str, Any]:
    """Bytes (the plan's `discovery.size_sql` over the rows discovery returns, else the table's
    average row size times the rows) and the oldest and newest `discovery.time_column` among them.
    `discovery_sql` is what the run will page (within its windows, for a windowed plan)."""
    size = await conn.fetchrow(TABLE_SIZE_SQL, target.oid)  # a partitioned table: its leaves
    assert size is not None
    rows = size["rows"]
    if rows is None or rows <= 0:  # never analysed (or empty): count it, once
        rows = await conn.fetchval(f"SELECT count(*) FROM {target.table}")
    out: dict[str, Any] = {
        "bytes": round(size["bytes"] / max(int(rows), 1) * needing),
        "bytes_from": "the table's average row size × the rows",
        "table_bytes": size["bytes"],
    }
    if discovery.size_sql is not None:
        try:
            async with conn.transaction():  # a savepoint: a failure names the field, nothing else
                value = await conn.fetchval(size_query(discovery_sql, discovery.size_sql))
        except asyncpg.PostgresError as e:
            raise InvalidInput(
                f"discovery.size_sql failed: {' '.join(str(e).split())}",
                hint="it reads `discovered` (discovery's rows) and returns one number of bytes, "
                "e.g. SELECT sum(f.size_bytes) FROM files f JOIN discovered d USING (id)",
            ) from None
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
                raise InvalidInput(
                    f"discovery.size_sql returned {type(value).__name__} {str(value)[:40]!r}, "
                    "not a number of bytes",
                    hint="return one number, e.g. SELECT sum(f.size_bytes) FROM files f JOIN "
                    "discovered d USING (id)",
                )
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(
                    f"discovery.size_sql returned {value}, not a number of bytes",
                    hint="return a finite number of bytes, 0 or more",
                )
            out["bytes"], out["bytes_from"] = int(value), "discovery.size_sql"
    column = discovery.time_column
    if column is not None:
        keys = ", ".join(k.q for k in target.key)
        span = await conn.fetchrow(
            f"SELECT min(t.{quote_ident(column)})::text AS oldest, "
            f"max(t.{quote_ident(column)})::text AS newest FROM {target.table} AS t "
            f"WHERE ({', '.join(f't.{k.q}' for k in target.key)}) IN "
            f"(SELECT {keys} FROM {as_subquery(discovery_sql)} AS d)"
        )
        assert span is not None
        out["time_column"] = column
        out["oldest"], out["newest"] = span["oldest"], span["newest"]
    return out
