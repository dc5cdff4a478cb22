"""The phase's own connection: shared by the producer and the workers' bookkeeping, so used one
caller at a time; re-opened, with the run lock taken again, when the database drops it."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import asyncpg

from runner.engine.executor import Reconnect, classify
from runner.errors import WorkFailed
from runner.ledger import try_run_lock

T = TypeVar("T")


class MainSession:
    """One connection, one caller at a time (asyncpg allows one operation per connection).

    A lost connection (a restart, a failover, a terminated backend) is re-opened with backoff
    for up to `retries` attempts; the run lock (when this connection holds it) goes with the old
    connection, so it is taken again first, and if another process holds it by then, the phase
    stops rather than share.
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        reopen: Reconnect,
        run_id: str,
        *,
        retries: int,
        holds_run_lock: bool = True,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
    ) -> None:
        self.conn = conn
        self._reopen = reopen
        self.run_id = run_id
        self.retries = retries
        self.holds_run_lock = holds_run_lock
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._lock = anyio.Lock()

    async def run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._lock:
            attempt = 0
            while True:
                try:
                    return await fn(self.conn)
                except Exception as exc:
                    attempt += 1
                    if classify(exc) != "connection_lost" or attempt > self.retries:
                        raise
                await self._reconnect(attempt)

    async def _reconnect(self, attempt: int) -> None:
        with contextlib.suppress(Exception):
            self.conn.terminate()
        delay = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
        await anyio.sleep(delay * (0.5 + random.random() / 2))
        try:
            conn = await self._reopen()
        except Exception:
            return  # the next call fails on the closed connection and counts another attempt
        if self.holds_run_lock and not await try_run_lock(conn, self.run_id):
            await conn.close()
            raise WorkFailed(
                f"run {self.run_id}: the connection to the database was lost, and another "
                "backfill process took the run before this one could reconnect; stopped",
                hint="let the other process finish the run; `backfill status` shows where it is",
            )
        self.conn = conn

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.close(timeout=5)
