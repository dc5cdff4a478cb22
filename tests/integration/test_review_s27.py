"""Review of 2970551 (a shaped batch locks its declared tables before its snapshot) and fe2d5a5
(images carry `COLLATE "C"`): each test pinned a case where a fix was incomplete or broke
something, and failed against the code as reviewed; its docstring says what went wrong and what should
happen instead, which is what happens now. Fixed
since: the lock is ACCESS SHARE, only on tables the login may lock; the plain rollback (runner,
dry run, psql file) compares images byte for byte too; "C" is `pg_catalog."C"`; health's schema
drift compares collations. One stays a known limit (xfail). The ICU tests need a server with ICU
collations (PostgreSQL 15 in CI; they skip on the embedded 18):
    BACKFILL_TEST_DSN=postgresql://postgres@/postgres?host=…&port=… \\
        uv run pytest tests/integration/test_review_s27.py
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.conftest import plan_dict, psql_binary, sql, val
from tests.helpers import (
    case_insensitive_collation,
    env_for,
    roll_back,
    run_id_of,
    wait_for,
)


def _apply(
    cli: Callable[..., Any], plan: dict[str, Any], workdir: Path, env: dict[str, str]
) -> Any:
    path = workdir / "p.json"
    path.write_text(json.dumps(plan))
    return cli("apply", str(path), "-e", "staging", "-q", env=env)


def _applied(cli: Callable[..., Any], plan: dict[str, Any], workdir: Path, db: str) -> str:
    result = _apply(cli, plan, workdir, env_for(db))
    assert result.exit_code == 3, result.output
    return run_id_of(result.output)


# -- 1. the lock needs a table-level write privilege the statements never needed ----------------


def _with_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}"))


@pytest.fixture
def runner_role(db: str) -> Iterator[str]:
    """A login role with what a runner needs of the ledger, and nothing of the tables yet."""
    role = "rev27_runner_" + str(val(db, "SELECT current_database()"))[-8:]
    sql(
        db,
        f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA backfill TO {role};"
        f" GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA backfill TO {role};"
        f" GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA backfill TO {role}",
    )
    try:
        yield role
    finally:
        sql(db, f"DROP OWNED BY {role}; DROP ROLE {role}")


_COPY = {
    "target": {"table": "src", "key": ["id"], "operations": []},
    "discovery": {
        "sql": "SELECT s.id FROM src s WHERE NOT EXISTS (SELECT 1 FROM seen d WHERE d.id = s.id)"
    },
    "apply": {"statements": ["INSERT INTO seen SELECT id, name FROM src WHERE id = ANY($1)"]},
    # whole images: not the READ COMMITTED direct path (which takes no lock)
    "writes": [{"table": "seen", "key": ["id"], "operations": ["insert"], "images": "whole"}],
}
_STAMP = {
    "target": {"table": "src", "key": ["id"], "columns": ["done"]},
    "discovery": {"sql": "SELECT id FROM src WHERE NOT done"},
    "apply": {"statements": ["UPDATE src SET done = true WHERE id = ANY($1)"]},
}


@pytest.mark.parametrize(
    ("shape", "grant", "done"),
    [
        # a read-only source (operations = []): the runner may only read it
        (_COPY, "GRANT SELECT ON src TO {role}", "SELECT count(*) FROM seen"),
        # least privilege on the target: UPDATE of the one column the plan declares
        (
            _STAMP,
            "GRANT SELECT, UPDATE (done) ON src TO {role}",
            "SELECT count(*) FROM src WHERE done",
        ),
    ],
    ids=["select-only-source", "column-update-grant"],
)
def test_a_runner_with_the_privileges_its_statements_need_can_still_apply(
    cli: Callable[..., Any],
    workdir: Path,
    db: str,
    runner_role: str,
    shape: dict[str, Any],
    grant: str,
    done: str,
) -> None:
    """LOCK TABLE … IN ROW EXCLUSIVE MODE needs a *table-level* INSERT, UPDATE, DELETE or
    TRUNCATE privilege (PostgreSQL's LockTableAclCheck); SELECT or a column-level UPDATE grant
    does not do. The fix locks every declared table, the read-only target (operations = [])
    included, so a runner that may only read its source, or may only update the declared
    column, now fails its first batch with "permission denied for table src" (sql_error: the
    phase stops, exit 1) although each of its statements is allowed; before 2970551 it applied.
    Should: lock only the tables the batch's statements write, and only as their privileges
    allow (or leave the lock to the statements and keep the column check after them), so the
    apply finishes (exit 3, every row done)."""
    sql(
        db,
        "CREATE TABLE src (id bigint PRIMARY KEY, name text NOT NULL,"
        " done bool NOT NULL DEFAULT false);"
        " CREATE TABLE seen (id bigint PRIMARY KEY, name text NOT NULL);"
        " INSERT INTO src (id, name) SELECT g, 'n' || g FROM generate_series(1, 20) AS g",
    )
    sql(db, grant.format(role=runner_role) + f"; GRANT SELECT, INSERT ON seen TO {runner_role}")
    plan = plan_dict(
        **shape,
        batching={"size": 10, "workers": 1, "lock_timeout": "2s", "statement_timeout": "20s"},
        soak__checks=[],
    )
    as_runner = _with_user(db, runner_role)
    result = _apply(cli, plan, workdir, {"STAGING_DSN": as_runner, "PROD_DSN": as_runner})
    assert result.exit_code == 3, result.output
    assert val(db, done) == 20


def test_a_read_only_source_is_not_locked_against_its_readers(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """The same lock on the read-only target (operations = [], only read by the batch) also
    conflicts with SHARE locks, which reads never did: a `CREATE INDEX` (not CONCURRENTLY) on
    the source, or a session holding `LOCK TABLE src IN SHARE MODE` to read it consistently,
    now makes every batch time out on a lock it does not need (lock_timeout, retried until
    the budget is spent: the phase stops), where before 2970551 the copy went on beside it.
    Should: a table the batch only reads is not locked ROW EXCLUSIVE: the apply finishes."""
    sql(
        db,
        "CREATE TABLE src (id bigint PRIMARY KEY, name text NOT NULL);"
        " CREATE TABLE seen (id bigint PRIMARY KEY, name text NOT NULL);"
        " INSERT INTO src (id, name) SELECT g, 'n' || g FROM generate_series(1, 20) AS g",
    )
    holder = subprocess.Popen(
        [psql_binary(), "-X", "-q", "-d", db],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdin is not None
        holder.stdin.write("BEGIN; LOCK TABLE src IN SHARE MODE;\n")
        holder.stdin.flush()
        wait_for(
            db,
            "SELECT count(*) FROM pg_locks WHERE relation = 'src'::regclass"
            " AND mode = 'ShareLock' AND granted",
        )
        plan = plan_dict(
            **_COPY,
            batching={
                "size": 10,
                "workers": 1,
                "lock_timeout": "300ms",
                "statement_timeout": "20s",
                "max_retries": 2,
            },
            soak__checks=[],
        )
        result = _apply(cli, plan, workdir, env_for(db))
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM seen") == 20


# -- 2. the plain run's psql rollback file still compares under the column's collation ---------


def _case_plan() -> dict[str, Any]:
    return plan_dict(
        target={"table": "items", "key": ["id"], "columns": ["name"]},
        discovery={"sql": "SELECT id FROM items WHERE name::bytea <> upper(name)::bytea"},
        apply={"sql": "UPDATE items SET name = upper(name) WHERE id = ANY($1)"},
        batching={"size": 10, "workers": 1, "lock_timeout": "2s", "statement_timeout": "20s"},
        soak__checks=[],
    )


def _case_items(db: str, column: str = "name text COLLATE ci NOT NULL") -> None:
    sql(
        db,
        f"CREATE TABLE items (id bigint PRIMARY KEY, {column}); "
        "INSERT INTO items SELECT g, 'name ' || g FROM generate_series(1, 30) AS g",
    )


def test_the_plain_psql_file_leaves_a_row_changed_only_in_case_since(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """A plain run (one UPDATE of a ci column: 'name 7' -> 'NAME 7'); then someone sets row 7
    to 'Name 7'. The runner's rollback (enc_current: COLLATE "C") leaves it as a conflict; the
    emitted psql file does not: RunShape.restore_sql compares `ARRAY[t.name::text]::text[]`
    (still under the column's collation, ci) with the image, finds 'Name 7' = 'NAME 7', and
    overwrites the change with 'name 7' — and then verifies clean (its verification counts
    and conflict list compare under ci too). The same for a domain over text, a text[] or a
    varchar under ci (`::text` keeps the collation), and for the file run again after the
    runner's rollback left the row as a conflict.
    Should: the file restores only rows byte for byte at the after-image (encode(), as the
    runner): row 7 keeps 'Name 7', the other 29 are back."""
    case_insensitive_collation(db)
    _case_items(db)
    run_id = _applied(cli, _case_plan(), workdir, db)
    sql(db, "UPDATE items SET name = 'Name 7' WHERE id = 7")
    roll_back(cli, workdir, db, run_id, "psql")
    assert val(db, "SELECT name::bytea FROM items WHERE id = 7") == b"Name 7"
    assert val(db, "SELECT count(*) FROM items WHERE name::bytea = ('name ' || id)::bytea") == 29


def test_the_plain_psql_file_leaves_a_case_change_in_a_composite_image(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """The same with an image of two columns (one ci, one plain): the file's
    `ARRAY[t.name::text, t.note::text]::text[]` takes the ci collation for the array, so a row
    whose ci column changed case since is restored over.
    Should: row 7 keeps 'Name 7'."""
    case_insensitive_collation(db)
    _case_items(db, "name text COLLATE ci NOT NULL, note text NOT NULL DEFAULT 'x'")
    plan = _case_plan()
    plan["target"]["columns"] = ["name", "note"]
    plan["apply"]["sql"] = "UPDATE items SET name = upper(name), note = 'y' WHERE id = ANY($1)"
    run_id = _applied(cli, plan, workdir, db)
    sql(db, "UPDATE items SET name = 'Name 7' WHERE id = 7")
    roll_back(cli, workdir, db, run_id, "psql")
    assert val(db, "SELECT name::bytea FROM items WHERE id = 7") == b"Name 7"


def test_the_plain_dry_run_counts_a_case_change_as_a_conflict(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """`backfill rollback --dry-run` of a plain run (`_classify`, `_dry_run`) compares
    `RunShape.current_image()` (the column's collation, ci) with the images, under which a
    before-image and an after-image that differ only in case are equal: every row counts as
    "already at its before-image" and none as restorable or conflicting ("would restore 0
    row(s); 30 already …; 0 conflict(s)"), while the rollback then restores 29 and leaves
    row 7 (changed since to 'Name 7') as a conflict.
    Should: the dry run compares encoded images (COLLATE "C"), as the rollback does: it says
    29 to restore and 1 conflict."""
    case_insensitive_collation(db)
    _case_items(db)
    run_id = _applied(cli, _case_plan(), workdir, db)
    sql(db, "UPDATE items SET name = 'Name 7' WHERE id = 7")
    dry = cli("rollback", run_id, "-e", "staging", "--dry-run", env=env_for(db))
    assert dry.exit_code == 0, dry.output
    text = " ".join(dry.output.split())
    done = cli("rollback", run_id, "-e", "staging", env=env_for(db))
    assert done.exit_code == 0, done.output
    assert "1 conflict(s) left alone" in " ".join(done.output.split()), done.output
    assert "would restore 29 row(s)" in text, text
    assert "1 conflict(s)" in text, text


# -- 3. COLLATE "C" is looked up on the search_path --------------------------------------------


def test_collate_c_means_pg_catalogs_whatever_the_search_path(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """encode() (and DIGEST_FORMS, the checksums' ORDER BY) write `COLLATE "C"` unqualified: it
    resolves through the session's search_path, which the runner does not pin. With the
    database's search_path `public, pg_catalog` (pg_catalog listed, so not searched first) and
    a collation public."C" that is nondeterministic, the images compare under it again: the
    case change is recorded as a no-op, without an image, and never undone (the defect
    fe2d5a5 fixed, back through a session setting; invariant 7: images and comparisons
    independent of session settings).
    Should: `COLLATE pg_catalog."C"`: 30 rows changed and imaged, the rollback restores them."""
    try:
        sql(
            db,
            "CREATE COLLATION public.\"C\" (provider = icu, locale = 'und-u-ks-level2', "
            "deterministic = false)",
        )
    except asyncpg.PostgresError as e:
        pytest.skip(f"no ICU collations on this server: {e}")
    sql(
        db,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET search_path = public, pg_catalog', "
        "current_database()); END $$",
    )
    _case_items(db, "name text NOT NULL")
    run_id = _applied(cli, _case_plan(), workdir, db)
    assert val(db, "SELECT count(*) FROM items WHERE name::bytea = upper(name)::bytea") == 30
    assert val(db, "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1", run_id) == 30
    roll_back(cli, workdir, db, run_id, "runner")
    assert val(db, "SELECT count(*) FROM items WHERE name::bytea = ('name ' || id)::bytea") == 30


# -- 4. prod health does not see a collation that differs from staging's ------------------------


def test_health_blocks_on_a_declared_column_whose_collation_differs_in_prod(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    """Staging's `items.name` is `text`, prod's is `text COLLATE ci` (nondeterministic): under
    it the plan's comparisons mean something else in prod (discovery's `<>`, `=` in the apply,
    ON CONFLICT and unique keys merging 'abc' and 'ABC'), so the staging rehearsal does not
    prove the prod apply. health's schema drift compares `format_type` only (no collation),
    and says nothing: the verdict is go.
    Should: a declared column (or key) whose collation differs between staging and prod is
    schema drift, a blocker (exit 4), as a type that differs is."""
    staging, prod = make_db(), make_db()
    case_insensitive_collation(prod)
    _case_items(staging, "name text NOT NULL")
    _case_items(prod, "name text COLLATE ci NOT NULL")
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    path = workdir / "p.json"
    plan = _case_plan()
    plan["soak"]["checks"] = [{"name": "n", "sql": "SELECT 0", "pass_if": "== 0"}]
    path.write_text(json.dumps(plan))
    applied = cli("apply", str(path), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    soaked = cli("soak", str(path), "-e", "staging", "--run", run_id, "--duration", "1s", env=env)
    assert soaked.exit_code == 3, soaked.output
    assert cli("approve", run_id, "--gate", "soak-staging", "--as", "alice", env=env).exit_code == 0
    result = cli("health", str(path), "-e", "prod", "--run", run_id, env=env)
    assert result.exit_code == 4, result.output
    assert "schema drift: column name" in " ".join(result.output.split()), result.output


# -- 5. a shaped batch compares the target's keys byte for byte, its statements do not ---------


def test_a_shaped_batch_takes_the_target_row_its_key_finds_under_the_key_collation(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """The target's key is `email text COLLATE ci` (unique under ci: 'A@X' and 'a@x' are one
    key); discovery returns the keys as another table spells them ('a@x' for the row 'A@X').
    The apply's `WHERE email = ANY($1)` finds the row (ci), as the plain path does (its
    finalize and RETURNING joins compare typed keys). The shaped path's `_bad_sql` joins the
    row's encoded key (COLLATE "C") to the batch's encoded keys: 'A@X' is not 'a@x', so every
    such row is "update of a row outside the batch", the batch is rolled back and the phase
    stops (exit 1).
    Should: a target row is within the batch when its key equals a batch key as the key's
    columns compare it (typed, as `reinserted_sql` and the rollback's joins do); the
    images keep the row's own key, byte for byte: the apply finishes and rolls back."""
    case_insensitive_collation(db)
    sql(
        db,
        "CREATE TABLE users (email text COLLATE ci PRIMARY KEY, verified bool NOT NULL DEFAULT false);"
        " CREATE TABLE signups (email text NOT NULL);"
        " INSERT INTO users SELECT 'USER' || g || '@X' FROM generate_series(1, 20) AS g;"
        " INSERT INTO signups SELECT 'user' || g || '@x' FROM generate_series(1, 20) AS g",
    )
    plan = plan_dict(
        target={"table": "users", "key": ["email"], "columns": ["verified"]},
        discovery={
            "sql": "SELECT s.email FROM signups s JOIN users u ON u.email = s.email "
            "WHERE NOT u.verified"
        },
        apply={"statements": ["UPDATE users SET verified = true WHERE email = ANY($1)"]},
        batching={"size": 10, "workers": 1, "lock_timeout": "2s", "statement_timeout": "20s"},
        soak__checks=[],
    )
    run_id = _applied(cli, plan, workdir, db)
    assert val(db, "SELECT count(*) FROM users WHERE verified") == 20
    roll_back(cli, workdir, db, run_id, "runner")
    assert val(db, "SELECT count(*) FROM users WHERE verified") == 0
