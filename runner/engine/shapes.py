"""Backfills of any shape: every table a batch may write, declared; each statement of the apply
and the one table it writes; whole-row images of every row a batch touched, in its transaction.

A plain run (one UPDATE of the target's declared columns) keeps the faster path of
`engine.target`. A *shaped* run (`Plan.shaped`: other tables written, inserts, deletes, several
statements) runs each statement with the runner's own RETURNING appended:

- PostgreSQL 18+: `RETURNING OLD/NEW` gives, per row, the version it replaced and the one it wrote;
- older servers (the capture path): an INSERT returns what it inserted and a DELETE what it
  deleted; an UPDATE or an upsert is first run in a savepoint that is rolled back, to learn which
  rows it touches, whose before-images are then copied, and run again for real. The batch runs at
  REPEATABLE READ, so both runs see the same snapshot; a concurrent change makes the real run
  fail with a serialization error (retried) rather than change a version not imaged.

Rows touched go to `pg_temp.backfill_touched`; `ShapedRun.finalize` reduces them to one net image
per row and table (`I` inserted, `U` changed, `N` unchanged, `D` deleted), checks them against the
declarations, and writes the images (`batch_images`, one tuple per table) and the ledger row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import asyncpg

from runner.db import qualified
from runner.engine.target import (
    LEDGER_PARAMS,
    BatchStatement,
    Column,
    TargetInfo,
    _refs,
    decoded,
    encode,
    key_display,
    plain_statement,
    read_catalog,
)
from runner.errors import InvalidInput
from runner.plan import Plan

TOUCHED_DDL = """
DROP TABLE IF EXISTS pg_temp.backfill_touched;
CREATE TEMP TABLE backfill_touched (
    step int, rel int, had_old bool, has_new bool, key_enc text, key_show text,
    before_enc text, after_enc text, others_same bool
) ON COMMIT DELETE ROWS;
DROP TABLE IF EXISTS pg_temp.backfill_prior;
CREATE TEMP TABLE backfill_prior (rel int, key_enc text, before_enc text) ON COMMIT DELETE ROWS;
"""


@dataclass(frozen=True)
class Table:
    """A table a shaped run writes, as the catalog describes it and the plan declares it."""

    rel: int  # 1: the target (the batch source); 2…: the plan's [[writes]], in order
    schema: str
    name: str
    oid: int
    root_oid: int
    key: tuple[Column, ...]
    image: tuple[Column, ...]  # every stored column, in table order: a whole row
    declared: tuple[str, ...]  # the columns an update may change
    allowed: frozenset[str]  # insert | update | delete
    # an insert-only table's inserted rows are recorded by a digest, not whole: per image column,
    # the form it is hashed in (DIGEST_FORMS); None: recorded whole
    digest: tuple[str, ...] | None = None

    @property
    def table(self) -> str:
        return qualified(self.schema, self.name)

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def paged(self) -> bool:
        return self.rel == 1

    @property
    def others(self) -> tuple[Column, ...]:
        """What no update may change: the key and every undeclared column."""
        return tuple(c for c in self.image if c.name not in self.declared)

    def key_of(self, alias: str) -> list[str]:
        return [f"{alias}.{k.q}" for k in self.key]

    def image_of(self, alias: str) -> list[str]:
        return [f"{alias}.{c.q}" for c in self.image]

    def after_of(self, alias: str) -> str:
        """What an inserted row's after-image records: its digest, or the row encoded whole."""
        if self.digest is None:
            return encode(self.image_of(alias))
        return row_digest([f"{alias}.{c.q}" for c in self.image], self.digest)

    def doc(self) -> dict[str, Any]:
        """As the run's row records it (`runs.tables`): enough to undo and verify the images."""
        return {
            "rel": self.rel,
            "schema": self.schema,
            "name": self.name,
            "oid": self.oid,
            "key": [[k.name, k.type] for k in self.key],
            "image": [[c.name, c.type] for c in self.image],
            "declared": list(self.declared),
            "allowed": sorted(self.allowed),
            "type_schemas": sorted({c.type_schema for c in self.image if c.type_schema}),
            **({} if self.digest is None else {"digest": list(self.digest)}),
        }

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Table:
        return cls(
            rel=int(d["rel"]),
            schema=d["schema"],
            name=d["name"],
            oid=int(d["oid"]),
            root_oid=int(d["oid"]),
            key=tuple(Column(n, t) for n, t in d["key"]),
            image=tuple(Column(n, t) for n, t in d["image"]),
            declared=tuple(d["declared"]),
            allowed=frozenset(d["allowed"]),
            digest=None if d.get("digest") is None else _forms(d["digest"]),
        )


