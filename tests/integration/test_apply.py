"""Phase 1 — apply: batches, atomic before-images, scope guard, convergence, gates, resume, rate."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import make_items, psql_binary, sql, val, write_plan
from tests.helpers import env_for, ledger_totals, run_id_of

BOTH_PATHS = pytest.mark.parametrize(
    "suffix", ["", " RETURNING id"], ids=["one-statement", "capture"]
)


def test_apply_changes_exactly_the_rows_that_needed_it_writes_artifacts_and_halts(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 1000)
    untouched = sql(db, "SELECT id, updated_at FROM items WHERE val = 'new' ORDER BY id")
    plan = write_plan(workdir / "p.json")
    result = cli("apply", str(plan), "--env", "staging", "--quiet", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    assert "halted at gate apply-staging" in result.output
    assert f"backfill approve {run_id} --gate apply-staging" in result.output

    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert val(db, "SELECT count(*) FROM items WHERE updated_at = '2030-01-01'") == 800
    assert sql(db, "SELECT id, updated_at FROM items WHERE id % 5 = 0 ORDER BY id") == untouched
    assert ledger_totals(db, run_id) == {"batches": 8, "changed": 800, "noop": 0}
    assert (
        val(db, "SELECT count(*) FROM backfill.row_images WHERE run_id = $1 AND op = 'U'", run_id)
        == 800
    )
    assert (
        val(db, "SELECT count(DISTINCT key) FROM backfill.row_images WHERE run_id = $1", run_id)
        == 800
    )
    assert val(db, "SELECT before FROM backfill.row_images WHERE key = '{1}'") == [
        "old1",
        "2020-01-01 00:00:00+00",
    ]

    out = workdir / "backfill_logs" / "items_new" / run_id / "staging"
    batch = json.loads((out / "batches" / "batch_00001.json").read_text())
    assert batch["status"] == "done"
    assert batch["counts"]["changed"] == 100
    assert batch["key_range"] == {"first": ["1"], "last": ["124"]}
    results = json.loads((out / "execution_results.json").read_text())
    assert results["totals"]["changed"] == 800
    assert results["plan"]["digest"]
    assert (out / "events.jsonl").read_text().count('"event": "batch.done"') == 8
    summary = (out / "backfill_summary.md").read_text()
    assert "```mermaid\nxychart-beta" in summary
    assert "| Rows changed | 800 |" in summary
    assert f"approve {run_id} --gate apply-staging" in summary
    assert "psql -X -v ON_ERROR_STOP=1" in summary
    rollback = next(out.glob("rollback_*.sql")).read_text()
    assert "-- restores:     800 row(s) in 8 batch(es)" in rollback


def test_approve_opens_the_gate_and_refuses_self_and_outsiders(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    plan = write_plan(workdir / "p.json", gates__approvers=["alice", "operator"])
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db)).output)
    outsider = cli("approve", run_id, "--gate", "apply-staging", "--as", "mallory", env=env_for(db))
    assert outsider.exit_code == 2
    assert "not an approver" in outsider.output
    self_ = cli("approve", run_id, "--gate", "apply-staging", "--as", "operator", env=env_for(db))
    assert self_.exit_code == 2
    assert "ran this phase and may not approve it" in self_.output
    ok = cli(
        "approve",
        run_id,
        "--gate",
        "apply-staging",
        "--as",
        "alice",
        "--note",
        "looks right",
        env=env_for(db),
    )
    assert ok.exit_code == 0, ok.output
    decision = sql(db, "SELECT actor, plan_digest, report_digest FROM backfill.gate_decisions")[0]
    assert decision["actor"] == "alice"
    assert len(decision["plan_digest"]) == 64
    status = cli("status", run_id, env=env_for(db))
    assert "gate apply-staging: open — approved by alice" in status.output


def test_approval_refused_when_the_report_was_edited(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    plan = write_plan(workdir / "p.json")
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db)).output)
    summary = workdir / "backfill_logs" / "items_new" / run_id / "staging" / "backfill_summary.md"
    summary.write_text(summary.read_text() + "\nLooks fine to me.\n")
    refused = cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env_for(db))
    assert refused.exit_code == 2
    assert "not the report the runner wrote" in refused.output
    assert cli("report", run_id, env=env_for(db)).exit_code == 0
    assert (
        cli(
            "approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env_for(db)
        ).exit_code
        == 0
    )


@BOTH_PATHS
def test_apply_touching_a_row_outside_its_batch_is_rolled_back_and_named(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    make_items(db, 300)
    before = val(db, "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM items i")
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new' WHERE id = ANY($1) OR id = 5" + suffix,
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert "batch 1 (keys [1] … [124])" in result.output
    assert "outside the batch" in result.output
    assert "(keys: 5)" in result.output
    assert "rolled back" in result.output
    assert val(db, "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM items i") == before
    assert val(db, "SELECT count(*) FROM backfill.row_images") == 0
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'") == 0
    failed = sql(db, "SELECT errors FROM backfill.batches WHERE status = 'failed'")
    assert json.loads(failed[0]["errors"])[0]["category"] == "scope_violation"


@BOTH_PATHS
def test_apply_changing_an_undeclared_column_is_rolled_back_and_named(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    make_items(db, 300)
    before = val(db, "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM items i")
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new', note = 'oops' WHERE id = ANY($1)" + suffix,
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert "outside target.columns (note)" in result.output
    assert val(db, "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM items i") == before


def test_apply_of_another_table_is_caught(
    cli: Callable[..., Any], workdir: Path, bare_db: str
) -> None:
    db = bare_db  # nothing may be created, not even the ledger schema
    make_items(db, 50)
    sql(
        db,
        "CREATE TABLE other (id bigint PRIMARY KEY, v text); INSERT INTO other SELECT g, 'x' FROM generate_series(1, 50) g",
    )
    plan = write_plan(workdir / "p.json", apply__sql="UPDATE other SET v = 'y' WHERE id = ANY($1)")
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 2  # refused before the run: the statement names another table
    assert "the apply updates other, not the target table public.items" in result.output
    assert val(db, "SELECT count(*) FROM other WHERE v = 'y'") == 0
    assert val(db, "SELECT to_regnamespace('backfill')") is None


def test_discovery_that_does_not_converge_is_stopped_not_looped(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 200)
    plan = write_plan(workdir / "p.json", discovery__sql="SELECT id FROM items WHERE grp = 3")
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert "discovery does not converge" in result.output
    assert "keys: 3" in result.output
    assert val(db, "SELECT count(*) FROM backfill.row_images WHERE key = '{3}'") == 1


def test_discovery_that_does_not_converge_stops_after_its_first_batches(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """The check runs behind the workers, span by span: a discovery query the apply cannot
    satisfy is caught after the first batch, not after a pass over the whole table."""
    make_items(db, 10_000)
    plan = write_plan(workdir / "p.json", discovery__sql="SELECT id FROM items")
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert "discovery does not converge" in result.output
    assert "keys: 1; 2; 3; 4; 5" in result.output
    committed = val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'")
    assert 1 <= committed <= 10, committed  # of 100


def test_rows_arriving_behind_the_cursor_are_applied_in_another_pass(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """A row that appears in a batch's span after its page was read is found by the check of that
    span after the batch commits, and a second pass applies it (no whole-table count needed)."""
    make_items(db, 0)
    sql(
        db, "INSERT INTO items (id, grp, val) SELECT g * 10, 0, 'old' FROM generate_series(1, 40) g"
    )
    # one batch a second: the producer reads batch 2's page while batch 1 runs, then waits
    plan = write_plan(workdir / "p.json", batching__size=10, batching__batches_per_minute=60)
    inserted = threading.Event()

    def insert_into_the_next_span() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                last = val(db, "SELECT last_key FROM backfill.batches WHERE batch_no = 1")
            except asyncpg.UndefinedTableError:  # the ledger is not there yet
                last = None
            if last is not None:
                time.sleep(0.2)  # batch 2's page (ids 110-200) is read by now; it runs at ~1 s
                sql(db, "INSERT INTO items (id, grp, val) VALUES ($1, 0, 'late')", int(last[0]) + 5)
                inserted.set()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=insert_into_the_next_span)
    thread.start()
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    thread.join()
    assert inserted.is_set()
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    results = json.loads(next(workdir.rglob("execution_results.json")).read_text())
    assert results["totals"]["passes"] == 2
    assert results["totals"]["remaining"] == 0
    assert results["totals"]["changed"] == 41
    assert val(db, "SELECT batch_no FROM backfill.row_images WHERE key = '{105}'") == 5


def test_rows_already_at_the_new_value_are_recorded_as_noops(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)  # every 5th row already holds 'new'
    plan = write_plan(
        workdir / "p.json",
        target__columns=["val"],
        # returns the rows already at 'new' too, until the first batch has committed
        discovery__sql="SELECT id FROM items WHERE val IS DISTINCT FROM 'new' OR NOT EXISTS "
        "(SELECT 1 FROM backfill.batches WHERE status = 'done')",
        apply__sql="UPDATE items SET val = 'new' WHERE id = ANY($1)",
    )
    assert cli("init", str(plan), "--env", "staging", env=env_for(db)).exit_code == 0
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db)).output)
    assert ledger_totals(db, run_id) == {"batches": 1, "changed": 80, "noop": 20}
    assert (
        val(db, "SELECT count(*) FROM backfill.row_images WHERE op = 'N' AND after IS NULL") == 20
    )


def test_composite_keys_page_and_apply(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    sql(
        db,
        """CREATE TABLE pairs (tenant int, code text, v text, PRIMARY KEY (tenant, code));
               INSERT INTO pairs SELECT t, 'c' || lpad(g::text, 3, '0'), NULL
               FROM generate_series(1, 4) t, generate_series(1, 60) g""",
    )
    plan = write_plan(
        workdir / "p.json",
        target={"table": "pairs", "key": ["tenant", "code"], "columns": ["v"]},
        discovery__sql="SELECT tenant, code FROM pairs WHERE v IS NULL",
        apply__sql="UPDATE pairs SET v = tenant || ':' || code WHERE (tenant, code) IN (SELECT * FROM unnest($1::int[], $2::text[]))",
        batching__size=50,
        soak__checks=[],
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM pairs WHERE v = tenant || ':' || code") == 240
    assert sql(db, "SELECT first_key, last_key FROM backfill.batches WHERE batch_no = 2")[0][:] == (
        ["1", "c051"],
        ["2", "c040"],
    )


def test_workers_apply_without_overlap(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    make_items(db, 3000)
    plan = write_plan(workdir / "p.json", batching__workers=3, batching__size=50)
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db)).output)
    assert ledger_totals(db, run_id)["changed"] == 2400
    assert val(db, "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images") == 0
    assert val(db, "SELECT count(*) FROM items WHERE val <> 'new'") == 0


def test_rate_limit_is_achieved_within_5_percent(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 600)
    plan = write_plan(workdir / "p.json", batching__size=8, batching__batches_per_minute=600)
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db)).output)
    starts: list[datetime] = [
        r[0]
        for r in sql(
            db,
            "SELECT started_at FROM backfill.batches WHERE run_id = $1 ORDER BY started_at",
            run_id,
        )
    ]
    assert len(starts) == 60
    achieved = (len(starts) - 1) / (starts[-1] - starts[0]).total_seconds() * 60
    assert abs(achieved - 600) / 600 < 0.05, achieved


def test_lock_timeout_is_retried_and_recorded(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    holder = subprocess.Popen(
        [
            psql_binary(),
            db,
            "-c",
            "BEGIN; SELECT * FROM items WHERE id = 1 FOR UPDATE; SELECT pg_sleep(2); COMMIT;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            if val(
                db,
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE a.query LIKE '%pg_sleep%' AND l.locktype = 'transactionid'"
                " AND a.datname = current_database()",
            ):
                break
            subprocess.run(["sleep", "0.1"], check=True)
        plan = write_plan(
            workdir / "p.json", batching__lock_timeout="300ms", batching__max_retries=10
        )
        result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    finally:
        holder.wait(timeout=30)
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    errors = json.loads(
        val(db, "SELECT errors FROM backfill.batches WHERE run_id = $1 AND batch_no = 1", run_id)
    )
    assert errors
    assert {e["category"] for e in errors} == {"lock_timeout"}
    assert val(db, "SELECT attempts FROM backfill.batches WHERE batch_no = 1") == len(errors) + 1
    summary = next((workdir / "backfill_logs").rglob("backfill_summary.md")).read_text()
    assert "| lock_timeout |" in summary


def test_failing_batch_stops_with_exit_1_and_the_run_continues_after_the_fix(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 500)
    sql(
        db,
        "ALTER TABLE items ADD CONSTRAINT no_250 CHECK (id <> 251 OR val <> 'new' OR note = 'fixed')",
    )
    plan = write_plan(workdir / "p.json", batching__on_error="stop")  # not split (#12)
    failed = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert failed.exit_code == 1, failed.output
    assert "batch 3 (keys [251] … [374]) failed: constraint_violation" in failed.output
    assert (
        f"continue the run: backfill apply {plan} --env staging --run {run_id_of(failed.output)}"
        in " ".join(failed.output.split())
    )
    run_id = run_id_of(failed.output)
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'") == 2
    sql(db, "UPDATE items SET note = 'fixed' WHERE id = 251")
    resumed = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env_for(db))
    assert resumed.exit_code == 3, resumed.output
    assert val(db, "SELECT count(*) FROM items WHERE val <> 'new'") == 0
    assert val(db, "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images") == 0
    assert ledger_totals(db, run_id)["changed"] == 400
    again = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env_for(db))
    assert again.exit_code == 3
    assert ledger_totals(db, run_id)["changed"] == 400


def test_plan_changed_mid_run_is_refused(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    make_items(db, 100)
    plan = write_plan(workdir / "p.json")
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db)).output)
    write_plan(workdir / "p.json", batching__size=7)
    result = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env_for(db))
    assert result.exit_code == 2
    assert "the plan changed mid-run" in result.output


def test_dry_run_counts_estimates_explains_and_writes_nothing(
    cli: Callable[..., Any], workdir: Path, bare_db: str
) -> None:
    db = bare_db  # nothing may be created, not even the ledger schema
    make_items(db, 1000)
    plan = write_plan(
        workdir / "p.json", batching__batches_per_minute=60, discovery__time_column="grp"
    )
    result = cli("apply", str(plan), "-e", "staging", "--dry-run", env=env_for(db))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # the impact: size, the time column's span, a sample batch run and rolled back, an estimate
    assert "size: about" in text
    assert "grp: from 0 to 6" in text
    assert "sample batch: 100 row(s) in" in text
    assert "estimated duration: about 7 s with 1 worker(s)" in text  # the rate is the slower
    unsampled = cli(
        "apply", str(plan), "-e", "staging", "--dry-run", "--no-sample", env=env_for(db)
    )
    assert "no duration estimate: not sampled" in " ".join(unsampled.output.split())
    assert "rows needing the backfill: 800" in result.output
    assert "batches: 8 of 100" in result.output
    assert "at least 7 s" in result.output
    assert "Update on items" in result.output
    assert "each batch runs, in one transaction:" in result.output
    assert "$1 = the batch's id keys (bigint[])" in result.output
    assert "INSERT INTO backfill.batches" in result.output  # the ledger row, in the batch
    # the EXPLAIN shows the first keys of the batch, not all 100
    assert re.search(r"'\{1,2,3,… \d+ more\}'", result.output), result.output
    assert val(db, "SELECT count(*) FROM items WHERE val = 'new'") == 200
    assert val(db, "SELECT to_regnamespace('backfill')") is None
    assert not (workdir / "backfill_logs").exists()


def test_prod_is_not_applied_from_the_full_plan(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    plan = write_plan(workdir / "p.json")
    result = cli("apply", str(plan), "-e", "prod", env=env_for(db))
    assert result.exit_code == 2
    assert "applied from the mini plan" in result.output
    result = cli("apply", str(plan), "-e", "qa", env=env_for(db))
    assert result.exit_code == 2
    assert "'qa' has no stage" in result.output


@pytest.mark.parametrize(
    ("suffix", "retries"),
    [("", []), (" RETURNING id", ["serialization"])],
    ids=["one-statement path: the update re-checks the new version", "capture path: a retry"],
)
def test_a_row_changed_between_capture_and_apply_is_imaged_as_it_was_replaced(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str, retries: list[str]
) -> None:
    make_items(db, 20)
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND (SELECT pg_sleep(2)) IS NOT NULL" + suffix,
    )
    writer = subprocess.Popen(
        [
            "bash",
            "-c",
            f"sleep 1; {psql_binary()} '{db}' -Atc \"UPDATE items SET val = 'app wrote' WHERE id = 2\"",
        ],
        stdout=subprocess.DEVNULL,
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    writer.wait(timeout=30)
    assert result.exit_code == 3, result.output
    errors = json.loads(val(db, "SELECT errors FROM backfill.batches WHERE batch_no = 1"))
    if int(val(db, "SHOW server_version_num")) < 180000:  # no one-statement path before 18
        retries = ["serialization"]
    assert [e["category"] for e in errors] == retries
    assert val(db, "SELECT before FROM backfill.row_images WHERE key = '{2}'")[0] == "app wrote"
    assert val(db, "SELECT val FROM items WHERE id = 2") == "new"


def test_a_discovery_that_fails_at_run_time_is_a_clear_error_not_a_crash(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 300)
    plan = write_plan(
        workdir / "p.json", discovery__sql="SELECT id FROM items WHERE 1 / (id - 250) > -100"
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert (
        "the database refused a statement: DivisionByZeroError: division by zero" in result.output
    )
    assert "internal error" not in result.output
    # the count before the run reads all of discovery, so it fails before any batch changes a row
    assert val(db, "SELECT count(*) FROM items WHERE val = 'new'") == 60


def test_a_discovery_and_an_apply_ending_in_a_comment_run(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 200)
    plan = write_plan(
        workdir / "p.json",
        discovery__sql="SELECT id FROM items WHERE val IS DISTINCT FROM 'new' -- rows still old",
        apply__sql="UPDATE items SET val = 'new' WHERE id = ANY($1) -- set them",
        target__columns=["val"],
    )
    checked = cli("validate", str(plan), "--env", "staging", env=env_for(db))
    assert checked.exit_code == 0, checked.output
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM items WHERE val <> 'new'") == 0


def test_max_rows_caps_each_command_exactly_and_the_next_one_continues(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 5000)
    needing = val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'")
    plan = write_plan(workdir / "p.json", batching__size=300, batching__workers=2)
    first = cli("apply", str(plan), "-e", "staging", "--max-rows", "2000", env=env_for(db))
    assert first.exit_code == 0, first.output
    assert "capped" in first.output
    run_id = run_id_of(first.output)
    changed = "SELECT count(*) FROM items WHERE val = 'new'"
    already = 1000  # make_items: every fifth row is already 'new'
    assert val(db, changed) == already + 2000  # exactly: the last page is cut to fit
    status = json.loads(cli("status", run_id, "--json", env=env_for(db)).output)
    assert status["steps"][0]["state"] == "capped"
    second = cli(
        "apply", str(plan), "-e", "staging", "--run", run_id, "--max-rows", "2000", env=env_for(db)
    )
    assert second.exit_code == 0, second.output
    assert val(db, changed) == already + 4000
    last = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env_for(db))
    assert last.exit_code == 3, last.output
    assert val(db, changed) == 5000
    assert ledger_totals(db, run_id)["changed"] == needing
    # a plan's own cap stops the pipeline too, at the same place
    make_items_again = "UPDATE items SET val = 'old' WHERE id % 2 = 0"
    sql(db, make_items_again)
    capped_plan = write_plan(workdir / "c.json", batching__size=300, batching__max_rows_per_run=700)
    piped = cli("pipeline", str(capped_plan), env=env_for(db))
    assert piped.exit_code == 0, piped.output
    assert "capped after 700 row(s)" in piped.output


def test_the_manifest_lists_each_batchs_changed_keys_and_report_writes_it_again(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 300)
    plan = write_plan(workdir / "p.json", batching__size=100)
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", env=env_for(db)).output)
    path = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/manifest.jsonl"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["batch_no"] for e in lines] == [1, 2, 3]
    assert sum(e["changed"] for e in lines) == 240  # every fifth row already held 'new'
    keys = sorted(int(k[0]) for e in lines for k in e["keys"])
    expected = [r[0] for r in sql(db, "SELECT id FROM items WHERE id % 5 <> 0 ORDER BY id")]
    assert keys == expected
    assert all(e["table"] == "public.items" and len(e["keys_md5"]) == 32 for e in lines)
    before = path.read_bytes()
    path.unlink()
    assert cli("report", run_id, env=env_for(db)).exit_code == 0
    assert path.read_bytes() == before


def test_a_read_on_a_connection_a_restart_closed_is_a_lost_connection_not_an_internal_error(
    db: str,
) -> None:
    """asyncpg answers is_in_transaction() on a closed connection with an AttributeError, which
    stopped an apply a PostgreSQL restart should only have delayed (the callers reconnect on a
    lost connection, never on an internal error)."""
    from runner.engine.discovery import read_only
    from runner.engine.executor import classify

    async def go() -> str:
        conn = await asyncpg.connect(db)
        conn.terminate()
        try:
            async with read_only(conn):
                raise AssertionError("must not run on a closed connection")
        except Exception as exc:
            return classify(exc)
        return "no error"

    from tests.conftest import run

    assert run(go) == "connection_lost"
