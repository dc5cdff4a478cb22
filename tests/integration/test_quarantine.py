"""#12: past bad rows: split down to single keys, quarantine, the failure budget, retry, checks
after the apply; on both batch paths (the capture path also runs on PostgreSQL 15 in CI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_items, sql, val, write_plan
from tests.helpers import differing, env_for, rollback_file, run_id_of, run_psql, snapshot

BOTH_PATHS = pytest.mark.parametrize(
    "suffix", ["", " RETURNING id"], ids=["one-statement", "capture"]
)

# `raw` is what the apply parses: 'abc' does not (SQLSTATE 22P02)
POISON_APPLY = (
    "UPDATE items SET val = 'new', updated_at = '2030-01-01'::timestamptz "
    "+ (raw::int * interval '0 s') WHERE id = ANY($1) AND val IS DISTINCT FROM 'new'"
)


def poisoned_items(db: str, n: int, every: int) -> list[int]:
    """`n` items, every `every`-th one (of those needing the backfill) unparseable; its ids."""
    make_items(db, n)
    sql(
        db,
        "ALTER TABLE items ADD COLUMN raw text; UPDATE items SET raw = id::text;"
        f" UPDATE items SET raw = 'abc' WHERE id IN (SELECT id FROM (SELECT id, row_number()"
        f" OVER (ORDER BY id) AS r FROM items WHERE val IS DISTINCT FROM 'new') AS n"
        f" WHERE r % {every} = 0)",
    )
    return [r["id"] for r in sql(db, "SELECT id FROM items WHERE raw = 'abc' ORDER BY id")]


def quarantined(db: str, run_id: str) -> list[tuple[str, str]]:
    return [
        (r["key"][0], r["sqlstate"])
        for r in sql(
            db,
            "SELECT key, sqlstate FROM backfill.quarantine WHERE run_id = $1"
            " ORDER BY key[1]::bigint",
            run_id,
        )
    ]


@BOTH_PATHS
def test_poison_rows_are_quarantined_once_and_every_good_row_changes(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    poison = poisoned_items(db, 3000, 100)
    assert len(poison) == 24
    plan = write_plan(
        workdir / "p.json", apply__sql=POISON_APPLY + suffix, batching__min_failure_sample=100
    )
    result = cli("apply", str(plan), "--env", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 24
    assert [r["id"] for r in sql(db, "SELECT id FROM items WHERE val <> 'new' ORDER BY id")] == (
        poison
    )
    assert quarantined(db, run_id) == [(str(p), "22P02") for p in poison]
    assert val(db, "SELECT criteria FROM backfill.phases WHERE run_id = $1", run_id) == (
        "inconclusive"
    )
    out = workdir / "backfill_logs" / "items_new" / run_id / "staging"
    data = json.loads((out / "quarantine.json").read_text())
    assert data["open"] == 24
    assert "invalid input syntax for type integer" in data["keys"][0]["message"]
    summary = (out / "backfill_summary.md").read_text()
    assert "## Quarantine" in summary
    assert "| `22P02` | 24 |" in summary


@pytest.mark.slow
def test_one_percent_poison_in_50k_rows_is_quarantined_and_the_criteria_show_it(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    poison = poisoned_items(db, 50_000, 100)  # 40k rows need the backfill: 400 poison (1 %)
    assert len(poison) == 400
    plan = write_plan(
        workdir / "p.json",
        apply__sql=POISON_APPLY,
        batching__size=1000,
        batching__workers=2,
    )
    result = cli("apply", str(plan), "--env", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 400
    assert quarantined(db, run_id) == [(str(p), "22P02") for p in poison]
    assert val(db, "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1", run_id) == 39_600
    assert val(db, "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images") == 0
    assert val(db, "SELECT criteria FROM backfill.phases WHERE run_id = $1", run_id) == (
        "inconclusive"
    )
    summary = next((workdir / "backfill_logs").rglob("backfill_summary.md")).read_text()
    assert "400 key(s) quarantined (1.00% of 40,000 row(s) attempted, within" in summary


@BOTH_PATHS
def test_poison_past_the_failure_budget_stops_with_exit_1_naming_it(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    poisoned_items(db, 5000, 33)  # 3 %
    plan = write_plan(workdir / "p.json", apply__sql=POISON_APPLY + suffix)
    result = cli("apply", str(plan), "--env", "staging", "-q", env=env_for(db))
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "the failure budget is spent" in said
    assert "over batching.max_failure_rate = 1.00%" in said
    assert "most common error: SQLSTATE 22P02" in said
    assert "invalid input syntax for type integer" in said
    run_id = run_id_of(result.output)
    # stopped early: the budget is judged once the minimum sample (1000 rows) was attempted
    assert val(db, "SELECT count(*) FROM backfill.quarantine WHERE run_id = $1", run_id) < 60
    assert val(db, "SELECT finished_at FROM backfill.phases WHERE run_id = $1", run_id) is None


@BOTH_PATHS
def test_a_permission_error_stops_at_once_without_splitting(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    make_items(db, 500)
    sql(
        db,
        "CREATE FUNCTION guarded(id bigint) RETURNS text LANGUAGE plpgsql AS $$ BEGIN"
        " IF id = 251 THEN RAISE EXCEPTION 'permission denied for table payroll'"
        " USING ERRCODE = 'insufficient_privilege'; END IF; RETURN 'new'; END $$",
    )
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = guarded(id), updated_at = '2030-01-01' "
        "WHERE id = ANY($1) AND val IS DISTINCT FROM 'new'" + suffix,
    )
    result = cli("apply", str(plan), "--env", "staging", "-q", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert "permission denied for table payroll" in result.output
    run_id = run_id_of(result.output)
    assert sql(db, "SELECT batch_no, status, attempts FROM backfill.batches ORDER BY batch_no") == [
        (1, "done", 1),
        (2, "done", 1),
        (3, "failed", 1),
    ]
    assert val(db, "SELECT count(*) FROM backfill.quarantine WHERE run_id = $1", run_id) == 0


@BOTH_PATHS
def test_retry_after_fixing_the_data_finishes_the_run(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    poison = poisoned_items(db, 5000, 33)
    plan = write_plan(workdir / "p.json", apply__sql=POISON_APPLY + suffix)
    env = env_for(db)
    stopped = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert stopped.exit_code == 1, stopped.output
    run_id = run_id_of(stopped.output)
    listed = cli("quarantine", run_id, "--env", "staging", env=env)
    assert listed.exit_code == 0, listed.output
    assert "22P02" in listed.output
    still = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert still.exit_code == 1, still.output  # nothing fixed yet: quarantined again
    assert "0 committed" in still.output
    assert val(db, "SELECT min(attempts) FROM backfill.quarantine WHERE run_id = $1", run_id) == 2
    # where it failed last: the retry's stage and batch
    assert {
        r[0] for r in sql(db, "SELECT stage FROM backfill.quarantine WHERE run_id = $1", run_id)
    } == {"retry"}

    sql(db, "UPDATE items SET raw = '0' WHERE raw = 'abc'")
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert retried.exit_code == 0, retried.output
    assert "0 still quarantined" in retried.output
    finished = cli("apply", str(plan), "--env", "staging", "-q", "--run", run_id, env=env)
    assert finished.exit_code == 3, finished.output
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert val(db, "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images") == 0
    assert val(db, "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1", run_id) == 4000
    assert val(db, "SELECT count(*) FROM backfill.quarantine WHERE released_at IS NULL") == 0
    assert val(db, "SELECT criteria FROM backfill.phases WHERE run_id = $1", run_id) == "pass"
    released = json.loads(next((workdir / "backfill_logs").rglob("quarantine.json")).read_text())
    assert released["open"] == 0
    assert released["keys"]
    assert all(k["released_at"] and k["attempts"] == 2 for k in released["keys"])
    assert len(poison) == 121


@BOTH_PATHS
@pytest.mark.parametrize("how", ["runner", "psql"])
def test_rollback_of_a_run_with_quarantined_rows_restores_exactly_what_changed(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str, how: str
) -> None:
    poisoned_items(db, 3000, 100)
    snapshot(db, "items")
    plan = write_plan(
        workdir / "p.json", apply__sql=POISON_APPLY + suffix, batching__min_failure_sample=100
    )
    env = env_for(db)
    result = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    assert differing(db, "items") == 2376
    if how == "runner":
        undone = cli("rollback", run_id, "--env", "staging", env=env)
        assert undone.exit_code == 0, undone.output
        assert "restored 2,376 row(s)" in undone.output
    else:
        ran = run_psql(db, rollback_file(workdir, run_id))
        assert ran.returncode == 0, ran.stderr
        assert "| t\n" in ran.stdout  # checksum_matches
    assert differing(db, "items") == 0


def test_checks_after_the_apply_are_shown_and_a_failing_one_fails_the_criteria(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 300)
    plan = write_plan(
        workdir / "p.json",
        verify=[
            {
                "name": "all_new",
                "sql": "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'",
                "pass_if": "== 0",
            },
            {
                "name": "unique_vals",
                "description": "no duplicate values",
                "sql": "SELECT count(*) - count(DISTINCT val) FROM items",
                "pass_if": "== 0",
            },
        ],
    )
    result = cli("apply", str(plan), "--env", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    assert val(db, "SELECT criteria FROM backfill.phases WHERE run_id = $1", run_id) == "fail"
    summary = next((workdir / "backfill_logs").rglob("backfill_summary.md")).read_text()
    assert "## Checks after the apply" in summary
    assert "| `all_new` | 0 | == 0 | **pass** |" in summary
    assert "| `unique_vals` — no duplicate values | 299 | == 0 | **fail** |" in summary
    assert "Criteria: **fail** (approving needs `--override` with a note)" in summary
    plain = cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env_for(db))
    assert plain.exit_code != 0
    assert "override" in plain.output


def test_sigkill_in_the_middle_of_a_split_resumes_without_losing_or_doubling_a_row(
    workdir: Path, db: str
) -> None:
    poison = poisoned_items(db, 2000, 50)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=POISON_APPLY + " AND (SELECT pg_sleep(0.03)) IS NOT NULL",  # once a statement
        batching__size=400,
        batching__min_failure_sample=100,
        batching__max_failure_rate=0.05,
    )
    env = {
        **os.environ,
        **env_for(db),
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
        "BACKFILL_ACTOR": "operator",
        "BACKFILL_CMD": "backfill",
    }
    with (workdir / "runner.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "apply", str(plan), "--env", "staging", "-q"],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # parts of batch 1 committed, batch 1 not settled
            parts = (
                sql(
                    db,
                    "SELECT count(*) FILTER (WHERE batch_no > 1 AND status = 'done') AS parts,"
                    " count(*) FILTER (WHERE batch_no = 1) AS top,"
                    " count(*) FILTER (WHERE status = 'quarantined') AS q FROM backfill.batches",
                )[0]
                if val(db, "SELECT to_regclass('backfill.batches') IS NOT NULL")
                else None
            )
            if parts and parts["parts"] >= 2 and parts["q"] >= 1 and parts["top"] == 0:
                break
            assert proc.poll() is None, (workdir / "runner.log").read_text()
            time.sleep(0.01)
        else:
            pytest.fail(f"never saw a split in progress; last seen {parts}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    run_id = next((workdir / "backfill_logs" / "items_new").iterdir()).name
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE batch_no = 1") == 0
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "apply",
            str(plan),
            "--env",
            "staging",
            "-q",
            "--run",
            run_id,
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert resumed.returncode == 3, resumed.stdout + resumed.stderr
    assert [r["id"] for r in sql(db, "SELECT id FROM items WHERE val <> 'new' ORDER BY id")] == (
        poison
    )
    assert quarantined(db, run_id) == [(str(p), "22P02") for p in poison]
    assert val(db, "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images") == 0
    assert val(db, "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1", run_id) == (
        1600 - len(poison)
    )


def test_malformed_snapshots_of_a_shaped_backfill_are_quarantined_and_the_rest_undone_exactly(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    from tests.integration.test_shapes import SCHEMA, TABLES, _all_back, keep, shaped_plan

    sql(db, SCHEMA.format(n=500))
    sql(
        db,
        "UPDATE snaps SET raw = jsonb_set(raw, '{troops,0,amount}', '\"abc\"') WHERE id % 50 = 7",
    )
    keep(db, *TABLES)
    plan = shaped_plan(workdir / "p.json", batching__size=64, batching__max_failure_rate=0.05)
    env = env_for(db)
    applied = cli("apply", str(plan), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    poison = [str(i) for i in range(7, 501, 50)]
    assert quarantined(db, run_id) == [(p, "22P02") for p in poison]
    assert [str(r["id"]) for r in sql(db, "SELECT id FROM snaps WHERE processed_at IS NULL")] == (
        poison
    )
    undone = cli("rollback", run_id, "--env", "staging", env=env)
    assert undone.exit_code == 0, undone.output
    assert "verified" in undone.output
    _all_back(db)