# -- an inserted row's digest ----------------------------------------------------------------------

# How each column enters a row's digest, by its type: hash_record_extended hashes a value with
# its type's own hash function, which must see every bit of it (equal hashes of different
# values only by chance). int2, int4, oid, date, bool, uuid and bytea hash all of theirs, text
# and varchar all of their bytes under COLLATE "C" (a nondeterministic collation hashes 'A' as
# 'a'); int8 and the timestamps and times fold 64 bits to 32 before hashing (1 and 2^32 hash
# alike), so they enter as their 8-byte binary form (`*_send`); every other column as its exact
# text, byte for byte: the form a whole image records.
DIGEST_FORMS = {
    "value": "{}",
    "bytes": '{} COLLATE pg_catalog."C"',
    "int8send": "int8send({})",
    "timestamp_send": "timestamp_send({})",
    "timestamptz_send": "timestamptz_send({})",
    "time_send": "time_send({})",
    "text": '({})::text COLLATE pg_catalog."C"',
}
_DIGEST_COLUMNS = """
SELECT a.attname,
       CASE WHEN t.typnamespace <> 'pg_catalog'::regnamespace THEN 'text'
            WHEN t.typname IN ('bool', 'int2', 'int4', 'oid', 'date', 'uuid', 'bytea')
                THEN 'value'
            WHEN t.typname IN ('text', 'varchar') THEN 'bytes'
            WHEN t.typname = 'int8' THEN 'int8send'
            WHEN t.typname IN ('timestamp', 'timestamptz', 'time')
                THEN t.typname || '_send'
            ELSE 'text' END AS form
FROM pg_attribute AS a JOIN pg_type AS t ON t.oid = a.atttypid
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped"""
DIGEST_SINCE = 140000  # server_version_num of PostgreSQL 14: hash_record_extended


def row_digest(values: list[str], forms: tuple[str, ...]) -> str:
    """A row's 64-bit digest as text: its columns hashed together, each in its form
    (DIGEST_FORMS)."""
    parts = [DIGEST_FORMS[form].format(v) for v, form in zip(values, forms, strict=True)]
    return f"hash_record_extended(ROW({', '.join(parts)}), 0)::text"


async def _digest_columns(
    conn: asyncpg.Connection, oid: int, image: tuple[Column, ...]
) -> tuple[str, ...]:
    forms = {r["attname"]: str(r["form"]) for r in await conn.fetch(_DIGEST_COLUMNS, oid)}
    return tuple(forms[c.name] for c in image)


def _forms(recorded: list[Any]) -> tuple[str, ...]:
    """A run's recorded digest forms, each one of DIGEST_FORMS (a ledger edited to hold
    anything else is refused, never put into SQL)."""
    unknown = [f for f in recorded if f not in DIGEST_FORMS]
    if unknown:
        raise InvalidInput(
            f"the run records digest forms {unknown!r} this version does not know",
            hint="roll back with the backfill version that applied the run",
        )
    return tuple(str(f) for f in recorded)


