"""Issue #13 on a real PostgreSQL: guards hold and stop a running apply, an operator pauses,
resumes and cancels it from another process, batches adapt their size, metrics are scraped.

Nothing here asserts a duration: each step waits (with a generous deadline) for a fact in the
ledger, and asserts on batches, holds and exit codes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from runner import ledger
from runner.engine.guards import GuardSet
from runner.plan import Guards
from tests.conftest import cli_subprocess, make_items, psql_binary, sql, val, write_plan
from tests.helpers import (
    counts_the_whole_server,
    differing,
    env_for,
    ledger_totals,
    run_id_of,
    snapshot,
    start_runner,
)

SLOW_APPLY = (
    "UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
    "AND val IS DISTINCT FROM 'new' AND pg_sleep(0.002) IS NOT NULL"
)
DEADLINE = 90.0


def wait_for(what: str, check: Callable[[], Any], proc: subprocess.Popen[str] | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail (with the runner's output) if the
    runner exits first or the deadline passes."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the runner exited ({proc.returncode}) before {what}:\n{out}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=DEADLINE * 2)
    return proc.returncode, out


def the_run(db: str) -> str | None:
    return val(db, "SELECT run_id FROM backfill.runs LIMIT 1") if _has_ledger(db) else None


def _has_ledger(db: str) -> bool:
    return bool(val(db, "SELECT to_regclass('backfill.guard_holds') IS NOT NULL"))


def committed(db: str) -> int:
    if not _has_ledger(db):
        return 0
    return int(val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'"))


def holds(db: str, signal: str) -> list[dict[str, Any]]:
    if not _has_ledger(db):
        return []
    rows = sql(
        db,
        "SELECT signal, reason, value, threshold, open, last_seen_at > started_at AS rechecked"
        " FROM backfill.guard_holds WHERE signal = $1 ORDER BY id",
        signal,
    )
    return [dict(r) for r in rows]


def summary(workdir: Path, run_id: str) -> str:
    return (
        workdir / "backfill_logs" / "items_new" / run_id / "staging" / "backfill_summary.md"
    ).read_text()


def backfill(workdir: Path, db: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A second process, as a second operator runs it."""
    env = {
        **env_for(db),
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
        "BACKFILL_ACTOR": "carol",
    }
    return cli_subprocess(list(args), workdir, env)


