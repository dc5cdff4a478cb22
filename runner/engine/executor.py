"""One batch, one transaction: capture, apply, compare, record, commit (invariants 1-4)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import anyio
import asyncpg

from runner import redact
from runner.db import fetch_one
from runner.engine.shapes import COLUMNS_SIGNATURE, TOUCHED_DDL, ShapedRun, Step
from runner.engine.target import BatchStatement, TargetInfo
from runner.errors import ConnectionFailed, InvalidInput, ScopeViolation, WorkFailed
from runner.ledger import LEDGER_SCHEMA, batch_committed
from runner.redact import redact_text

TRANSIENT = frozenset(
    {
        "lock_timeout",
        "deadlock",
        "serialization",
        "statement_timeout",
        "connection_lost",
        "batch_recorded",
    }
)


RETURNING_OLD_NEW_SINCE = 180000  # server_version_num of PostgreSQL 18


class LeaseLost(Exception):
    """The batch's lease was taken over by another process (engine.claims): not applied here."""


async def _fence(conn: asyncpg.Connection, batch: Batch) -> None:
    """A fenced batch's first statement: its lease is still its owner's, and stays so until
    the batch commits (FOR SHARE: a takeover skips a lease so locked)."""
    if not batch.fenced or batch.lease is None:
        return
    run_id, lease, owner = batch.lease
    held = await conn.fetchval(
        "SELECT 1 FROM backfill.leases WHERE run_id = $1 AND batch_no = $2 AND owner = $3"
        " FOR SHARE",
        run_id,
        lease,
        owner,
    )
    if held is None:
        raise LeaseLost(
            f"batch {batch.batch_no} (keys {batch.key_range}): part of batch {lease}, whose page "
            "another process took over; not applied here"
        )


class Unrepeatable(Exception):
    """A statement touched other rows when run for real than when probed (capture path): the
    batch is rolled back and retried, like a serialization failure."""


@dataclass(frozen=True)
class Batch:
    """Keys from one discovery page, as arrays (one per key column), with the page's bounds."""

    batch_no: int
    stage: str
    key_arrays: tuple[list[Any], ...]
    first_key: list[str]
    last_key: list[str]
    after_key: list[str] | None = None  # the discovery cursor this page was read after
    # the claimed page (engine.claims) this batch applies: (run, lease's batch number, owner)
    lease: tuple[str, int, str] | None = None
    # check in the batch's transaction that the lease is still its owner's: a split's parts
    # have numbers of their own, so the batch row's key cannot stop a second process (one that
    # took the lease over) applying their keys too
    fenced: bool = False

    @property
    def size(self) -> int:
        return len(self.key_arrays[0])

    @property
    def key_range(self) -> str:
        return f"[{', '.join(self.first_key)}] … [{', '.join(self.last_key)}]"


@dataclass(frozen=True)
class BatchContext:
    """One attempt at a batch: everything its statements bind, by parameter name
    (BatchStatement.bind places them; target.LEDGER_PARAMS names the ledger row's)."""

    batch: Batch
    run_id: str
    attempts: int
    errors: list[dict[str, str]]
    started: datetime
    manifest_sql: str | None = None  # the plan's [manifest] sql

    def values(self, target: TargetInfo) -> dict[str, Any]:
        b = self.batch
        return {
            **{f"k{i}": keys for i, keys in enumerate(b.key_arrays)},
            "run_id": self.run_id,
            "batch_no": b.batch_no,
            "stage": b.stage,
            "first_key": b.first_key,
            "last_key": b.last_key,
            "attempts": self.attempts,
            "errors": json.dumps(self.errors),
            "started_at": self.started,
            "batch_size": b.size,
            "target": target.table,
        }


@dataclass
class BatchOutcome:
    batch_no: int
    stage: str
    # done | failed | skipped (already committed before a lost connection); after a data error
    # (engine.quarantine): split (its halves ran as `split_into`) | quarantined (one key) |
    # stopped (a split the failure budget or a failing part ended)
    status: str
    first_key: list[str]
    last_key: list[str]
    selected: int = 0
    changed: int = 0
    noop: int = 0
    attempts: int = 1
    errors: list[dict[str, str]] = field(default_factory=list)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    duration_ms: float = 0.0
    error_category: str | None = None
    error: str | None = None
    sqlstate: str | None = None
    split_into: list[int] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "batch_no": self.batch_no,
            "stage": self.stage,
            "status": self.status,
            "size": self.selected,
            "key_range": {"first": self.first_key, "last": self.last_key},
            "counts": {"selected": self.selected, "changed": self.changed, "noop": self.noop},
            "attempts": self.attempts,
            "errors": self.errors,
            "error_category": self.error_category,
            "error": self.error,
            "sqlstate": self.sqlstate,
            "split_into": self.split_into,
            "started_at": self.started_at.isoformat(),
            "duration_ms": round(self.duration_ms, 3),
        }


