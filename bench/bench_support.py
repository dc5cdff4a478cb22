"""What the benchmarks share: a fresh database to measure in, and running a few statements."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg

from runner.db import EmbeddedServer, dsn_with_database


async def _exec(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for s in statements:
            await conn.execute(s)
    finally:
        await conn.close()


def sql(dsn: str, *statements: str) -> None:
    """Run the statements in order on one connection."""
    anyio.run(_exec, dsn, *statements)


@contextlib.contextmanager
def bench_database() -> Iterator[tuple[Path, str, str]]:
    """A scratch folder and a fresh `backfill_bench` database, on BACKFILL_BENCH_DSN's server or
    on an embedded one started (and stopped) here: (folder, dsn, which server)."""
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp:
        work = Path(tmp)
        server = None
        if os.environ.get("BACKFILL_BENCH_DSN"):
            admin = os.environ["BACKFILL_BENCH_DSN"]
        else:
            server = EmbeddedServer(work / "pg")
            server.start()
            admin = server.uri("postgres")
        try:
            sql(admin, "DROP DATABASE IF EXISTS backfill_bench", "CREATE DATABASE backfill_bench")
            yield (
                work,
                dsn_with_database(admin, "backfill_bench"),
                "embedded" if server else "BACKFILL_BENCH_DSN",
            )
        finally:
            if server is not None:
                server.stop()
