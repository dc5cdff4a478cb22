"""Undoing a shaped run (engine.shapes): whole-row images per table, `I` inserted, `U` changed,
`D` deleted, undone newest batch first, one transaction per batch, by the runner and by the
emitted psql file alike.

Within a batch: deleted rows are re-inserted (parents before children), changed rows restored,
inserted rows deleted (children before parents); foreign keys between the declared tables give
the order, and deferrable ones are deferred. Each row is undone only while it still holds what
the run left there: an inserted row is deleted only if it still equals its after-image, a
deleted one re-inserted only if its key is free, a changed one restored only if it still holds
its after-image. Anything else is a conflict, left alone and listed.

Verification compares every row touched with the earliest image among the batches undone: a
row several batches changed must be back at what the first of them found.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from runner import ledger
from runner.db import quote_ident
from runner.engine.executor import Writes, counters, write_delta
from runner.engine.shapes import Table
from runner.engine.target import as_text_array, decoded, encode
from runner.errors import InvalidInput, WorkFailed
from runner.files import writing_bytes
from runner.rollback.plain import (
    ImageSpool,
    RollbackResult,
    _scope_text,
    comment_text,
    session_preamble,
    sql_literal,
    table_check,
)

_TAG = re.compile(r"^\w+(?: \d+)? (\d+)$")

# a batch's images of one table from the ledger ($1 run, $2 batch): op, key, before, after
LEDGER_IMAGES = ledger.SHAPED_IMAGES
# the same from the rollback file's temp table
FILE_IMAGES = (
    "SELECT u.batch_no, u.op, u.key, u.before, u.after FROM pg_temp.backfill_rollback_images AS u "
    "WHERE u.batch_no = {batch} AND u.rel = {rel}"
)


@dataclass(frozen=True)
class ShapedUndo:
    """A shaped run's tables as its row records them, in foreign-key order (parents first)."""

    run_id: str
    tables: tuple[Table, ...]  # parents first
    search_schemas: tuple[str, ...]
    # per table (oid): the foreign keys that reference it, from any table; an inserted row that
    # a row references now (the run's own children are deleted first) is left alone, so that
    # undoing it never cascades into, or nulls, rows written since
    references: tuple[tuple[int, tuple[tuple[str, list[str], list[str]], ...]], ...] = ()

    @classmethod
    async def of(cls, conn: asyncpg.Connection, run: ledger.RunRow) -> ShapedUndo:
        assert run.tables is not None
        tables = [Table.from_doc(d) for d in run.tables]
        edges = await ledger.foreign_keys_between(conn, [t.oid for t in tables])
        refs = []
        for t in tables:
            refs.append((t.oid, tuple(await ledger.references_to(conn, t.oid))))
        return cls(
            run.run_id, tuple(_parents_first(tables, edges)), tuple(run.search_schemas), tuple(refs)
        )

    def referenced_by(self, t: Table) -> tuple[tuple[str, list[str], list[str]], ...]:
        return next((r for oid, r in self.references if oid == t.oid), ())

    async def check_tables(self, conn: asyncpg.Connection) -> None:
        """Refuse unless every table is the one the run wrote (same name, same oid)."""
        for t in self.tables:
            oid = await conn.fetchval("SELECT to_regclass($1)::oid", t.table)
            if oid != t.oid:
                raise InvalidInput(
                    f"{t.table} is not the table this run wrote (oid {t.oid}, now "
                    f"{'missing' if oid is None else oid}): it was dropped, renamed or created "
                    "again",
                    hint="nothing was restored; restore by hand from the run's rollback SQL file "
                    "after checking which table holds the run's rows",
                )


def _parents_first(tables: list[Table], edges: list[tuple[int, int]]) -> list[Table]:
    """Tables ordered so that a referenced table comes before the tables referencing it (a
    cycle keeps the plan's order: the batch's constraints are deferred where they can be)."""
    by_oid = {t.oid: t for t in tables}
    parents = {t.oid: {p for c, p in edges if c == t.oid and p != t.oid} for t in tables}
    ordered: list[Table] = []
    while len(ordered) < len(tables):
        ready = [
            t for t in tables if t not in ordered and parents[t.oid] <= {o.oid for o in ordered}
        ]
        ordered.append(ready[0] if ready else next(t for t in tables if t not in ordered))
    return [by_oid[t.oid] for t in ordered]


