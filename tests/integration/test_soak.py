"""Phase 2 — soak: read-only checks over time, verdicts, early failure, resume, and its gate."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_items, sql, val, write_plan
from tests.helpers import DEMO_PLAN, env_for, run_id_of, seed_demo


def _applied_and_approved(cli: Callable[..., Any], db: str, plan: Path | str) -> str:
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    approved = cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env_for(db))
    assert approved.exit_code == 0, approved.output
    return run_id


def _soak(cli: Callable[..., Any], db: str, plan: Path | str, run_id: str, *flags: str) -> Any:
    return cli("soak", str(plan), "-e", "staging", "--run", run_id, *flags, env=env_for(db))


def test_demo_soak_after_an_approved_apply_passes_and_writes_its_report(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    seed_demo(db)
    refused = cli(
        "soak",
        str(DEMO_PLAN),
        "-e",
        "staging",
        "--run",
        "20261122T000000Z-profiles_results_v1_2_1-0000",
        env=env_for(db),
    )
    assert refused.exit_code == 2
    assert "has no apply" in refused.output
    result = cli("apply", str(DEMO_PLAN), "-e", "staging", "-q", env=env_for(db))
    run_id = run_id_of(result.output)
    waiting = _soak(cli, db, DEMO_PLAN, run_id, "--duration", "2s")
    assert waiting.exit_code == 3
    assert "gate apply-staging is waiting" in waiting.output
    assert f"approve {run_id} --gate apply-staging" in waiting.output
    cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env_for(db))
    soaked = _soak(cli, db, DEMO_PLAN, run_id, "--duration", "2s", "--interval", "1s")
    assert soaked.exit_code == 3, soaked.output
    assert "verdict PASS" in soaked.output
    assert "halted at gate soak-staging" in soaked.output
    report = (
        workdir
        / "backfill_logs"
        / "profiles_results_v1_2_1"
        / run_id
        / "staging"
        / "staging_observability.md"
    ).read_text()
    assert report.startswith("# Soak report")
    assert "**Verdict: PASS**" in report
    assert "| `conversion_rate` |" in report
    assert "baseline" in report
    assert report.count("xychart-beta") == 4
    assert "| connections in use / max_connections |" in report
    assert f"approve {run_id} --gate soak-staging" in report
    assert val(db, "SELECT count(DISTINCT sample_no) FROM backfill.soak_samples") >= 2
    assert (
        val(db, "SELECT count(*) FROM backfill.soak_samples WHERE check_name = 'db.lock_waiters'")
        >= 2
    )


def test_demo_regression_fails_the_soak_early_with_exit_4(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    seed_demo(db)
    run_id = _applied_and_approved(cli, db, DEMO_PLAN)
    sql(
        db,
        "INSERT INTO telemetry_events (kind, engine_version) VALUES ('engine_version_override', 'v1.1')",
    )
    failed = _soak(cli, db, DEMO_PLAN, run_id, "--duration", "10m", "--interval", "1s")
    assert failed.exit_code == 4, failed.output
    assert "verdict FAIL" in failed.output
    assert "version_overrides failed 1 time(s)" in failed.output
    assert (
        val(db, "SELECT max(sample_no) FROM backfill.soak_samples") == 1
    )  # it did not wait out the window
    no_override = cli("approve", run_id, "--gate", "soak-staging", "--as", "bob", env=env_for(db))
    assert no_override.exit_code == 4
    assert "approval alone cannot open it" in no_override.output
    forced = cli(
        "approve",
        run_id,
        "--gate",
        "soak-staging",
        "--as",
        "bob",
        "--override",
        "--note",
        "override events come from a test client",
        env=env_for(db),
    )
    assert forced.exit_code == 0, forced.output
    assert (
        val(db, "SELECT override FROM backfill.gate_decisions WHERE gate = 'soak-staging'") is True
    )


def test_a_check_that_writes_is_refused_and_writes_nothing(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    sql(
        db, "CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql AS $$ DELETE FROM items; SELECT 1 $$"
    )
    plan = write_plan(
        workdir / "p.json",
        soak__checks=[
            {
                "name": "deletes",
                "sql": "WITH d AS (DELETE FROM items RETURNING 1) SELECT count(*) FROM d",
                "pass_if": "== 0",
                "consecutive_error_limit": 10,
            },
            {
                "name": "calls_writer",
                "sql": "SELECT sneaky()",
                "pass_if": "== 1",
                "consecutive_error_limit": 10,
            },
        ],
    )
    run_id = _applied_and_approved(cli, db, plan)
    result = _soak(cli, db, plan, run_id, "--duration", "1s", "--interval", "1s")
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM items") == 100
    details = {
        r["check_name"]: r["detail"]
        for r in sql(
            db, "SELECT check_name, detail FROM backfill.soak_samples WHERE outcome = 'error'"
        )
    }
    assert "data-modifying" in details["deletes"]  # refused before it can run at all
    assert "cannot execute DELETE in a read-only transaction" in details["calls_writer"]
    assert "verdict INCONCLUSIVE" in result.output


def test_no_data_is_inconclusive_and_approval_then_needs_a_note(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 50)
    plan = write_plan(
        workdir / "p.json",
        soak__checks=[
            {"name": "nothing", "sql": "SELECT max(id) FROM items WHERE id < 0", "pass_if": "== 0"},
        ],
    )
    run_id = _applied_and_approved(cli, db, plan)
    result = _soak(cli, db, plan, run_id, "--duration", "1s")
    assert result.exit_code == 3
    assert "verdict INCONCLUSIVE" in result.output
    bare = cli("approve", run_id, "--gate", "soak-staging", "--as", "bob", env=env_for(db))
    assert bare.exit_code == 2
    assert "needs a --note" in bare.output
    noted = cli(
        "approve",
        run_id,
        "--gate",
        "soak-staging",
        "--as",
        "bob",
        "--note",
        "no negative ids exist",
        env=env_for(db),
    )
    assert noted.exit_code == 0


@pytest.mark.slow
def test_interrupted_soak_resumes_with_the_time_already_observed(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 50)
    plan = write_plan(workdir / "p.json")
    run_id = _applied_and_approved(cli, db, plan)
    env = {
        **os.environ,
        "STAGING_DSN": db,
        "PROD_DSN": db,
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
    }
    args = [
        sys.executable,
        "-m",
        "runner",
        "soak",
        str(plan),
        "-e",
        "staging",
        "--run",
        run_id,
        "--duration",
        "6s",
        "--interval",
        "1s",
    ]
    with (workdir / "soak.log").open("ab") as log:
        proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=log)
    time.sleep(4)
    proc.kill()
    proc.wait()
    first = val(db, "SELECT max(sample_no) FROM backfill.soak_samples")
    observed = val(
        db, "SELECT (result->>'observed_seconds')::float8 FROM backfill.phases WHERE phase = 'soak'"
    )
    assert first >= 1
    assert observed > 0
    done = subprocess.run(
        args, cwd=workdir, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 3, done.stdout + done.stderr
    final = sql(
        db,
        "SELECT (result->>'observed_seconds')::float8 AS seen, result->>'window_start' AS start "
        "FROM backfill.phases WHERE phase = 'soak'",
    )[0]
    assert final["seen"] >= 6
    samples = [
        r[0] for r in sql(db, "SELECT DISTINCT sample_no FROM backfill.soak_samples ORDER BY 1")
    ]
    assert samples == list(range(1, len(samples) + 1))
    assert len(samples) > first
    # the resumed soak counted the time already observed: fewer samples than a fresh 6 s window
    assert len(samples) - first < 7
