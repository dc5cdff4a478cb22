"""`validate --env`: catches SQL mistakes by PREPARE against the database, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import make_items, val, write_plan

FINGERPRINT = """
SELECT md5(string_agg(x, '|' ORDER BY x)) FROM (
    SELECT n.nspname || '.' || c.relname || ':' || c.relkind::text || ':' || c.relfilenode AS x
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
    UNION ALL SELECT 'rows:' || md5(string_agg(i::text, ',' ORDER BY i.id)) FROM items i
) s
"""


def test_validate_env_reports_misspelled_column_and_syntax_error_and_changes_nothing(
    cli: Callable[..., Any], workdir: Path, bare_db: str
) -> None:
    db = bare_db  # nothing may be created, not even the ledger schema
    make_items(db, 50)
    before = val(db, FINGERPRINT)
    path = write_plan(
        workdir / "p.json",
        discovery__sql="SELECT id FROM items WHERE vall IS DISTINCT FROM 'new'",
        apply__sql="UPDATE items SET val = 'new' WHER id = ANY($1)",
    )
    result = cli("validate", str(path), "--env", "staging", env={"STAGING_DSN": db, "PROD_DSN": db})
    assert result.exit_code == 2, result.output
    assert 'column "vall" does not exist' in result.output
    assert "FAIL discovery.sql" in result.output
    assert 'FAIL apply.sql: PostgresSyntax: syntax error at or near "WHER"' in result.output
    assert "line 1, column 30" in result.output
    assert "(line 1, column 28: `SELECT id FROM items WHERE vall" in result.output
    assert val(db, FINGERPRINT) == before
    assert val(db, "SELECT to_regnamespace('backfill')") is None  # not even the ledger


def test_validate_env_reports_parameter_type_mismatch(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 10)
    path = write_plan(
        workdir / "p.json", apply__sql="UPDATE items SET val = 'new' WHERE id::text = ANY($1)"
    )
    result = cli("validate", str(path), "-e", "staging", env={"STAGING_DSN": db, "PROD_DSN": db})
    assert result.exit_code == 2
    assert "$1 is text[], but the runner passes bigint[]" in result.output


def test_validate_env_reports_missing_table_column_and_non_unique_key(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    env = {"STAGING_DSN": db, "PROD_DSN": db}
    path = write_plan(workdir / "p.json")
    result = cli("validate", str(path), "-e", "staging", env=env)
    assert result.exit_code == 2
    assert "table 'items' does not exist" in result.output
    make_items(db, 10)
    path = write_plan(workdir / "p.json", target__columns=["valz"])
    result = cli("validate", str(path), "-e", "staging", env=env)
    assert result.exit_code == 2
    assert "['valz'] do not exist" in result.output
    path = write_plan(workdir / "p.json", target__key=["grp"])
    result = cli("validate", str(path), "-e", "staging", env=env)
    assert result.exit_code == 2
    assert "is not unique" in result.output


def test_validate_env_accepts_a_good_plan(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    make_items(db, 10)
    path = write_plan(workdir / "p.json")
    result = cli(
        "validate", str(path), "-e", "staging", "--json", env={"STAGING_DSN": db, "PROD_DSN": db}
    )
    assert result.exit_code == 0, result.output
    assert '"ok": true' in result.output


def test_unreachable_database_is_a_clear_error_without_the_password(
    cli: Callable[..., Any], workdir: Path
) -> None:
    path = write_plan(workdir / "p.json")
    dsn = "postgresql://someone:s3cr3tpass@127.0.0.1:1/nope"
    result = cli("validate", str(path), "-e", "staging", env={"STAGING_DSN": dsn, "PROD_DSN": dsn})
    assert result.exit_code == 1
    assert "cannot connect to environment 'staging'" in result.output
    assert "s3cr3tpass" not in result.output