@pytest.fixture
def idle_sessions(db: str) -> Iterator[Callable[[int], list[subprocess.Popen[bytes]]]]:
    """Open N extra sessions on the server (psql sleeping), closed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def open_(n: int) -> list[subprocess.Popen[bytes]]:
        mine = [
            subprocess.Popen(
                [psql_binary(), "-X", "-q", "-d", db, "-c", "SELECT pg_sleep(600)"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PGAPPNAME": "idle_holder"},
            )
            for _ in range(n)
        ]
        procs.extend(mine)
        return mine

    yield open_
    release(db)
    for p in procs:
        p.wait()


def release(db: str) -> None:
    """End the idle sessions (a killed psql leaves its backend sleeping)."""
    sql(
        db,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'idle_holder' AND datname = current_database()",
    )


def client_sessions(db: str) -> int:
    return int(
        val(db, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
    )


@counts_the_whole_server
def test_connections_past_the_threshold_hold_the_run_and_releasing_them_resumes_it(
    workdir: Path, db: str, idle_sessions: Callable[[int], list[subprocess.Popen[bytes]]]
) -> None:
    make_items(db, 600)
    max_connections = int(val(db, "SHOW max_connections"))
    base = client_sessions(db)
    # the runner alone (its main, reader, checker and worker sessions) stays under the
    # threshold; 20 idle sessions more go over it
    share = (base + 12) / max_connections
    plan = write_plan(
        workdir / "p.json",
        guards={"interval": "100ms", "connections": {"hold": share, "critical": False}},
    )
    extra = idle_sessions(20)
    wait_for("the idle sessions", lambda: client_sessions(db) >= base + 20)
    proc = start_runner(["apply", str(plan), "--env", "staging", "--quiet"], workdir, db)
    held = wait_for(
        "a hold that was checked again",
        lambda: [h for h in holds(db, "connections") if h["rechecked"]],
        proc,
    )
    assert held[0]["open"]
    assert held[0]["reason"].startswith("connections in use ")
    assert committed(db) == 0, "a held run started a batch"
    run_id = the_run(db)
    assert run_id is not None
    status = backfill(workdir, db, "status", run_id)
    assert "held: connections in use" in status.stdout, status.stdout + status.stderr

    release(db)
    for p in extra:
        p.wait()
    code, out = finish(proc)
    assert code == 3, out
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert not any(h["open"] for h in holds(db, "connections"))
    text = summary(workdir, run_id)
    assert "| connections |" in text, text


def test_a_failing_custom_guard_holds_one_past_its_critical_threshold_stops_with_exit_1_and_the_run_resumes(
    workdir: Path, db: str
) -> None:
    make_items(db, 1000)
    sql(db, "CREATE TABLE queue (job int)")
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY,
        batching__size=50,
        guards={
            "interval": "100ms",
            "custom": [
                {
                    "name": "queue_depth",
                    "sql": "SELECT count(*) FROM queue",
                    "pass_if": "== 0",
                    "critical_if": ">= 10",
                }
            ],
        },
    )
    proc = start_runner(["apply", str(plan), "--env", "staging", "--quiet"], workdir, db)
    wait_for("a first batch", lambda: committed(db) >= 1, proc)
    sql(db, "INSERT INTO queue VALUES (1)")
    held = wait_for(
        "the custom guard's hold, checked again",
        lambda: [h for h in holds(db, "custom.queue_depth") if h["rechecked"]],
        proc,
    )
    assert held[0]["value"] == 1.0
    at_hold = committed(db)
    seen = val(db, "SELECT clock_timestamp()")
    wait_for(
        "another re-check",
        lambda: val(db, "SELECT last_seen_at > $1 FROM backfill.guard_holds WHERE open", seen),
        proc,
    )
    assert committed(db) == at_hold, "a batch started while the guard held"

    sql(db, "INSERT INTO queue SELECT g FROM generate_series(2, 10) AS g")
    code, out = finish(proc)
    assert code == 1, out
    assert "guard queue_depth = 10" in out
    assert "critical" in out
    run_id = the_run(db)
    assert run_id is not None
    assert committed(db) == at_hold

    sql(db, "DELETE FROM queue")
    again = backfill(
        workdir, db, "apply", str(plan), "--env", "staging", "--run", run_id, "--quiet"
    )
    assert again.returncode == 3, again.stdout + again.stderr
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert ledger_totals(db, run_id)["changed"] == 800  # each row once, across both commands
    assert "custom.queue_depth" in summary(workdir, run_id)


def test_pause_from_a_second_process_stops_new_batches_within_one_batch_and_resume_continues(
    workdir: Path, db: str
) -> None:
    make_items(db, 2000)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY,
        batching__size=50,
        guards={"interval": "100ms"},
    )
    proc = start_runner(["apply", str(plan), "--env", "staging", "--quiet"], workdir, db)
    wait_for("two batches", lambda: committed(db) >= 2, proc)
    run_id = the_run(db)
    assert run_id is not None
    paused = backfill(workdir, db, "pause", run_id, "--env", "staging", "--note", "deploy")
    assert paused.returncode == 0, paused.stdout + paused.stderr
    assert "paused" in paused.stdout
    at_request = committed(db)
    wait_for("the pause obeyed", lambda: holds(db, "paused"), proc)
    obeyed = committed(db)
    assert obeyed <= at_request + 1, "more than the batch in flight ran after the pause"
    wait_for("a re-check while paused", lambda: [h for h in holds(db, "paused") if h["rechecked"]])
    assert committed(db) == obeyed
    status = backfill(workdir, db, "status", run_id)
    assert "paused by carol" in status.stdout, status.stdout
    assert "(deploy)" in status.stdout

    resumed = backfill(workdir, db, "resume", run_id, "--env", "staging")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    code, out = finish(proc)
    assert code == 3, out
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert "paused by an operator" in summary(workdir, run_id)
    again = backfill(workdir, db, "resume", run_id, "--env", "staging")
    assert again.returncode == 2, "resuming a run that is not paused is refused"


def test_cancel_stops_cleanly_and_leaves_a_run_that_rolls_back_exactly(
    workdir: Path, db: str
) -> None:
    make_items(db, 2000)
    snapshot(db, "items")
    plan = write_plan(workdir / "p.json", apply__sql=SLOW_APPLY, batching__size=50)
    proc = start_runner(["apply", str(plan), "--env", "staging", "--quiet"], workdir, db)
    wait_for("two batches", lambda: committed(db) >= 2, proc)
    run_id = the_run(db)
    assert run_id is not None
    cancelled = backfill(workdir, db, "cancel", run_id, "--env", "staging", "--note", "wrong value")
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    code, out = finish(proc)
    assert code == 4, out
    assert "cancelled by carol" in out

    kept = ledger_totals(db, run_id)
    assert 0 < kept["changed"] < 1600
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE status <> 'done'") == 0
    status = backfill(workdir, db, "status", run_id)
    assert "cancelled by carol" in status.stdout, status.stdout
    again = backfill(workdir, db, "apply", str(plan), "--env", "staging", "--run", run_id)
    assert again.returncode == 4, again.stdout + again.stderr
    assert ledger_totals(db, run_id) == kept, "a cancelled run went forward"

    undone = backfill(workdir, db, "rollback", run_id, "--env", "staging")
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert "checksum verified" in undone.stdout
    assert differing(db, "items") == 0


def test_adaptive_batches_shrink_as_rows_get_slower_and_never_pass_max_size(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 2500)
    plan = write_plan(
        workdir / "p.json",
        # each row costs more than the one before: 2 µs per unit of id
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND pg_sleep(id * 0.000002) IS NOT NULL",
        batching={
            "size": 20,
            "min_size": 5,
            "max_size": 400,
            "target_batch_seconds": 0.1,
            "statement_timeout": "30s",
        },
    )
    result = cli("apply", str(plan), "--env", "staging", "--quiet", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    batches = sorted(
        (workdir / "backfill_logs" / "items_new" / run_id / "staging" / "batches").glob("*.json")
    )
    sizes = [json.loads(p.read_text())["size"] for p in batches]
    assert all(s <= 400 for s in sizes)
    # a page is smaller than min_size only where discovery had fewer keys left: the last one
    assert all(s >= 5 for s in sizes[:-1]), sizes
    peak = max(sizes)
    assert peak > 20, "the size never grew from its start on cheap rows"
    assert sizes[-2] < peak / 2, f"the size did not shrink as rows got slower: {sizes}"
    assert "Batch size adapted toward" in summary(workdir, run_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_are_served_while_the_apply_runs(workdir: Path, db: str) -> None:
    make_items(db, 2000)
    plan = write_plan(workdir / "p.json", apply__sql=SLOW_APPLY, batching__size=50)
    port = _free_port()
    proc = start_runner(
        ["apply", str(plan), "--env", "staging", "--quiet", "--metrics-port", str(port)],
        workdir,
        db,
    )

    def scrape() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text: str = r.read().decode()
        except OSError:
            return ""
        return text if 'backfill_batches_total{outcome="done"}' in text else ""

    text = wait_for("a scrape with a committed batch", scrape, proc)
    for name in (
        "backfill_rows_changed_total",
        "backfill_batch_duration_seconds_bucket",
        "backfill_batch_size 50.0",
        'backfill_guard_state{signal="connections"} 0.0',
        'backfill_guard_value{signal="connections"}',
        "backfill_rows_remaining_estimate",
        "backfill_held 0.0",
        'backfill_guard_value{signal="busy_sessions"}',
        "backfill_yielded_seconds_total",
        "backfill_yield_factor",
    ):
        assert name in text, name
    code, out = finish(proc)
    assert code == 3, out


def test_a_hold_longer_than_max_hold_stops_resumably_with_exit_1(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 300)
    sql(db, "CREATE TABLE maintenance (on_ boolean); INSERT INTO maintenance VALUES (true)")
    guards = {
        "interval": "50ms",
        "max_hold": "300ms",
        "custom": [
            {"name": "window", "sql": "SELECT bool_or(on_) FROM maintenance", "pass_if": "is false"}
        ],
    }
    plan = write_plan(workdir / "p.json", guards=guards)
    result = cli("apply", str(plan), "--env", "staging", "--quiet", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert "longer than guards.max_hold" in result.output
    assert "guard window = 1, passes when is false" in result.output
    run_id = the_run(db)
    assert run_id is not None
    assert committed(db) == 0
    assert f"--run {run_id}" in result.output

    sql(db, "UPDATE maintenance SET on_ = false")
    again = cli("apply", str(plan), "--env", "staging", "--run", run_id, "--quiet", env=env_for(db))
    assert again.exit_code == 3, again.output
    assert ledger_totals(db, run_id)["changed"] == 240


def test_the_request_and_the_signals_are_read_in_one_statement_and_unread_signals_hold(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """Before each batch, the pause/cancel request and the built-in signals are one statement.
    Signals that do not answer within guards.statement_timeout hold (never pass), the request is
    still obeyed, and the connection goes on working."""
    import anyio
    import asyncpg

    from runner.engine.guards import GuardSet
    from runner.plan import Guards

    make_items(db, 200)
    plan = write_plan(workdir / "p.json", batching__size=50)
    first = cli("apply", str(plan), "--env", "staging", "--quiet", env=env_for(db))
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    oid = int(val(db, "SELECT 'items'::regclass::oid"))

    async def read(guards: Guards) -> tuple[Any, list[Any], int]:
        conn = await asyncpg.connect(db)
        try:
            request, readings = await GuardSet(guards, oid).with_control(conn, run_id)
            return request, readings, await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    request, readings, _ = anyio.run(read, Guards())
    assert request is None
    assert {r.signal for r in readings} >= {"connections", "longest_transaction_seconds"}
    assert all(r.state == "normal" for r in readings), readings

    paused = backfill(workdir, db, "pause", run_id, "--env", "staging", "--note", "deploy")
    assert paused.returncode == 0, paused.stdout + paused.stderr
    request, readings, _ = anyio.run(read, Guards())
    assert (request.action, request.actor, request.note) == ("pause", "carol", "deploy")

    # a bound no statement can meet: the signals are unread, and that holds
    request, readings, after = anyio.run(read, Guards(statement_timeout=0.000001))
    assert request is not None
    assert request.action == "pause"
    assert [(r.signal, r.state) for r in readings] == [("builtin", "hold")]
    assert "guards could not be read: no answer within" in readings[0].reason
    assert after == 1, "the connection is usable after the timed-out read"


WAITING_ON_LOCKS = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
)


def test_sessions_waiting_on_a_table_of_another_database_with_the_same_oid_do_not_hold_the_run(
    server: str, make_db: Callable[..., str]
) -> None:
    """A database cloned from another (CREATE DATABASE … TEMPLATE) has its tables under the same
    oids: the lock-waiter guard counts waiters on the target in the run's own database only."""
    import anyio
    import asyncpg

    from runner.db import dsn_with_database
    from runner.engine.guards import GuardSet
    from runner.plan import Guards

    db = make_db()
    make_items(db, 50)
    oid = int(val(db, "SELECT 'items'::regclass::oid"))
    clone = f"clone_{os.getpid()}_{oid}"
    sql(server, f"CREATE DATABASE {clone} TEMPLATE {val(db, 'SELECT current_database()')}")
    other = dsn_with_database(server, clone)
    assert int(val(other, "SELECT 'items'::regclass::oid")) == oid

    async def go() -> tuple[float | None, float | None]:
        holder = await asyncpg.connect(other)
        waiters = [await asyncpg.connect(other) for _ in range(7)]
        here, there = await asyncpg.connect(db), await asyncpg.connect(other)
        try:
            await holder.execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            async with anyio.create_task_group() as tg:
                for w in waiters:
                    tg.start_soon(w.execute, "SELECT count(*) FROM items")
                try:
                    for _ in range(600):  # until all of them wait (30 s at most)
                        if await there.fetchval(WAITING_ON_LOCKS) >= len(waiters):
                            break
                        await anyio.sleep(0.05)
                    _, mine = await GuardSet(Guards(), oid).with_control(here, "no-such-run")
                    _, theirs = await GuardSet(Guards(), oid).with_control(there, "no-such-run")
                finally:
                    await holder.execute("COMMIT")
            return (
                {r.signal: r for r in mine}["lock_waiters"].value,
                {r.signal: r for r in theirs}["lock_waiters"].value,
            )
        finally:
            for c in [holder, *waiters, here, there]:
                await c.close()

    mine, theirs = anyio.run(go)
    sql(server, f"DROP DATABASE {clone} WITH (FORCE)")
    assert theirs == 7, "the clone's own guard sees its waiters"
    assert mine == 0, "waiters on another database's table of the same oid held the run"


