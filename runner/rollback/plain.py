"""Undoing a run exactly (invariant 7): emitted SQL for psql, and a batched, verified rollback.

Both restore a row's before-image only while it still holds the runner's after-image; a row changed
since is a conflict, reported and left alone. Values travel as their text form inside standard
SQL string literals (standard_conforming_strings on, quotes doubled), cast back to the column's
type, so no value can break out of its literal.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import asyncpg

from runner import ledger
from runner.db import PINNED_SETTINGS, fetch_one, qualified, quote_ident
from runner.engine.executor import classify
from runner.engine.session import MainSession
from runner.engine.spool import Spool
from runner.engine.target import as_text_array, decoded, encode
from runner.engine.throttle import Throttle
from runner.errors import ConnectionFailed, InvalidInput
from runner.files import writing_bytes

CHECKSUM_ROW = ledger.CHECKSUM_ROW


def comment_text(value: object) -> str:
    """A value shown inside a `--` comment: control characters escaped, so a name with a
    newline in it cannot end the comment and become SQL."""
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in str(value)
    )


def session_preamble(search_schemas: list[str]) -> str:
    """The SETs that make the file's comparisons mean what the runner's did, in any session."""
    lines = [
        f"SET {name} = {sql_literal(value)};"
        for name, value in PINNED_SETTINGS.items()
        if name != "standard_conforming_strings"
    ]
    path = ", ".join(["pg_catalog", *(quote_ident(s) for s in search_schemas), "pg_temp"])
    return "\n".join([*lines, f"SET search_path = {path};"])


def table_check_sql(shape: RunShape, run_id: str) -> str:
    """A DO block that stops the file unless the table is the one the run changed."""
    return table_check(shape.table, shape.oid, run_id)


def table_check(table: str, oid: int, run_id: str) -> str:
    """A DO block that stops the file unless `table` (quoted, qualified) has oid `oid`: the
    table the run wrote, not one dropped and created again or another of the same name."""
    body = f"""BEGIN
    IF to_regclass({sql_literal(table)}) IS NULL
       OR to_regclass({sql_literal(table)})::oid <> {int(oid)} THEN
        RAISE EXCEPTION 'backfill rollback: % is not the table run % changed (oid {int(oid)})',
            {sql_literal(table)}, {sql_literal(run_id)};
    END IF;
