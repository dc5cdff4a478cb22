"""Second hostile review of #15 (leases), after the fixes of the first review.

Tests marked `# FOUND:` failed on the code as reviewed (fixed with them) and explain the defect; the
others are regression guards for properties the fixes claim."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_items, sql, val, write_plan
from tests.helpers import (
    SLOW_APPLY,
    finish,
    kill,
    leader_run,
    process_of,
    start_runner,
    wait_for,
)


def _twice(db: str, run_id: str) -> list[dict[str, Any]]:
    """Keys with a before-image in more than one batch: applied more than once."""
    return [
        dict(r)
        for r in sql(
            db,
            "SELECT key, array_agg(batch_no ORDER BY batch_no) AS batches"
            " FROM backfill.row_images WHERE run_id = $1 GROUP BY key HAVING count(*) > 1",
            run_id,
        )
    ]


def _no_open_lease(db: str, run_id: str) -> None:
    open_ = sql(
        db,
        "SELECT batch_no, owner FROM backfill.leases l WHERE run_id = $1 AND NOT EXISTS ("
        " SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id"
        " AND b.batch_no = l.batch_no AND b.status IN ('done', 'split', 'quarantined'))",
        run_id,
    )
    assert not open_, open_


# ---------------------------------------------------------------------------------------------
# a page claimed in a pass the leader has already closed


@pytest.mark.slow
def test_a_page_claimed_while_the_leader_counts_is_not_paged_again_in_the_next_pass(
    workdir: Path, db: str
) -> None:
    # DEFECT (silent wrongness: a key applied twice, by two batch numbers): BatchRun.run
    # waits for open leases (_settle_pass), then counts the whole table (_count_whole, as
    # soon as another process shared the pass) and only then opens the next pass
    # (Claims.next_pass: position = NULL). Nothing stops a process from claiming a page of the
    # OLD pass in between: ledger.claim_page only checks that the cursor's pass and position
    # are the ones it read. Here a process that joins while the leader counts (rows arrived
    # after the cursor) claims such a page; the leader then opens pass 2, pages from the start
    # and claims the same keys again under another number while the joiner is still applying
    # them: both batches commit the keys (two before-images, the apply ran twice; with an
    # apply that is not idempotent the data is wrong, and `keys_in_several_batches` trips).
    # (runner/engine/batch_run.py BatchRun.run: _settle_pass .. next_pass is not atomic;
    # runner/ledger.py next_pass does not wait for, or adopt, the old pass's open leases.)
    make_items(db, 3000)
    # a gap below the cursor, filled while pass 1 runs: rows that make the leader's count >0
    # without being ones this run applied (not "stuck")
    gap = [
        r["id"] for r in sql(db, "DELETE FROM items WHERE id <= 120 AND id % 3 = 1 RETURNING id")
    ]
    plan = write_plan(
        workdir / "p.json",
        # every row costs 1.5 ms to discover: counting the whole table takes seconds, a page
        # after the cursor does not (an index range)
        discovery__sql="SELECT id FROM items WHERE CASE WHEN pg_sleep(0.0015) IS NULL THEN false"
        " ELSE val IS DISTINCT FROM 'new' END",
        # ids above 5000 (rows that arrive late) take 30 s to apply; no idempotence guard, so
        # a second application shows in the images
        apply__sql="UPDATE items SET val = 'new', updated_at = clock_timestamp()"
        " WHERE id = ANY($1) AND (SELECT pg_sleep(CASE WHEN max(x) > 5000 THEN 30 ELSE 0.5 END)"
        " FROM unnest($1::int[]) AS x) IS NOT NULL",
        batching__size=100,
        batching__statement_timeout="60s",
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    late: subprocess.Popen[str] | None = None
    try:
        # the joiner shares pass 1 (so the leader counts the whole table after it)
        wait_for(
            db, "SELECT 1 FROM backfill.batches WHERE process = $1", process_of(db, run_id, joiner)
        )
        sql(
            db,
            "INSERT INTO items (id, grp, val) SELECT g, 0, 'old' FROM unnest($1::int[]) AS g",
            gap,
        )
        # pass 1 is dry for both processes: every row up to the cursor done, no lease open
        wait_for(
            db,
            "SELECT NOT EXISTS (SELECT 1 FROM items WHERE id > 120 AND val <> 'new')"
            " AND NOT EXISTS (SELECT 1 FROM backfill.leases l WHERE l.run_id = $1 AND NOT"
            " EXISTS (SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id"
            " AND b.batch_no = l.batch_no))",
            run_id,
            timeout=120,
        )
        # the leader counts now; rows arrive after the cursor and a third process joins
        sql(
            db,
            "INSERT INTO items (id, grp, val) SELECT g, 0, 'old' FROM generate_series(5001, 5040) g",
        )
        late = start_runner(
            ["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db
        )
        code, out = finish(leader, timeout=240)
        _lcode, lout = finish(late, timeout=120)
        finish(joiner, timeout=60)
    finally:
        for p in (leader, joiner, late):
            if p is not None:
                kill(p)
    passes = sql(
        db,
        "SELECT pass, owner, batch_no FROM backfill.leases WHERE run_id = $1"
        " AND last_key[1]::int > 5000 ORDER BY batch_no",
        run_id,
    )
    assert any(p["pass"] == 1 for p in passes), (
        f"the late process did not claim the arrived rows in pass 1: not exercised {passes}\n{lout}"
    )
    assert code == 3, out
    twice = _twice(db, run_id)
    assert not twice, (
        f"keys applied by two batches: {twice[:5]} (leases: {[dict(p) for p in passes]})"
    )


# ---------------------------------------------------------------------------------------------
# a process frozen inside a ledger transaction


@pytest.mark.slow
def test_a_joiner_frozen_inside_a_claim_does_not_block_the_run(workdir: Path, db: str) -> None:
    # DEFECT (hang): the fix ends a batch transaction left idle for lease_timeout (a frozen
    # process's FOR SHARE lock), but not a LEDGER transaction: the main connection has no
    # idle_in_transaction_session_timeout (nor lock_timeout). A process stopped inside
    # ledger.claim_page (after `UPDATE backfill.work`, before COMMIT) keeps the stage's cursor
    # row locked for as long as it is frozen (a SIGSTOP, a VM pause, a client cut off by the
    # network: hours until TCP keepalive): every other process, the leader included, waits on
    # that row lock in claim_page / take_over / finish_work with no timeout — the run stops
    # though the frozen process's heartbeat went silent long ago, and nothing takes it over.
    # The window is short in real life (a few round trips; take_over and release_claim have
    # the same shape); a trigger on backfill.leases widens it here so the freeze lands in it.
    # (runner/ledger.py claim_page/take_over/finish_work under runner/engine/session.py
    # MainSession: no idle_in_transaction_session_timeout / lock_timeout on ledger connections.)
    # Fixed: a claim is one statement (nothing is left open between its round trips), and the
    # ledger connection ends a transaction left idle for lease_timeout (the other ledger
    # transactions of several statements).
    make_items(db, 1000)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.3),
        batching__size=20,
        batching__lease_timeout=3,
    )
    sql(
        db,
        """CREATE TABLE public.slow_owner (owner text);
           CREATE FUNCTION public.slow_lease() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.owner IN (SELECT owner FROM public.slow_owner) THEN PERFORM pg_sleep(2);
             END IF;
             RETURN NEW;
           END $$;
           CREATE TRIGGER slow_lease BEFORE INSERT ON backfill.leases
             FOR EACH ROW EXECUTE FUNCTION public.slow_lease();""",
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    try:
        me = process_of(db, run_id, joiner)
        wait_for(db, "SELECT 1 FROM backfill.batches WHERE process = $1", me)
        sql(db, "INSERT INTO public.slow_owner VALUES ($1)", me)
        # the joiner's claim is inside its transaction (the cursor row locked): freeze it there
        wait_for(
            db,
            "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%INSERT INTO backfill.leases%'"
            " AND wait_event = 'PgSleep' AND datname = current_database()",
        )
        joiner.send_signal(signal.SIGSTOP)
        sql(db, "DELETE FROM public.slow_owner")
        time.sleep(3)
        before = val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1", run_id)
        time.sleep(8)  # more than two lease timeouts
        after = val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1", run_id)
        waiting = [
            dict(r)
            for r in sql(
                db,
                "SELECT pid, wait_event_type, left(query, 60) AS query,"
                " now() - query_start AS waited FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
        ]
        assert after > before + 5, (
            f"the run made no progress for 8 s while a joiner was frozen inside a claim "
            f"({before} -> {after} batch rows); waiting on locks: {waiting}"
        )
        joiner.send_signal(signal.SIGCONT)
        code, out = finish(leader)
        assert code == 3, out
    finally:
        joiner.send_signal(signal.SIGCONT)
        kill(joiner)
        kill(leader)
    assert not _twice(db, run_id)
    _no_open_lease(db, run_id)


# ---------------------------------------------------------------------------------------------
# rollback


def test_a_rollback_of_a_plan_with_a_lease_timeout_duration_runs(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    # DEFECT (loud failure): lease_timeout takes durations ("30s"), and the plan stored with
    # the run is the raw plan; _stop_other_processes reads it back with
    # float(run.plan["batching"]["lease_timeout"]): a rollback of any run whose plan wrote the
    # timeout as a duration string dies with ValueError before restoring anything (the
    # quarantine retry and apply read the parsed plan; only the rollback reads the raw one).
    # (runner/commands/rollback.py _stop_other_processes)
    from tests.helpers import differing, env_for, snapshot

    make_items(db, 300)
    snapshot(db, "items")
    plan = write_plan(workdir / "p.json", batching__lease_timeout="5s")
    applied = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert applied.exit_code == 3, applied.output
    run_id = str(val(db, "SELECT run_id FROM backfill.runs"))
    undone = cli("rollback", run_id, "--env", "staging", env=env_for(db))
    assert undone.exit_code == 0, f"{undone.output}\n{undone.exception!r}"
    assert differing(db, "items") == 0


@pytest.mark.slow
def test_a_rollback_waits_out_a_joiner_frozen_inside_its_batch_and_nothing_commits_after(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    # guard: a joiner frozen with its batch transaction open (FOR SHARE on its lease, its
    # batch row written but not committed): the rollback tombstones the lease once the server
    # ends that idle transaction; continued, the joiner commits nothing.
    from tests.helpers import differing, env_for, snapshot

    make_items(db, 1000)
    snapshot(db, "items")
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
        me = process_of(db, run_id, joiner)
        wait_for(db, "SELECT 1 FROM backfill.batches WHERE process = $1", me)
        kill(leader)
        # the joiner's batch statement sleeping: freeze it inside the transaction
        wait_for(
            db,
            "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
            " AND query LIKE '%pg_sleep%' AND state = 'active' AND datname = current_database()",
        )
        joiner.send_signal(signal.SIGSTOP)
        undone = cli("rollback", run_id, "--env", "staging", env=env_for(db))
        joiner.send_signal(signal.SIGCONT)
        jcode, jout = finish(joiner, timeout=60)
    finally:
        kill(joiner)
        kill(leader)
    assert undone.exit_code == 0, undone.output
    assert differing(db, "items") == 0, "rows changed after the rollback"
    assert jcode != 0, jout
    late = sql(
        db,
        "SELECT batch_no, status, committed_at FROM backfill.batches WHERE run_id = $1"
        " AND status = 'done' AND committed_at > (SELECT max(at) FROM backfill.run_events"
        " WHERE run_id = $1 AND kind = 'rollback')",
        run_id,
    )
    assert not late, late
    # the tombstone a rollback writes reads back everywhere
    assert val(
        db,
        "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND status = 'abandoned'",
        run_id,
    ), "no lease was tombstoned: not exercised"
    status = cli("status", run_id, env=env_for(db))
    assert status.exit_code == 0, f"{status.output}\n{status.exception!r}"
    again = cli("rollback", run_id, "--env", "staging", "--dry-run", env=env_for(db))
    assert again.exit_code == 0, f"{again.output}\n{again.exception!r}"
    emitted = cli("rollback", run_id, "--env", "staging", "--emit", env=env_for(db))
    assert emitted.exit_code == 0, f"{emitted.output}\n{emitted.exception!r}"


# ---------------------------------------------------------------------------------------------
# --max-rows with a joiner


@pytest.mark.slow
def test_a_capped_leader_with_a_joiner_then_continued_applies_each_key_once(
    workdir: Path, db: str
) -> None:
    # guard: the leader stops at its cap without waiting for the joiner's leases; the joiner
    # goes on, then the run is continued while the joiner may still hold leases
    make_items(db, 1000)
    needing = 800
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.2),
        batching__size=20,
        batching__lease_timeout=3,
    )
    leader = start_runner(
        ["apply", str(plan), "-e", "staging", "-q", "--max-rows", "200"], workdir, db
    )
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    again: subprocess.Popen[str] | None = None
    try:
        code, out = finish(leader)
        assert code == 0, out
        led = val(
            db,
            "SELECT count(*) FROM backfill.batches b JOIN backfill.processes p"
            " ON p.process_id = b.process WHERE b.run_id = $1 AND p.pid = $2"
            " AND b.status = 'done'",
            run_id,
            leader.pid,
        )
        assert led == 10, f"the leader committed {led} batches of 20 keys for a cap of 200"
        again = start_runner(
            ["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db
        )
        acode, aout = finish(again)
        finish(joiner)
    finally:
        for p in (leader, joiner, again):
            if p is not None:
                kill(p)
    assert acode == 3, aout
    assert not _twice(db, run_id)
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert val(db, "SELECT count(*) FROM backfill.row_images WHERE run_id = $1", run_id) == needing
    _no_open_lease(db, run_id)
    results = json.loads(next(workdir.rglob("execution_results.json")).read_text())
    assert results["totals"]["changed"] == needing, results["totals"]


# ---------------------------------------------------------------------------------------------
# a leader that lost its run lock while alive


@pytest.mark.slow
def test_a_leader_that_lost_its_connection_while_alive_and_its_successor_apply_each_key_once(
    workdir: Path, db: str
) -> None:
    # guard: the leader's ledger connection (the run lock) is cut while it is frozen with a
    # batch in flight; a new `apply --run` takes the lock and marks it gone at once (lead_work)
    # though it is alive; continued, the old leader's late batch must not commit keys twice
    make_items(db, 1000)
    needing = 800
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.3),
        batching__size=20,
        batching__workers=2,
        batching__lease_timeout=3,
    )
    old = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    new: subprocess.Popen[str] | None = None
    try:
        wait_for(db, "SELECT count(*) > 5 FROM backfill.batches WHERE run_id = $1", run_id)
        old.send_signal(signal.SIGSTOP)
        sql(
            db,
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
            " AND granted AND pid <> pg_backend_pid()"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        new = start_runner(
            ["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db
        )
        wait_for(
            db,
            "SELECT 1 FROM backfill.processes WHERE run_id = $1 AND pid = $2",
            run_id,
            new.pid,
        )
        wait_for(db, "SELECT 1 FROM backfill.leases WHERE run_id = $1 AND takeovers > 0", run_id)
        old.send_signal(signal.SIGCONT)
        code, out = finish(new)
        finish(old, timeout=60)
    finally:
        for p in (old, new):
            if p is not None:
                kill(p)
    assert code == 3, out
    assert not _twice(db, run_id)
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert val(db, "SELECT count(*) FROM backfill.row_images WHERE run_id = $1", run_id) == needing
    _no_open_lease(db, run_id)


# ---------------------------------------------------------------------------------------------
# a quarantine retry between two commands of a stage


SLOW_POISON_APPLY = (
    "UPDATE items SET val = 'new', updated_at = '2030-01-01'::timestamptz "
    "+ (raw::int * interval '0 s') WHERE id = ANY($1) AND val IS DISTINCT FROM 'new'"
    " AND (SELECT pg_sleep({s})) IS NOT NULL"
)


@pytest.mark.slow
def test_a_retry_between_two_commands_does_not_take_the_number_of_an_open_lease(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    # DEFECT (a batch number reused for other keys): the quarantine retry numbers its batches
    # after the run's last batch ROW (resume_point over batch_states), not after the stage's
    # cursor (backfill.work.next_no) nor its leases. A killed apply leaves its in-flight page
    # as an open lease numbered above every batch row; a retry then (the hint of a spent
    # budget says: fix the data, re-try, then continue) writes its 'done' row under THAT
    # number, for other keys. The ledger now takes the lease as settled (_OPEN matches any
    # settled row of its number, whatever its stage): the continuing apply never takes it
    # over, and its page's keys are applied only because a later pass happens to find them
    # (with max_passes = 1: left behind with a "rows still need the backfill" warning). A
    # frozen joiner that owns such a lease and wakes up finds "its" number committed
    # (batch_recorded -> 'skipped') and counts its page as done.
    # (runner/phases/retry.py _retry: resume_point(...) for next_no; runner/ledger.py _OPEN.)
    from tests.helpers import env_for

    make_items(db, 1000)
    sql(
        db,
        "ALTER TABLE items ADD COLUMN raw text; UPDATE items SET raw = id::text;"
        " UPDATE items SET raw = 'abc' WHERE id IN (7, 13)",
    )
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_POISON_APPLY.format(s=0.3),
        batching__size=20,
        batching__lease_timeout=3,
        batching__min_failure_sample=100,
        batching__max_failure_rate=0.5,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    try:
        wait_for(db, "SELECT count(*) >= 2 FROM backfill.quarantine WHERE run_id = $1", run_id)
        wait_for(db, "SELECT count(*) > 8 FROM backfill.batches WHERE run_id = $1", run_id)
        # its batch in flight: an open lease above every batch row
        wait_for(
            db,
            "SELECT 1 FROM backfill.leases l WHERE l.run_id = $1 AND l.batch_no >"
            " (SELECT max(batch_no) FROM backfill.batches b WHERE b.run_id = $1)",
            run_id,
        )
        kill(leader)
    finally:
        kill(leader)
    open_lease = sql(
        db,
        "SELECT batch_no, after_key, last_key FROM backfill.leases l WHERE l.run_id = $1"
        " AND NOT EXISTS (SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id"
        " AND b.batch_no = l.batch_no)",
        run_id,
    )
    assert len(open_lease) == 1, open_lease
    time.sleep(3.5)  # its heartbeat is silent: the retry may run
    sql(db, "UPDATE items SET raw = id::text")  # the data fixed
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env_for(db))
    assert retried.exit_code == 0, retried.output
    again = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env_for(db))
    assert again.exit_code == 3, again.output
    numbers = [
        dict(r)
        for r in sql(
            db,
            "SELECT batch_no, stage, status, first_key, last_key FROM backfill.batches"
            " WHERE run_id = $1 AND batch_no = $2",
            run_id,
            open_lease[0]["batch_no"],
        )
    ]
    left = [
        r["id"]
        for r in sql(db, "SELECT id FROM items WHERE val IS DISTINCT FROM 'new' ORDER BY id")
    ]
    assert not left, (
        f"{len(left)} row(s) never applied ({left[:5]}…), the page of lease "
        f"{dict(open_lease[0])}; its number's batch row: {numbers}"
    )
    assert all(n["stage"] == "apply" for n in numbers), (
        f"the number of the open lease {dict(open_lease[0])} went to other keys: {numbers}"
    )


# ---------------------------------------------------------------------------------------------
# the prod mini plan: canary then rest, with joiners on both sides of the gate


def _start_env(args: list[str], workdir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    import os
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=workdir,
        env={
            **os.environ,
            **env,
            "BACKFILL_LOGS": str(workdir / "backfill_logs"),
            "BACKFILL_ACTOR": "operator",
            "BACKFILL_CMD": "backfill",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_canary_with_a_killed_leader_then_rest_with_a_joiner_each_key_once(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    # guard: the canary led by a process killed mid-way and continued while a joiner works,
    # then the rest stage with a joiner: the canary keeps its batch count, every key applied
    # once, no batch number of the canary reused by the rest
    from tests.helpers import run_id_of

    staging, prod = make_db(), make_db()
    make_items(staging, 300)
    make_items(prod, 1500)
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    plan = write_plan(
        workdir / "plan.json",
        apply__sql=SLOW_APPLY.format(s=0.3),
        batching__size=20,
        batching__lease_timeout=3,
        health__canary_percent=40,
    )
    applied = cli("apply", str(plan), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    soak = ("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s")
    assert cli(*soak, "--interval", "1s", env=env).exit_code == 3
    assert cli("approve", run_id, "--gate", "soak-staging", "--as", "bob", env=env).exit_code == 0
    checked = cli("health", str(plan), "-e", "prod", "--run", run_id, env=env)
    assert checked.exit_code == 3, checked.output
    assert cli("approve", run_id, "--gate", "health-prod", "--as", "alice", env=env).exit_code == 0
    mini = next(workdir.rglob("prod_mini_backfill_plan.json"))
    batches = json.loads(mini.read_text())["canary"]["batches"]
    args = ["apply", str(mini), "-e", "prod", "--run", run_id, "-q"]
    procs: list[subprocess.Popen[str]] = []
    try:
        leader = _start_env(args, workdir, env)
        procs.append(leader)
        wait_for(prod, "SELECT 1 FROM backfill.work WHERE stage = 'canary'")
        joiner = _start_env(args, workdir, env)
        procs.append(joiner)
        wait_for(
            prod,
            "SELECT count(*) >= 2 FROM backfill.batches WHERE stage = 'canary'"
            " AND process = (SELECT process_id FROM backfill.processes WHERE pid = $1)",
            joiner.pid,
        )
        kill(leader)
        again = _start_env(args, workdir, env)
        procs.append(again)
        code, out = finish(again)
        assert code == 3, out
        finish(joiner)
        done = val(
            prod,
            "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND stage = 'canary'"
            " AND status = 'done'",
            run_id,
        )
        assert done == batches, (done, batches)
        assert (
            cli("approve", run_id, "--gate", "canary-prod", "--as", "bob", env=env).exit_code == 0
        )
        rest = _start_env(args, workdir, env)
        procs.append(rest)
        wait_for(prod, "SELECT 1 FROM backfill.work WHERE stage = 'rest'")
        joiner2 = _start_env(args, workdir, env)
        procs.append(joiner2)
        code, out = finish(rest)
        jcode, jout = finish(joiner2)
    finally:
        for p in procs:
            kill(p)
    assert code == 0, out
    assert jcode == 0, jout
    assert val(prod, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert not _twice(prod, run_id)
    assert val(prod, "SELECT count(*) FROM backfill.row_images WHERE run_id = $1", run_id) == 1200
    _no_open_lease(prod, run_id)