def classify(exc: BaseException) -> str:
    """The error category an operator sees in logs and reports."""
    if isinstance(exc, ScopeViolation):
        return "scope_violation"
    if isinstance(exc, LeaseLost):
        return "lease_lost"
    if isinstance(exc, ConnectionFailed):  # reconnecting failed: the server is (still) away
        return "connection_lost"
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return "lock_timeout"
    if isinstance(exc, asyncpg.DeadlockDetectedError):
        return "deadlock"
    if isinstance(exc, asyncpg.SerializationError | Unrepeatable):
        return "serialization"
    if isinstance(exc, asyncpg.QueryCanceledError):
        return "statement_timeout"
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return "read_only"
    if isinstance(
        exc,
        asyncpg.ConnectionDoesNotExistError
        | asyncpg.PostgresConnectionError
        | asyncpg.AdminShutdownError
        | asyncpg.CannotConnectNowError
        | asyncpg.InterfaceError
        # the protocol left mid-operation by a connection the server dropped under it
        # ("cannot switch to state …; another operation is in progress"): only a new one helps
        | asyncpg.InternalClientError
        | ConnectionError
        | OSError
        | asyncio.TimeoutError,
    ):
        return "connection_lost"
    if (
        isinstance(exc, asyncpg.UniqueViolationError)
        and getattr(exc, "schema_name", None) == LEDGER_SCHEMA
        and getattr(exc, "constraint_name", None) == "batches_pkey"
    ):
        # another process recorded this batch number first: a lease taken over from a process
        # that committed it after all; the next attempt finds it committed (skipped)
        return "batch_recorded"
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return "constraint_violation"
    if isinstance(exc, asyncpg.PostgresError):
        return "sql_error"
    return "internal"


def _describe(exc: BaseException) -> str:
    """The error as recorded everywhere (ledger, batch files, logs): database errors quote
    values, and values may be secrets, so it is redacted here, before any write."""
    text = str(exc).strip() or type(exc).__name__
    detail = getattr(exc, "detail", None)
    return redact_text(f"{text} ({detail})" if detail else text)


_TAG = re.compile(r"^(\w+)(?: \d+)? (\d+)$")

# Every table this session has written rows of, however it wrote them (its own statements,
# data-modifying CTEs, triggers, cascades): PostgreSQL's per-backend counters of rows inserted,
# updated and deleted that are not yet flushed to the shared statistics. They also hold earlier
# transactions' counts until a flush, and a flush happens only outside a transaction block, so a
# batch reads them at its start and at its end: the difference is what its transaction wrote.
# Partitions count towards their root. Temporary tables vanish with the session and system
# catalogs change with DDL, not data, so neither counts (large objects do). One query, a few
# function calls per table in the database.
WRITES_SQL = """
WITH w AS (
    SELECT coalesce(pg_partition_root(c.oid), c.oid) AS root,
           pg_stat_get_xact_tuples_inserted(c.oid) AS ins,
           pg_stat_get_xact_tuples_updated(c.oid) AS upd,
           pg_stat_get_xact_tuples_deleted(c.oid) AS del
    FROM pg_class AS c
    WHERE c.relkind = 'r' AND c.relpersistence <> 't'
      AND (c.relnamespace <> 'pg_catalog'::regnamespace OR c.relname LIKE 'pg_largeobject%')
)
SELECT current_setting('track_counts')::bool AS tracking, t.*
FROM (SELECT 1) AS one LEFT JOIN (
    SELECT w.root::bigint AS oid, n.nspname AS schema, r.relname AS name,
           sum(w.ins)::bigint AS ins, sum(w.upd)::bigint AS upd, sum(w.del)::bigint AS del
    FROM w JOIN pg_class AS r ON r.oid = w.root JOIN pg_namespace AS n ON n.oid = r.relnamespace
    WHERE w.ins > 0 OR w.upd > 0 OR w.del > 0
    GROUP BY w.root, n.nspname, r.relname
) AS t ON true
ORDER BY t.schema, t.name"""


WRITES_AND_COLUMNS_SQL = WRITES_SQL.replace(
    "SELECT current_setting('track_counts')::bool AS tracking, t.*",
    f"SELECT current_setting('track_counts')::bool AS tracking, ({COLUMNS_SIGNATURE}) AS columns, t.*",
)