def test_a_run_held_by_a_process_in_another_database_is_not_running_in_this_one(
    make_db: Callable[..., str],
) -> None:
    """A run has a ledger in each environment's database; two may be databases of one server.
    Advisory locks are per database: `status` of one must not say "running now" because a
    process holds the run in the other."""
    import anyio
    import asyncpg

    from runner import ledger

    staging, prod = make_db(), make_db()

    async def go() -> tuple[bool, bool]:
        a, b = await asyncpg.connect(staging), await asyncpg.connect(prod)
        try:
            assert await ledger.try_run_lock(a, "run-1")
            return await ledger.run_is_locked(a, "run-1"), await ledger.run_is_locked(b, "run-1")
        finally:
            await a.close()
            await b.close()

    here, there = anyio.run(go)
    assert here
    assert not there


@pytest.mark.skipif(
    bool(os.environ.get("BACKFILL_TEST_DSN")),
    reason="locks pg_database, which keeps every new session of the server out meanwhile: only "
    "on the test process's own embedded server",
)
def test_a_cancel_is_obeyed_while_the_signals_do_not_answer_within_the_timeout(
    workdir: Path, db: str
) -> None:
    """The signals' statement, already prepared and running on the server, blocked (pg_database
    is read by it alone) past guards.statement_timeout: the client cancels it, the run holds on
    "builtin", the request read alone still stops it, and the main session goes on working (the
    hold is closed on it)."""
    import anyio
    import asyncpg

    make_items(db, 3000)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY,
        batching__size=50,
        guards={"interval": "100ms", "statement_timeout": "300ms"},
    )
    # not --quiet: what the operator reads while it holds and when it stops
    proc = start_runner(["apply", str(plan), "--env", "staging"], workdir, db)
    wait_for("two batches", lambda: committed(db) >= 2, proc)
    run_id = the_run(db)

    async def until(conn: asyncpg.Connection, query: str) -> None:
        end = time.monotonic() + DEADLINE
        while not await conn.fetchval(query):
            assert time.monotonic() < end, f"never true: {query}"
            await anyio.sleep(0.05)

    async def go() -> tuple[int, str]:
        holder, writer = await asyncpg.connect(db), await asyncpg.connect(db)
        try:
            await holder.execute("BEGIN; LOCK TABLE pg_database IN ACCESS EXCLUSIVE MODE")
            try:
                await until(
                    writer, "SELECT count(*) FROM backfill.guard_holds WHERE signal = 'builtin'"
                )
                await writer.execute(
                    "INSERT INTO backfill.control_requests (run_id, env, action, actor)"
                    " VALUES ($1, 'staging', 'cancel', 'carol')",
                    run_id,
                )
                await until(
                    writer,
                    "SELECT count(*) FROM backfill.guard_holds WHERE signal = 'builtin' AND NOT open",
                )
            finally:
                await holder.execute("COMMIT")
            reason = await writer.fetchval(
                "SELECT reason FROM backfill.guard_holds WHERE signal = 'builtin'"
            )
            started = await writer.fetchval(
                "SELECT count(*) FROM backfill.batches WHERE started_at >"
                " (SELECT min(started_at) FROM backfill.guard_holds WHERE signal = 'builtin')"
            )
            return started, reason
        finally:
            await holder.close()
            await writer.close()

    started, reason = anyio.run(go)
    code, out = finish(proc)
    assert code == 4, out
    assert "cancelled by carol" in out
    assert "held: guards could not be read" in out
    assert "resumed (" not in out, "a run stopped while held was said to have resumed"
    assert started == 0, "a batch started while the signals were unread"
    assert "no answer within guards.statement_timeout (0.3 s)" in reason