END"""
    tag = "$backfill$"
    while tag in body:
        tag = tag[:-1] + "x$"
    return f"DO {tag} {body} {tag};"


def sql_literal(value: str | None) -> str:
    """A standard SQL string literal (standard_conforming_strings = on), or NULL."""
    if value is None:
        return "NULL"
    if "\x00" in value:
        raise ValueError("text values cannot contain NUL bytes")
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class RunShape:
    """The target as recorded on the run row: enough to restore without the plan file."""

    table: str  # quoted and qualified
    oid: int
    key: list[tuple[str, str]]
    columns: list[tuple[str, str]]
    search_schemas: list[str]

    @classmethod
    def of(cls, run: ledger.RunRow) -> RunShape:
        if run.target_schema is None or run.target_name is None or run.target_oid is None:
            raise InvalidInput(
                f"run {run.run_id} recorded its target as {run.target_table!r} before the "
                "ledger kept the schema and table name apart, and no single table in this "
                "database has that name now: the runner cannot tell which table to restore",
                hint="restore from the run's rollback SQL file after checking the table it names",
            )
        return cls(
            qualified(run.target_schema, run.target_name),
            run.target_oid,
            list(zip(run.key_columns, run.key_types, strict=True)),
            list(zip(run.columns, run.column_types, strict=True)),
            run.search_schemas or [run.target_schema],
        )

    async def check_table(self, conn: asyncpg.Connection) -> None:
        """Refuse to restore into any table but the one the run changed (same name, same oid)."""
        oid = await conn.fetchval("SELECT to_regclass($1)::oid", self.table)
        if oid != self.oid:
            raise InvalidInput(
                f"{self.table} is not the table this run changed (oid {self.oid}, now "
                f"{'missing' if oid is None else oid}): it was dropped, renamed or created again",
                hint="nothing was restored; restore by hand from the run's rollback SQL file "
                "after checking which table holds the run's rows",
            )

    def current_image(self, alias: str = "t") -> str:
        """The row's declared columns now, as text, compared byte for byte (not under their
        collations: see `engine.target.encode`)."""
        return f"CASE WHEN {alias}.ctid IS NULL THEN NULL ELSE {self._columns_now(alias)} END"

    def _columns_now(self, alias: str) -> str:
        cols = ", ".join(f"{alias}.{quote_ident(c)}::text" for c, _ in self.columns)
        return f'(ARRAY[{cols}]::text[] COLLATE pg_catalog."C")'

    def join(self, images: str = "i", alias: str = "t") -> str:
        return " AND ".join(
            f"{alias}.{quote_ident(k)} = {images}.key[{n}]::{t}"
            for n, (k, t) in enumerate(self.key, start=1)
        )

    def set_clause(self, images: str = "i") -> str:
        return ", ".join(
            f"{quote_ident(c)} = {images}.before[{n}]::{t}"
            for n, (c, t) in enumerate(self.columns, start=1)
        )

    def restore_sql(self, images_from: str, batch_filter: str) -> str:
        return (
            f"UPDATE {self.table} AS t\nSET {self.set_clause()}\nFROM {images_from} AS i\n"
            f"WHERE {batch_filter} AND {self.join()}\n"
            f"  AND {self._columns_now('t')} IS NOT DISTINCT FROM i.after"
        )

    # The same, over batch_images' own encoding (what the capture wrote: a value's own text when
    # the key or the image has one column, else the text of a text[]): no per-row arrays built.

    @staticmethod
    def images_of(where: str) -> str:
        """A batch's changed rows as (batch_no, key, before, after), encoded, from batch_images."""
        return (
            "SELECT i.batch_no, u.key, u.before, u.after FROM backfill.batch_images AS i "
            "CROSS JOIN LATERAL unnest(i.ops, i.keys, i.befores, i.afters) "
            f"AS u(op, key, before, after) WHERE {where} AND u.op = 'U'"
        )

    def enc_join(self, img: str = "img", alias: str = "t") -> str:
        values = decoded(f"{img}.key", [t for _, t in self.key])
        return " AND ".join(
            f"{alias}.{quote_ident(k)} = {v}" for (k, _), v in zip(self.key, values, strict=True)
        )

    def enc_current(self, alias: str = "t") -> str:
        """The row's image now, encoded as the capture encoded it (compare with before/after)."""
        return encode([f"{alias}.{quote_ident(c)}" for c, _ in self.columns])

    def enc_set(self, img: str = "img") -> str:
        values = decoded(f"{img}.before", [t for _, t in self.columns])
        return ", ".join(
            f"{quote_ident(c)} = {v}" for (c, _), v in zip(self.columns, values, strict=True)
        )

    def as_text_array(self, expr: str, *, key: bool) -> str:
        """An encoded key or image as the text[] the conflict table and reports show."""
        return as_text_array(expr, len(self.key if key else self.columns))


# -- selection ---------------------------------------------------------------------------------


def parse_batch_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, _, b = text.partition("-")
        lo, hi = int(a), int(b or a)
    except ValueError:
        raise InvalidInput(
            f"--batches {text!r}: write A-B (e.g. 3-10) or a single batch number"
        ) from None
    if lo < 1 or hi < lo:
        raise InvalidInput(f"--batches {text!r}: the range must be 1 or more and ascending")
    return lo, hi


# -- emitted SQL -------------------------------------------------------------------------------


def images_insert(rows: str) -> str:
    """The statement that loads a batch's images into the rollback file's images table (`rows`:
    the VALUES or SELECT of `ledger.image_values` or `ledger.shaped_image_values`)."""
    return f"INSERT INTO pg_temp.backfill_rollback_images {rows};\n"


ImageReader = Callable[[asyncpg.Connection, str, int], Awaitable[tuple[str | None, Any]]]