async def require_write_tracking(conn: asyncpg.Connection) -> None:
    """The scope guard reads the transaction's write counters, which exist only with track_counts."""
    if not await conn.fetchval("SELECT current_setting('track_counts')::bool"):
        raise InvalidInput(
            "track_counts is off on this database: the scope guard could not see what a batch's "
            "transaction writes (triggers, data-modifying WITH, cascades), so nothing was applied",
            hint="turn it on (ALTER SYSTEM SET track_counts = on; SELECT pg_reload_conf()), "
            "it is on by default",
        )


# Deferred constraint triggers and checks fire at COMMIT, after the guard's last look: fired
# here instead, their writes are counted like any other (and a deferred violation fails now).
FIRE_DEFERRED = "SET CONSTRAINTS ALL IMMEDIATE"

_LEDGER_WRITES = {"batches": (1, 1), "batch_images": (0, 1)}  # inserts allowed per batch: min, max


Writes = dict[int, tuple[str, str, int, int, int]]  # oid → schema, table, ins, upd, del


def _writes(rows: list[asyncpg.Record]) -> Writes:
    return {
        r["oid"]: (r["schema"], r["name"], r["ins"], r["upd"], r["del"])
        for r in rows
        if r["oid"] is not None
    }


async def counters(conn: asyncpg.Connection) -> Writes:
    """The write counters now (see WRITES_SQL), without the batch's track_counts check."""
    return _writes(await conn.fetch(WRITES_SQL))


async def read_writes(
    conn: asyncpg.Connection, batch: Batch, shape: ShapedRun | None = None
) -> Writes:
    """The counters now; refuses (rolling the batch back) if counting was switched off, as a
    superuser's apply could do in its own transaction. With `shape`, the same statement also
    checks that the shape's tables still have the columns the run resolved."""
    if shape is None:
        rows = await conn.fetch(WRITES_SQL)
    else:
        rows = await conn.fetch(WRITES_AND_COLUMNS_SQL, shape.oids)
        if rows[0]["columns"] != shape.signature:
            _columns_changed(batch)
    if not rows[0]["tracking"]:
        raise ScopeViolation(
            f"batch {batch.batch_no} (keys {batch.key_range}): track_counts is off in the "
            "batch's transaction, so the scope guard cannot see what it wrote; rolled back",
            hint="do not change track_counts in the apply (or in functions it calls)",
        )
    return _writes(rows)


ProbeWrites = dict[int, list[int]]  # oid → inserted, updated, deleted by rolled-back probes


def write_delta(start: Writes, end: Writes) -> ProbeWrites:
    """What was written between two readings of the counters, per table (oid)."""
    out: ProbeWrites = {}
    for oid, (schema, table, *after) in end.items():
        before = start.get(oid, (schema, table, 0, 0, 0))[2:]
        counts = [int(a) - int(b) for a, b in zip(after, before, strict=True)]
        if any(counts):
            out[oid] = counts
    return out


_OPS = ("inserted", "updated", "deleted")


def _ledger_excess(table: str, counts: list[int], images: int) -> list[str]:
    """A batch's writes to its own ledger tables beyond its one batch row and `images`
    batch_images rows."""
    lo, hi = _LEDGER_WRITES[table]
    hi = images if table == "batch_images" else hi
    ins, upd, dele = counts
    what = [
        f"{ins} inserted" if not lo <= ins <= hi else "",
        f"{upd} updated" if upd else "",
        f"{dele} deleted" if dele else "",
    ]
    return [w for w in what if w]


def unexpected_writes(
    start: Writes, end: Writes, target: TargetInfo, statement_rows: int
) -> list[str]:
    """What the batch's transaction wrote (`end` - `start`) beyond its apply statement's own rows
    of the target and its ledger rows; each as `schema.table: N inserted, N updated, …`."""
    found: list[str] = []
    for oid, counts in write_delta(start, end).items():
        schema, table = end[oid][0], end[oid][1]
        ins, upd, dele = counts
        if oid in (target.oid, target.root_oid):  # write counters roll up to the tree's root
            what = [f"{ins} inserted" if ins else "", f"{dele} deleted" if dele else ""]
            if upd > statement_rows:
                what.append(
                    f"{upd - statement_rows} updated beyond the {statement_rows} row(s) "
                    "the apply statement updated"
                )
        elif schema == LEDGER_SCHEMA and table in _LEDGER_WRITES:
            what = _ledger_excess(table, counts, images=1)
        else:
            what = [f"{n} {op}" for n, op in zip(counts, _OPS, strict=True) if n]
        what = [w for w in what if w]
        if what:
            found.append(f"{schema}.{table}: {', '.join(what)}")
    return found