async def resolve_tables(conn: asyncpg.Connection, plan: Plan) -> list[Table]:
    """The target (rel 1) and every declared write, checked against the catalog."""
    declared: list[tuple[str, str, list[str], list[str], frozenset[str], bool]] = [
        (
            "target",
            plan.target.table,
            plan.target.key,
            plan.target.columns,
            frozenset(plan.target.operations),
            False,
        ),
    ]
    declared += [
        (f"writes[{w.table}]", w.table, w.key, w.columns, w.allowed, w.digested)
        for w in plan.writes
    ]
    digests = int(await conn.fetchval("SHOW server_version_num")) >= DIGEST_SINCE
    tables: list[Table] = []
    for rel, (where, name, key, columns, allowed, digested) in enumerate(declared, start=1):
        cat = await read_catalog(conn, name, where)
        cat.require(where, key, columns, whole_rows=True)
        image = tuple(c for c in cat.attrs.values() if not c.generated)
        if any(t.oid == cat.oid for t in tables):
            raise InvalidInput(
                f"{where}: {cat.display} is declared twice (under another name)",
                hint="declare each table once, with every operation it needs",
            )
        tables.append(
            Table(
                rel=rel,
                schema=cat.schema,
                name=cat.name,
                oid=cat.oid,
                root_oid=cat.root_oid,
                key=tuple(cat.attrs[n] for n in key),
                image=image,
                declared=tuple(columns),
                allowed=allowed,
                digest=await _digest_columns(conn, cat.oid, image)
                if digested and digests
                else None,
            )
        )
    return tables


# -- each statement and the table it writes ------------------------------------------------------

_OPS = {"Insert": "insert", "Update": "update", "Delete": "delete", "Merge": "merge"}
_NEEDS = {
    "insert": {"insert"},
    "upsert": {"insert", "update"},
    "update": {"update"},
    "delete": {"delete"},
}


def _writers(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node] if node.get("Node Type") == "ModifyTable" else []
    for child in node.get("Plans", []):
        found += _writers(child)
    return found