class ImageSpool:
    """A run's rollback images as `INSERT … VALUES` statements, batch by batch in any order, on
    disk (`engine.spool.Spool`), with what goes with each batch's (`extra`: a plain run's batch
    checksum, `ledger.image_values`; a shaped run's row count, `ledger.shaped_image_values`). The
    apply fills it while its batches run (`phases.follow`), so writing the rollback file after the
    last batch copies them instead of reading the ledger again; the file always covers the
    ledger's committed batches, fetching here whatever is not spooled yet."""

    def __init__(self, folder: Path, read: ImageReader = ledger.image_values) -> None:
        self._chunks = Spool(folder)
        self._read = read
        self.extra: dict[int, Any] = {}

    @classmethod
    def of(cls, run: ledger.RunRow, folder: Path) -> ImageSpool:
        """An empty spool for the run's images, read the way its rollback file needs them."""
        return cls(
            folder, ledger.image_values if run.tables is None else ledger.shaped_image_values
        )

    def __contains__(self, batch_no: object) -> bool:
        return batch_no in self._chunks

    async def fetch(self, conn: asyncpg.Connection, run_id: str, batch_no: int) -> None:
        """Read one committed batch's images from the ledger into the spool."""
        values, extra = await self._read(conn, run_id, batch_no)
        self._chunks.put(batch_no, images_insert(values).encode() if values else b"")
        self.extra[batch_no] = extra

    def copy_to(self, out: BinaryIO, batch_nos: list[int]) -> None:
        """The spooled statements of `batch_nos`, in that order."""
        self._chunks.copy_to(out, batch_nos)

    def close(self) -> None:
        self._chunks.close()


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
    """Write the rollback SQL for the run's batches in this environment, streaming from the ledger.

    With `checksum_conn` (a second connection to the same database) the batches' images are read
    on both. With `spool`, the batches already in it are copied from there, not read again (images
    of a committed batch never change)."""
    shape = RunShape.of(run)
    nos = await ledger.done_batches(conn, run.run_id, batches, since)
    counts = await ledger.changed_per_batch(conn, run.run_id, nos)
    with_images = [no for no in nos if counts.get(no)]
    own = spool is None
    images = ImageSpool(path.parent) if spool is None else spool
    try:
        missing = [no for no in with_images if no not in images]
        conns = [conn] if checksum_conn is None else [conn, checksum_conn]

        async def fetch(c: asyncpg.Connection, nos_: list[int]) -> None:
            for no in nos_:
                await images.fetch(c, run.run_id, no)

        # two connections read alternate batches; the file takes them in order
        async with anyio.create_task_group() as tg:
            for k, c in enumerate(conns):
                tg.start_soon(fetch, c, missing[k :: len(conns)])
        rows = sum(counts.get(no, 0) for no in with_images)
        checksum_value = ledger.run_checksum([images.extra[no] for no in sorted(with_images)])
        header = _file_header(
            run,
            shape,
            path.name,
            display_dsn,
            scope=_scope_text(batches, since),
            rows=rows,
            batches=len(with_images),
            checksum=checksum_value,
        )
        with writing_bytes(path) as out:
            out.write(header.encode())
            images.copy_to(out, with_images)
            tail = [
                "CREATE INDEX ON pg_temp.backfill_rollback_images (batch_no);\n"
                "ANALYZE pg_temp.backfill_rollback_images;\n"
            ]
            for no in with_images:
                restore = shape.restore_sql(
                    "pg_temp.backfill_rollback_images", f"i.batch_no = {int(no)}"
                )
                tail.append(f"\n-- batch {no}: {counts[no]} row(s)\nBEGIN;\n{restore};\nCOMMIT;\n")
            tail.append(_file_verification(shape, checksum_value))
            out.write("".join(tail).encode())
    finally:
        if own:
            images.close()
    return path


def _scope_text(batches: tuple[int, int] | None, since: datetime | None) -> str:
    scope = []
    if batches:
        scope.append(f"batches {batches[0]}-{batches[1]}")
    if since:
        scope.append(f"batches committed after {since.isoformat()}")
    return "; ".join(scope) or "every batch of the run in this environment"


