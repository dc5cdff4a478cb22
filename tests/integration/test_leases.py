"""Several processes on one run (#15): pages claimed through the ledger, leases taken over from
a killed process, one rate for the run, one story in the summary and the rollback."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner import ledger
from tests.conftest import make_items, run, sql, val, write_plan
from tests.helpers import (
    SLOW_APPLY,
    counts_the_whole_server,
    differing,
    each_key_once,
    env_for,
    finish,
    join_gate,
    leader_run,
    open_join_gate,
    run_id_of,
    snapshot,
    start_runner,
    wait_for,
)


@pytest.mark.slow
def test_three_processes_finish_one_run_each_batch_once_and_the_rollback_covers_all(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 3000)
    needing = 2400  # a fifth already hold the new value
    snapshot(db, "items")
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.05),
        batching__size=20,
        batching__workers=2,
        guards=join_gate(db),
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiners = [
        start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
        for _ in range(2)
    ]
    open_join_gate(db, run_id, 2)
    code, out = finish(leader)
    assert code == 3, out  # the leader finished the stage and halted at its gate
    for j in joiners:
        jcode, jout = finish(j)
        assert jcode == 0, jout
        assert f"joined the apply of run {run_id}" in jout, jout
    each_key_once(db, run_id, needing)
    # three processes committed batches; every lease was settled by a batch of its number
    per_process = sql(
        db,
        "SELECT process, count(*) AS n FROM backfill.batches WHERE run_id = $1"
        " AND status = 'done' GROUP BY process",
        run_id,
    )
    assert len(per_process) == 3, per_process
    assert all(r["process"] and r["n"] > 0 for r in per_process)
    assert (
        val(
            db,
            "SELECT count(*) FROM backfill.leases l WHERE run_id = $1 AND NOT EXISTS ("
            " SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id"
            " AND b.batch_no = l.batch_no AND b.status = 'done')",
            run_id,
        )
        == 0
    )
    # one story: the summary and results count every process's batches
    results = json.loads(next(workdir.rglob("execution_results.json")).read_text())
    assert results["totals"]["changed"] == needing
    assert results["totals"]["batches"] == sum(r["n"] for r in per_process)
    summary = next(workdir.rglob("backfill_summary.md")).read_text()
    assert "Processes" in summary
    status = json.loads(cli("status", run_id, "--json", env=env_for(db)).output)
    shown = status["processes"]
    assert sorted(p["batches"] for p in shown) == sorted(r["n"] for r in per_process)
    # the rollback undoes every process's batches
    undone = cli("rollback", run_id, "--env", "staging", env=env_for(db))
    assert undone.exit_code == 0, undone.output
    assert differing(db, "items") == 0


@pytest.mark.slow
def test_a_killed_process_lease_is_taken_over_after_it_expires(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 600)
    needing = 480
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.4),
        batching__size=20,
        batching__lease_timeout=3,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    try:
        me = wait_for(
            db,
            "SELECT process_id FROM backfill.processes WHERE run_id = $1 AND pid = $2",
            run_id,
            joiner.pid,
        )
        # its batch is running: a lease of its own with no batch row yet
        lease = wait_for(
            db,
            "SELECT l.batch_no FROM backfill.leases l WHERE l.owner = $1 AND NOT EXISTS ("
            " SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id"
            " AND b.batch_no = l.batch_no) AND EXISTS (SELECT 1 FROM backfill.batches b"
            " WHERE b.process = $1)",
            me,
        )
        time.sleep(0.1)
        joiner.send_signal(signal.SIGKILL)
    finally:
        if joiner.poll() is None:
            joiner.kill()
        joiner.communicate()  # its pipe closed too
    code, out = finish(leader)
    assert code == 3, out
    each_key_once(db, run_id, needing)
    taken = sql(
        db,
        "SELECT batch_no, owner, takeovers FROM backfill.leases WHERE run_id = $1 AND takeovers > 0",
        run_id,
    )
    assert taken, "the killed process's lease was not taken over"
    assert lease in {t["batch_no"] for t in taken} or val(
        db,
        "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND batch_no = $2",
        run_id,
        lease,
    )
    # the batch of the taken-over lease was committed once, by the leader
    assert all(
        val(
            db,
            "SELECT process FROM backfill.batches WHERE run_id = $1 AND batch_no = $2",
            run_id,
            t["batch_no"],
        )
        == t["owner"]
        for t in taken
    )
    status = cli("status", run_id, env=env_for(db))
    assert "killed, or its connection was lost" in status.output or "no heartbeat" in status.output


@pytest.mark.slow
def test_the_rate_is_the_runs_whatever_the_number_of_processes(workdir: Path, db: str) -> None:
    make_items(db, 1600)
    needing = 1280
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.25),
        batching__size=20,
        batching__batches_per_minute=360,  # 6 a second; one process alone makes at most 4
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiners = [
        start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
        for _ in range(2)
    ]
    code, out = finish(leader)
    assert code == 3, out
    for j in joiners:
        jc, jo = finish(j)
        assert jc == 0, jo
    each_key_once(db, run_id, needing)
    rows = sql(
        db,
        "SELECT started_at, process FROM backfill.batches WHERE run_id = $1 AND status = 'done'"
        " ORDER BY started_at",
        run_id,
    )
    # from the moment all three processes were committing batches
    firsts = {}
    for r in rows:
        firsts.setdefault(r["process"], r["started_at"])
    assert len(firsts) == 3, firsts
    since = max(firsts.values())
    starts = [r["started_at"] for r in rows if r["started_at"] >= since]
    assert len(starts) >= 50, len(starts)
    achieved = (len(starts) - 1) / (starts[-1] - starts[0]).total_seconds() * 60
    assert abs(achieved - 360) / 360 < 0.10, achieved


def test_a_hold_every_process_recorded_counts_once(db: str) -> None:
    """Each process of a run records the same guard hold: the summary's time held is the union."""
    make_items(db, 10)

    async def go() -> dict[str, float]:
        conn = await asyncpg.connect(db)
        try:
            await ledger.ensure_ledger(conn)
            await conn.execute(
                "INSERT INTO backfill.runs (run_id, env, plan_name, plan_digest, plan,"
                " target_table, key_columns, columns, key_types, column_types, operator)"
                " VALUES ('r1', 'staging', 'p', 'd', '{}', 'items', '{id}', '{val}', '{int}',"
                " '{text}', 'alice')"
            )
            await conn.execute(
                """INSERT INTO backfill.guard_holds (run_id, stage, signal, reason, started_at,
                                                     last_seen_at, open)
                   VALUES ('r1', 'apply', 'connections', '', '2026-01-01 00:00:00+00',
                           '2026-01-01 00:00:10+00', false),
                          ('r1', 'apply', 'connections', '', '2026-01-01 00:00:02+00',
                           '2026-01-01 00:00:12+00', false),
                          ('r1', 'apply', 'connections', '', '2026-01-01 00:00:03+00',
                           '2026-01-01 00:00:05+00', false),
                          ('r1', 'apply', 'connections', '', '2026-01-01 00:01:00+00',
                           '2026-01-01 00:01:04+00', false),
                          ('r1', 'apply', 'paused', '', '2026-01-01 00:00:00+00',
                           '2026-01-01 00:00:01+00', false)"""
            )
            return await ledger.held_seconds(conn, "r1", "apply")
        finally:
            await conn.close()

    assert run(go) == {"connections": 16.0, "paused": 1.0}