async def _check_writes(
    conn: asyncpg.Connection, target: TargetInfo, batch: Batch, start: Writes, statement_rows: int
) -> None:
    """Roll the batch back if its transaction wrote anything outside its scope (invariant 4)."""
    await conn.execute(FIRE_DEFERRED)
    found = unexpected_writes(start, await read_writes(conn, batch), target, statement_rows)
    if not found:
        return
    keys = await _outside_keys(conn, target, batch)
    raise ScopeViolation(
        f"batch {batch.batch_no} (keys {batch.key_range}): the batch's transaction wrote outside "
        f"the plan's scope — {'; '.join(found)}"
        + (f" (rows of {target.display} outside the batch: keys {', '.join(keys)})" if keys else "")
        + "; the batch was rolled back",
        hint="the apply may only UPDATE target.columns of the batch's rows: look for triggers "
        f"on {target.display}, data-modifying WITH clauses and cascading foreign keys",
    )


async def _outside_keys(conn: asyncpg.Connection, target: TargetInfo, batch: Batch) -> list[str]:
    """Diagnosis only, on the way to a rollback: up to 5 target rows this transaction wrote
    outside the batch. A scan of the table, so bounded by a short timeout."""
    try:
        async with conn.transaction():  # a savepoint: a timeout here loses nothing
            await conn.execute("SET LOCAL statement_timeout = '5s'")
            return [
                r["key"] for r in await conn.fetch(target.outside_rows_sql(), *batch.key_arrays)
            ]
    except asyncpg.PostgresError:
        return []


MANIFEST_ROWS = 100  # rows of the plan's [manifest] sql kept per batch
MANIFEST_BYTES = 64 * 1024  # and at most this much of them (as JSON)


def manifest_query(sql: str) -> str:
    """The plan's [manifest] sql as a batch runs it: each row as JSON, one more than are kept."""
    return f"SELECT row_to_json(m)::text FROM ({sql}\n) AS m LIMIT {MANIFEST_ROWS + 1}"


async def record_manifest(conn: asyncpg.Connection, ctx: BatchContext) -> None:
    """The plan's [manifest] sql over the batch's keys, last in the batch's transaction, its
    rows stored with the batch's ledger row. It runs read-only (in a savepoint that is rolled
    back, so the batch's own writes are kept): a manifest query that writes fails the batch."""
    if ctx.manifest_sql is None:
        return
    batch = ctx.batch
    probe = conn.transaction()
    await probe.start()
    try:
        await conn.execute("SET LOCAL transaction_read_only = on")
        stmt = await conn.prepare(manifest_query(ctx.manifest_sql))
        # as many key arrays as it reads ($1 alone of a composite key is fine)
        rows = await stmt.fetch(*batch.key_arrays[: len(stmt.get_parameters())])
    except asyncpg.PostgresError as e:
        raise ScopeViolation(
            f"batch {batch.batch_no} (keys {batch.key_range}): the plan's manifest.sql failed: "
            f"{' '.join(str(e).split())}; the batch was rolled back",
            hint="manifest.sql must be one read-only SELECT over the batch's keys ($1…)",
        ) from None
    finally:
        await probe.rollback()
    # through the redaction point (a secret ${VAR} in the query may come back in a row), and
    # bounded in size as in number
    kept: list[dict[str, Any]] = []
    size = 0
    for r in rows[:MANIFEST_ROWS]:
        size += len(r[0].encode())
        if size > MANIFEST_BYTES:
            break
        kept.append(redact.redact_value(json.loads(r[0])))
    doc: dict[str, Any] = {"rows": kept, "truncated": len(kept) < len(rows)}
    if kept:  # jsonb keeps no key order: the query's column order, for manifest.jsonl
        doc["columns"] = list(kept[0])
    await conn.execute(
        "UPDATE backfill.batches SET manifest = $3::jsonb WHERE run_id = $1 AND batch_no = $2",
        ctx.run_id,
        batch.batch_no,
        json.dumps(doc),
    )