def _file_header(
    run: ledger.RunRow,
    shape: RunShape,
    name: str,
    display_dsn: str,
    *,
    scope: str,
    rows: int,
    batches: int,
    checksum: str | None,
) -> str:
    """What the file is, how to run it, the session it pins, the table check, the images table."""
    return f"""-- backfill rollback
-- run:          {comment_text(run.run_id)}
-- plan:         {comment_text(run.plan_name)} (digest {run.plan_digest})
-- environment:  {comment_text(run.env)} ({comment_text(display_dsn)})
-- target:       {comment_text(shape.table)} (oid {shape.oid}), columns {comment_text(", ".join(run.columns))}
-- generated:    {datetime.now(UTC).isoformat(timespec="seconds")}
-- scope:        {scope}
-- restores:     {rows} row(s) in {batches} batch(es), newest batch first, one transaction each
-- checksum:     {checksum or "(no rows)"}
--   (md5 over each batch's before-images in key order, then over those in batch order; the
--   verification at the end recomputes it from the table)
--
-- Run it:       psql -X -v ON_ERROR_STOP=1 -d "$DSN_OF_{comment_text(run.env.upper())}" -f {comment_text(name)}
-- Verify:       the last two queries print restored rows, conflicts and the checksum;
--               checksum_matches is true when every row holds its before-image again.
-- A row is restored only while it still holds the value this run wrote; rows changed since
-- are conflicts: left alone and listed at the end. Running the file again is safe.
-- The SETs below pin how values are written as text, so the comparisons mean the same in your
-- session as in the runner's (PGTZ, PGDATESTYLE, PGOPTIONS or database defaults do not matter).
\\set ON_ERROR_STOP on
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SET lock_timeout = '5s';
{session_preamble(shape.search_schemas)}
-- The table must be the one the run changed: same name and same oid (a table dropped and
-- created again, or another table of the same name, stops the file here, before any change).
{table_check_sql(shape, run.run_id)}
CREATE TEMP TABLE pg_temp.backfill_rollback_images (
    batch_no integer NOT NULL, key text[] NOT NULL, before text[], after text[]
);
"""


def _file_verification(shape: RunShape, checksum: str | None) -> str:
    """The file's last two queries: the verification with its checksum, and the conflicts."""
    current = shape.current_image()
    expected = sql_literal(checksum) if checksum else "NULL"
    return f"""
-- Verification: every row should hold its before-image again (conflicts excepted).
WITH v AS (
    SELECT i.batch_no, i.key::text AS k, i.before, {current} AS cur,
           {CHECKSUM_ROW.format(img=current)} AS line
    FROM pg_temp.backfill_rollback_images AS i LEFT JOIN {shape.table} AS t ON {shape.join()}
), per_batch AS (
    SELECT batch_no, md5(string_agg(line, '|' ORDER BY k COLLATE pg_catalog."C")) AS m FROM v GROUP BY batch_no
), run AS (
    SELECT md5(string_agg(m, '|' ORDER BY batch_no)) AS checksum FROM per_batch
)
SELECT count(*) AS rows_in_rollback,
       count(*) FILTER (WHERE v.cur IS NOT DISTINCT FROM v.before) AS rows_at_before_image,
       count(*) FILTER (WHERE v.cur IS DISTINCT FROM v.before) AS conflicts,
       (SELECT checksum FROM run) AS checksum,
       {expected}::text AS expected_checksum,
       (SELECT checksum FROM run) IS NOT DISTINCT FROM {expected}::text AS checksum_matches
FROM v;

-- Conflicts: rows changed since the apply, left alone (key, value this run wrote, value now).
SELECT i.batch_no, i.key, i.after AS runner_wrote, {current} AS now_holds
FROM pg_temp.backfill_rollback_images AS i LEFT JOIN {shape.table} AS t ON {shape.join()}
WHERE {current} IS DISTINCT FROM i.before
ORDER BY i.batch_no DESC, i.key::text COLLATE pg_catalog."C";
"""


# -- executed rollback -------------------------------------------------------------------------


