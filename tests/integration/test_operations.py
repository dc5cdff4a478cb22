"""What operators live through: a killed process's embedded server, a dropped connection, the
ledger's install, pacing in rows per second, and undoing the demo with psql."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from runner.db import dsn_with_database
from runner.ledger import MIGRATIONS
from tests.conftest import make_items, psql_binary, sql, val, write_plan
from tests.helpers import CHECKSUM, DEMO_PLAN, env_for, run_id_of, seed_demo, start_runner


def _postmaster_pid(home: Path) -> int | None:
    pidfile = home / "pgdata" / "postmaster.pid"
    if not pidfile.exists():
        return None
    pid = int(pidfile.read_text().splitlines()[0])
    return pid if psutil.pid_exists(pid) else None


@pytest.mark.slow
def test_a_server_left_by_a_killed_process_is_adopted_and_stopped(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "BACKFILL_HOME": str(home), "BACKFILL_LOGS": str(tmp_path / "logs")}
    plan = write_plan(
        tmp_path / "p.json",
        environments={"staging": {"dsn": "embedded"}, "prod": {"dsn": "embedded"}},
    )
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from runner.db import EmbeddedServer as E; "
            f"E(__import__('pathlib').Path({str(home)!r})).start(); print('up', flush=True); time.sleep(600)",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "up"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    left = _postmaster_pid(home)
    assert left is not None, "the killed process should have left its server running"
    result = subprocess.run(
        [sys.executable, "-m", "runner", "init", str(plan), "--env", "staging"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"version {len(MIGRATIONS)}" in result.stdout
    for _ in range(50):
        if _postmaster_pid(home) is None:
            break
        time.sleep(0.1)
    assert _postmaster_pid(home) is None, (
        "the adopted server should be stopped when the command ends"
    )


def test_init_creates_the_ledger_once(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    plan = write_plan(workdir / "p.json")
    for _ in range(2):
        result = cli("init", str(plan), "-e", "staging", env=env_for(db))
        assert result.exit_code == 0, result.output
    assert val(
        db, "SELECT array_agg(version ORDER BY version) FROM backfill.schema_version"
    ) == list(range(1, len(MIGRATIONS) + 1))
    tables = {
        r[0]
        for r in sql(
            db, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'backfill'"
        )
    }
    assert {
        "runs",
        "batches",
        "batch_images",
        "row_images",
        "gate_decisions",
        "soak_samples",
        "phases",
    } <= tables


def test_a_newer_ledger_is_refused(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    plan = write_plan(workdir / "p.json")
    cli("init", str(plan), "-e", "staging", env=env_for(db))
    sql(db, "INSERT INTO backfill.schema_version (version) VALUES (99)")
    result = cli("init", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 2
    assert "newer than this backfill knows" in result.output


@pytest.mark.slow
def test_a_dropped_connection_is_retried_and_nothing_is_applied_twice(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 600)
    plan = write_plan(
        workdir / "p.json",
        batching__size=50,
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND pg_sleep(0.005) IS NOT NULL",
    )
    killer = subprocess.Popen(
        [
            "bash",
            "-c",
            f"for i in 1 2 3; do sleep 0.6; {psql_binary()} '{db}' -Atc "
            '"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity '
            "WHERE query LIKE '%UPDATE items SET%' AND state = 'active' AND pid <> pg_backend_pid()"
            ' AND datname = current_database()"; done',
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    out, _ = killer.communicate(timeout=30)
    assert result.exit_code == 3, result.output
    assert sum(int(x) for x in out.split()) >= 1, (
        "no connection was dropped: the test proves nothing"
    )
    run_id = run_id_of(result.output)
    lost = [
        json.loads(r[0])
        for r in sql(db, "SELECT errors FROM backfill.batches WHERE errors <> '[]'")
    ]
    assert any(e["category"] == "connection_lost" for errors in lost for e in errors)
    assert val(db, "SELECT count(*) FROM items WHERE val <> 'new'") == 0
    assert (
        val(db, "SELECT count(*) FROM backfill.row_images WHERE run_id = $1 AND op = 'U'", run_id)
        == 480
    )
    assert (
        val(db, "SELECT count(DISTINCT key) FROM backfill.row_images WHERE run_id = $1", run_id)
        == 480
    )


def test_rows_per_second_paces_the_apply(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    make_items(db, 500)
    # 10 batches a second: a batch's own work (~5 ms) stays well inside its 100 ms on a busy machine
    plan = write_plan(workdir / "p.json", batching__size=20, batching__rows_per_second=200)
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db)).output)
    starts: list[datetime] = [
        r[0]
        for r in sql(
            db,
            "SELECT started_at FROM backfill.batches WHERE run_id = $1 ORDER BY started_at",
            run_id,
        )
    ]
    assert len(starts) == 20
    rows_after_first = 19 * 20
    achieved = rows_after_first / (starts[-1] - starts[0]).total_seconds()
    assert abs(achieved - 200) / 200 < 0.05, achieved


@pytest.mark.slow
def test_demo_apply_is_undone_exactly_by_psql_and_by_the_runner(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    seed_demo(db, rows=3000)
    before = val(db, CHECKSUM.format(table="profiles"))
    result = cli("apply", str(DEMO_PLAN), "-e", "staging", "-q", env=env_for(db))
    run_id = run_id_of(result.output)
    assert val(db, CHECKSUM.format(table="profiles")) != before
    rollback = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/rollback_*.sql"))
    done = subprocess.run(
        [psql_binary(), "-X", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", str(rollback)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert val(db, CHECKSUM.format(table="profiles")) == before
    assert " t\n" in done.stdout  # checksum_matches
    # and once more, through the runner this time
    again = cli("apply", str(DEMO_PLAN), "-e", "staging", "-q", env=env_for(db))
    second = run_id_of(again.output)
    undone = cli("rollback", second, "-e", "staging", env=env_for(db))
    assert undone.exit_code == 0, undone.output
    assert "checksum verified" in undone.output
    assert val(db, CHECKSUM.format(table="profiles")) == before


@pytest.mark.slow
def test_status_after_ctrl_c_says_interrupted_what_was_kept_and_how_to_continue(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 2000)
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND pg_sleep(0.005) IS NOT NULL",
        batching__size=20,
    )
    proc = start_runner(["apply", str(plan), "--env", "staging", "--quiet"], workdir, db)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if val(db, "SELECT to_regclass('backfill.batches') IS NOT NULL") and val(
            db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'"
        ):
            break
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    run_id = val(db, "SELECT run_id FROM backfill.runs")
    committed = val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'")
    assert 0 < committed < 100
    status = cli("status", run_id, env=env_for(db))
    assert status.exit_code == 0, status.output
    text = " ".join(status.output.split())
    assert f"apply on staging interrupted ({committed} batch(es) committed" in text, text
    assert f"next: continue the interrupted apply: backfill pipeline {plan} --run {run_id}" in text


def test_status_shows_an_unreachable_prod_and_each_decision_once(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 200)
    plan = write_plan(workdir / "p.json")
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    run_id = run_id_of(result.output)
    approved = cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env_for(db))
    assert approved.exit_code == 0, approved.output
    shared = cli("status", run_id, env=env_for(db))  # staging and prod in one database
    assert shared.exit_code == 0, shared.output
    assert shared.output.count("decision: apply-staging approve") == 1
    missing = dsn_with_database(db, "no_such_database")
    status = cli("status", run_id, env=env_for(db, prod=missing))
    assert status.exit_code == 0, status.output
    text = " ".join(status.output.split())
    assert "health on prod unknown:" in text
    assert "no such database" in text


def test_status_json_gives_scripts_each_phase_gate_decision_and_the_next_command(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 200)
    plan = write_plan(workdir / "p.json")
    run_id = run_id_of(cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db)).output)
    waiting = json.loads(cli("status", run_id, "--json", env=env_for(db)).output)
    assert waiting["run_id"] == run_id
    first = waiting["steps"][0]
    assert (first["phase"], first["env"], first["state"]) == ("apply", "staging", "finished")
    assert first["gate"]["name"] == "apply-staging"
    assert first["gate"]["status"] == "waiting"
    assert [s["state"] for s in waiting["steps"][1:]] == ["not-run"] * 4
    assert waiting["next"].startswith("review ")
    assert f"approve {run_id} --gate apply-staging" in waiting["next"]
    cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env_for(db))
    approved = json.loads(cli("status", run_id, "--json", env=env_for(db)).output)
    assert approved["steps"][0]["gate"]["status"] == "open"
    assert [(d["gate"], d["decision"], d["actor"]) for d in approved["decisions"]] == [
        ("apply-staging", "approve", "alice")
    ]
    datetime.fromisoformat(approved["decisions"][0]["at"])
    listed = json.loads(cli("status", "--json", env=env_for(db)).output)
    assert [r["run_id"] for r in listed] == [run_id]


def test_params_are_typed_recorded_shown_and_bound_by_the_gate(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 300)
    plan = write_plan(
        workdir / "p.json",
        params={"since": {"type": "int", "default": "0", "description": "first id to backfill"}},
        discovery__sql="SELECT id FROM items WHERE id >= ${since} AND val IS DISTINCT FROM 'new'",
    )
    env = env_for(db)
    bad = cli("--param", "since=yesterday", "apply", str(plan), "-e", "staging", env=env)
    assert bad.exit_code == 2, bad.output
    assert "params.since = 'yesterday': not a int" in bad.output
    assert val(db, "SELECT to_regclass('backfill.runs') IS NOT NULL")  # template's empty ledger
    assert val(db, "SELECT count(*) FROM backfill.runs") == 0
    shown = cli("--param", "since=100", "validate", str(plan), env=env)
    assert "param since (int) = 100 — first id to backfill" in shown.output, shown.output
    applied = cli("--param", "since=100", "apply", str(plan), "-e", "staging", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert val(db, "SELECT count(*) FROM items WHERE id < 100 AND val = 'new'") == 19  # untouched
    summary = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/backfill_summary.md"))
    assert "`since` = 100" in summary.read_text()  # shown, not masked: a param is never secret
    approved = cli(
        "--param",
        "since=100",
        "approve",
        run_id,
        "--gate",
        "apply-staging",
        "--as",
        "alice",
        env=env,
    )
    assert approved.exit_code == 0, approved.output
    # the approval of since=100 does not open the gate for since=200
    other = json.loads(cli("--param", "since=200", "status", run_id, "--json", env=env).output)
    assert other["steps"][0]["gate"]["status"] != "open"
    same = json.loads(cli("--param", "since=100", "status", run_id, "--json", env=env).output)
    assert same["steps"][0]["gate"]["status"] == "open"