async def _apply_once(
    conn: asyncpg.Connection,
    target: TargetInfo,
    apply: BatchStatement,
    ctx: BatchContext,
    fresh: Reconnect,
) -> int:
    """Capture, apply, compare and record the batch; returns how many of its rows changed."""
    batch = ctx.batch
    values = ctx.values(target)
    # REPEATABLE READ: the capture fixes the snapshot the apply must update (see capture)
    async with conn.transaction(isolation="repeatable_read"):
        await _fence(conn, batch)
        start = await read_writes(conn, batch)
        await conn.execute(target.capture.sql, *target.capture.bind(values))
        tag = await conn.execute(apply.sql, *apply.bind(values))
        m = _TAG.match(tag or "")
        if not m or m.group(1) != "UPDATE":
            raise ScopeViolation(
                f"batch {batch.batch_no} (keys {batch.key_range}): the apply statement ran as "
                f"{tag!r}, but only an UPDATE of {target.display} is supported; rolled back",
                hint="make the apply one UPDATE statement of the target table",
            )
        finalize = target.finalize
        counts = await fetch_one(conn, finalize.sql, *finalize.bind(values))
        reported = int(m.group(2))
        if reported > counts["touched"] or counts["vanished"]:
            outside = await _outside_keys(conn, target, batch)
            raise ScopeViolation(
                f"batch {batch.batch_no} (keys {batch.key_range}): the apply statement reported "
                f"{reported} row(s) but touched only {counts['touched']} of the batch's "
                f"{counts['locked']} row(s)"
                + (
                    f"; it changed rows outside the batch (keys: {', '.join(outside)})"
                    if outside
                    else ""
                )
                + (f"; it removed {counts['vanished']} row(s)" if counts["vanished"] else "")
                + "; the batch was rolled back",
                hint="restrict the apply to the batch's keys (`WHERE id = ANY($1)`) and to the target table",
            )
        await _check_writes(conn, target, batch, start, reported)
        if counts["other_changed"]:
            raise await _undeclared_change(conn, fresh, target, batch, counts)
        await record_manifest(conn, ctx)
        return int(counts["changed"])


async def _apply_returning(
    conn: asyncpg.Connection,
    target: TargetInfo,
    statement: BatchStatement,
    ctx: BatchContext,
    fresh: Reconnect,
) -> int:
    """The batch as one statement (TargetInfo.returning_apply), in one transaction.
    Returns how many of its rows changed (the rest of its keys are no-ops)."""
    batch = ctx.batch
    async with conn.transaction():
        await _fence(conn, batch)
        start = await read_writes(conn, batch)
        row = await fetch_one(conn, statement.sql, *statement.bind(ctx.values(target)))
        await _check_writes(conn, target, batch, start, int(row["returned"]))
        if row["outside"]:
            raise ScopeViolation(
                f"batch {batch.batch_no} (keys {batch.key_range}): the apply statement changed "
                f"{row['outside']} row(s) outside the batch or outside {target.display} "
                f"(keys: {', '.join(row['outside_keys'] or [])}); the batch was rolled back",
                hint="restrict the apply to the batch's keys (`WHERE id = ANY($1)`) and to the target table",
            )
        if row["other_changed"]:
            raise await _undeclared_change(conn, fresh, target, batch, row)
        await record_manifest(conn, ctx)
        return int(row["changed"])


async def _undeclared_change(
    conn: asyncpg.Connection,
    fresh: Reconnect,
    target: TargetInfo,
    batch: Batch,
    counts: asyncpg.Record,
) -> ScopeViolation:
    """The error for a batch that changed columns outside target.columns, naming them."""
    cols = await _changed_other_columns(conn, fresh, target, batch)
    return ScopeViolation(
        f"batch {batch.batch_no} (keys {batch.key_range}): the apply statement changed "
        f"column(s) outside target.columns ({', '.join(cols) or 'the key'}) on "
        f"{counts['other_changed']} row(s) (e.g. keys {', '.join(counts['bad_keys'] or [])});"
        " the batch was rolled back",
        hint="declare every column the apply sets in target.columns, or stop setting it",
    )


async def _changed_other_columns(
    conn: asyncpg.Connection, fresh: Reconnect, target: TargetInfo, batch: Batch
) -> list[str]:
    """Which undeclared columns changed (diagnosis only, on the way to a rollback).

    Our transaction cannot see the rows' old versions, so a second connection, whose snapshot
    predates our uncommitted change, reads them.
    """
    try:
        other = await fresh()
    except Exception:
        return []
    try:
        keys = ", ".join(f"t.{k.q}::text" for k in target.key)
        cols = ", ".join(f"t.{c.q}::text" for c in target.others)
        sql = (
            f"SELECT ARRAY[{keys}]::text[] AS k, ARRAY[{cols}]::text[] AS v "
            f"FROM {target.table} AS t WHERE {target.key_match('t')}"
        )
        before = {tuple(r["k"]): r["v"] for r in await other.fetch(sql, *batch.key_arrays)}
        after = {tuple(r["k"]): r["v"] for r in await conn.fetch(sql, *batch.key_arrays)}
    finally:
        await other.close()
    changed: list[str] = []
    for key, old in before.items():
        new = after.get(key)
        for col, a, b in zip(target.others, old, new or old, strict=True):
            if a != b and col.name not in changed:
                changed.append(col.name)
    return changed