@dataclass
class RollbackResult:
    run_id: str
    env: str
    dry_run: bool
    batches: list[int]
    restored: int = 0
    already: int = 0
    conflicts: int = 0
    restorable: int = 0
    conflict_rows: list[dict[str, Any]] = field(default_factory=list)
    expected_checksum: str | None = None
    actual_checksum: str | None = None
    unverified: int = 0
    elapsed_seconds: float = 0.0
    verify_seconds: float = 0.0
    batches_this_command: int = 0
    workers: int = 1
    note: str = ""
    tables: list[dict[str, Any]] = field(default_factory=list)  # a shaped run's, per table

    @property
    def verified(self) -> bool:
        return (
            not self.dry_run
            and self.unverified == 0
            and self.expected_checksum == self.actual_checksum
        )


async def _classify(
    conn: asyncpg.Connection, shape: RunShape, run_id: str, nos: list[int]
) -> asyncpg.Record:
    current = shape.current_image()
    return await fetch_one(
        conn,
        f"""
        WITH v AS (
            SELECT i.batch_no, i.key, i.before, i.after, {current} AS cur
            FROM backfill.row_images AS i LEFT JOIN {shape.table} AS t ON {shape.join()}
            WHERE i.run_id = $1 AND i.op = 'U' AND i.batch_no = ANY($2)
        )
        SELECT count(*) FILTER (WHERE cur IS NOT DISTINCT FROM after
                                  AND cur IS DISTINCT FROM before) AS restorable,
               count(*) FILTER (WHERE cur IS NOT DISTINCT FROM before) AS already,
               count(*) FILTER (WHERE cur IS DISTINCT FROM after AND cur IS DISTINCT FROM before)
                   AS conflicts
        FROM v""",
        run_id,
        nos,
    )


async def _restore_batch(
    conn: asyncpg.Connection, shape: RunShape, run_id: str, no: int
) -> tuple[int, int, int]:
    """One batch in one statement: restore the rows still at the run's after-image, record the
    rows at neither image (or gone) as conflicts, and record the batch. The UPDATE re-checks
    each row's current image itself, so a row changed meanwhile is left alone, never
    overwritten; the verification then finds it not restored."""
    cur = shape.enc_current("t")
    statement = f"""
WITH img AS MATERIALIZED ({shape.images_of("i.run_id = $1 AND i.batch_no = $2")}),
now_ AS (
    SELECT img.key, img.before, img.after, t.ctid IS NOT NULL AS present, {cur} AS cur
    FROM img LEFT JOIN {shape.table} AS t ON {shape.enc_join("img", "t")}
),
restored AS (
    UPDATE {shape.table} AS t SET {shape.enc_set("img")}
    FROM img
    WHERE {shape.enc_join("img", "t")}
      AND {cur} IS NOT DISTINCT FROM img.after AND {cur} IS DISTINCT FROM img.before
    RETURNING 1
),
conflicts AS (
    INSERT INTO backfill.rollback_conflicts (run_id, batch_no, key, expected, current)
    SELECT $1, $2, {shape.as_text_array("n.key", key=True)},
           {shape.as_text_array("n.after", key=False)},
           CASE WHEN n.present THEN {shape.as_text_array("n.cur", key=False)} END
    FROM now_ AS n
    WHERE NOT n.present
       OR (n.cur IS DISTINCT FROM n.after AND n.cur IS DISTINCT FROM n.before)
    RETURNING 1
),
counts AS (
    SELECT (SELECT count(*) FROM restored)::int AS restored,
           (SELECT count(*) FROM conflicts)::int AS conflicts,
           (SELECT count(*) FROM now_ WHERE present AND cur IS NOT DISTINCT FROM before)::int
               AS already
),
recorded AS (
    INSERT INTO backfill.rollback_batches (run_id, batch_no, restored, conflicts, already)
    SELECT $1, $2, restored, conflicts, already FROM counts
)
SELECT restored, conflicts, already FROM counts"""
    async with conn.transaction():
        if await ledger.batch_rolled_back(conn, run_id, no):
            return 0, 0, 0
        row = await fetch_one(conn, statement, run_id, no)
        return int(row["restored"]), int(row["conflicts"]), int(row["already"])


