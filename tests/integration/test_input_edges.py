"""Bad input changes nothing: run ids, plans that do not fit the database, absurd values, DSNs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import make_items, val, write_plan
from tests.integration.test_validate_env import FINGERPRINT


@pytest.fixture
def db(bare_db: str) -> str:
    """Every test here pins that nothing was written, not even the ledger schema."""
    return bare_db


def _nothing_written(db: str, before: str) -> None:
    assert val(db, FINGERPRINT) == before
    assert val(db, "SELECT to_regnamespace('backfill')") is None  # not even the ledger


@pytest.mark.parametrize(
    ("flags", "extra_env", "needle"),
    [
        (["--run", ""], {}, "'' is not a run id"),
        ([], {"BACKFILL_RUN": ""}, "BACKFILL_RUN is set but empty"),
        (["--run", "../../etc"], {}, "'../../etc' is not a run id"),
        (["--run", "20261122T101500Z-other_plan-3fa2"], {}, "belongs to plan 'other_plan'"),
        (["--run", "20261122T101500Z-items_new-3fa2\n"], {}, "is not a run id"),
    ],
    ids=["empty", "empty-env", "path", "other-plan", "newline"],
)
def test_a_bad_run_id_is_refused_before_anything_is_written(
    cli: Callable[..., Any],
    workdir: Path,
    db: str,
    flags: list[str],
    extra_env: dict[str, str],
    needle: str,
) -> None:
    make_items(db, 50)
    before = val(db, FINGERPRINT)
    plan = write_plan(workdir / "p.json")
    env = {"STAGING_DSN": db, "PROD_DSN": db, **extra_env}
    result = cli("apply", str(plan), "-e", "staging", "-q", *flags, env=env)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    _nothing_written(db, before)
    assert not (workdir / "backfill_logs").exists() or not any(
        (workdir / "backfill_logs").rglob("run.json")
    )
    soak = cli("soak", str(plan), "-e", "staging", "--run", "../x", env=env)
    assert soak.exit_code == 2
    _nothing_written(db, before)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        (
            {"discovery__sql": "SELECT id FROM items WHERE vall IS DISTINCT FROM 'new'"},
            'discovery.sql: UndefinedColumn: column "vall" does not exist',
        ),
        ({"discovery__sql": "SELEC id FROM items"}, "discovery.sql: PostgresSyntax"),
        ({"target__columns": ["valz"]}, "['valz'] do not exist"),
        ({"apply__sql": "SELECT $1::bigint[]"}, "apply.sql: the apply is a SELECT statement"),
    ],
    ids=["wrong-column", "syntax", "missing-column", "select"],
)
def test_apply_checks_its_statements_first_and_creates_nothing_when_they_do_not_fit(
    cli: Callable[..., Any], workdir: Path, db: str, over: dict[str, Any], needle: str
) -> None:
    make_items(db, 50)
    before = val(db, FINGERPRINT)
    plan = write_plan(workdir / "p.json", **over)
    result = cli("apply", str(plan), "-e", "staging", "-q", env={"STAGING_DSN": db, "PROD_DSN": db})
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "nothing was written" in result.output or "does not exist" in result.output
    assert "database refused" not in result.output
    _nothing_written(db, before)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"apply__sql": "SELECT $1::bigint[]"}, "FAIL apply.sql: the apply is a SELECT statement"),
        (
            {"apply__sql": "DELETE FROM items WHERE id = ANY($1)"},
            "FAIL apply.sql: the apply is a DELETE statement",
        ),
        (
            {"apply__sql": "UPDATE other SET v = 'x' WHERE id = ANY($1)"},
            "FAIL apply.sql: the apply updates other, not the target table public.items",
        ),
        (
            {"soak__checks": [{"name": "texty", "sql": "SELECT 'zero'::text", "pass_if": "== 0"}]},
            "FAIL soak.checks.texty.sql: the check's first column is of type text",
        ),
    ],
    ids=["select", "delete", "other-table", "text-check"],
)
def test_validate_env_refuses_an_apply_that_is_not_an_update_of_the_target_and_text_checks(
    cli: Callable[..., Any], workdir: Path, db: str, over: dict[str, Any], needle: str
) -> None:
    make_items(db, 10)
    from tests.conftest import sql

    sql(db, "CREATE TABLE other (id bigint PRIMARY KEY, v text)")
    plan = write_plan(workdir / "p.json", **over)
    result = cli("validate", str(plan), "-e", "staging", env={"STAGING_DSN": db, "PROD_DSN": db})
    assert result.exit_code == 2, result.output
    assert needle in result.output


def _with(dsn: str, *, user: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.rsplit('@', 1)[-1]}"
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


@pytest.mark.parametrize(
    ("change", "code", "needle"),
    [
        ({"user": "nobody_here"}, 2, "the server refused the login"),
        ({"database": "no_such_db"}, 2, "no such database on that server"),
    ],
    ids=["unknown-login", "missing-database"],
)
def test_a_wrong_login_or_database_is_invalid_input(
    cli: Callable[..., Any],
    workdir: Path,
    db: str,
    change: dict[str, str],
    code: int,
    needle: str,
) -> None:
    plan = write_plan(workdir / "p.json")
    dsn = _with(db, **change)
    result = cli(
        "apply", str(plan), "-e", "staging", "-q", env={"STAGING_DSN": dsn, "PROD_DSN": dsn}
    )
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert "cannot connect to environment 'staging'" in result.output


def test_an_unreachable_server_says_so(cli: Callable[..., Any], workdir: Path) -> None:
    plan = write_plan(workdir / "p.json")
    dsn = "postgresql://someone:s3cr3tpass@127.0.0.1:1/nope"
    result = cli(
        "apply", str(plan), "-e", "staging", "-q", env={"STAGING_DSN": dsn, "PROD_DSN": dsn}
    )
    assert result.exit_code == 1, result.output
    assert "the server is unreachable" in result.output
    assert "s3cr3tpass" not in result.output


def test_a_row_locking_subquery_in_the_apply_is_not_mistaken_for_an_update(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 20)
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id IN "
        "(SELECT id FROM items WHERE id = ANY($1) FOR NO KEY UPDATE OF items SKIP LOCKED) "
        "AND val IS DISTINCT FROM 'new'",
    )
    result = cli("validate", str(plan), "-e", "staging", env={"STAGING_DSN": db, "PROD_DSN": db})
    assert result.exit_code == 0, result.output