# -- the statements, over any source of images ----------------------------------------------------


def _join(t: Table, img: str = "img", alias: str = "t") -> str:
    values = decoded(f"{img}.key", [k.type for k in t.key])
    return " AND ".join(f"{alias}.{k.q} = {v}" for k, v in zip(t.key, values, strict=True))


def typed_key(t: Table, img: str) -> str:
    """An image's key as its columns' types compare it (for grouping images of one row)."""
    return ", ".join(decoded(f"{img}.key", [k.type for k in t.key]))


def _current(t: Table, alias: str = "t") -> str:
    """The row's whole image now, encoded as the batch encoded it."""
    return encode(t.image_of(alias))


def _decoded(t: Table, img: str = "img") -> list[str]:
    return decoded(f"{img}.before", [c.type for c in t.image])


def reinsert_sql(t: Table, src: str) -> str:
    """Deleted rows back, where their key is free."""
    cols = ", ".join(c.q for c in t.image)
    return f"""WITH img AS MATERIALIZED ({src} AND u.op = 'D')
INSERT INTO {t.table} ({cols}) OVERRIDING SYSTEM VALUE
SELECT {", ".join(_decoded(t))} FROM img
WHERE NOT EXISTS (SELECT 1 FROM {t.table} AS t WHERE {_join(t)})"""


def restore_sql(t: Table, src: str) -> str | None:
    """Changed rows back to their before-image, where they still hold the after-image."""
    values = _decoded(t)
    sets = [f"{c.q} = {v}" for c, v in zip(t.image, values, strict=True) if c not in t.key]
    if not sets:
        return None
    return f"""WITH img AS MATERIALIZED ({src} AND u.op = 'U')
UPDATE {t.table} AS t SET {", ".join(sets)}
FROM img WHERE {_join(t)} AND {_current(t)} = img.after"""


def delete_sql(
    t: Table, src: str, references: tuple[tuple[str, list[str], list[str]], ...] = ()
) -> str:
    """Inserted rows removed, where they still equal what the run inserted and no row
    references them now."""
    unreferenced = "".join(
        f"\n  AND NOT EXISTS (SELECT 1 FROM {child} AS r WHERE "
        + " AND ".join(
            f"r.{quote_ident(c)} = t.{quote_ident(p)}" for c, p in zip(cols, pcols, strict=True)
        )
        + ")"
        for child, cols, pcols in references
    )
    return f"""WITH img AS MATERIALIZED ({src} AND u.op = 'I')
DELETE FROM {t.table} AS t USING img WHERE {_join(t)} AND {t.after_of("t")} = img.after{unreferenced}"""


INSERTED, UPDATED, DELETED = 0, 1, 2  # which write counter an undo statement moves


def batch_statements(undo: ShapedUndo, src: str) -> list[tuple[Table, int, str]]:
    """One batch's undo, in order, with the counter each statement moves; `src` names the
    batch's images of table `{rel}`."""
    out: list[tuple[Table, int, str]] = []
    # only the undo of what the table allows: a statement that can touch no row must not run
    # either (an UPDATE of a GENERATED ALWAYS identity column is refused even then, and so is a
    # statement the rollback's login has no privilege for)
    for t in undo.tables:
        if "delete" in t.allowed:
            out.append((t, INSERTED, reinsert_sql(t, src.format(rel=t.rel))))
    for t in undo.tables:
        if "update" in t.allowed and (sql := restore_sql(t, src.format(rel=t.rel))) is not None:
            out.append((t, UPDATED, sql))
    for t in reversed(undo.tables):
        if "insert" in t.allowed:
            out.append((t, DELETED, delete_sql(t, src.format(rel=t.rel), undo.referenced_by(t))))
    return out


