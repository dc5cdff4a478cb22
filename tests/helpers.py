"""Helpers the integration tests share: running the CLI's outputs, snapshots compared bytewise,
hostile sessions, the demo's seed data."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.db import PINNED_SETTINGS
from runner.demo.data import seed
from tests.conftest import ROOT, psql_binary, run, sql, val

DEMO_PLAN = ROOT / "plans" / "profiles_results_v1_2_1.toml"


def seed_demo(dsn: str, rows: int = 2000) -> None:

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await seed(conn, rows=rows, already_stamped=0.0, new_from=rows + 1)
        finally:
            await conn.close()

    run(go)


def snapshot(db: str, table: str) -> None:
    sql(db, f"DROP TABLE IF EXISTS snap; CREATE TABLE snap AS SELECT * FROM {table}")


def differing(db: str, table: str, key: str = "id") -> int:
    """Rows of `table` that are not the ones in the snapshot (missing ones included): bytewise
    different, unless only a NaN's bits differ (PostgreSQL prints and compares every NaN alike,
    so a NaN is restored as the canonical one). Text is compared under exact settings only."""

    async def go() -> int:
        conn = await asyncpg.connect(db, server_settings=PINNED_SETTINGS)
        try:
            return int(
                await conn.fetchval(
                    f"SELECT count(*) FROM {table} AS cur_row FULL JOIN snap AS snap_row "
                    f"USING ({key}) WHERE cur_row IS NULL OR snap_row IS NULL "
                    "OR NOT record_image_eq(cur_row, snap_row) AND (cur_row::text <> snap_row::text "
                    "OR cur_row IS DISTINCT FROM snap_row)"
                )
            )
        finally:
            await conn.close()

    return int(run(go))


def set_on_database(db: str, **settings: str) -> None:
    """Defaults every new session of the database gets (the runner's included)."""
    for name, value in settings.items():
        sql(
            db,
            f"DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET {name} = %L', "
            f"current_database(), '{value}'); END $$",
        )


HOSTILE_PSQL_ENV = {
    "PGTZ": "America/New_York",
    "PGDATESTYLE": "SQL, DMY",
    "PGOPTIONS": "-c IntervalStyle=sql_standard -c extra_float_digits=0 "
    "-c bytea_output=escape -c search_path=nowhere",
}


def run_psql(
    db: str, path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [psql_binary(), "-X", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def rollback_file(workdir: Path, run_id: str) -> Path:
    return next((workdir / "backfill_logs").rglob(f"{run_id}/staging/rollback_*.sql"))


def roll_back(cli: Any, workdir: Path, db: str, run_id: str, how: str) -> str:
    """Undo run `run_id` on staging by `backfill rollback` (`how` = "runner") or by its emitted
    file through psql under hostile session settings ("psql"); what it printed."""
    if how == "runner":
        done = cli("rollback", run_id, "--env", "staging", env=env_for(db))
        assert done.exit_code == 0, done.output
        return str(done.output)
    ran = run_psql(db, rollback_file(workdir, run_id), HOSTILE_PSQL_ENV)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


CHECKSUM = "SELECT md5(string_agg(h::text, '|' ORDER BY h::text)) FROM {table} h"


RUN = re.compile(r"run (\d{8}T\d{6}Z-[\w.-]+-[0-9a-f]{4})")


def run_id_of(output: str) -> str:
    m = RUN.search(output)
    assert m, output
    return m.group(1)


def env_for(db: str, prod: str | None = None) -> dict[str, str]:
    return {"STAGING_DSN": db, "PROD_DSN": prod or db}


def ledger_totals(db: str, run_id: str) -> dict[str, Any]:
    row = sql(
        db,
        """SELECT count(*) FILTER (WHERE status = 'done') AS batches,
                            coalesce(sum(changed), 0) AS changed, coalesce(sum(noop), 0) AS noop
                     FROM backfill.batches WHERE run_id = $1""",
        run_id,
    )[0]
    return dict(row)


def start_runner(args: list[str], workdir: Path, db: str) -> subprocess.Popen[str]:
    """`backfill ARGS` in its own process, as an operator runs it (its output in one pipe)."""
    env = {
        **os.environ,
        **env_for(db),
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
        "BACKFILL_ACTOR": "operator",
        "BACKFILL_CMD": "backfill",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# -- several processes on one run (#15) --------------------------------------------------------

SLOW_APPLY = (
    "UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
    "AND val IS DISTINCT FROM 'new' AND (SELECT pg_sleep({s})) IS NOT NULL"
)


def wait_for(db: str, query: str, *args: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if found := val(db, query, *args):
                return found
        except Exception:  # the ledger is not there yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {query}")


def leader_run(db: str) -> str:
    return str(wait_for(db, "SELECT run_id FROM backfill.work WHERE stage = 'apply' AND NOT done"))


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGCONT)  # a frozen process is killed too
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"process {proc.pid} hung; its output:\n{out}") from None
    return proc.returncode, out


def kill(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGKILL)
    if proc.stdout is None or proc.stdout.closed:
        proc.wait()
        return ""
    out, _ = proc.communicate()
    return out or ""


def process_of(db: str, run_id: str, proc: subprocess.Popen[str]) -> str:
    return str(
        wait_for(
            db,
            "SELECT process_id FROM backfill.processes WHERE run_id = $1 AND pid = $2",
            run_id,
            proc.pid,
        )
    )


def each_key_once(db: str, run_id: str, needing: int) -> None:
    """Every row applied, by exactly one committed batch, with its image."""
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert (
        val(
            db,
            "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images WHERE run_id = $1",
            run_id,
        )
        == 0
    )
    assert val(db, "SELECT count(*) FROM backfill.row_images WHERE run_id = $1", run_id) == needing
    assert (
        val(
            db,
            "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1 AND status = 'done'",
            run_id,
        )
        == needing
    )


def no_open_lease(db: str, run_id: str) -> None:
    open_ = sql(
        db,
        "SELECT batch_no, owner FROM backfill.leases l WHERE run_id = $1 AND NOT EXISTS ("
        " SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id"
        " AND b.batch_no = l.batch_no AND b.status IN ('done', 'split', 'quarantined'))",
        run_id,
    )
    assert not open_, open_


def join_gate(db: str, guards: dict[str, Any] | None = None) -> dict[str, Any]:
    """Guards that hold every process of a run at its first batch until `open_join_gate`: a
    test that needs its joiners to commit batches starts them all first, however slowly they
    start on a loaded machine (a leader alone finished before a joiner was up)."""
    sql(db, "CREATE TABLE IF NOT EXISTS join_gate (opened boolean)")
    custom = {"name": "join_gate", "sql": "SELECT count(*) FROM join_gate", "pass_if": ">= 1"}
    return {"interval": "100ms", **(guards or {}), "custom": [custom]}


def open_join_gate(db: str, run_id: str, joiners: int) -> None:
    """Let the run's processes go once `joiners` processes have joined it."""
    wait_for(
        db,
        "SELECT count(*) >= $2 FROM backfill.processes WHERE run_id = $1 AND joined",
        run_id,
        joiners,
    )
    sql(db, "INSERT INTO join_gate VALUES (true)")


# a test that counts the whole server's sessions: on a BACKFILL_TEST_DSN server shared by
# several test processes (pytest -n), the others' sessions are counted too
counts_the_whole_server = pytest.mark.skipif(
    bool(os.environ.get("BACKFILL_TEST_DSN") and os.environ.get("PYTEST_XDIST_WORKER")),
    reason="counts the whole server's sessions: on a shared BACKFILL_TEST_DSN server, run it "
    "alone (-n 0), not beside other test processes",
)


def case_insensitive_collation(db: str) -> None:
    """`ci`, a nondeterministic ICU collation ('abc' = 'ABC'), or the test is skipped (a
    server built without ICU, as the embedded one)."""
    import asyncpg
    import pytest

    try:
        sql(
            db,
            "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', "
            "deterministic = false)",
        )
    except asyncpg.PostgresError as e:
        pytest.skip(f"no ICU collations on this server: {e}")
