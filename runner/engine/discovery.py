"""Keyset paging over the plan's discovery query: the cost of a page does not grow with progress."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from runner.engine.target import TargetInfo


@contextlib.asynccontextmanager
async def read_only(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """An explicit READ ONLY transaction (invariant 5), whatever the session's defaults say —
    a query cannot switch it to read-write. Inside a caller's transaction, that one holds."""
    if conn.is_closed():
        # asyncpg answers is_in_transaction() on a closed connection with an AttributeError;
        # this error is the one the reconnecting callers know (a restart closed it)
        raise asyncpg.ConnectionDoesNotExistError("the connection was closed")
    if conn.is_in_transaction():
        yield
        return
    async with conn.transaction(readonly=True):
        yield


@dataclass(frozen=True)
class Page:
    key_arrays: tuple[list[Any], ...]
    first_key: list[str]
    last_key: list[str]

    @property
    def size(self) -> int:
        return len(self.key_arrays[0])


class Discovery:
    """Pages of keys that still need the backfill, in key order, strictly after a cursor."""

    def __init__(self, target: TargetInfo, discovery_sql: str, page_size: int) -> None:
        self.target = target
        self.page_size = page_size
        self._first = target.discovery_page_sql(discovery_sql, after_cursor=False)
        self._next = target.discovery_page_sql(discovery_sql, after_cursor=True)
        self._sql = discovery_sql

    async def page(
        self,
        conn: asyncpg.Connection,
        cursor: list[str] | None,
        limit: int | None = None,
        *,
        until: list[str] | None = None,
    ) -> Page | None:
        """The next page after `cursor` (None: from the start), read on `conn`; with `until`,
        only keys up to it (a lease's range)."""
        size = limit or self.page_size
        async with read_only(conn):
            if until is not None:
                sql = self.target.discovery_page_sql(
                    self._sql, after_cursor=cursor is not None, until=True
                )
                row = await conn.fetchrow(sql, size, *(cursor or []), *until)
            elif cursor is None:
                row = await conn.fetchrow(self._first, size)
            else:
                row = await conn.fetchrow(self._next, size, *cursor)
        if row is None or row["n"] == 0:
            return None
        arrays = tuple(row[f"k{i}"] for i in range(len(self.target.key)))
        return Page(arrays, list(row["first_key"]), list(row["last_key"]))


@dataclass(frozen=True)
class Span:
    """Keys discovery has been through: (after, last]; `after` None is from the start, `last`
    None to the end. `batch_keys` are the keys of the committed batch that covered it (None:
    several batches, e.g. what earlier commands of a continued run committed)."""

    after: list[str] | None
    last: list[str] | None
    batch_keys: tuple[list[Any], ...] | None
    # quarantined keys (engine.quarantine) in the span: discovery still returns them, by design
    excluded: tuple[list[Any], ...] | None = None


@dataclass(frozen=True)
class SpanCheck:
    remaining: int  # rows discovery returns in the span now (arrived since it was paged)
    stuck: list[str]  # of those, keys this run already applied: the discovery does not converge


class ConvergenceCheck:
    """Re-runs discovery over the span of each committed batch, behind the workers.

    Discovery must stop returning a row once the apply has done it. Checking span by span, while
    the next batches run, finds an apply that does not converge after its first batch, and counts
    rows that arrived behind the cursor without a second scan of the whole table at the end.
    """

    def __init__(
        self, conn: asyncpg.Connection, target: TargetInfo, discovery_sql: str, run_id: str
    ) -> None:
        self.conn = conn
        self.target = target
        self.discovery_sql = discovery_sql
        self.run_id = run_id

    async def check(self, span: Span) -> SpanCheck:
        async with read_only(self.conn):
            return await self._check(span)

    async def _check(self, span: Span) -> SpanCheck:
        lower, upper = span.after is not None, span.last is not None
        bounds = [b for b in (span.after, span.last) if b is not None]
        count_sql = self.target.range_count_sql(self.discovery_sql, lower=lower, upper=upper)
        remaining = int(await self.conn.fetchval(count_sql, *bounds))
        if remaining and span.excluded and span.excluded[0]:
            among = self.target.range_count_sql(
                self.discovery_sql, lower=lower, upper=upper, among=True
            )
            remaining -= int(await self.conn.fetchval(among, *bounds, *span.excluded))
        if not remaining:
            return SpanCheck(0, [])
        of_batch = span.batch_keys is not None
        stuck_sql = self.target.rediscovered_sql(
            self.discovery_sql, of_batch=of_batch, lower=lower, upper=upper
        )
        done = list(span.batch_keys) if span.batch_keys is not None else [self.run_id]
        return SpanCheck(
            remaining, [r["key"] for r in await self.conn.fetch(stuck_sql, *done, *bounds)]
        )
