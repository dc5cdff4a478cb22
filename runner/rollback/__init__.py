"""Undoing a run exactly (invariant 7): the emitted psql file and the runner's batched, verified
rollback. A plain run (one UPDATE of the target's declared columns) is undone by `plain`; a
shaped run (several tables, inserts, deletes: `engine.shapes`) by `shaped`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from runner import ledger
from runner.rollback import plain
from runner.rollback.plain import ImageSpool, RollbackResult, parse_batch_range, sql_literal
from runner.rollback.shaped import emit_shaped_file, run_shaped_rollback

__all__ = [
    "ImageSpool",
    "RollbackResult",
    "emit_rollback_file",
    "parse_batch_range",
    "run_rollback",
    "sql_literal",
]


async def emit_rollback_file(
    conn: asyncpg.Connection,
    run: ledger.RunRow,
    path: Path,
    *,
    display_dsn: str,
    batches: tuple[int, int] | None = None,
    since: datetime | None = None,
    checksum_conn: asyncpg.Connection | None = None,
    spool: ImageSpool | None = None,
) -> Path:
    """Write the run's rollback SQL for psql (see `plain.emit_rollback_file`; `spool`: the run's
    images read while its batches ran, `ImageSpool.of(run, folder)`'s)."""
    if run.tables is not None:
        return await emit_shaped_file(
            conn, run, path, display_dsn=display_dsn, batches=batches, since=since, spool=spool
        )
    return await plain.emit_rollback_file(
        conn,
        run,
        path,
        display_dsn=display_dsn,
        batches=batches,
        since=since,
        checksum_conn=checksum_conn,
        spool=spool,
    )


async def run_rollback(
    conn: asyncpg.Connection,
    run: ledger.RunRow,
    *,
    dry_run: bool,
    batches: tuple[int, int] | None,
    since: datetime | None,
    batches_per_minute: float | None,
    on_batch: Any = None,
    workers: int = 1,
    connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
) -> RollbackResult:
    """Undo the selected batches newest first, one transaction each, then verify."""
    if run.tables is not None:
        return await run_shaped_rollback(
            conn, run, dry_run=dry_run, batches=batches, since=since, on_batch=on_batch
        )
    return await plain.run_rollback(
        conn,
        run,
        dry_run=dry_run,
        batches=batches,
        since=since,
        batches_per_minute=batches_per_minute,
        on_batch=on_batch,
        workers=workers,
        connect=connect,
    )
