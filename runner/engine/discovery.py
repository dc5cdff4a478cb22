"""Keyset paging over the plan's discovery query: the cost of a page does not grow with progress."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from runner.engine.target import TargetInfo


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

    def __init__(
        self, conn: asyncpg.Connection, target: TargetInfo, discovery_sql: str, page_size: int
    ) -> None:
        self.conn = conn
        self.target = target
        self.page_size = page_size
        self._first = target.discovery_page_sql(discovery_sql, after_cursor=False)
        self._next = target.discovery_page_sql(discovery_sql, after_cursor=True)

    async def page(self, cursor: list[str] | None, limit: int | None = None) -> Page | None:
        size = limit or self.page_size
        if cursor is None:
            row = await self.conn.fetchrow(self._first, size)
        else:
            row = await self.conn.fetchrow(self._next, size, *cursor)
        if row is None or row["n"] == 0:
            return None
        arrays = tuple(row[f"k{i}"] for i in range(len(self.target.key)))
        return Page(arrays, list(row["first_key"]), list(row["last_key"]))