def _state(t: Table, images: str) -> str:
    """Each image's row now, and whether it is where the undo leaves it."""
    cur = _current(t)
    # an inserted row is compared as its image records it: whole, or by its digest
    inserted = cur if t.digest is None else t.after_of("t")
    return f"""SELECT img.batch_no, img.op, img.key, img.before, img.after,
       t.ctid IS NOT NULL AS present, {cur} AS cur, {inserted} AS cur_inserted,
       CASE WHEN img.op = 'I' THEN t.ctid IS NULL
            ELSE t.ctid IS NOT NULL AND {cur} IS NOT DISTINCT FROM img.before END AS back
FROM ({images}) AS img LEFT JOIN {t.table} AS t ON {_join(t)}"""


def _as_array(t: Table, expr: str, *, key: bool) -> str:
    return as_text_array(expr, len(t.key if key else t.image))


def _wrote(t: Table, s: str = "s") -> str:
    """What a conflict's row held when the run left it, as the rollback report shows it."""
    whole = _as_array(t, f"coalesce({s}.after, {s}.before)", key=False)
    if t.digest is None:
        return whole
    return (
        f"CASE WHEN {s}.op = 'I' THEN ARRAY['(the row it inserted, kept as digest ' || {s}.after "
        f"|| ')'] ELSE {whole} END"
    )


# checksum lines: what each row should be (expected) and is (actual), in key order per table
_EXPECTED = (
    "img.key || '=' || CASE WHEN img.op = 'I' THEN '(absent)' ELSE coalesce(img.before, 'NULL') END"
)
_ACTUAL = (
    "img.key || '=' || CASE WHEN NOT img.present THEN '(absent)' ELSE coalesce(img.cur, 'NULL') END"
)


def verify_sql(t: Table, earliest: str, conflicts: str) -> str:
    """Per table: the checksums over the earliest image of each row among the batches undone
    (conflicts excepted), and how many rows are not where the undo leaves them."""
    return f"""WITH img AS ({_state(t, earliest)}),
c AS ({conflicts})
SELECT md5(string_agg({_EXPECTED}, '|' ORDER BY img.key COLLATE pg_catalog."C") FILTER (WHERE c.key IS NULL)) AS expected,
       md5(string_agg({_ACTUAL}, '|' ORDER BY img.key COLLATE pg_catalog."C") FILTER (WHERE c.key IS NULL)) AS actual,
       count(*) FILTER (WHERE c.key IS NULL AND NOT img.back)::int AS unverified,
       count(*) FILTER (WHERE c.key IS NOT NULL)::int AS conflicts
FROM img LEFT JOIN c ON c.key = {_as_array(t, "img.key", key=True)}"""


def combined(parts: list[str | None]) -> str:
    return hashlib.md5("|".join(p or "" for p in parts).encode()).hexdigest()


# -- the runner's rollback ----------------------------------------------------------------------


def _rows(tag: str) -> int:
    m = _TAG.match(tag or "")
    return int(m.group(1)) if m else 0


def _undo_guard(
    undo: ShapedUndo, no: int, start: Writes, end: Writes, expected: dict[int, list[int]]
) -> None:
    """The undo may write only the rows its own statements undid: a cascade or a trigger that
    deletes or changes rows written since the run (another's) stops it before it commits."""
    by_oid = {t.oid: t for t in undo.tables}
    found = []
    for oid, counts in write_delta(start, end).items():
        schema, name = end[oid][0], end[oid][1]
        allowed = expected.get(oid, [0, 0, 0])
        extra = [n - a for n, a in zip(counts, allowed, strict=True)]
        what = [
            f"{n} {op}"
            for n, op in zip(extra, ("inserted", "updated", "deleted"), strict=True)
            if n > 0
        ]
        if what:
            declared = "" if oid in by_oid else " (not one of the run's tables)"
            found.append(f"{schema}.{name}{declared}: {', '.join(what)}")
    if found:
        raise WorkFailed(
            f"undoing batch {no} would also write rows it did not write itself — "
            f"{'; '.join(found)} (a cascading foreign key or a trigger): nothing of this batch "
            "was undone",
            hint="look at what references or watches the run's tables; undo those rows by hand, "
            "or remove the cascade, then run the rollback again",
        )