@dataclass(frozen=True)
class Step:
    """One statement of the apply, and what its plan says it writes."""

    no: int
    sql: str
    table: Table
    op: str  # insert | upsert | update | delete
    alias: str  # how the statement names its table (RETURNING qualifies by it)

    @property
    def where(self) -> str:
        return f"apply.statements[{self.no}]" if self.no else "apply.sql"

    # -- PostgreSQL 18+: one statement, OLD and NEW ------------------------------------------------

    @cached_property
    def returning_sql(self) -> str:
        if self.op in ("insert", "delete"):  # one image per row: its own RETURNING gives it
            return self.direct_sql
        t, old, new = self.table, "backfill_old", "backfill_new"
        k0 = t.key[0].q
        keys = [f"coalesce({new}.{k.q}, {old}.{k.q})" for k in t.key]
        same = (
            "record_image_eq("
            f"ROW({', '.join(f'{old}.{c.q}' for c in t.others)}), "
            f"ROW({', '.join(f'{new}.{c.q}' for c in t.others)}))"
        )
        return f"""
WITH w AS (
{plain_statement(self.sql)}RETURNING WITH (OLD AS {old}, NEW AS {new})
    {old}.{k0} IS NOT NULL AS had_old, {new}.{k0} IS NOT NULL AS has_new,
    {encode(keys)} AS key_enc, {key_display(keys)} AS key_show,
    {encode(t.image_of(old))} AS before_enc, {encode(t.image_of(new))} AS after_enc,
    {same} AS others_same
)
INSERT INTO pg_temp.backfill_touched
SELECT {self.no}, {t.rel}, had_old, has_new, key_enc, key_show,
       CASE WHEN had_old THEN before_enc END, CASE WHEN has_new THEN after_enc END,
       coalesce(others_same, false)
FROM w"""

    # -- older servers: the capture path ------------------------------------------------------------

    def _returning(self, *, show: bool = True) -> str:
        """Each row's key and image (an inserted row's as `after_of` records it); `show`: and
        its key as a person reads it (for a scope violation's message)."""
        t, a = self.table, self.alias
        image = t.after_of(a) if self.op == "insert" else encode(t.image_of(a))
        shown = f"{key_display(t.key_of(a))} AS key_show, " if show else ""
        return f"RETURNING {encode(t.key_of(a))} AS key_enc, {shown}{image} AS img"

    @cached_property
    def direct_sql(self) -> str:
        """An INSERT (what it inserted) or a DELETE (what it deleted), recorded as it runs."""
        inserted = self.op == "insert"
        return f"""
WITH w AS (
{plain_statement(self.sql)}{self._returning()}
)
INSERT INTO pg_temp.backfill_touched
SELECT {self.no}, {self.table.rel}, {"false" if inserted else "true"}, {"true" if inserted else "false"},
       key_enc, key_show, {"NULL" if inserted else "img"}, {"img" if inserted else "NULL"}, true
FROM w"""

    @cached_property
    def probe_sql(self) -> str:
        """The rows an UPDATE or upsert touches (run in a savepoint that is rolled back)."""
        t, a = self.table, self.alias
        arrays = ", ".join(f"array_agg(w.k{i}) AS k{i}" for i in range(len(t.key)))
        keys = ", ".join(f"{a}.{k.q} AS k{i}" for i, k in enumerate(t.key))
        return f"""
WITH w AS (
{plain_statement(self.sql)}RETURNING {keys}
)
SELECT count(*)::int AS n, {arrays} FROM w"""

    @cached_property
    def prior_sql(self) -> str:
        """Before-images of the rows the probe found ($1…: their key arrays), as they are now."""
        t = self.table
        if len(t.key) == 1:
            match = f"p.{t.key[0].q} = ANY($1::{t.key[0].type}[])"
        else:
            cols = ", ".join(t.key_of("p"))
            arrays = ", ".join(f"${i + 1}::{k.type}[]" for i, k in enumerate(t.key))
            match = f"({cols}) IN (SELECT * FROM unnest({arrays}))"
        return f"""
INSERT INTO pg_temp.backfill_prior
SELECT {t.rel}, {encode(t.key_of("p"))}, {encode(t.image_of("p"))}
FROM {t.table} AS p WHERE {match}"""

    @cached_property
    def real_sql(self) -> str:
        """The UPDATE or upsert for real, each row paired with its before-image (none: inserted)."""
        t = self.table
        positions = [i + 1 for i, c in enumerate(t.image) if c.name not in t.declared]
        if len(t.image) == 1:
            same = "p.before_enc IS NOT DISTINCT FROM w.img"
        else:
            same = (
                " AND ".join(
                    f"(p.before_enc::text[])[{i}] IS NOT DISTINCT FROM (w.img::text[])[{i}]"
                    for i in positions
                )
                or "true"
            )
        return f"""
WITH w AS (
{plain_statement(self.sql)}{self._returning()}
)
INSERT INTO pg_temp.backfill_touched
SELECT {self.no}, {t.rel}, p.key_enc IS NOT NULL, true, w.key_enc, w.key_show,
       p.before_enc, w.img, p.key_enc IS NULL OR ({same})
FROM w LEFT JOIN pg_temp.backfill_prior AS p ON p.rel = {t.rel} AND p.key_enc = w.key_enc"""


def _refuse(where: str, what: str) -> InvalidInput:
    return InvalidInput(
        f"{where}: {what}",
        hint="each statement of the apply writes one declared table at its top level, without "
        "RETURNING; a write inside WITH cannot be imaged: make it its own statement in "
        "apply.statements (they run in order, in the batch's transaction)",
    )