def in_transaction(db: str, app: str) -> int:
    return int(
        val(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND state = 'idle in transaction'",
            app,
        )
    )


@counts_the_whole_server
def test_busy_sessions_make_the_apply_wait_after_each_batch_and_the_summary_says_how_long(
    workdir: Path,
    db: str,
    busy_sessions: Callable[[int], None],
    idle_sessions: Callable[[int], list[subprocess.Popen[bytes]]],
) -> None:
    make_items(db, 300)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY,
        batching__size=50,
        guards={"yield_to_busy": {"per_session": 1.5, "max_factor": 8}},
    )
    busy_sessions(3)
    idle_sessions(4)  # asleep in pg_sleep: connected, but not busy
    wait_for("the busy sessions", lambda: in_transaction(db, "busy_app") == 3)
    proc = start_runner(["apply", str(plan), "--env", "staging"], workdir, db)
    code, out = finish(proc)
    assert code == 3, out
    run_id = run_id_of(out)
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    row = sql(
        db, "SELECT seconds, batches, max_factor FROM backfill.yields WHERE run_id = $1", run_id
    )
    assert len(row) == 1, "one command, one row"
    # 3 sessions in a transaction, 1.5 batch times each (the 4 asleep are not counted): every
    # batch after the first waited, 4.5 times the batch's time, and nothing after the last
    batches = committed(db)
    assert batches >= 4
    assert row[0]["batches"] == batches - 1
    # the waits are time no batch ran: with one worker, batches and waits fit in the stage
    span = sql(
        db,
        "SELECT extract(epoch FROM max(committed_at) - min(started_at))::float8 AS wall,"
        " sum(duration_ms)::float8 / 1000 AS busy FROM backfill.batches WHERE run_id = $1",
        run_id,
    )[0]
    assert span["busy"] + row[0]["seconds"] <= span["wall"] + 0.2, (dict(span), dict(row[0]))
    assert row[0]["max_factor"] == pytest.approx(4.5)
    assert row[0]["seconds"] > 0
    text = summary(workdir, run_id)
    assert "Yielded to busy sessions (`guards.yield_to_busy`):" in text, text
    assert f"after {batches - 1} batch(es)" in text, text
    assert "at most 4.5× a batch's time" in text, text
    rerendered = backfill(workdir, db, "report", run_id)
    assert rerendered.returncode == 0, rerendered.stdout + rerendered.stderr

    # switched off, the same work does not wait
    sql(db, "UPDATE items SET val = 'old'")
    off = write_plan(
        workdir / "off.json",
        apply__sql=SLOW_APPLY,
        batching__size=50,
        guards={"yield_to_busy": {"per_session": 0}},
    )
    proc = start_runner(["apply", str(off), "--env", "staging"], workdir, db)
    code, out = finish(proc)
    assert code == 3, out
    assert not sql(db, "SELECT 1 FROM backfill.yields WHERE run_id = $1", run_id_of(out))
    assert "Yielded to busy sessions" not in summary(workdir, run_id_of(out))