async def _undo_batch(
    conn: asyncpg.Connection, undo: ShapedUndo, no: int, per_table: dict[int, list[int]]
) -> int:
    """One batch in one transaction: undo, record conflicts and the batch. Returns rows undone."""
    src = LEDGER_IMAGES.replace("{batch}", "$2")
    async with conn.transaction():
        if await ledger.batch_rolled_back(conn, undo.run_id, no):
            return 0
        await conn.execute("SET CONSTRAINTS ALL DEFERRED")
        start = await counters(conn)
        expected: dict[int, list[int]] = {}
        done = 0
        for t, kind, sql in batch_statements(undo, src):
            n = _rows(await conn.execute(sql, undo.run_id, no))
            per_table.setdefault(t.rel, [0, 0])[0] += n
            expected.setdefault(t.oid, [0, 0, 0])[kind] += n
            done += n
        await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        _undo_guard(undo, no, start, await counters(conn), expected)
        conflicts = 0
        for t in undo.tables:
            state = _state(t, LEDGER_IMAGES.format(rel=t.rel, batch="$2") + " AND u.op <> 'N'")
            conflicts += await ledger.record_shaped_conflicts(
                conn,
                f"""SELECT $1, $2, {t.rel}, {_as_array(t, "s.key", key=True)},
                       {_wrote(t)},
                       CASE WHEN s.present THEN {_as_array(t, "s.cur", key=False)} END
                    FROM ({state}) AS s
                    WHERE NOT s.back""",
                undo.run_id,
                no,
            )
        total = await ledger.shaped_image_count(conn, undo.run_id, no)
        await ledger.record_rollback_batch(
            conn, undo.run_id, no, done, conflicts, max(total - done - conflicts, 0)
        )
        return done


async def _verify(
    conn: asyncpg.Connection, undo: ShapedUndo, nos: list[int], result: RollbackResult
) -> None:
    expected, actual = [], []
    result.unverified = result.conflicts = 0
    for t in undo.tables:
        earliest = ledger.SHAPED_EARLIEST.format(rel=t.rel, typed_key=typed_key(t, "u"))
        conflicts = ledger.SHAPED_CONFLICT_KEYS.format(rel=t.rel)
        row = await conn.fetchrow(verify_sql(t, earliest, conflicts), undo.run_id, nos)
        assert row is not None
        expected.append(row["expected"])
        actual.append(row["actual"])
        result.unverified += row["unverified"]
        result.conflicts += row["conflicts"]
    result.expected_checksum = combined(expected)
    result.actual_checksum = combined(actual)
    result.conflict_rows = [
        {
            "batch_no": r["batch_no"],
            "key": [f"{undo_table(undo, r['rel']).display}: {', '.join(r['key'])}"],
            "expected": r["expected"],
            "current": r["current"],
        }
        for r in await ledger.rollback_conflicts(conn, undo.run_id, nos)
    ]


def undo_table(undo: ShapedUndo, rel: int) -> Table:
    return next(t for t in undo.tables if t.rel == rel)


async def _dry_run(
    conn: asyncpg.Connection, undo: ShapedUndo, nos: list[int], result: RollbackResult
) -> None:
    """What the undo would do, read-only: the newest image of each row among the batches."""
    async with conn.transaction(readonly=True):
        for t in undo.tables:
            state = _state(t, ledger.SHAPED_NEWEST.format(rel=t.rel, typed_key=typed_key(t, "u")))
            row = await conn.fetchrow(
                f"""WITH s AS ({state})
                SELECT count(*) FILTER (WHERE CASE op WHEN 'I' THEN present AND cur_inserted = after
                                                      WHEN 'U' THEN cur = after AND cur IS DISTINCT FROM before
                                                      ELSE NOT present END)::int AS restorable,
                       count(*) FILTER (WHERE back)::int AS already,
                       count(*)::int AS total
                FROM s""",
                undo.run_id,
                nos,
            )
            assert row is not None
            result.restorable += row["restorable"]
            result.already += row["already"]
            result.conflicts += row["total"] - row["restorable"] - row["already"]