@pytest.mark.slow
def test_the_canary_count_is_the_runs_whatever_the_number_of_processes(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    staging, prod = make_db(), make_db()
    make_items(staging, 100)
    make_items(prod, 1500)
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    plan = write_plan(
        workdir / "p.json",
        soak__duration="1s",
        soak__interval="1s",
        apply__sql=SLOW_APPLY.format(s=0.8),
        batching__size=20,
        health__canary_percent=40,
    )
    first = cli("pipeline", str(plan), "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    for gate in ("apply-staging", "soak-staging"):
        assert cli("approve", run_id, "--gate", gate, "--as", "alice", env=env).exit_code == 0
        assert cli("pipeline", str(plan), "--run", run_id, "-q", env=env).exit_code == 3
    assert cli("approve", run_id, "--gate", "health-prod", "--as", "alice", env=env).exit_code == 0
    mini = next(workdir.rglob("prod_mini_backfill_plan.json"))
    canary = json.loads(mini.read_text())["canary"]["batches"]
    assert canary >= 4, canary
    args = ["apply", str(mini), "-e", "prod", "-q", "--run", run_id]
    leader = start_runner(args, workdir, prod)
    wait_for(prod, "SELECT 1 FROM backfill.work WHERE stage = 'canary' AND NOT done")
    joiner = start_runner(args, workdir, prod)
    code, out = finish(leader)
    assert code == 3, out  # halted at the canary's gate
    jcode, jout = finish(joiner)
    assert jcode == 0, jout
    assert "joined the canary" in jout, jout
    per_process = sql(
        prod,
        "SELECT process, count(*) AS n FROM backfill.batches WHERE run_id = $1"
        " AND stage = 'canary' AND status = 'done' GROUP BY process",
        run_id,
    )
    # the run's count, not the count in each process
    assert sum(r["n"] for r in per_process) == canary, per_process
    assert len(per_process) == 2, per_process


@pytest.mark.slow
def test_pause_and_cancel_hold_every_process_of_the_run(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 2000)
    plan = write_plan(workdir / "p.json", apply__sql=SLOW_APPLY.format(s=0.2), batching__size=20)
    env = env_for(db)
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    wait_for(
        db,
        "SELECT count(DISTINCT process) = 2 FROM backfill.batches WHERE run_id = $1",
        run_id,
    )
    assert cli("pause", run_id, "--env", "staging", "--note", "incident", env=env).exit_code == 0
    time.sleep(1.0)  # the batches in flight finish (one per process, 0.2 s each)
    paused_at = val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1", run_id)
    time.sleep(1.5)
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1", run_id) == paused_at
    assert cli("resume", run_id, "--env", "staging", env=env).exit_code == 0
    wait_for(
        db, "SELECT count(*) > $2 FROM backfill.batches WHERE run_id = $1", run_id, paused_at + 2
    )
    assert cli("cancel", run_id, "--env", "staging", "--note", "enough", env=env).exit_code == 0
    code, out = finish(leader)
    jcode, jout = finish(joiner)
    assert code == 4, out  # a cancel stops the apply it reaches
    assert jcode in (1, 4), jout
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") > 0
    # what was committed stays, once each, and can be rolled back
    assert (
        val(
            db,
            "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images WHERE run_id = $1",
            run_id,
        )
        == 0
    )


@pytest.mark.slow
def test_a_killed_apply_continued_at_once_applies_its_open_page_under_its_own_number(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """The command that continues a killed apply leads: it takes the killed process's lease over
    at once (it holds the run lock the other held), without waiting for lease_timeout."""
    make_items(db, 400)
    needing = 320
    plan = write_plan(workdir / "p.json", apply__sql=SLOW_APPLY.format(s=0.5), batching__size=20)
    first = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    open_lease = wait_for(
        db,
        "SELECT l.batch_no FROM backfill.leases l WHERE l.run_id = $1 AND NOT EXISTS ("
        " SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id AND b.batch_no = l.batch_no)"
        " AND l.batch_no > 2",
        run_id,
    )
    first.send_signal(signal.SIGKILL)
    first.communicate()
    t0 = time.monotonic()
    resumed = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env_for(db))
    assert resumed.exit_code == 3, resumed.output
    assert time.monotonic() - t0 < 25  # not after the 30 s lease timeout
    each_key_once(db, run_id, needing)
    assert (
        val(
            db,
            "SELECT takeovers FROM backfill.leases WHERE run_id = $1 AND batch_no = $2",
            run_id,
            open_lease,
        )
        == 1
    )
    assert (
        val(
            db,
            "SELECT status FROM backfill.batches WHERE run_id = $1 AND batch_no = $2",
            run_id,
            open_lease,
        )
        == "done"
    )
    results = json.loads(next(workdir.rglob("execution_results.json")).read_text())
    assert not [w for w in results["warnings"] if "interrupted" in w], results["warnings"]


@pytest.mark.slow
def test_a_joined_process_follows_the_leader_into_its_next_pass(workdir: Path, db: str) -> None:
    make_items(db, 1000)
    needing = 800 + 400
    plan = write_plan(workdir / "p.json", apply__sql=SLOW_APPLY.format(s=0.15), batching__size=20)
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    wait_for(
        db, "SELECT count(DISTINCT process) = 2 FROM backfill.batches WHERE run_id = $1", run_id
    )
    # rows behind the cursor: the second pass applies them
    sql(db, "INSERT INTO items (id, grp, val) SELECT -g, 0, 'late' FROM generate_series(1, 400) g")
    code, out = finish(leader)
    assert code == 3, out
    jcode, jout = finish(joiner)
    assert jcode == 0, jout
    each_key_once(db, run_id, needing)
    second = sql(
        db,
        "SELECT owner, count(*) AS n FROM backfill.leases WHERE run_id = $1 AND pass = 2"
        " GROUP BY owner",
        run_id,
    )
    assert len(second) == 2, second  # both processes claimed pages of the second pass


@pytest.mark.slow
def test_the_leaders_progress_counts_every_processs_batches(workdir: Path, db: str) -> None:
    make_items(db, 6000)
    needing = 4800
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.2),
        batching__size=20,
        batching__workers=2,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging"], workdir, db)
    run_id = leader_run(db)
    joiners = [
        start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
        for _ in range(2)
    ]
    code, out = finish(leader)
    assert code == 3, out
    for j in joiners:
        assert finish(j)[0] == 0
    lines = re.findall(r"progress: (\d+) batches, ([\d,]+)/([\d,]+) rows", out)
    assert lines, out
    own = val(
        db,
        "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND status = 'done'"
        " AND process = (SELECT process_id FROM backfill.processes WHERE run_id = $1"
        " AND NOT joined)",
        run_id,
    )
    shown = [(int(b), int(d.replace(",", "")), int(t.replace(",", ""))) for b, d, t in lines]
    # a line while the joiners worked counts their batches too: more than the leader ever did
    assert max(b for b, _, _ in shown) > own, (shown, own)
    assert all(done <= total == needing for _, done, total in shown), shown


@counts_the_whole_server
def test_processes_that_yield_to_busy_sessions_each_get_their_share_of_the_pages(
    workdir: Path, db: str, busy_sessions: Callable[[int], None]
) -> None:
    # guard: a process that lost the race for a page waited a whole batch's spacing again
    # before its next try, and the yield came between reading the next page and claiming it,
    # so the process whose wait ended first claimed nearly every page (a joiner got 1 of 24)
    make_items(db, 750)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.3),
        batching__size=20,
        guards=join_gate(db, {"yield_to_busy": {"per_session": 0.3, "max_factor": 8}}),
    )
    busy_sessions(2)
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    open_join_gate(db, run_id, 1)
    code, out = finish(leader)
    assert code == 3, out
    jcode, jout = finish(joiner)
    assert jcode == 0, jout
    each_key_once(db, run_id, 600)
    per_process = sql(
        db,
        "SELECT process, count(*) AS n FROM backfill.batches WHERE run_id = $1"
        " AND status = 'done' GROUP BY process",
        run_id,
    )
    assert len(per_process) == 2, per_process
    assert min(r["n"] for r in per_process) >= 5, per_process
    # both waited after their batches, and the summary adds the two commands up
    rows = sql(db, "SELECT * FROM backfill.yields WHERE run_id = $1", run_id)
    assert len([r for r in rows if r["seconds"] > 0]) == 2, rows
    text = next(workdir.rglob("backfill_summary.md")).read_text()
    assert "summed over 2 commands" in text, text
    # a joiner saves no wait after the leader wrote the summary: it re-renders as written
    rerendered = start_runner(["report", run_id], workdir, db)
    rcode, rout = finish(rerendered)
    assert rcode == 0, rout