async def plan_steps(
    conn: asyncpg.Connection, plan: Plan, tables: list[Table], target: TargetInfo
) -> list[Step]:
    """Each statement of the apply, with the table and operation its plan (EXPLAIN) shows.
    Nothing runs: EXPLAIN without ANALYZE only plans, so this works in a READ ONLY transaction."""
    statements = plan.apply.all
    empty: list[list[Any]] = [[] for _ in target.key]
    steps: list[Step] = []
    for no, sql in enumerate(statements):
        where = f"apply.statements[{no}]" if plan.apply.statements else "apply.sql"
        try:
            raw = await conn.fetchval(
                "EXPLAIN (VERBOSE, FORMAT JSON) " + plain_statement(sql), *empty
            )
        except asyncpg.PostgresError as e:
            raise InvalidInput(f"{where}: does not plan: {' '.join(str(e).split())}") from None
        root = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
        writers = _writers(root)
        if root.get("Node Type") != "ModifyTable":
            raise _refuse(
                where,
                "it writes nothing at its top level"
                + (f" (it writes {len(writers)} table(s) inside WITH)" if writers else ""),
            )
        if len(writers) > 1:
            raise _refuse(where, "it also writes inside a WITH (a data-modifying CTE)")
        if root.get("Output"):
            raise _refuse(where, "it has its own RETURNING: the runner adds its own")
        op = _OPS.get(root.get("Operation", ""), "")
        if op == "merge":
            raise _refuse(where, "MERGE is not supported yet: write INSERT … ON CONFLICT")
        if op == "insert" and root.get("Conflict Resolution") == "UPDATE":
            op = "upsert"
        name = (root.get("Schema"), root.get("Relation Name"))
        table = next((t for t in tables if (t.schema, t.name) == name), None)
        if table is None:
            raise InvalidInput(
                f"{where}: it writes {name[0]}.{name[1]}, which the plan does not declare",
                hint="declare it under [[writes]] with its key, the operations allowed on it and "
                "the columns an update may change",
            )
        missing = _NEEDS[op] - table.allowed
        if missing:
            raise InvalidInput(
                f"{where}: it is {'an' if op[0] in 'aeiou' else 'a'} {op.upper()} of "
                f"{table.display}, but the plan allows only {sorted(table.allowed)} there",
                hint=f"add {op!r} to the operations declared for {table.display}, or change "
                "the statement",
            )
        steps.append(Step(no, sql, table, op, root.get("Alias") or table.name))
    return steps


# -- the batch's net images, checked and recorded -------------------------------------------------


# -- the pieces of ShapedRun.finalize (one statement: these are its CTEs) -------------------------

# one net image per row and table: the before of its first statement, the after of its last
_NET_IMAGES = """net AS (
    SELECT rel, key_enc,
           (array_agg(key_show ORDER BY step))[1] AS key_show,
           (array_agg(had_old ORDER BY step))[1] AS had_old,
           (array_agg(has_new ORDER BY step DESC))[1] AS has_new,
           (array_agg(before_enc ORDER BY step))[1] AS before_enc,
           (array_agg(after_enc ORDER BY step DESC))[1] AS after_enc,
           bool_and(others_same OR NOT (had_old AND has_new)) AS others_same
    FROM pg_temp.backfill_touched GROUP BY rel, key_enc
),
img AS (
    SELECT net.*, CASE WHEN had_old AND has_new
                       THEN CASE WHEN before_enc IS DISTINCT FROM after_enc THEN 'U' ELSE 'N' END
                       WHEN has_new THEN 'I' WHEN had_old THEN 'D' END AS op
    FROM net
)"""

# per table: the images as parallel arrays and their counts; `raw`: what the statements
# returned, row by row (what the scope guard's counters must match)
_PER_TABLE = """per AS (
    SELECT rel, array_agg(op ORDER BY key_enc) AS ops, array_agg(key_enc ORDER BY key_enc) AS keys,
           array_agg(before_enc ORDER BY key_enc) AS befores,
           array_agg(after_enc ORDER BY key_enc) AS afters,
           count(*) FILTER (WHERE op = 'I')::int AS ins, count(*) FILTER (WHERE op = 'U')::int AS upd,
           count(*) FILTER (WHERE op = 'D')::int AS del, count(*) FILTER (WHERE op = 'N')::int AS same
    FROM img WHERE op IS NOT NULL GROUP BY rel
),
raw AS (
    SELECT rel, count(*) FILTER (WHERE has_new AND NOT had_old)::int AS ins,
           count(*) FILTER (WHERE has_new AND had_old)::int AS upd,
           count(*) FILTER (WHERE had_old AND NOT has_new)::int AS del
    FROM pg_temp.backfill_touched GROUP BY rel
)"""

_AGG = """agg AS (
    SELECT coalesce(sum(ins + upd + del), 0)::int AS changed, coalesce(sum(same), 0)::int AS same,
           coalesce(json_object_agg(rel, json_build_array(ins, upd, del, same)), '{}') AS per_table
    FROM per
)"""