async def run_shaped_rollback(
    conn: asyncpg.Connection,
    run: ledger.RunRow,
    *,
    dry_run: bool,
    batches: tuple[int, int] | None,
    since: datetime | None,
    on_batch: Any = None,
) -> RollbackResult:
    """Undo the selected batches newest first, one transaction each, resumable; then verify.
    One connection: rows of several tables, often touched by several batches, undo in order."""
    undo = await ShapedUndo.of(conn, run)
    await undo.check_tables(conn)
    nos = await ledger.done_batches(conn, run.run_id, batches, since)
    result = RollbackResult(run.run_id, run.env, dry_run, nos)
    t0 = time.perf_counter()
    if dry_run:
        await _dry_run(conn, undo, nos, result)
        result.elapsed_seconds = time.perf_counter() - t0
        return result
    result.note = "a run of several tables is undone one batch at a time, newest first"
    per_table: dict[int, list[int]] = {}
    for no in nos:
        n = await _undo_batch(conn, undo, no, per_table)
        result.batches_this_command += 1
        if on_batch:
            on_batch(no, n, 0)
    result.restored, result.already = await ledger.rollback_totals(conn, run.run_id, nos)
    t_verify = time.perf_counter()
    await _verify(conn, undo, nos, result)
    result.verify_seconds = time.perf_counter() - t_verify
    result.tables = [
        {"table": t.display, "undone": per_table.get(t.rel, [0])[0]} for t in undo.tables
    ]
    result.elapsed_seconds = time.perf_counter() - t0
    return result


# -- the emitted file ---------------------------------------------------------------------------


async def emit_shaped_file(
    conn: asyncpg.Connection,
    run: ledger.RunRow,
    path: Path,
    *,
    display_dsn: str,
    batches: tuple[int, int] | None = None,
    since: datetime | None = None,
    spool: ImageSpool | None = None,
) -> Path:
    """The psql file: the images, each batch's undo in its own transaction, the verification.
    With `spool` (`ImageSpool.of(run, …)`, filled while the batches ran), the batches
    already in it are copied from there, the others read now: a committed batch's images never
    change, so the file is what reading them all now writes."""
    undo = await ShapedUndo.of(conn, run)
    nos = await ledger.done_batches(conn, run.run_id, batches, since)
    path.parent.mkdir(parents=True, exist_ok=True)
    # on disk (unnamed files, gone with the process, even a killed one): the header counts them
    images = ImageSpool.of(run, path.parent) if spool is None else spool
    try:
        for no in nos:
            if no not in images:
                await images.fetch(conn, run.run_id, no)
        rows = sum(int(images.extra[no]) for no in nos)
        expected = await _expected_checksum(conn, undo, nos)
        header = _header(
            run,
            undo,
            path.name,
            display_dsn,
            _scope_text(batches, since),
            rows,
            len(nos),
            expected,
        )
        with writing_bytes(path) as out:
            out.write(header.encode())
            images.copy_to(out, nos)
            out.write(
                b"CREATE INDEX ON pg_temp.backfill_rollback_images (batch_no, rel);\n"
                b"ANALYZE pg_temp.backfill_rollback_images;\n"
            )
            for no in nos:
                src = FILE_IMAGES.replace("{batch}", str(int(no)))
                steps = "\n".join(f"{sql};" for _, _, sql in batch_statements(undo, src))
                out.write(
                    f"\n-- batch {no}\nBEGIN;\nSET CONSTRAINTS ALL DEFERRED;\n{steps}\nCOMMIT;\n".encode()
                )
            out.write(_file_verification(undo, expected).encode())
    finally:
        if spool is None:
            images.close()
    return path