def test_a_login_without_pg_monitor_is_told_the_sessions_it_cannot_see(db: str) -> None:
    # other logins' sessions read as empty rows to it: neither connected nor busy
    role = f"plain_{abs(hash(db)) % 10**8}"
    sql(db, f"CREATE TABLE items_probe (id int); CREATE ROLE {role} LOGIN")

    async def go() -> tuple[int, int]:
        admin = await asyncpg.connect(db)
        try:
            await ledger.ensure_ledger(admin)
            await admin.execute(
                f"GRANT USAGE ON SCHEMA backfill TO {role};"
                f" GRANT SELECT ON backfill.control_requests TO {role}"
            )
            oid = await admin.fetchval("SELECT 'items_probe'::regclass::oid")
            seen = GuardSet(Guards(), oid)
            await seen.with_control(admin, "r")
            plain = await asyncpg.connect(db, user=role)
            try:
                hidden = GuardSet(Guards(), oid)
                await hidden.with_control(plain, "r")
            finally:
                await plain.close()
            return seen.hidden_sessions, hidden.hidden_sessions
        finally:
            await admin.execute(f"DROP OWNED BY {role}")
            await admin.close()

    try:
        as_admin, as_plain = anyio.run(go)
    finally:
        sql(db, f"DROP ROLE IF EXISTS {role}")
    assert as_admin == 0
    assert as_plain > 0  # the server's other backends, at least (its checkpointer, …)


@counts_the_whole_server
def test_a_batch_that_fails_while_the_apply_yields_stops_it_without_another_wait(
    workdir: Path, db: str, busy_sessions: Callable[[int], None]
) -> None:
    make_items(db, 300)
    # the second batch fails on its data (a division by zero at id 70), and stops the phase
    failing = SLOW_APPLY.replace("WHERE id = ANY($1)", "WHERE id = ANY($1) AND 1 / (id - 70) <> 0")
    plan = write_plan(
        workdir / "p.json",
        apply__sql=failing,
        batching__size=50,
        batching__on_error="stop",
        guards={"yield_to_busy": {"per_session": 4, "max_factor": 8}},
    )
    busy_sessions(2)
    wait_for("the busy sessions", lambda: in_transaction(db, "busy_app") == 2)
    proc = start_runner(["apply", str(plan), "--env", "staging"], workdir, db)
    code, out = finish(proc)
    assert code == 1, out
    run_id = run_id_of(out)
    waits = sql(db, "SELECT batches FROM backfill.yields WHERE run_id = $1", run_id)
    # one wait, before the batch that failed; none after it for a batch that never came
    assert [r["batches"] for r in waits] == [committed(db)] == [1], (waits, out)