def _ledger_row_sql(p: dict[str, str]) -> str:
    """The batch's ledger row; a shaped batch's no-ops are the rows it touched unchanged."""
    size = f"{p['batch_size']}::int"
    return f"""
    INSERT INTO backfill.batches (run_id, batch_no, stage, status, first_key, last_key,
                                  selected, changed, noop, attempts, errors, started_at, duration_ms)
    SELECT {p["run_id"]}, {p["batch_no"]}, {p["stage"]}, 'done', {p["first_key"]}, {p["last_key"]},
           {size}, agg.changed, agg.same, {p["attempts"]}, {p["errors"]}::jsonb,
           {p["started_at"]}, extract(epoch FROM clock_timestamp() - {p["started_at"]}) * 1000
    FROM agg"""


# the declared tables' columns, as one text: a batch refuses to commit if they changed since the
# run resolved them (an image would leave out, or misplace, a column its rollback must restore)
COLUMNS_SIGNATURE = """
SELECT string_agg(format('%s:%s:%s', a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod)),
                  ',' ORDER BY a.attrelid, a.attnum)
FROM pg_attribute AS a
WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped"""


LOCKABLE = """
SELECT array_agg(o) FROM unnest($1::oid[]) AS o
WHERE has_table_privilege(o, 'SELECT')
   OR (current_setting('server_version_num')::int >= 160000
       AND has_table_privilege(o, 'INSERT, UPDATE, DELETE, TRUNCATE'))"""


