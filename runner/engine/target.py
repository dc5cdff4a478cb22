"""The target table as the catalog describes it, and the statements the runner builds for it.

Every identifier passes through `quote_ident`; values always travel as parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import asyncpg

from runner.db import fetch_one, qualified, quote_ident
from runner.errors import InvalidInput
from runner.plan import Target

# Types outside pg_catalog are named schema-qualified (format_type qualifies only what the
# session's search_path does not show), so a recorded type means the same type in any session:
# the rollback file's, an operator's, another role's.
# A table's bytes (with indexes and TOAST) and estimated rows (-1: never analyzed). A partitioned
# table stores nothing itself: its leaf partitions' sums. $1 is the table's oid.
TABLE_SIZE_SQL = """
SELECT coalesce(sum(pg_total_relation_size(r.relid)), 0)::bigint AS bytes,
       CASE WHEN bool_and(c.reltuples < 0) THEN -1
            ELSE sum(greatest(c.reltuples, 0)) END::bigint AS rows
FROM (SELECT relid FROM pg_partition_tree($1::oid::regclass) WHERE isleaf
      UNION
      SELECT $1::oid::regclass WHERE NOT EXISTS (SELECT FROM pg_partition_tree($1::oid::regclass))
     ) AS r
JOIN pg_class AS c ON c.oid = r.relid
"""

# pg_attribute `a`'s own collation where it is not its type's, qualified and quoted
# (`public.ci`); NULL otherwise (and for a type without collation)
OWN_COLLATION = """(SELECT format('%I.%I', cn.nspname, co.collname)
        FROM pg_collation AS co JOIN pg_namespace AS cn ON cn.oid = co.collnamespace
        WHERE co.oid = a.attcollation
          AND a.attcollation <> (SELECT typcollation FROM pg_type WHERE oid = a.atttypid))"""

_ATTRS = f"""
SELECT a.attname AS name,
       CASE WHEN en.nspname IS NULL OR en.nspname = 'pg_catalog'
            THEN format_type(a.atttypid, a.atttypmod)
            ELSE format('%I.%I', en.nspname, e.typname) || CASE WHEN ty.typelem <> 0
                 AND ty.typcategory = 'A' THEN '[]' ELSE '' END
       END AS type,
       CASE WHEN en.nspname <> 'pg_catalog' THEN en.nspname END AS type_schema,
       a.attnotnull AS not_null, a.attgenerated <> '' AS generated,
       {OWN_COLLATION} AS collation,
       en.nspname = 'pg_catalog' AND e.typname IN ('regclass', 'regproc', 'regprocedure',
           'regoper', 'regoperator', 'regtype', 'regconfig', 'regdictionary', 'regnamespace',
           'regrole', 'regcollation') AS names_by_search_path
FROM pg_attribute a
JOIN pg_type ty ON ty.oid = a.atttypid
LEFT JOIN pg_type e ON e.oid = CASE WHEN ty.typelem <> 0 AND ty.typcategory = 'A'
                                    THEN ty.typelem ELSE ty.oid END
LEFT JOIN pg_namespace en ON en.oid = e.typnamespace
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_UNIQUE_KEYS = """
SELECT array_agg(a.attname ORDER BY k.ord) AS cols
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
  AND i.indisvalid AND i.indimmediate
GROUP BY i.indexrelid
"""


# The parameters every batch statement that writes the ledger row takes, by name: the SQL builders
# below place them ($n) and BatchStatement.bind supplies them, from the same tuple, so the order
# is one contract in code (values: executor.BatchContext.values).
LEDGER_PARAMS = (
    "run_id",
    "batch_no",
    "stage",
    "first_key",
    "last_key",
    "attempts",
    "errors",
    "started_at",
    "batch_size",
)


