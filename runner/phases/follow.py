"""The stage's files prepared while its batches run, so they are written right after the last one.

The rollback file and the manifest are read from the ledger's images of every committed batch:
read after the last batch, that is a second pass over every changed row (about 2 s per million
rows here), which an operator waits for. A `Follower` reads each batch's share as soon as the
batch is recorded, on a connection of its own beside the workers: its rollback statements into an
`ImageSpool`, its manifest rows into a `ManifestSpool` (unnamed files: memory stays flat).

It is only ever a cache. The files are written from the ledger's committed batches when the stage
finishes; what the follower did not read (another process's batches, an earlier command's, the
last ones still in its queue when it was stopped, all of them after it lost its connection) is
read then. A committed batch's images never change, so a batch read early reads the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runner import ledger
from runner.db import close_quietly
from runner.engine.spool import Spool
from runner.rollback import ImageSpool

log = structlog.get_logger()

DRAIN_SECONDS = 2.0  # a longer backlog is read faster by the writer, on two connections
MANIFEST_KEYS_UP_TO = 1000  # per batch and table: more keys are listed by count and md5 only


async def manifest_records(
    conn: asyncpg.Connection, run_id: str, stage: str, batch_nos: list[int] | None = None
) -> list[dict[str, Any]]:
    """The manifest's rows of the stage's committed batches (or of `batch_nos` among them), as
    JSON values (`started_at` in ISO 8601)."""
    return [
        dict(r) | {"started_at": r["started_at"].isoformat()}
        for r in await ledger.manifest_rows(conn, run_id, stage, MANIFEST_KEYS_UP_TO, batch_nos)
    ]


class ManifestSpool:
    """Each committed batch's manifest rows, as JSON on disk (`engine.spool.Spool`): a manifest
    lists up to MANIFEST_KEYS_UP_TO keys per batch, which memory should not hold for a whole run."""

    def __init__(self, folder: Path) -> None:
        self._chunks = Spool(folder)

    def __contains__(self, batch_no: object) -> bool:
        return batch_no in self._chunks

    def __len__(self) -> int:
        return len(self._chunks)

    async def fetch(
        self, conn: asyncpg.Connection, run_id: str, stage: str, batch_nos: list[int]
    ) -> None:
        """Read committed batches' manifest rows from the ledger into the spool."""
        rows: dict[int, list[dict[str, Any]]] = {no: [] for no in batch_nos}
        for r in await manifest_records(conn, run_id, stage, batch_nos):
            rows[r["batch_no"]].append(r)
        for no, of_batch in rows.items():
            self._chunks.put(no, json.dumps(of_batch).encode())

    def rows(self, batch_no: int) -> list[dict[str, Any]]:
        """The batch's rows, one per table it changed, in table order."""
        return list(json.loads(self._chunks.get(batch_no)))

    def close(self) -> None:
        self._chunks.close()


class Follower:
    """Reads each committed batch's rollback images and manifest rows as it is recorded."""

    def __init__(self, run: ledger.RunRow, stage: str, folder: Path) -> None:
        self.run_id = run.run_id
        self.stage = stage
        self.spool = ImageSpool.of(run, folder)
        self.manifest = ManifestSpool(folder)
        send, receive = anyio.create_memory_object_stream[int](math.inf)
        self._send: MemoryObjectSendStream[int] = send
        self._receive: MemoryObjectReceiveStream[int] = receive

    def committed(self, batch_no: int) -> None:
        """A batch of the stage was recorded done: read its share when the follower gets to it."""
        # once it stopped following, the files read the batch at the end
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(batch_no)

    async def _follow(self, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        conn: asyncpg.Connection | None = None
        try:
            async with self._receive:
                conn = await connect()
                async for no in self._receive:
                    await self.spool.fetch(conn, self.run_id, no)
                    await self.manifest.fetch(conn, self.run_id, self.stage, [no])
        except asyncio.CancelledError:
            if conn is not None:
                conn.terminate()  # stopped mid-read: nothing of that batch was kept
                conn = None
            raise
        except Exception as exc:  # a cache: the files read what is missing at the end
            log.info("apply.follow_stopped", error=str(exc))  # nothing lost: said in the log only
        finally:
            if conn is not None:
                await close_quietly(conn)

    @asynccontextmanager
    async def running(
        self, connect: Callable[[], Awaitable[asyncpg.Connection]]
    ) -> AsyncIterator[Follower]:
        """Follow while the body runs. When it ends, the batches still queued are read (for at
        most DRAIN_SECONDS: the files read the rest); when it fails, nothing more is read."""
        # a plain asyncio task (asyncpg runs on asyncio): a task group around the `yield` would
        # wrap the apply's own errors in an exception group
        task = asyncio.create_task(self._follow(connect))
        try:
            yield self
            self._send.close()
            await asyncio.wait({task}, timeout=DRAIN_SECONDS)
        finally:
            self._send.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self._receive.close()  # if the task was stopped before it began

    def close(self) -> None:
        self.spool.close()
        self.manifest.close()
