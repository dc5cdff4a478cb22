"""Invariant 5: discovery and checks only read — no write, and no side effect READ ONLY lets by."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import make_items, psql_binary, sql, val, write_plan
from tests.helpers import run_id_of


def test_a_discovery_that_calls_a_writing_function_writes_nothing(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 200)
    sql(
        db,
        "CREATE TABLE audit (k bigint);"
        " CREATE FUNCTION noted(k bigint) RETURNS boolean LANGUAGE sql AS"
        " $$ INSERT INTO audit VALUES (k) RETURNING true $$",
    )
    plan = write_plan(
        workdir / "p.json",
        discovery__sql="SELECT id FROM items WHERE val IS DISTINCT FROM 'new' AND noted(id)",
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env={"STAGING_DSN": db, "PROD_DSN": db})
    assert result.exit_code == 1, result.output
    assert "cannot execute INSERT in a read-only transaction" in result.output
    assert val(db, "SELECT count(*) FROM audit") == 0
    assert val(db, "SELECT count(*) FROM items WHERE val = 'new'") == 40


def test_a_check_that_would_terminate_another_session_is_refused_before_it_runs(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 50)
    other = subprocess.Popen(
        [psql_binary(), "-X", "-d", db, "-c", "SELECT pg_sleep(60) /* bystander */"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        bystander = (
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%/* bystander */%'"
            " AND pid <> pg_backend_pid() AND datname = current_database()"
        )
        deadline = time.monotonic() + 20
        while (pid := val(db, bystander)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid is not None
        plan = write_plan(
            workdir / "p.json",
            soak__checks=[
                {
                    "name": "kills",
                    "sql": f"SELECT count(*) FROM (SELECT pg_terminate_backend({pid})) AS t",
                    "pass_if": "== 1",
                }
            ],
        )
        result = cli(
            "soak",
            str(plan),
            "-e",
            "staging",
            "--run",
            "20261122T101500Z-items_new-3fa2",
            env={"STAGING_DSN": db, "PROD_DSN": db},
        )
        assert result.exit_code == 2, result.output
        assert "soak.checks.0.sql" in result.output
        assert "pg_terminate_backend()" in result.output
        assert val(db, bystander) == pid  # still there
    finally:
        other.kill()
        other.wait()


def test_checks_run_under_the_plans_read_role(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 50)
    sql(
        db,
        "CREATE TABLE payroll (amount int); DROP ROLE IF EXISTS backfill_reader_t;"
        " CREATE ROLE backfill_reader_t; GRANT SELECT ON items TO backfill_reader_t",
    )
    env = {"STAGING_DSN": db, "PROD_DSN": db}
    plan = write_plan(
        workdir / "p.json",
        environments__staging__read_role="backfill_reader_t",
        soak__checks=[
            {
                "name": "reads_payroll",
                "sql": "SELECT count(*) FROM payroll",
                "pass_if": "== 0",
                "consecutive_error_limit": 10,
            }
        ],
    )
    applied = cli("apply", str(plan), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output  # discovery reads items as the role
    run_id = run_id_of(applied.output)
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    soaked = cli("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s", env=env)
    assert soaked.exit_code == 3, soaked.output
    detail = val(
        db, "SELECT max(detail) FROM backfill.soak_samples WHERE check_name = 'reads_payroll'"
    )
    assert "permission denied for table payroll" in detail
    sql(db, "DROP OWNED BY backfill_reader_t; DROP ROLE backfill_reader_t")
