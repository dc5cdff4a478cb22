"""The processes that work on a run (#15's first part): recorded, beating, shown by status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner import ledger
from runner.errors import WorkFailed
from runner.phases.common import HEARTBEAT_SECONDS, run_lock
from tests.conftest import make_items, run, sql, val, write_plan
from tests.helpers import env_for, run_id_of


def test_a_finished_apply_records_its_process_and_status_shows_it(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 500)
    plan = write_plan(workdir / "p.json")
    applied = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    rows = sql(db, "SELECT * FROM backfill.processes WHERE run_id = $1", run_id)
    assert len(rows) == 1
    p = rows[0]
    assert (p["env"], p["phase"], p["host"], p["pid"]) == (
        "staging",
        "apply",
        socket.gethostname(),
        os.getpid(),  # the CLI ran in this process
    )
    assert p["outcome"] == "finished"
    assert p["finished_at"] is not None
    batches = val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1", run_id)
    status = cli("status", run_id, env=env_for(db))
    assert f"process {socket.gethostname()} pid {os.getpid()} (staging apply): started" in (
        status.output
    )
    assert f"(finished); {batches} batch(es) committed" in status.output
    shown = json.loads(cli("status", run_id, "--json", env=env_for(db)).output)["processes"]
    assert [(s["phase"], s["outcome"], s["batches"]) for s in shown] == [
        ("apply", "finished", batches)
    ]
    # a command on a finished apply is a no-op, recorded as a process too
    refused = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env_for(db))
    assert refused.exit_code == 3, refused.output  # a finished apply: a no-op, recorded too
    outcomes = [r["outcome"] for r in sql(db, "SELECT outcome FROM backfill.processes")]
    assert outcomes == ["finished", "finished"]


@pytest.mark.slow
def test_a_running_apply_beats_and_a_killed_one_is_shown_as_gone(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 2000)
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND (SELECT pg_sleep(0.1)) IS NOT NULL",
        batching__size=20,
    )
    env = {
        **os.environ,
        **env_for(db),
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
        "BACKFILL_ACTOR": "operator",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "apply", str(plan), "-e", "staging", "-q"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not val(
            db,
            "SELECT count(*) FROM backfill.processes WHERE to_regclass('backfill.processes') IS NOT NULL",
        ):
            time.sleep(0.2)
        first = val(db, "SELECT heartbeat FROM backfill.processes")
        time.sleep(HEARTBEAT_SECONDS + 1.5)
        second = val(db, "SELECT heartbeat FROM backfill.processes")
        assert second > first  # it beats while its batches run
        run_id = val(db, "SELECT run_id FROM backfill.processes")
        status = cli("status", run_id, env=env_for(db))
        assert f"pid {proc.pid} (staging apply): started" in status.output, status.output
        assert "running (last heartbeat" in status.output
    finally:
        proc.kill()
        proc.wait()
    # killed: no end recorded; once silent long enough, status says so
    row = sql(db, "SELECT outcome, finished_at FROM backfill.processes")[0]
    assert (row["outcome"], row["finished_at"]) == (None, None)
    sql(db, "UPDATE backfill.processes SET heartbeat = heartbeat - interval '1 minute'")
    status = cli("status", run_id, env=env_for(db))
    assert "no heartbeat for" in status.output
    assert "killed, or its connection was lost" in status.output


def test_a_second_process_on_a_held_run_is_told_which_process_holds_it(db: str) -> None:
    make_items(db, 10)

    async def go() -> str:
        holder = await asyncpg.connect(db)
        other = await asyncpg.connect(db)
        try:
            await holder.execute(
                "INSERT INTO backfill.runs (run_id, env, plan_name, plan_digest, plan,"
                " target_table, key_columns, columns, key_types, column_types, operator)"
                " VALUES ('r1', 'staging', 'p', 'd', '{}', 'items', '{id}', '{val}', '{int}',"
                " '{text}', 'alice')"
            )
            assert await ledger.try_run_lock(holder, "r1")
            await ledger.register_process(
                holder, "r1", "box-7:4242:ab", "staging", "apply", "box-7", 4242, "alice"
            )
            try:
                async with run_lock(other, "r1", wait_seconds=0.3):
                    raise AssertionError("the lock is held: this must not run")
            except WorkFailed as e:
                return e.message
            raise AssertionError("no error")
        finally:
            await holder.close()
            await other.close()

    message = run(go)
    assert "run r1 is being worked on by another backfill process (box-7 pid 4242, apply in " in (
        message
    )
    assert "staging since " in message
    assert ", last heartbeat " in message