def _verify_batch_sql(shape: RunShape) -> str:
    """One batch's verification: its rows' checksums over the before-images and over the table
    now (rows recorded as conflicts excepted), and how many rows are not at their before-image."""
    cur = shape.enc_current("t")
    line = "img.key || '=' || {}"
    return f"""
WITH img AS ({shape.images_of("i.run_id = $1 AND i.batch_no = $2")}),
c AS (SELECT DISTINCT key FROM backfill.rollback_conflicts WHERE run_id = $1 AND batch_no = $2),
v AS (
    SELECT img.key, img.before, t.ctid IS NOT NULL AS present, {cur} AS cur,
           c.key IS NOT NULL AS conflict
    FROM img LEFT JOIN {shape.table} AS t ON {shape.enc_join("img", "t")}
    LEFT JOIN c ON c.key = {shape.as_text_array("img.key", key=True)}
)
SELECT md5(string_agg({line.format("coalesce(img.before, 'NULL')")}, '|'
                      ORDER BY img.key COLLATE pg_catalog."C") FILTER (WHERE NOT conflict)) AS expected,
       md5(string_agg({line.format("CASE WHEN present THEN coalesce(cur, 'NULL') ELSE '(missing)' END")},
                      '|' ORDER BY img.key COLLATE pg_catalog."C") FILTER (WHERE NOT conflict)) AS actual,
       count(*) FILTER (WHERE NOT conflict
                        AND NOT (present AND cur IS NOT DISTINCT FROM before))::int AS unverified,
       count(*) FILTER (WHERE conflict)::int AS conflicts
FROM v AS img"""


async def _verify_batches(
    conns: list[asyncpg.Connection], shape: RunShape, run_id: str, nos: list[int]
) -> dict[int, asyncpg.Record]:
    """Every batch verified against the table as it is now, side by side on `conns`."""
    statement = _verify_batch_sql(shape)
    found: dict[int, asyncpg.Record] = {}
    pending = iter(nos)

    async def verify_from(c: asyncpg.Connection) -> None:
        for no in pending:
            found[no] = await fetch_one(c, statement, run_id, no)

    async with anyio.create_task_group() as tg:
        for c in conns:
            tg.start_soon(verify_from, c)
    return found


def _combined(parts: list[str | None]) -> str:
    return hashlib.md5("|".join(p or "" for p in parts).encode()).hexdigest()


async def verify(
    conns: list[asyncpg.Connection], run: ledger.RunRow, result: RollbackResult
) -> None:
    """Recompute the checksums over the rows that were restorable, batch by batch, and list the
    recorded conflicts. The checksum of the run is the md5 of its batches' in batch order."""
    shape = RunShape.of(run)
    conn = conns[0]
    await shape.check_table(conn)  # the checksums below must be over the table that was restored
    nos = sorted(result.batches)
    found = await _verify_batches(conns, shape, run.run_id, nos)
    result.expected_checksum = _combined([found[n]["expected"] for n in nos])
    result.actual_checksum = _combined([found[n]["actual"] for n in nos])
    result.unverified = sum(int(found[n]["unverified"]) for n in nos)
    result.conflicts = sum(int(found[n]["conflicts"]) for n in nos)
    result.conflict_rows = [
        {
            "batch_no": r["batch_no"],
            "key": list(r["key"]),
            "expected": r["expected"],
            "current": r["current"],
        }
        for r in await ledger.rollback_conflicts(conn, run.run_id, nos)
    ]


async def _dry_run(
    conn: asyncpg.Connection, shape: RunShape, run_id: str, nos: list[int], result: RollbackResult
) -> None:
    """What a rollback would restore, what is already back, and the conflicts; read-only."""
    async with conn.transaction(readonly=True):
        counts = await _classify(conn, shape, run_id, nos)
        current = shape.current_image()
        result.restorable, result.already, result.conflicts = (
            counts["restorable"],
            counts["already"],
            counts["conflicts"],
        )
        result.conflict_rows = [
            {
                "batch_no": r["batch_no"],
                "key": list(r["key"]),
                "expected": r["after"],
                "current": r["cur"],
            }
            for r in await conn.fetch(
                f"""SELECT i.batch_no, i.key, i.after, {current} AS cur
                    FROM backfill.row_images AS i LEFT JOIN {shape.table} AS t ON {shape.join()}
                    WHERE i.run_id = $1 AND i.op = 'U' AND i.batch_no = ANY($2)
                      AND {current} IS DISTINCT FROM i.after AND {current} IS DISTINCT FROM i.before
                    ORDER BY i.batch_no DESC LIMIT 200""",
                run_id,
                nos,
            )
        ]