def shaped_unexpected(
    start: Writes, end: Writes, shape: ShapedRun, raw: dict[int, list[int]], probed: ProbeWrites
) -> list[str]:
    """What a shaped batch's transaction wrote beyond the rows its statements returned (and
    imaged), per declared table and operation, and anything written to an undeclared table.
    `probed`: what capture-path probes wrote and rolled back (the counters keep it), measured
    by the same counters around each probe and taken off exactly."""
    found: list[str] = []
    by_oid = {o: t for t in shape.tables for o in (t.oid, t.root_oid)}
    for oid, delta in write_delta(start, end).items():
        counts = [n - p for n, p in zip(delta, probed.get(oid, [0, 0, 0]), strict=True)]
        if not any(counts):
            continue
        schema, table = end[oid][0], end[oid][1]
        declared = by_oid.get(oid)
        if declared is not None:
            imaged = raw.get(declared.rel, [0, 0, 0])
            what = [
                f"{n - imaged[i]} {op} beyond the {imaged[i]} its statements returned"
                for i, (n, op) in enumerate(zip(counts, _OPS, strict=True))
                if n > imaged[i]
            ]
        elif schema == LEDGER_SCHEMA and table in _LEDGER_WRITES:
            what = _ledger_excess(table, counts, images=len(shape.tables))
        else:
            what = [
                f"{n} {op} (not declared in the plan)"
                for n, op in zip(counts, _OPS, strict=True)
                if n
            ]
        if what:
            found.append(f"{schema}.{table}: {', '.join(what)}")
    return found


async def _capture_step(
    conn: asyncpg.Connection, step: Step, batch: Batch, probed: ProbeWrites
) -> None:
    """One statement on the capture path (see engine.shapes)."""
    if step.op in ("insert", "delete"):
        await conn.execute(step.direct_sql, *batch.key_arrays)
        return
    before = await read_writes(conn, batch)
    probe = conn.transaction()  # a savepoint, rolled back: only which rows it touches is kept
    await probe.start()
    try:
        found = await fetch_one(conn, step.probe_sql, *batch.key_arrays)
    finally:
        await probe.rollback()
    for oid, counts in write_delta(before, await read_writes(conn, batch)).items():
        probed[oid] = [a + b for a, b in zip(probed.get(oid, [0, 0, 0]), counts, strict=True)]
    n = int(found["n"])
    # this statement's before-images only: an earlier statement of the batch may have probed
    # the same table (a temporary table: the scope guard does not count it)
    await conn.execute("DELETE FROM pg_temp.backfill_prior")
    if n:
        arrays = [found[f"k{i}"] for i in range(len(step.table.key))]
        await conn.execute(step.prior_sql, *arrays)
    await conn.execute(step.real_sql, *batch.key_arrays)
    real, matched, prior = await fetch_one(
        conn,
        "SELECT count(*)::int, count(*) FILTER (WHERE had_old)::int,"
        " (SELECT count(*)::int FROM pg_temp.backfill_prior WHERE rel = $2)"
        " FROM pg_temp.backfill_touched WHERE step = $1",
        step.no,
        step.table.rel,
    )
    if real != n or matched != prior:
        raise Unrepeatable(
            f"{step.where} touched {real} row(s) of {step.table.display} when run, but "
            f"{n} when probed ({matched} of {prior} known rows): its rows depend on something "
            "that changed (a volatile function?)"
        )


async def _apply_shaped(
    conn: asyncpg.Connection, shape: ShapedRun, ctx: BatchContext, mode: str
) -> tuple[int, int]:
    """A shaped batch (engine.shapes), in one transaction: its statements, its net images
    checked and recorded, the scope guard. Returns (rows changed, rows unchanged)."""
    batch = ctx.batch
    probed: ProbeWrites = {}
    if shape.direct is not None:
        return await _apply_direct(conn, shape, shape.direct, ctx)
    async with conn.transaction(isolation="repeatable_read"):
        if shape.lock_sql:  # before the snapshot: what it waited for is in it
            await conn.execute(shape.lock_sql)
        start = await read_writes(conn, batch)
        for step in shape.steps:
            if mode == "returning":
                await conn.execute(step.returning_sql, *batch.key_arrays)
            else:
                await _capture_step(conn, step, batch, probed)
        if shape.reinserted_sql and (again := await conn.fetchrow(shape.reinserted_sql)):
            raise ScopeViolation(
                f"batch {batch.batch_no} (keys {batch.key_range}): it deleted a row of "
                f"{shape.table(again['rel']).display} and inserted one with the same key "
                f"({again['key_show']}): the rollback could not undo both in a safe order; "
                "the batch was rolled back",
                hint="update the row in place (declare update and its columns), or delete and "
                "insert in separate runs",
            )
        fin = shape.finalize
        row = await fetch_one(conn, fin.sql, *fin.bind(ctx.values(shape.target)))
        bad = json.loads(row["bad"] or "[]")
        if bad:
            raise ScopeViolation(
                f"batch {batch.batch_no} (keys {batch.key_range}): {shape.describe_bad(bad)}; "
                "the batch was rolled back",
                hint="declare each table the apply writes under [[writes]], with its operations "
                "and the columns an update may change; restrict the target's rows to the batch's keys",
            )
        raw = {int(k): v for k, v in json.loads(row["raw"]).items()}
        await _within_returned(conn, shape, batch, start, raw, probed)
        await record_manifest(conn, ctx)
        return int(row["changed"]), int(row["same"])