async def _expected_checksum(conn: asyncpg.Connection, undo: ShapedUndo, nos: list[int]) -> str:
    parts = []
    for t in undo.tables:
        parts.append(
            await conn.fetchval(
                f"""SELECT md5(string_agg({_EXPECTED}, '|' ORDER BY img.key COLLATE pg_catalog."C"))
                    FROM ({ledger.SHAPED_EARLIEST.format(rel=t.rel, typed_key=typed_key(t, "u"))}) AS img""",
                undo.run_id,
                nos,
            )
        )
    return combined(parts)


def _header(
    run: ledger.RunRow,
    undo: ShapedUndo,
    name: str,
    display_dsn: str,
    scope: str,
    rows: int,
    batches: int,
    checksum: str,
) -> str:
    tables = "\n".join(
        f"--   {comment_text(t.table)} (oid {t.oid}): {', '.join(sorted(t.allowed))}"
        for t in undo.tables
    )
    checks = "\n".join(table_check(t.table, t.oid, run.run_id) for t in undo.tables)
    return f"""-- backfill rollback (a run writing several tables)
-- run:          {comment_text(run.run_id)}
-- plan:         {comment_text(run.plan_name)} (digest {run.plan_digest})
-- environment:  {comment_text(run.env)} ({comment_text(display_dsn)})
-- tables, parents first (deleted rows are re-inserted in this order, inserted rows deleted in
-- the reverse order, changed rows restored in between):
{tables}
-- generated:    {datetime.now(UTC).isoformat(timespec="seconds")}
-- scope:        {scope}
-- undoes:       {rows} row image(s) in {batches} batch(es), newest batch first, one transaction each
-- checksum:     {checksum}
--   (per table, md5 over each row's earliest image among these batches in key order; then md5
--   over the tables' in the order above)
--
-- Run it:       psql -X -v ON_ERROR_STOP=1 -d "$DSN_OF_{comment_text(run.env.upper())}" -f {comment_text(name)}
-- Verify:       the last query prints, per table, the rows not back and the checksum;
--               checksum_matches is true when every row is back where the run found it.
-- A row is undone only while it still holds what this run left there; rows changed since are
-- left alone (conflicts). Running the file again is safe.
\\set ON_ERROR_STOP on
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SET lock_timeout = '5s';
{session_preamble(list(undo.search_schemas))}
{checks}
CREATE TEMP TABLE pg_temp.backfill_rollback_images (
    batch_no integer NOT NULL, rel integer NOT NULL, op "char" NOT NULL, key text NOT NULL,
    before text, after text
);
"""


def _file_verification(undo: ShapedUndo, expected: str) -> str:
    earliest = (
        "SELECT DISTINCT ON ({typed_key}) u.batch_no, u.op, u.key, u.before, u.after "
        "FROM pg_temp.backfill_rollback_images AS u WHERE u.rel = {rel} AND u.op <> 'N' "
        "ORDER BY {typed_key}, u.batch_no"
    )
    parts = []
    for ord_, t in enumerate(undo.tables):
        state = _state(t, earliest.format(rel=t.rel, typed_key=typed_key(t, "u")))
        parts.append(
            f"""SELECT {ord_} AS ord, {sql_literal(t.display)} AS table_name,
       count(*) AS rows_touched, count(*) FILTER (WHERE NOT back) AS not_back,
       md5(string_agg({_ACTUAL}, '|' ORDER BY img.key COLLATE pg_catalog."C")) AS checksum
FROM ({state}) AS img"""
        )
    union = "\nUNION ALL\n".join(parts)
    return f"""
-- Verification: every row should be back where the run found it (conflicts are the rows not
-- back: changed since the run, left alone).
WITH per_table AS (
{union}
)
SELECT table_name, rows_touched, not_back FROM per_table ORDER BY ord;
WITH per_table AS (
{union}
)
SELECT md5(string_agg(coalesce(checksum, ''), '|' ORDER BY ord)) AS checksum,
       {sql_literal(expected)}::text AS expected_checksum,
       md5(string_agg(coalesce(checksum, ''), '|' ORDER BY ord)) = {sql_literal(expected)} AS checksum_matches
FROM per_table;
"""