@dataclass(frozen=True)
class BatchStatement:
    """A statement of the batch transaction and the names of its parameters, in $1…$n order."""

    sql: str
    params: tuple[str, ...]

    def bind(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(values[name] for name in self.params)


def plain_statement(sql: str) -> str:
    """A plan's statement ready to be wrapped: no trailing `;`, and a final newline so that a
    closing `-- comment` cannot swallow what the runner writes after it."""
    return sql.rstrip().rstrip(";").rstrip() + "\n"


def as_subquery(sql: str) -> str:
    return f"({plain_statement(sql)})"


def _refs(params: tuple[str, ...]) -> dict[str, str]:
    return {name: f"${i}" for i, name in enumerate(params, start=1)}


def encode(exprs: list[str]) -> str:
    """A key or an image as one text value, the way batch_images stores it: a single value's
    own text form, or the text form of the text[] of several (see ledger.row_images).

    COLLATE "C": the text keeps its column's collation, and images are compared as encoded (a
    change, a no-op, a row as the run left it): under a nondeterministic collation ('abc' =
    'ABC'), a change of case would compare equal, be recorded as a no-op and never undone.
    Schema-qualified, as everywhere the runner names "C": a collation of that name in a schema
    the search_path puts first would be taken otherwise."""
    if len(exprs) == 1:
        return f'({exprs[0]}::text COLLATE pg_catalog."C")'
    return (
        "(ARRAY["
        + ", ".join(f"{e}::text" for e in exprs)
        + ']::text[]::text COLLATE pg_catalog."C")'
    )


def decoded(expr: str, types: list[str]) -> list[str]:
    """The inverse of `encode`: each value of an encoded key or image `expr`, cast back to its
    column's type (`types`, in order)."""
    if len(types) == 1:
        return [f"{expr}::{types[0]}"]
    return [f"({expr}::text[])[{n}]::{t}" for n, t in enumerate(types, start=1)]


def as_text_array(expr: str, width: int) -> str:
    """An encoded key or image of `width` values as a text[] (how conflicts and reports show it)."""
    return f"ARRAY[{expr}]::text[]" if width == 1 else f"{expr}::text[]"


def key_display(exprs: list[str]) -> str:
    """A key as a person reads it in an error: its values, comma-separated."""
    return "concat_ws(', ', " + ", ".join(f"{e}::text" for e in exprs) + ")"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool = False
    generated: bool = False
    type_schema: str | None = None  # of a user-defined type (None: pg_catalog)
    # the column's own collation where it is not its type's (qualified, quoted), as the catalog
    # has it now: not recorded with the run's tables
    collation: str | None = None

    @property
    def q(self) -> str:
        return quote_ident(self.name)


@dataclass(frozen=True)
class TargetInfo:
    """A resolved target: its qualified name, typed key and columns, and the columns it must not touch."""

    schema: str
    name: str
    key: tuple[Column, ...]
    columns: tuple[Column, ...]
    others: tuple[Column, ...]
    oid: int = 0
    root_oid: int = 0  # the top of its partition tree (itself when it is not a partition)

    @property
    def table(self) -> str:
        """The quoted, qualified name: the only form the runner's SQL uses."""
        return qualified(self.schema, self.name)

    @property
    def search_schemas(self) -> list[str]:
        """The target's schema and those of its user-defined key and column types: where the
        operators a rollback compares them with live."""
        found = [self.schema]
        for c in (*self.key, *self.columns):
            if c.type_schema and c.type_schema not in found:
                found.append(c.type_schema)
        return found

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def key_params(self) -> tuple[str, ...]:
        """The batch's key arrays, always $1…$n: the plan's apply statement is written so."""
        return tuple(f"k{i}" for i in range(len(self.key)))

    @property
    def key_order(self) -> str:
        return ", ".join(f"page.{k.q}" for k in self.key)

    # -- discovery ------------------------------------------------------------------------------

    def discovery_page_sql(
        self, discovery_sql: str, *, after_cursor: bool, until: bool = False
    ) -> str:
        """One keyset page of the plan's discovery query: the key arrays and the page's bounds.

        `$1` is the page size; with `after_cursor`, `$2…` are the text forms of the last key seen;
        with `until`, the text forms of the last key the page may hold follow (a lease's range).
        """
        keys = ", ".join(f"d.{k.q}" for k in self.key)

        def bound(first: int) -> str:  # a key's text forms as parameters $first…
            return ", ".join(f"${first + i}::text::{k.type}" for i, k in enumerate(self.key))

        conds = []
        if after_cursor:
            conds.append(f"({keys}) > ({bound(2)})")
        if until:
            conds.append(f"({keys}) <= ({bound(2 + (len(self.key) if after_cursor else 0))})")
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        order = self.key_order
        arrays = ", ".join(
            f"array_agg(page.{k.q} ORDER BY {order}) AS k{i}" for i, k in enumerate(self.key)
        )
        firsts = ", ".join(f"k{i}[1]::text" for i in range(len(self.key)))
        lasts = ", ".join(f"k{i}[n]::text" for i in range(len(self.key)))
        # the bounds come from the arrays: a second and third pass over the page would cost
        # more than half of what reading the page costs
        return f"""
SELECT n, {", ".join(f"k{i}" for i in range(len(self.key)))},
       ARRAY[{firsts}] AS first_key, ARRAY[{lasts}] AS last_key
FROM (
    SELECT count(*)::int AS n, {arrays}
    FROM (
        SELECT {keys} FROM {as_subquery(discovery_sql)} AS d
        {where}
        ORDER BY {keys}
        LIMIT $1
    ) AS page
) AS agg"""

    def discovery_count_sql(self, discovery_sql: str) -> str:
        keys = ", ".join(f"d.{k.q}" for k in self.key)
        as_text = ", ".join(f"d.{k.q}::text" for k in self.key)
        return f"""
SELECT count(*)::bigint AS n,
       (SELECT ARRAY[{as_text}] FROM {as_subquery(discovery_sql)} AS d ORDER BY {keys} LIMIT 1) AS first_key,
       (SELECT ARRAY[{as_text}] FROM {as_subquery(discovery_sql)} AS d
        ORDER BY {", ".join(f"d.{k.q} DESC" for k in self.key)} LIMIT 1) AS last_key
FROM {as_subquery(discovery_sql)} AS d"""

    def _in_range(self, alias: str, lo: str | None, hi: str | None) -> str:
        """`alias`'s key lies in (lo, hi]; lo and hi are text[] parameters, None is unbounded."""
        keys = ", ".join(f"{alias}.{k.q}" for k in self.key)
        conds = []
        for op, bound in ((">", lo), ("<=", hi)):
            if bound is not None:
                typed = ", ".join(
                    f"({bound}::text[])[{i + 1}]::{k.type}" for i, k in enumerate(self.key)
                )
                conds.append(f"({keys}) {op} ({typed})")
        return " AND ".join(conds) or "true"

    @staticmethod
    def _bounds(first: int, lower: bool, upper: bool) -> tuple[str | None, str | None]:
        lo = f"${first}" if lower else None
        hi = f"${first + lower}" if upper else None
        return lo, hi

    def range_count_sql(
        self, discovery_sql: str, *, lower: bool, upper: bool, among: bool = False
    ) -> str:
        """How many rows discovery returns with a key in (lower, upper]: the bounds that are
        given, as text[] parameters $1 (and $2); with `among`, only keys among the key arrays
        that follow them (quarantined keys)."""
        lo, hi = self._bounds(1, lower, upper)
        where = self._in_range("d", lo, hi)
        if among:
            first = 1 + lower + upper
            cols = ", ".join(f"d.{k.q}" for k in self.key)
            arrays = ", ".join(f"${first + i}::{k.type}[]" for i, k in enumerate(self.key))
            where += f" AND ({cols}) IN (SELECT * FROM unnest({arrays}))"
        return f"SELECT count(*)::bigint FROM {as_subquery(discovery_sql)} AS d WHERE {where}"

    def key_texts_sql(self) -> str:
        """The text form of each key of a batch ($1… its key arrays), as first_key is written."""
        return "SELECT " + ", ".join(
            f"(${i + 1}::{k.type}[])::text[] AS k{i}" for i, k in enumerate(self.key)
        )

    def rediscovered_sql(
        self, discovery_sql: str, *, of_batch: bool, lower: bool, upper: bool
    ) -> str:
        """Keys in (lower, upper] that discovery still returns although the run already did them:
        with `of_batch`, keys of one batch ($1… its key arrays); else keys run $1 recorded an
        image for. The bounds that are given follow as text[] parameters."""
        n = len(self.key)
        lo, hi = self._bounds(n + 1 if of_batch else 2, lower, upper)
        keys = ", ".join(f"d.{k.q}" for k in self.key)
        as_text = ", ".join(f"p.{k.q}::text" for k in self.key)
        if of_batch:
            arrays = ", ".join(f"${i + 1}::{k.type}[]" for i, k in enumerate(self.key))
            on = " AND ".join(f"p.{k.q} = b.k{i}" for i, k in enumerate(self.key))
            done = f"unnest({arrays}) AS b({', '.join(f'k{i}' for i in range(n))}) ON {on}"
        else:
            # rel 0: a plain run's target; rel 1: a shaped run's target (engine.shapes)
            done = f"backfill.row_images r ON r.run_id = $1 AND r.rel IN (0, 1) AND r.key = ARRAY[{as_text}]::text[]"
        return f"""
WITH p AS (SELECT {keys} FROM {as_subquery(discovery_sql)} AS d WHERE {self._in_range("d", lo, hi)})
SELECT concat_ws(', ', {as_text}) AS key
FROM p JOIN {done}
ORDER BY {", ".join(f"p.{k.q}" for k in self.key)}
LIMIT 5"""

    # -- the batch transaction ------------------------------------------------------------------

    def key_match(self, alias: str) -> str:
        """`alias`'s key is among the batch's key arrays ($1…$n)."""
        if len(self.key) == 1:
            k = self.key[0]
            return f"{alias}.{k.q} = ANY($1::{k.type}[])"
        cols = ", ".join(f"{alias}.{k.q}" for k in self.key)
        arrays = ", ".join(f"${i + 1}::{k.type}[]" for i, k in enumerate(self.key))
        return f"({cols}) IN (SELECT * FROM unnest({arrays}))"

    def key_range(self, alias: str, first: str, last: str) -> str:
        """`alias`'s key lies within the batch's first and last key (`first`, `last`: text[])."""
        cols = ", ".join(f"{alias}.{k.q}" for k in self.key)
        lo = ", ".join(f"({first}::text[])[{i + 1}]::{k.type}" for i, k in enumerate(self.key))
        hi = ", ".join(f"({last}::text[])[{i + 1}]::{k.type}" for i, k in enumerate(self.key))
        return f"({cols}) >= ({lo}) AND ({cols}) <= ({hi})"

    def _others_unchanged(self, before: str, after: str) -> str:
        """Undeclared columns bytewise equal before and after (record_image_eq works for every
        type, json and point included, and needs no text conversion)."""
        if not self.others:
            return "true"
        cols = range(len(self.others))
        return (
            f"record_image_eq(ROW({', '.join(f'{before}.o{i}' for i in cols)}), "
            f"ROW({', '.join(f'{after}.{c.q}' for c in self.others)}))"
        )

    def _image(self, alias: str) -> str:
        return encode([f"{alias}.{c.q}" for c in self.columns])

    @property
    def scratch_ddl(self) -> str:
        """A per-connection temp table holding the batch's before-images until commit."""
        cols = [f"k{i} {k.type}" for i, k in enumerate(self.key)] + ["before text"]
        cols += [f"o{i} {c.type}" for i, c in enumerate(self.others)]
        return (
            "DROP TABLE IF EXISTS pg_temp.backfill_before; "
            f"CREATE TEMP TABLE backfill_before ({', '.join(cols)}) ON COMMIT DELETE ROWS"
        )

    @cached_property
    def capture(self) -> BatchStatement:
        """Keep the batch's before-images: declared columns as text, the rest as typed copies for
        the scope guard.

        No row locks: the batch runs at REPEATABLE READ and this is its first statement, so it
        fixes the snapshot. If another transaction changes a batch row after that, the apply's
        UPDATE of it fails with a serialization error (retried) instead of updating a version we
        did not capture; so a before-image is always exactly the version the apply replaced.
        """
        cols = (
            [f"t.{k.q}" for k in self.key] + [self._image("t")] + [f"t.{c.q}" for c in self.others]
        )
        sql = f"""
INSERT INTO pg_temp.backfill_before
SELECT {", ".join(cols)}
FROM {self.table} AS t
WHERE {self.key_match("t")}"""
        return BatchStatement(sql, self.key_params)

    @staticmethod
    def _image_aggs(changed: str, where: str = "true") -> str:
        """The batch's row images as parallel arrays, aggregated in the pass that counts them,
        from rows with key_enc/before_enc/after_enc (`encode`)."""
        f = f"FILTER (WHERE {where})"
        return f"""array_agg(CASE WHEN {changed} THEN 'U' ELSE 'N' END) {f} AS img_ops,
           array_agg(key_enc) {f} AS img_keys,
           array_agg(before_enc) {f} AS img_befores,
           array_agg(CASE WHEN {changed} THEN after_enc END) {f} AS img_afters"""

    def _images_insert(self, run: str, batch_no: str) -> str:
        """The batch's row images as one batch_images tuple, from `agg` (see _image_aggs)."""
        return f"""INSERT INTO backfill.batch_images
        (run_id, batch_no, key_width, image_width, ops, keys, befores, afters)
    SELECT {run}, {batch_no}, {len(self.key)}, {len(self.columns)},
           img_ops, img_keys, img_befores, img_afters
    FROM agg WHERE img_ops IS NOT NULL"""

    @staticmethod
    def _ledger_insert(p: Mapping[str, str]) -> str:
        """The batch's ledger row, from `agg`; `p` places the LEDGER_PARAMS. A batch's no-ops
        are the keys it was given that it did not change."""
        size = f"{p['batch_size']}::int"
        return f"""INSERT INTO backfill.batches (run_id, batch_no, stage, status, first_key, last_key,
                                  selected, changed, noop, attempts, errors, started_at, duration_ms)
    SELECT {p["run_id"]}, {p["batch_no"]}, {p["stage"]}, 'done', {p["first_key"]}, {p["last_key"]},
           {size}, agg.changed, {size} - agg.changed, {p["attempts"]}, {p["errors"]}::jsonb,
           {p["started_at"]}, extract(epoch FROM clock_timestamp() - {p["started_at"]}) * 1000
    FROM agg"""

    @cached_property
    def finalize(self) -> BatchStatement:
        """After the apply: compare, store row images and the batch's ledger row, return the counts.

        The join is bounded by the batch's key range: without it the planner may merge-join from
        the start of the key index, a cost that grows with progress.
        """
        p = _refs(LEDGER_PARAMS)
        n = len(self.key)
        join = " AND ".join(f"t.{k.q} = b.k{i}" for i, k in enumerate(self.key))
        bkeys = [f"b.k{i}" for i in range(n)]
        sql = f"""
WITH me AS (SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text AS xid),
cur AS (
    SELECT {encode(bkeys)} AS key_enc,
           {key_display(bkeys)} AS key_show,
           b.before AS before_enc,
           CASE WHEN t.ctid IS NULL THEN NULL ELSE {self._image("t")} END AS after_enc,
           t.ctid IS NOT NULL AND NOT {self._others_unchanged("b", "t")} AS other_changed,
           coalesce(t.xmin::text = me.xid, false) AS touched,
           t.ctid IS NULL AS vanished
    FROM pg_temp.backfill_before AS b CROSS JOIN me
    LEFT JOIN {self.table} AS t ON {join} AND {self.key_range("t", p["first_key"], p["last_key"])}
),
agg AS (
    SELECT count(*)::int AS locked,
           count(*) FILTER (WHERE touched)::int AS touched,
           count(*) FILTER (WHERE NOT vanished AND before_enc IS DISTINCT FROM after_enc)::int AS changed,
           count(*) FILTER (WHERE other_changed)::int AS other_changed,
           count(*) FILTER (WHERE vanished)::int AS vanished,
           (array_agg(key_show) FILTER (WHERE vanished OR other_changed))[1:5] AS bad_keys,
           {self._image_aggs("before_enc IS DISTINCT FROM after_enc", "NOT vanished")}
    FROM cur
),
images AS (
    {self._images_insert(p["run_id"], p["batch_no"])}
),
ledger AS (
    {self._ledger_insert(p)}
)
SELECT locked, touched, changed, other_changed, vanished, bad_keys FROM agg"""
        return BatchStatement(sql, LEDGER_PARAMS)

    def returning_apply(self, apply_sql: str) -> BatchStatement:
        """The whole batch as one statement (PostgreSQL 18+): the plan's UPDATE as a data-modifying
        CTE whose `RETURNING OLD/NEW` gives the exact version it replaced, the after-image, the
        undeclared columns (key included) compared bytewise and the table it changed; then the
        row images and the batch's ledger row.

        `$1…$n` stay the plan's key arrays; the LEDGER_PARAMS and the target follow. Preparing it
        fails for applies it cannot wrap (their own RETURNING, a data-modifying WITH, an older
        server): the executor then uses capture + the plan's statement + finalize.
        """
        n = len(self.key)
        params = (*self.key_params, *LEDGER_PARAMS, "target")
        p = _refs(params)
        old, new = "backfill_old", "backfill_new"
        guarded = list(self.others) + list(self.key)
        same = (
            f"record_image_eq(ROW({', '.join(f'{old}.{c.q}' for c in guarded)}), "
            f"ROW({', '.join(f'{new}.{c.q}' for c in guarded)}))"
        )
        new_keys = ", ".join(f"{new}.{k.q} AS bk{i}" for i, k in enumerate(self.key))
        # a deleted row has no NEW, an inserted one no OLD: show whichever key it has
        shown_keys = ", ".join(
            f"coalesce({new}.{k.q}, {old}.{k.q}) AS sk{i}" for i, k in enumerate(self.key)
        )
        arrays = ", ".join(f"${i + 1}::{k.type}[]" for i, k in enumerate(self.key))
        batch_cols = ", ".join(f"k{i}" for i in range(n))
        on = " AND ".join(f"a.bk{i} = b.k{i}" for i in range(n))
        show = key_display([f"sk{i}" for i in range(n)])
        # membership through a hash join: `= ANY($1)` per returned row would compare each row
        # with the whole batch (PostgreSQL hashes ANY only for constant arrays)
        sql = f"""
WITH applied AS (
{plain_statement(apply_sql)}RETURNING WITH (OLD AS {old}, NEW AS {new})
    -- a partitioned target's rows live in its partitions: any table of its tree is the target
    {new}.tableoid = {p["target"]}::text::regclass
        OR {new}.tableoid = ANY(ARRAY(SELECT relid FROM pg_partition_tree({p["target"]}::text::regclass)))
        AS on_target,
    {new_keys},
    {shown_keys},
    {encode([f"{old}.{k.q}" for k in self.key])} AS key_enc,
    {self._image(old)} AS before_enc,
    {self._image(new)} AS after_enc,
    {same} AS others_same
),
checked AS (
    SELECT a.*, a.before_enc IS DISTINCT FROM a.after_enc AS changed,
           a.on_target AND b.k0 IS NOT NULL AS in_scope
    FROM applied AS a
    LEFT JOIN unnest({arrays}) AS b({batch_cols}) ON {on}
),
agg AS (
    SELECT count(*)::int AS returned,
           count(*) FILTER (WHERE NOT in_scope)::int AS outside,
           count(*) FILTER (WHERE changed)::int AS changed,
           count(*) FILTER (WHERE NOT others_same)::int AS other_changed,
           (array_agg({show}) FILTER (WHERE NOT in_scope))[1:5] AS outside_keys,
           (array_agg({show}) FILTER (WHERE NOT others_same))[1:5] AS bad_keys,
           {self._image_aggs("changed")}
    FROM checked
),
images AS (
    {self._images_insert(p["run_id"], p["batch_no"])}
),
ledger AS (
    {self._ledger_insert(p)}
)
SELECT returned, outside, changed, other_changed, outside_keys, bad_keys FROM agg"""
        return BatchStatement(sql, params)

    def discovered_sql(self, discovery_sql: str) -> str:
        """Which of the keys $1… (arrays, one per key column) discovery returns now, as text[]."""
        as_text = ", ".join(f"d.{k.q}::text" for k in self.key)
        return (
            f"SELECT ARRAY[{as_text}]::text[] FROM {as_subquery(discovery_sql)} AS d "
            f"WHERE {self.key_match('d')}"
        )

    def outside_rows_sql(self) -> str:
        """Diagnosis only (after a scope violation): rows of the table this transaction touched
        outside the batch. A sequential scan, run once, inside the transaction being rolled back."""
        key_show = "concat_ws(', ', " + ", ".join(f"t.{k.q}::text" for k in self.key) + ")"
        return f"""
SELECT {key_show} AS key FROM {self.table} AS t
WHERE t.xmin::text = (pg_current_xact_id()::text::bigint % 4294967296)::text
  AND NOT ({self.key_match("t")})
LIMIT 5"""


@dataclass(frozen=True)
class Catalog:
    """A table as the catalog describes it, before the plan's columns are checked against it."""

    oid: int
    root_oid: int
    schema: str
    name: str
    attrs: dict[str, Column]
    by_search_path: frozenset[str]
    unique_sets: tuple[frozenset[str], ...]

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"

    def require(
        self, where: str, key: list[str], columns: list[str], *, whole_rows: bool = False
    ) -> None:
        """The plan's key and columns exist, the key is unique and NOT NULL, nothing imaged is
        a reg* value or generated: what a row image needs to mean one row, exactly.
        `whole_rows`: every column is imaged (inserted and deleted rows are recorded whole)."""
        display = self.display
        for field, names in (("key", key), ("columns", columns)):
            missing = [n for n in names if n not in self.attrs]
            if missing:
                raise InvalidInput(
                    f"{where}.{field}: column(s) {missing} do not exist in {display}",
                    hint=f"its columns are: {', '.join(self.attrs)}",
                )
        nullable = [n for n in key if not self.attrs[n].not_null]
        if nullable:
            raise InvalidInput(
                f"{where}.key: {nullable} of {display} allow NULL: a row whose key is NULL "
                "can be neither paged by key nor restored by key, so it would be skipped silently",
                hint="use the primary key, or make the key columns NOT NULL",
            )
        by_path = [n for n in self.attrs if n in self.by_search_path]
        if by_path and (set(by_path) & {*key, *columns} or whole_rows):
            raise InvalidInput(
                f"{where}: {by_path} of {display} hold reg* values (regclass, regproc, …), "
                "whose text names objects relative to the session's search_path: a row image of "
                "them could restore a reference to another object",
                hint="backfill an oid column instead, or leave these columns out of the plan",
            )
        generated = [n for n in columns if self.attrs[n].generated]
        if generated:
            raise InvalidInput(
                f"{where}.columns: {generated} are generated columns and cannot be set"
            )
        if frozenset(key) not in self.unique_sets:
            raise InvalidInput(
                f"{where}.key: {key} is not unique in {display} "
                "(no primary key or unique index on exactly these columns that is checked at "
                "once: a DEFERRABLE one lets a batch hold two rows with one key until commit)",
                hint="use the primary key, or create a unique index on the key columns",
            )


async def read_catalog(conn: asyncpg.Connection, table: str, where: str) -> Catalog:
    """Look a table up; a missing table or one that is not a table is an InvalidInput."""
    try:
        oid = await conn.fetchval("SELECT to_regclass($1)::oid", table)
    except asyncpg.PostgresError as e:
        raise InvalidInput(f"{where}.table: {table!r} is not a valid table name: {e}") from None
    if oid is None:
        raise InvalidInput(
            f"{where}.table: table {table!r} does not exist in this database",
            hint="check the name and schema (write schema.table if it is not on the search_path)",
        )
    schema, name, kind = await fetch_one(
        conn,
        "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        oid,
    )
    if kind not in ("r", "p"):
        raise InvalidInput(f"{where}.table: {schema}.{name} is not a table (relkind {kind!r})")
    rows = await conn.fetch(_ATTRS, oid)
    return Catalog(
        oid=int(oid),
        root_oid=int(
            await conn.fetchval(
                "SELECT coalesce(pg_partition_root($1::oid::regclass)::oid, $1::oid)", oid
            )
        ),
        schema=schema,
        name=name,
        attrs={
            r["name"]: Column(
                r["name"],
                r["type"],
                r["not_null"],
                r["generated"],
                r["type_schema"],
                r["collation"],
            )
            for r in rows
        },
        by_search_path=frozenset(r["name"] for r in rows if r["names_by_search_path"]),
        unique_sets=tuple(frozenset(r["cols"]) for r in await conn.fetch(_UNIQUE_KEYS, oid)),
    )


async def resolve_target(conn: asyncpg.Connection, target: Target) -> TargetInfo:
    """Look the target up in the catalog; a missing table, key or column is an InvalidInput."""
    cat = await read_catalog(conn, target.table, "target")
    cat.require("target", target.key, target.columns)
    declared = set(target.key) | set(target.columns)
    return TargetInfo(
        schema=cat.schema,
        name=cat.name,
        key=tuple(cat.attrs[n] for n in target.key),
        columns=tuple(cat.attrs[n] for n in target.columns),
        others=tuple(c for n, c in cat.attrs.items() if n not in declared and not c.generated),
        oid=cat.oid,
        root_oid=cat.root_oid,
    )