async def _cannot_reconnect() -> asyncpg.Connection:
    raise ConnectionFailed("no way to reconnect was given")


async def _worker_sessions(
    conn: asyncpg.Connection,
    run_id: str,
    workers: int,
    connect: Callable[[], Awaitable[asyncpg.Connection]] | None,
) -> list[MainSession]:
    """The workers' connections, the caller's first. Each is re-opened with backoff when the
    database drops it (a restart, a failover): a batch's restore is one transaction that first
    checks whether it committed, so trying it again is safe; 8 tries, 16 to 32 s of outage."""
    extra = [await connect() for _ in range(workers - 1)] if connect is not None else []
    return [
        MainSession(
            c,
            connect or _cannot_reconnect,
            run_id,
            retries=8 if connect is not None else 0,
            holds_run_lock=False,
            backoff_base=0.25,
            backoff_cap=8.0,
        )
        for c in (conn, *extra)
    ]


async def _restore_all(
    sessions: list[MainSession],
    shape: RunShape,
    run_id: str,
    nos: list[int],
    result: RollbackResult,
    batches_per_minute: float | None,
    on_batch: Any,
) -> None:
    """Every selected batch restored, newest first, the workers taking the next one in turn."""
    throttle = Throttle(batches_per_minute, None, 1)
    pending = iter(nos)  # newest first; the workers share it

    async def restore_from(session: MainSession) -> None:
        for no in pending:
            await throttle.wait(1)

            async def restore(c: asyncpg.Connection, no: int = no) -> tuple[int, int, int]:
                return await _restore_batch(c, shape, run_id, no)

            restored, conflicts, already = await session.run(restore)
            result.batches_this_command += 1 if restored or conflicts or already else 0
            if on_batch:
                on_batch(no, restored, conflicts)

    async with anyio.create_task_group() as tg:
        for session in sessions:
            tg.start_soon(restore_from, session)


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
    """Restore the selected batches newest first, one transaction each, resumable, then verify.

    With `workers` > 1 (and `connect` to open their connections) batches are restored side by
    side: each is its own transaction on rows no other batch has, so the order does not matter,
    unless a key is in several batches (then one worker, in order)."""
    shape = RunShape.of(run)
    await shape.check_table(conn)
    nos = await ledger.done_batches(conn, run.run_id, batches, since)
    result = RollbackResult(run.run_id, run.env, dry_run, nos)
    t0 = time.perf_counter()
    if dry_run:
        await _dry_run(conn, shape, run.run_id, nos, result)
        result.elapsed_seconds = time.perf_counter() - t0
        return result
    if workers > 1 and await ledger.keys_in_several_batches(conn, run.run_id, nos):
        result.note = (
            "a key was changed by more than one batch of this run: restored one batch at a time, "
            "newest first, so the earliest before-image is the one left"
        )
        workers = 1
    result.workers = workers
    sessions = await _worker_sessions(conn, run.run_id, workers, connect)
    try:
        await _restore_all(sessions, shape, run.run_id, nos, result, batches_per_minute, on_batch)
        result.restored, result.already = await sessions[0].run(
            lambda c: ledger.rollback_totals(c, run.run_id, nos)
        )
        t_verify = time.perf_counter()
        try:
            await verify([s.conn for s in sessions], run, result)
        except Exception as exc:  # a connection lost meanwhile: verify again on one, re-opened
            if classify(exc) != "connection_lost":
                raise
            await sessions[0].run(lambda c: verify([c], run, result))
        result.verify_seconds = time.perf_counter() - t_verify
    finally:
        for session in sessions:
            if session.conn is not conn:  # the caller's own connection is the caller's to close
                await session.close()
    result.elapsed_seconds = time.perf_counter() - t0
    return result