async def _apply_direct(
    conn: asyncpg.Connection,
    shape: ShapedRun,
    statements: tuple[BatchStatement, ...],
    ctx: BatchContext,
) -> tuple[int, int]:
    """A batch that only inserts into insert-only tables (`ShapedRun.direct`): each statement
    records its rows' digests as it runs, the last one the ledger row too; then the columns are
    checked and the write counters held to what the statements returned, as for any shaped
    batch. READ COMMITTED (no probe needs a repeatable snapshot): the column check, in the
    statement that reads the counters after the statements, sees a change of columns that an
    INSERT waited for."""
    batch = ctx.batch
    values = ctx.values(shape.target)
    async with conn.transaction():
        start = await read_writes(conn, batch)
        raw: dict[int, list[int]] = {}
        for step, stmt in zip(shape.steps, statements, strict=True):
            values["earlier"] = sum(n for n, _, _ in raw.values())
            n = await conn.fetchval(stmt.sql, *stmt.bind(values))
            raw[step.table.rel] = [int(n), 0, 0]
        await _within_returned(conn, shape, batch, start, raw, {})
        await record_manifest(conn, ctx)
        return sum(n for n, _, _ in raw.values()), 0


def _columns_changed(batch: Batch) -> NoReturn:
    raise ScopeViolation(
        f"batch {batch.batch_no} (keys {batch.key_range}): a declared table's columns "
        "changed while the run was going (added, dropped or retyped): its row images "
        "would not restore them; the batch was rolled back",
        hint="finish or roll back a run before changing its tables' columns; then start a new run",
    )


async def _within_returned(
    conn: asyncpg.Connection,
    shape: ShapedRun,
    batch: Batch,
    start: Writes,
    raw: dict[int, list[int]],
    probed: ProbeWrites,
) -> None:
    """The scope guard: nothing written beyond the rows the statements returned (and imaged);
    the statement that reads the counters also checks that the tables still have the columns
    the run resolved (an image would leave out, or misplace, a column its rollback restores)."""
    await conn.execute(FIRE_DEFERRED)
    end = await read_writes(conn, batch, shape)
    found = shaped_unexpected(start, end, shape, raw, probed)
    if found:
        raise ScopeViolation(
            f"batch {batch.batch_no} (keys {batch.key_range}): the batch's transaction wrote "
            f"outside what its statements returned — {'; '.join(found)}; the batch was "
            "rolled back",
            hint="look for triggers, cascading foreign keys and writes inside functions: every "
            "row a batch writes must be one its statements write (so it can be undone)",
        )


Reconnect = Callable[[], Awaitable[asyncpg.Connection]]