@dataclass(frozen=True)
class ShapedRun:
    """A shaped run's tables and statements: what a batch runs and how it is recorded."""

    tables: tuple[Table, ...]
    steps: tuple[Step, ...]
    target: TargetInfo
    signature: str = ""  # COLUMNS_SIGNATURE when the tables were resolved
    # the tables the login may LOCK in ACCESS SHARE mode (a table-level privilege: SELECT, or
    # from PostgreSQL 16 any; column grants do not count): the others are not locked first
    lockable: frozenset[int] = frozenset()

    @property
    def oids(self) -> list[int]:
        return [t.oid for t in self.tables]

    @property
    def paged(self) -> Table:
        return self.tables[0]

    @cached_property
    def finalize(self) -> BatchStatement:
        """After the statements: one net image per row and table (the before of its first
        statement, the after of its last), checked, stored per table, and the ledger row."""
        params = (*self.target.key_params, *LEDGER_PARAMS)
        p = _refs(params)
        sql = f"""
WITH {_NET_IMAGES},
bad AS ({self._bad_sql()}),
{_PER_TABLE},
images AS ({self._images_sql(p)}),
{_AGG},
ledger AS ({_ledger_row_sql(p)})
SELECT agg.changed, agg.same, agg.per_table::text AS per_table,
       (SELECT coalesce(json_object_agg(rel, json_build_array(ins, upd, del)), '{{}}')::text
        FROM raw) AS raw,
       (SELECT json_agg(json_build_object('rel', rel, 'op', op, 'key', key_show, 'why', why))::text
        FROM (SELECT * FROM bad WHERE why IS NOT NULL ORDER BY rel, why LIMIT 10) AS b) AS bad
FROM agg"""
        return BatchStatement(sql, params)

    def _bad_sql(self) -> str:
        """Net images that break the declarations: an undeclared column changed, an operation
        not allowed on the table, a row of the target outside the batch's keys ($1…)."""
        pt = self.paged
        pairs = [f"({t.rel}, '{op}')" for t in self.tables for op in sorted(t.allowed)]
        allowed = (
            f"VALUES {', '.join(pairs)}"
            if pairs
            else "SELECT NULL::int AS column1, NULL::text AS column2 WHERE false"
        )
        n = len(pt.key)
        arrays = ", ".join(f"${i + 1}::{k.type}[]" for i, k in enumerate(pt.key))
        columns = ", ".join(f"k{i}" for i in range(n))
        # the batch's keys as the key's columns compare them (typed, in the column's own
        # collation: 'a@x' finds the row 'A@X' under a case-insensitive one, as the statements'
        # `= ANY($1)` does), once each
        typed = ", ".join(
            f"b.k{i}" + (f" COLLATE {k.collation}" if k.collation else "") + f" AS k{i}"
            for i, k in enumerate(pt.key)
        )
        batch_keys = f"SELECT DISTINCT {typed} FROM unnest({arrays}) AS b({columns})"
        # only the target's images decode as its key (CASE: a join may compute the other side
        # for every image before it looks at the table)
        matches = " AND ".join(
            f"bk.k{i} = CASE WHEN i.rel = {pt.rel} THEN {v} END"
            for i, v in enumerate(decoded("i.key_enc", [k.type for k in pt.key]))
        )
        return f"""
    SELECT i.rel, i.op, i.key_show,
           CASE WHEN i.op IN ('U', 'N') AND NOT i.others_same THEN 'undeclared column'
                WHEN i.op <> 'N' AND a.rel IS NULL THEN 'operation'
                WHEN i.rel = {pt.rel} AND i.op <> 'I' AND bk.k0 IS NULL THEN 'outside the batch'
           END AS why
    FROM img AS i
    LEFT JOIN ({allowed}) AS a(rel, op)
        ON a.rel = i.rel AND a.op = CASE i.op WHEN 'I' THEN 'insert' WHEN 'D' THEN 'delete' ELSE 'update' END
    LEFT JOIN ({batch_keys}) AS bk ON i.rel = {pt.rel} AND {matches}
    WHERE i.op IS NOT NULL"""

    def _images_sql(self, p: dict[str, str]) -> str:
        widths = ", ".join(
            f"({t.rel}, {len(t.key)}, {len(t.image)}, {t.digest is not None})" for t in self.tables
        )
        return f"""
    INSERT INTO backfill.batch_images
        (run_id, batch_no, rel, key_width, image_width, ops, keys, befores, afters, digests)
    SELECT {p["run_id"]}, {p["batch_no"]}, per.rel, w.kw, w.iw, ops, keys, befores, afters, w.dg
    FROM per JOIN (VALUES {widths}) AS w(rel, kw, iw, dg) ON w.rel = per.rel"""

    def table(self, rel: int) -> Table:
        return self.tables[rel - 1]

    @cached_property
    def lock_sql(self) -> str | None:
        """The first statement of a batch's REPEATABLE READ transaction: ACCESS SHARE on its
        tables (what reading them takes anyway), before its snapshot (LOCK takes none). A
        statement that waited for an ALTER TABLE would otherwise run against the altered table
        in a snapshot taken before it: images of the columns the run resolved, a column check
        that reads the catalog as it was, and a column left out unseen. ACCESS SHARE waits for
        exactly the ACCESS EXCLUSIVE an ALTER of columns holds, and for nothing a reader does not
        (a CREATE INDEX, a SHARE lock). ONLY: columns change through the table itself. Only the
        tables the login may lock (`lockable`); None when there is none."""
        names = [f"ONLY {t.table}" for t in self.tables if t.oid in self.lockable]
        return f"LOCK TABLE {', '.join(names)} IN ACCESS SHARE MODE" if names else None

    # -- the direct path: a batch that only inserts rows recorded by their digests ---------------

    @cached_property
    def direct(self) -> tuple[BatchStatement, ...] | None:
        """When every statement is a plain INSERT into its own insert-only table (whose rows are
        recorded by digest), nothing needs reducing or checking after the statements: each
        records its rows' images itself, as it runs, and returns how many it inserted; the last
        one also writes the batch's ledger row. None otherwise (the temporary table and
        `finalize`)."""
        rels = [s.table.rel for s in self.steps]
        if not all(s.op == "insert" and s.table.digest is not None for s in self.steps) or len(
            set(rels)
        ) != len(rels):
            return None
        out = []
        for no, step in enumerate(self.steps):
            last = no == len(self.steps) - 1
            params = (
                (*self.target.key_params, *LEDGER_PARAMS, "earlier")
                if last
                else (*self.target.key_params, "run_id", "batch_no")
            )
            out.append(BatchStatement(self._direct_sql(step, _refs(params), last=last), params))
        return tuple(out)

    def _direct_sql(self, step: Step, p: dict[str, str], *, last: bool) -> str:
        t = step.table
        # every key array typed, whichever the statement uses
        typed = ", ".join(
            f"{p[name]}::{k.type}[]"
            for name, k in zip(self.target.key_params, self.target.key, strict=True)
        )
        images = f"""
WITH backfill_keys AS (SELECT {typed}),
w AS (
{plain_statement(step.sql)}{step._returning(show=False)}
),
img AS (
    INSERT INTO backfill.batch_images
        (run_id, batch_no, rel, key_width, image_width, ops, keys, befores, afters, digests)
    SELECT {p["run_id"]}::text, {p["batch_no"]}::int, {t.rel}, {len(t.key)}, {len(t.image)},
           array_fill('I'::text, ARRAY[count(*)::int]), array_agg(w.key_enc),
           array_fill(NULL::text, ARRAY[count(*)::int]), array_agg(w.img), true
    FROM w HAVING count(*) > 0
    RETURNING cardinality(keys) AS n
)"""
        if not last:
            return images + "\nSELECT coalesce((SELECT n FROM img), 0) AS n"
        return f"""{images},
agg AS (SELECT {p["earlier"]}::int + coalesce((SELECT n FROM img), 0) AS changed, 0 AS same),
ledger AS ({_ledger_row_sql(p)})
SELECT coalesce((SELECT n FROM img), 0) AS n"""

    @cached_property
    def reinserted_sql(self) -> str | None:
        """A row a batch deleted and inserted again (the same key as its columns compare it,
        whatever its text: 1 and 1.0): its images could not be undone in a safe order, so such a
        batch is refused. None when no table allows both."""
        parts = []
        for t in self.tables:
            if not {"insert", "delete"} <= t.allowed:
                continue
            types = [k.type for k in t.key]
            same = " AND ".join(
                f"{d} = {i}"
                for d, i in zip(
                    decoded("d.key_enc", types), decoded("i.key_enc", types), strict=True
                )
            )
            parts.append(
                f"(SELECT {t.rel} AS rel, d.key_show FROM pg_temp.backfill_touched AS d "
                f"JOIN pg_temp.backfill_touched AS i ON i.rel = d.rel AND {same} "
                f"WHERE d.rel = {t.rel} AND d.had_old AND NOT d.has_new "
                "AND i.has_new AND NOT i.had_old LIMIT 1)"
            )
        return f"SELECT * FROM ({' UNION ALL '.join(parts)}) AS again LIMIT 1" if parts else None

    def describe_bad(self, bad: list[dict[str, Any]]) -> str:
        """The declarations a batch broke, for its scope violation: table, operation, keys."""
        parts: dict[tuple[str, str], list[str]] = {}
        for b in bad:
            t = self.table(int(b["rel"]))
            op = {"I": "insert", "U": "update", "N": "update", "D": "delete"}[b["op"]]
            if b["why"] == "undeclared column":
                what = f"{t.display}: an update changed a column outside its declared columns ({', '.join(t.declared) or 'none'})"
            elif b["why"] == "operation":
                what = (
                    f"{t.display}: {op} is not declared (allowed: {', '.join(sorted(t.allowed))})"
                )
            else:
                what = f"{t.display}: {op} of a row outside the batch"
            parts.setdefault((what, ""), []).append(str(b["key"]))
        return "; ".join(
            f"{what} (keys {', '.join(keys[:5])})" for (what, _), keys in parts.items()
        )


async def shaped_run(conn: asyncpg.Connection, plan: Plan, target: TargetInfo) -> ShapedRun:
    tables = await resolve_tables(conn, plan)
    steps = await plan_steps(conn, plan, tables, target)
    oids = [t.oid for t in tables]
    signature = await conn.fetchval(COLUMNS_SIGNATURE, oids)
    lockable = await conn.fetchval(LOCKABLE, oids)
    return ShapedRun(tuple(tables), tuple(steps), target, str(signature), frozenset(lockable or ()))
