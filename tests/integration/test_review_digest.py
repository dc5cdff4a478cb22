"""Review of #11 (inserted rows recorded by a 64-bit digest): where the digest or the direct
insert path is silently wrong. Each finding's test says what should happen instead ("Should: …").
Sections 1-3 and the identity test failed at fc00d39 (the change as reviewed) and pass since
36f8ea8; the ICU tests need a server with ICU (PostgreSQL 15 here, not the embedded 18)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from runner.plan import Discovery
from tests.conftest import plan_dict, sql, val
from tests.helpers import (
    case_insensitive_collation,
    env_for,
    roll_back,
    run_id_of,
)


def _plan(path: Path, statements: list[str], writes: list[dict[str, Any]], **over: Any) -> Path:
    plan = plan_dict(
        target={"table": "src", "key": ["id"], "columns": ["v"]},
        discovery={
            "sql": "SELECT s.id FROM src s WHERE NOT EXISTS (SELECT 1 FROM dst d WHERE d.id = s.id)"
        },
        apply={"statements": statements},
        writes=writes,
        batching={"size": 10, "workers": 1, "lock_timeout": "1s", "statement_timeout": "20s"},
        soak__checks=[],
        **over,
    )
    path.write_text(json.dumps(plan))
    return path


DST = [{"table": "dst", "key": ["id"], "operations": ["insert"]}]


def _apply(cli: Callable[..., Any], plan: Path, db: str) -> str:
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    return run_id_of(result.output)


# -- 1. bigint / timestamp(tz) / time are hashed by a 32-bit fold ------------------------------


_TS_FLIP = (
    "c + ((x # 4294967297) - x) * interval '1 microsecond' FROM (SELECT (extract(epoch FROM "
    "c - '2000-01-01 00:00+00') * 1000000)::int8 AS x FROM dst WHERE id = 7) AS q"
)


@pytest.mark.parametrize("how", ["runner", "psql"])
@pytest.mark.parametrize(
    ("type_", "initial", "changed"),
    [
        ("bigint", "1", "4294967296"),  # a size in bytes: 1 B -> 4 GiB
        ("bigint", "-1", "4294967295"),  # -1 ("unknown") -> 4294967295
        ("timestamptz", "'2026-01-01 00:00+00'", _TS_FLIP),  # moved by 4294967297 µs
        ("timestamp", "'2026-01-01 00:00'", _TS_FLIP.replace("+00", "")),
    ],
    ids=["int8-1-to-4GiB", "int8-minus1", "timestamptz", "timestamp"],
)
def test_review_digest_a_changed_int8_or_timestamp_value_is_not_deleted(
    cli: Callable[..., Any],
    workdir: Path,
    db: str,
    how: str,
    type_: str,
    initial: str,
    changed: str,
) -> None:
    """hash_record_extended hashes int8 (and timestamp, timestamptz, time: all hashint8extended)
    after folding the 64-bit value to 32 bits (low XOR high half): 1 and 4294967296, -1 and
    4294967295, 0 and 4294967297 have one digest — deterministically, not "with a chance of
    2^-64". A row the application changed since (1 B -> 4 GiB) is "as inserted" and deleted.

    Should: the changed row is a conflict and stays (hash these types by their bytes, e.g.
    `int8send(c)`, `timestamptz_send(c)`, or by their pinned text — not by value)."""
    sql(
        db,
        f"CREATE TABLE src (id bigint PRIMARY KEY, v text, c {type_} NOT NULL); "
        "CREATE TABLE dst (LIKE src INCLUDING ALL); "
        f"INSERT INTO src SELECT g, 'v' || g, {initial} FROM generate_series(1, 30) AS g",
    )
    plan = _plan(workdir / "p.json", ["INSERT INTO dst SELECT * FROM src WHERE id = ANY($1)"], DST)
    run_id = _apply(cli, plan, db)
    sql(db, f"UPDATE dst SET c = {changed} WHERE id = 7")
    now = val(db, "SELECT c::text FROM dst WHERE id = 7")
    assert now != val(db, "SELECT c::text FROM src WHERE id = 7"), now  # it did change
    roll_back(cli, workdir, db, run_id, how)
    # Should: the row changed since is left alone (a conflict); the 29 others deleted
    assert [r["id"] for r in sql(db, "SELECT id FROM dst ORDER BY id")] == [7]


# -- 2. nondeterministic collations: arrays, domains, and a collation changed since ------------


@pytest.mark.parametrize(
    "column", ["tags text[] COLLATE ci", "tags ci_text", "tags varchar(20) COLLATE ci"]
)
def test_review_digest_a_case_change_in_an_array_or_domain_under_ci_is_a_change(
    cli: Callable[..., Any], workdir: Path, db: str, column: str
) -> None:
    """A column hashed as its text keeps its collation through `::text` (a text[] or a domain
    over text under a nondeterministic collation): hash_record_extended then hashes it by the
    collation's sort key, so '{abc}' and '{ABC}' have one digest.

    Should: the row whose value changed case since is a conflict and stays (hash the text
    COLLATE "C")."""
    case_insensitive_collation(db)
    sql(db, "CREATE DOMAIN ci_text AS text COLLATE ci")
    value = "ARRAY['tag ' || g]" if "[]" in column else "'tag ' || g"
    sql(
        db,
        f"CREATE TABLE src (id bigint PRIMARY KEY, v text, {column}); "
        "CREATE TABLE dst (LIKE src INCLUDING ALL); "
        f"INSERT INTO src SELECT g, 'v' || g, {value} FROM generate_series(1, 30) AS g",
    )
    plan = _plan(workdir / "p.json", ["INSERT INTO dst SELECT * FROM src WHERE id = ANY($1)"], DST)
    run_id = _apply(cli, plan, db)
    sql(
        db,
        "UPDATE dst SET tags = upper(tags::text)::"
        + ("text[]" if "[]" in column else "text")
        + " WHERE id = 7",
    )
    roll_back(cli, workdir, db, run_id, "runner")
    assert [r["id"] for r in sql(db, "SELECT id FROM dst ORDER BY id")] == [7]


def test_review_digest_a_collation_changed_after_the_apply_keeps_every_unchanged_row(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """A text column is hashed "by value", i.e. under its collation *at the time of hashing*:
    after `ALTER COLUMN … TYPE text COLLATE ci` (no value changes) the rollback's digests are
    sort-key hashes, the apply's were byte hashes, so every unchanged row is a "conflict" and
    nothing is deleted (whole images compared text and did not care).

    Should: the 30 unchanged rows are deleted (hash text COLLATE "C" whatever its column's
    collation; and record the collation in the run's identity / COLUMNS_SIGNATURE)."""
    case_insensitive_collation(db)
    sql(
        db,
        "CREATE TABLE src (id bigint PRIMARY KEY, v text, name text NOT NULL); "
        "CREATE TABLE dst (LIKE src INCLUDING ALL); "
        "INSERT INTO src SELECT g, 'v' || g, 'name ' || g FROM generate_series(1, 30) AS g",
    )
    plan = _plan(workdir / "p.json", ["INSERT INTO dst SELECT * FROM src WHERE id = ANY($1)"], DST)
    run_id = _apply(cli, plan, db)
    sql(db, "ALTER TABLE dst ALTER COLUMN name TYPE text COLLATE ci")
    roll_back(cli, workdir, db, run_id, "runner")
    assert val(db, "SELECT count(*) FROM dst") == 0


# -- 3. discovery: "OFFSET 0" is allowed by a regex that also lets an OFFSET that skips through ---


@pytest.mark.parametrize(
    "tail", ["OFFSET 0 + 5", "OFFSET 0+5", "OFFSET 0::int + 5", "OFFSET 0 - -5", "OFFSET 0 | 5"]
)
def test_review_digest_discovery_offset_that_skips_rows_is_refused(tail: str) -> None:
    """`\\boffset\\b(?!\\s+0(?![\\w.]))` accepts any OFFSET whose expression starts with a lone
    0: `OFFSET 0 + 5` skips 5 rows of every discovery page, so rows are silently never
    backfilled (the run still finishes, "done").

    Should: refused as any other OFFSET (allow only `OFFSET 0` followed by `)`, ROW(S), end,
    or a clause keyword)."""
    with pytest.raises(ValidationError, match="must not use OFFSET"):
        Discovery(sql=f"SELECT id FROM items WHERE val IS NULL {tail}")


# -- checked and found correct (kept: not covered elsewhere) -----------------------------------

ZOO = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (at timestamptz, amount numeric);
CREATE DOMAIN positive AS numeric CHECK (VALUE > 0);
CREATE TABLE src (id bigint PRIMARY KEY, v text, j json, jb jsonb, x {xml}, pt point,
    arr int[], tarr timestamptz[], comp pair, e mood, r tstzrange, m money, f8 float8, f4 real,
    iv interval, tt timetz, ip inet, bits varbit, d positive, n numeric, c char(5), b bytea,
    u uuid, dt date, t time, ok bool, nul text);
INSERT INTO src SELECT g, 'v' || g, '{"a": 1,  "b": [1, 2]}', '{"a": 1}', '<a>x</a>',
    point(g / 3.0, -g), ARRAY[g, NULL], ARRAY['2026-01-01 00:00+00'::timestamptz + g * interval '1 s'],
    ROW('2026-01-01 00:00+00'::timestamptz, g / 7.0)::pair, 'ok', tstzrange('2026-01-01', '2026-02-01'),
    g * 1.25, CASE WHEN g % 2 = 0 THEN 'NaN'::float8 ELSE g / 3.0 END, 0, interval '1 day',
    '12:00+02', '10.0.0.1/32', B'101', 1.50, 1.0, 'ab', '\\x00ff', gen_random_uuid(), '2026-01-01',
    '23:59:59.999999', g % 2 = 0, CASE WHEN g % 3 = 0 THEN 'x' END
FROM generate_series(1, 30) AS g;
"""
COLS = (
    "id, v, j, jb, x, pt, arr, tarr, comp, e, r, m, f8, f4, iv, tt, ip, bits, d, n, c, b, u, dt, "
    "t, ok, nul"
)
# each changes the row's value (though some compare equal with `=`): each row is kept
CHANGES = {
    2: "f4 = '-0'",
    3: "x = '<a>y</a>'",
    4: "pt = point(pt[0], pt[1] + 1e-12)",
    5: "comp = ROW((comp).at, (comp).amount * 2)::pair",
    6: "e = 'happy'",
    7: "r = tstzrange('2026-01-01', '2026-02-02')",
    8: 'j = \'{"a": 1, "b": [1, 2]}\'',  # the same json, other whitespace
    9: "iv = interval '24 hours'",  # = interval '1 day', another value
    10: "nul = ''",  # NULL -> empty
    11: "n = 1.00",
    12: "m = m + 0.01::money",
    13: "tarr = ARRAY['2026-01-01 00:00:00.000001+00'::timestamptz]",
    14: "arr = ARRAY[14]",  # the NULL element dropped
    15: "gen_only = gen_only",  # written again, unchanged: deleted
    16: "c = 'ab '",  # char(5): the same value, blank-padded alike: deleted
}


@pytest.mark.parametrize("how", ["runner", "psql"])
@pytest.mark.parametrize("partitioned", [False, True])
def test_review_digest_many_types_partitioned_generated_identity(
    cli: Callable[..., Any], workdir: Path, db: str, how: str, partitioned: bool
) -> None:
    """Every kind of column (json, xml, point, arrays, composite, enum, range, money, NaN, -0,
    interval, domain, NULLs), an identity and a generated column, plain or partitioned, through
    the direct path: unchanged rows are deleted, each changed one kept, by the runner and by the
    psql file in a hostile session alike."""
    try:
        sql(db, "SELECT '<a/>'::xml")
        xml = "xml"
    except asyncpg.PostgresError:  # a server built without libxml
        xml = "text"
    sql(db, ZOO.replace("{xml}", xml))
    part = " PARTITION BY RANGE (id)" if partitioned else ""
    sql(
        db,
        f"CREATE TABLE dst (LIKE src, seq bigint GENERATED BY DEFAULT AS IDENTITY, "
        f"gen_only bigint GENERATED ALWAYS AS (id * 2) STORED, PRIMARY KEY (id)){part}",
    )
    if partitioned:
        sql(
            db,
            "CREATE TABLE dst_a PARTITION OF dst FOR VALUES FROM (0) TO (11); "
            "CREATE TABLE dst_b PARTITION OF dst FOR VALUES FROM (11) TO (1000)",
        )
    plan = _plan(
        workdir / "p.json",
        [f"INSERT INTO dst ({COLS}) SELECT {COLS} FROM src WHERE id = ANY($1)"],
        DST,
    )
    run_id = _apply(cli, plan, db)
    assert val(db, "SELECT count(*) FROM dst") == 30
    assert val(db, "SELECT bool_and(digests) FROM backfill.batch_images WHERE run_id = $1", run_id)
    for id_, change in CHANGES.items():
        if change.startswith("gen_only"):
            sql(db, f"UPDATE dst SET v = v WHERE id = {id_}")
        else:
            sql(db, f"UPDATE dst SET {change} WHERE id = {id_}")
    out = roll_back(cli, workdir, db, run_id, how)
    kept = [r["id"] for r in sql(db, "SELECT id FROM dst ORDER BY id")]
    assert kept == [i for i in CHANGES if i < 15], out


@pytest.mark.parametrize("how", ["runner", "psql"])
def test_review_digest_an_insert_only_table_with_an_always_identity_rolls_back(
    cli: Callable[..., Any], workdir: Path, db: str, how: str
) -> None:
    """The usual insert target: `id … GENERATED ALWAYS AS IDENTITY`. The apply inserts fine,
    but every batch's undo includes restore_sql's `UPDATE dst SET …, seq = …` (for 'U' images,
    which an insert-only table never has), which PostgreSQL refuses at parse time ("column seq
    can only be updated to DEFAULT"): neither the runner nor the psql file can roll the run back.
    (restore_sql predates #11, but #11 makes insert-only tables the advertised case.)

    Should: the rollback deletes the 30 inserted rows (no restore statement for a table that
    allows no update, and none that SETs a GENERATED ALWAYS identity column)."""
    sql(
        db,
        "CREATE TABLE src (id bigint PRIMARY KEY, v text); "
        "CREATE TABLE dst (id bigint PRIMARY KEY, v text, "
        "seq bigint GENERATED ALWAYS AS IDENTITY); "
        "INSERT INTO src SELECT g, 'v' || g FROM generate_series(1, 30) AS g",
    )
    plan = _plan(
        workdir / "p.json",
        ["INSERT INTO dst (id, v) SELECT id, v FROM src WHERE id = ANY($1)"],
        DST,
    )
    run_id = _apply(cli, plan, db)
    roll_back(cli, workdir, db, run_id, how)
    assert val(db, "SELECT count(*) FROM dst") == 0


SIMPLE = """
CREATE TABLE src (id bigint PRIMARY KEY, v text NOT NULL);
CREATE TABLE dst (LIKE src INCLUDING ALL);
CREATE TABLE audit (id bigint);
INSERT INTO src SELECT g, 'v' || g FROM generate_series(1, 30) AS g;
"""


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (  # a trigger writing an undeclared table
            "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO audit VALUES (NEW.id); RETURN NULL; END $$; "
            "CREATE TRIGGER t AFTER INSERT ON dst FOR EACH ROW EXECUTE FUNCTION f()",
            "public.audit: 10 inserted (not declared in the plan)",
        ),
        (  # a trigger writing the target
            "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "UPDATE src SET v = 'x' WHERE id = NEW.id; RETURN NULL; END $$; "
            "CREATE TRIGGER t AFTER INSERT ON dst FOR EACH ROW EXECUTE FUNCTION f()",
            "public.src: 10 updated beyond the 0",
        ),
        (  # a deferred constraint trigger changing the row after its digest was taken
            "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "UPDATE dst SET v = 'later' WHERE id = NEW.id; RETURN NULL; END $$; "
            "CREATE CONSTRAINT TRIGGER t AFTER INSERT ON dst DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW EXECUTE FUNCTION f()",
            "public.dst: 10 updated beyond the 0",
        ),
        (  # a trigger inserting one more row of the insert-only table
            "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.id < 1000 THEN INSERT INTO dst VALUES (NEW.id + 1000, 'twin'); END IF; "
            "RETURN NULL; END $$; "
            "CREATE TRIGGER t AFTER INSERT ON dst FOR EACH ROW EXECUTE FUNCTION f()",
            "public.dst: 10 inserted beyond the 10",
        ),
    ],
    ids=["undeclared", "target", "deferred", "extra-row"],
)
def test_review_digest_direct_path_scope_guard(
    cli: Callable[..., Any], workdir: Path, db: str, setup: str, expected: str
) -> None:
    """The direct path (READ COMMITTED, no finalize) still refuses every write beyond its
    statements' rows: another table, the target, a deferred trigger, an extra row."""
    sql(db, SIMPLE)
    sql(db, setup)
    plan = _plan(workdir / "p.json", ["INSERT INTO dst SELECT * FROM src WHERE id = ANY($1)"], DST)
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert expected in text, text
    assert val(db, "SELECT count(*) FROM dst") == 0
    assert val(db, "SELECT count(*) FROM backfill.batch_images") == 0


def test_review_digest_before_trigger_and_two_tables_on_the_direct_path(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """Two insert-only tables (one inserting nothing in some batches), a BEFORE trigger that
    rewrites the row: the digest is the stored row's, the ledger counts every inserted row,
    the psql file deletes them all."""
    sql(db, SIMPLE)
    sql(
        db,
        "CREATE TABLE dst2 (LIKE src INCLUDING ALL); "
        "CREATE FUNCTION up() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "NEW.v := upper(NEW.v); RETURN NEW; END $$; "
        "CREATE TRIGGER t BEFORE INSERT ON dst FOR EACH ROW EXECUTE FUNCTION up()",
    )
    plan = _plan(
        workdir / "p.json",
        [
            "INSERT INTO dst SELECT * FROM src WHERE id = ANY($1)",
            "INSERT INTO dst2 SELECT * FROM src WHERE id = ANY($1) AND id <= 5",
        ],
        [*DST, {"table": "dst2", "key": ["id"], "operations": ["insert"]}],
    )
    run_id = _apply(cli, plan, db)
    assert val(db, "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1", run_id) == 35
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1", run_id) == 3
    assert val(db, "SELECT count(*) FROM backfill.row_images WHERE run_id = $1", run_id) == 35
    assert val(db, "SELECT min(v) FROM dst") == "V1"
    roll_back(cli, workdir, db, run_id, "psql")
    assert val(db, "SELECT count(*) FROM dst") + val(db, "SELECT count(*) FROM dst2") == 0