class BatchExecutor:
    """Applies batches on one connection, retrying transient errors with backoff."""

    def __init__(
        self,
        target: TargetInfo,
        apply_sql: str,
        run_id: str,
        reconnect: Reconnect,
        *,
        max_retries: int,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        shape: ShapedRun | None = None,
        manifest_sql: str | None = None,
    ) -> None:
        self.shape = shape
        self.manifest_sql = manifest_sql
        self.target = target
        self.apply_sql = apply_sql
        self.run_id = run_id
        self.reconnect = reconnect
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.conn: asyncpg.Connection | None = None
        self.returning = target.returning_apply(apply_sql)
        self.apply = BatchStatement(apply_sql, target.key_params)
        self.mode: str | None = None  # "returning" (one statement) or "capture" (three)
        self.mode_reason = ""

    async def _connection(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await self.reconnect()
            await self.conn.execute(self.target.scratch_ddl)
            if self.shape is not None:
                await self.conn.execute(TOUCHED_DDL)
            if self.mode is None:
                await self._choose_mode(self.conn)
        return self.conn

    async def _choose_mode(self, conn: asyncpg.Connection) -> None:
        """One statement per batch where the server and the apply allow it (RETURNING OLD/NEW,
        PostgreSQL 18+); otherwise capture, apply and compare as three statements."""
        if self.shape is not None:
            version = int(await conn.fetchval("SHOW server_version_num"))
            self.mode, self.mode_reason = (
                ("returning", "RETURNING OLD/NEW per statement")
                if version >= RETURNING_OLD_NEW_SINCE
                else ("capture", f"PostgreSQL {version // 10000}: no RETURNING OLD/NEW")
            )
            return
        try:
            await conn.prepare(self.returning.sql)
        except asyncpg.PostgresError as e:
            self.mode, self.mode_reason = "capture", " ".join(str(e).split())
        else:
            self.mode, self.mode_reason = "returning", "RETURNING OLD/NEW"

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close(timeout=5)

    async def run(self, batch: Batch) -> BatchOutcome:
        errors: list[dict[str, str]] = []
        attempt = 0
        started_wall = datetime.now(UTC)
        t0 = time.perf_counter()
        while True:
            attempt += 1
            try:
                conn = await self._connection()
                if attempt > 1 and await batch_committed(conn, self.run_id, batch.batch_no):
                    return BatchOutcome(
                        batch.batch_no,
                        batch.stage,
                        "skipped",
                        batch.first_key,
                        batch.last_key,
                        attempts=attempt,
                        errors=errors,
                        started_at=started_wall,
                    )
                ctx = BatchContext(
                    batch, self.run_id, attempt, errors, started_wall, self.manifest_sql
                )
                noop: int | None = None
                if self.shape is not None:
                    changed, noop = await _apply_shaped(conn, self.shape, ctx, self.mode or "")
                elif self.mode == "returning":
                    changed = await _apply_returning(
                        conn, self.target, self.returning, ctx, self.reconnect
                    )
                else:
                    changed = await _apply_once(conn, self.target, self.apply, ctx, self.reconnect)
            except Exception as exc:
                category = classify(exc)
                sqlstate = getattr(exc, "sqlstate", None)
                errors.append(
                    {"attempt": str(attempt), "category": category, "error": _describe(exc)}
                    | ({"sqlstate": str(sqlstate)} if sqlstate else {})
                )
                if category in ("connection_lost", "internal") and self.conn is not None:
                    # never reuse a connection whose state an error may have left unknown
                    self.conn.terminate()
                    self.conn = None
                if category not in TRANSIENT or attempt > self.max_retries:
                    return BatchOutcome(
                        batch.batch_no,
                        batch.stage,
                        "failed",
                        batch.first_key,
                        batch.last_key,
                        selected=batch.size,
                        attempts=attempt,
                        errors=errors,
                        started_at=started_wall,
                        duration_ms=(time.perf_counter() - t0) * 1000,
                        error_category=category,
                        error=_describe(exc),
                        sqlstate=sqlstate,
                    )
                delay = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
                await anyio.sleep(delay * (0.5 + random.random() / 2))
                continue
            return BatchOutcome(
                batch.batch_no,
                batch.stage,
                "done",
                batch.first_key,
                batch.last_key,
                selected=batch.size,
                changed=changed,
                noop=batch.size - changed if noop is None else noop,
                attempts=attempt,
                errors=errors,
                started_at=started_wall,
                duration_ms=(time.perf_counter() - t0) * 1000,
            )


def failure_error(outcome: BatchOutcome, *, resume: str) -> WorkFailed:
    """The error that stops the phase when a batch fails for good; `resume` continues the run."""
    cls = ScopeViolation if outcome.error_category == "scope_violation" else WorkFailed
    keys = f"[{', '.join(outcome.first_key)}] … [{', '.join(outcome.last_key)}]"
    if outcome.error_category == "connection_lost":
        return cls(
            f"batch {outcome.batch_no} (keys {keys}): lost the connection to the database and "
            f"could not get it back within the retry budget ({outcome.attempts} attempt(s) "
            f"over {outcome.duration_ms / 1000:.1f} s): {outcome.error}; every committed batch "
            "is kept, this one was not applied",
            hint=f"when the database is reachable again, continue: {resume}",
        )
    retried = f" after {outcome.attempts} attempt(s)" if outcome.attempts > 1 else ""
    return cls(
        f"batch {outcome.batch_no} (keys {keys}) failed{retried}: {outcome.error_category}: "
        f"{outcome.error}",
        hint=f"fix the cause, then continue the run: {resume}",
    )
