"""Hostile review of #15 (leases: several processes on one run's stage).

Tests marked `# FOUND:` reproduce a defect the review found in the first version (fixed with
them); the others are regression guards for the properties the change claims."""

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
    each_key_once,
    env_for,
    finish,
    kill,
    leader_run,
    no_open_lease,
    process_of,
    start_runner,
    wait_for,
)

# `raw` is what the apply parses: 'abc' does not (SQLSTATE 22P02)
SLOW_POISON_APPLY = (
    "UPDATE items SET val = 'new', updated_at = '2030-01-01'::timestamptz "
    "+ (raw::int * interval '0 s') WHERE id = ANY($1) AND val IS DISTINCT FROM 'new'"
    " AND (SELECT pg_sleep({s})) IS NOT NULL"
)


def _poisoned_items(db: str, n: int, every: int) -> list[int]:
    make_items(db, n)
    sql(
        db,
        "ALTER TABLE items ADD COLUMN raw text; UPDATE items SET raw = id::text;"
        f" UPDATE items SET raw = 'abc' WHERE id IN (SELECT id FROM (SELECT id, row_number()"
        f" OVER (ORDER BY id) AS r FROM items WHERE val IS DISTINCT FROM 'new') AS n"
        f" WHERE r % {every} = 0)",
    )
    return [r["id"] for r in sql(db, "SELECT id FROM items WHERE raw = 'abc' ORDER BY id")]


# ---------------------------------------------------------------------------------------------
# quarantine across processes


@pytest.mark.slow
def test_a_key_a_joiner_quarantined_is_not_tried_again_by_the_leader(
    workdir: Path, db: str
) -> None:
    # FOUND: the leader takes in the other processes' quarantined keys only once, when it
    # starts (BatchRun.run calls on_data_error.share before the first pass only). Keys a joiner
    # quarantines later are unknown to the leader's ExcludingSource: its whole count after the
    # pass still counts them (remaining > 0), so it opens another pass and pages them again —
    # each such key is applied (and fails) a second time and is quarantined again (a second
    # 'quarantined' batch row; the failure budget counts it twice). Typically the last key the
    # joiner quarantines after the leader's last split. A single process quarantines each key
    # once. (Settle's share() comes too late: it runs after the batch already failed, and the
    # split does not drop keys that share() just learned are quarantined.) (runner/engine/batch_run.py BatchRun.run: no share()
    # between passes, unlike BatchRun.join; Quarantine.share.)
    poison = _poisoned_items(db, 1500, 30)  # 1200 needing, 40 poisoned
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_POISON_APPLY.format(s=0.05),
        batching__size=20,
        batching__min_failure_sample=100,
        batching__max_failure_rate=0.5,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    code, out = finish(leader)
    jcode, jout = finish(joiner)
    assert code == 3, out
    assert jcode == 0, jout
    by_joiner = val(
        db,
        "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND status = 'quarantined'"
        " AND process = (SELECT process_id FROM backfill.processes WHERE run_id = $1"
        " AND pid = $2)",
        run_id,
        joiner.pid,
    )
    assert by_joiner, "the joiner quarantined nothing: the test did not exercise the case"
    # every good row changed, the poisoned ones stayed
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == len(poison)
    keys = sql(
        db,
        "SELECT key[1]::int AS id, attempts FROM backfill.quarantine WHERE run_id = $1"
        " ORDER BY key[1]::int",
        run_id,
    )
    assert [k["id"] for k in keys] == poison
    # one 'quarantined' batch row per poisoned key, as a single process records
    rows = sql(
        db,
        "SELECT batch_no, first_key, last_key, process FROM backfill.batches"
        " WHERE run_id = $1 AND status = 'quarantined' ORDER BY batch_no",
        run_id,
    )
    assert len(rows) == len(poison), (
        f"{len(rows) - len(poison)} key(s) quarantined again after another process had "
        f"quarantined them; the last rows: {[dict(r) for r in rows[-3:]]}"
    )
    twice = [k["id"] for k in keys if k["attempts"] != 1]
    assert not twice, f"quarantine attempts charged twice: {twice}"


@pytest.mark.slow
def test_a_quarantined_batch_row_names_the_key_that_failed(workdir: Path, db: str) -> None:
    # FOUND: ExcludingSource.next_page keeps the inner page's bounds when it filters out
    # quarantined keys, so a page left with ONE key has the first_key of a key it excluded.
    # When that key fails, _Split.node records the top batch as 'quarantined' with
    # failed.first_key (the excluded key), and BatchRecorder._settled calls quarantine_key with
    # outcome.first_key: the ledger charges the wrong key (its attempts, batch_no, message are
    # overwritten and a released key would be re-opened: released_at = NULL), while the key
    # that failed is not updated. The leases make this common: the leader's second pass over
    # pages of mostly quarantined keys (see the test above). (runner/engine/quarantine.py
    # ExcludingSource.next_page / _Split.node; runner/phases/apply.py BatchRecorder._settled)
    _poisoned_items(db, 1500, 30)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_POISON_APPLY.format(s=0.05),
        batching__size=20,
        batching__min_failure_sample=100,
        batching__max_failure_rate=0.5,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    code, out = finish(leader)
    jcode, jout = finish(joiner)
    assert code == 3, out
    assert jcode == 0, jout
    wrong = [
        dict(r)
        for r in sql(
            db,
            "SELECT batch_no, first_key, last_key, selected, process FROM backfill.batches"
            " WHERE run_id = $1 AND status = 'quarantined' AND first_key <> last_key",
            run_id,
        )
    ]
    assert not wrong, f"a one-key 'quarantined' batch spanning other keys: {wrong}"


# ---------------------------------------------------------------------------------------------
# a killed leader


@pytest.mark.slow
def test_a_joiner_whose_leader_was_killed_does_not_report_a_clean_join(
    workdir: Path, db: str
) -> None:
    # FOUND (UX): the leader is SIGKILLed mid-stage; the joiner applies what it can, leaves
    # when it sees the leader gone (BatchRun._await_leader -> False) and returns status
    # "joined": exit 0 and "the process that leads the stage finishes it (summary, rollback
    # file, gate)". No process leads it any more: the stage is unfinished, no summary, no
    # gate, and nothing tells the operator to resume it (apply --run). Expected: a non-zero
    # exit (or at least a message that the leader is gone and how to continue).
    # (runner/phases/apply.py _join; runner/cli.py _print_apply "joined")
    make_items(db, 1000)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.2),
        batching__size=20,
        batching__lease_timeout=3,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    me = process_of(db, run_id, joiner)
    wait_for(db, "SELECT 1 FROM backfill.batches WHERE process = $1", me)
    kill(leader)
    jcode, jout = finish(joiner)
    assert not val(
        db, "SELECT done FROM backfill.work WHERE run_id = $1 AND stage = 'apply'", run_id
    )
    assert jcode != 0 or "gone" in jout or "--run" in jout, (
        f"exit {jcode} and a clean 'joined' report while the stage was left unfinished:\n{jout}"
    )


@pytest.mark.slow
def test_a_killed_leader_resumed_while_a_joiner_works_applies_each_key_once(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 2000)
    needing = 1600
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.1),
        batching__size=20,
        batching__workers=2,
        batching__lease_timeout=3,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    try:
        me = process_of(db, run_id, joiner)
        wait_for(db, "SELECT count(*) >= 3 FROM backfill.batches WHERE process = $1", me)
        kill(leader)
        # at once: the killed leader's heartbeat is still fresh, its leases not yet gone
        again = start_runner(
            ["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db
        )
        code, out = finish(again)
        assert code == 3, out
        jcode, jout = finish(joiner)
        assert jcode == 0, jout
    finally:
        kill(joiner)
    each_key_once(db, run_id, needing)
    no_open_lease(db, run_id)
    results = json.loads(next(workdir.rglob("execution_results.json")).read_text())
    assert results["totals"]["changed"] == needing, results["totals"]
    assert val(db, "SELECT done FROM backfill.work WHERE run_id = $1", run_id)


# ---------------------------------------------------------------------------------------------
# a process paused (SIGSTOP) past the lease timeout, then continued


@pytest.mark.slow
def test_a_paused_joiner_whose_lease_was_taken_over_does_not_apply_it_twice(
    workdir: Path, db: str
) -> None:
    make_items(db, 800)
    needing = 640
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.3),
        batching__size=20,
        batching__lease_timeout=3,
        batching__max_retries=20,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    try:
        me = process_of(db, run_id, joiner)
        wait_for(db, "SELECT 1 FROM backfill.batches WHERE process = $1", me)
        # a batch of its own running: an open lease without a batch row
        wait_for(
            db,
            "SELECT l.batch_no FROM backfill.leases l WHERE l.owner = $1 AND NOT EXISTS ("
            " SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id"
            " AND b.batch_no = l.batch_no)",
            me,
        )
        joiner.send_signal(signal.SIGSTOP)
        wait_for(db, "SELECT 1 FROM backfill.leases WHERE takeovers > 0 AND run_id = $1", run_id)
        time.sleep(1.0)
        joiner.send_signal(signal.SIGCONT)
        code, out = finish(leader)
        finish(joiner)
    finally:
        joiner.send_signal(signal.SIGCONT)
        kill(joiner)
        kill(leader)
    assert code == 3, out
    each_key_once(db, run_id, needing)
    no_open_lease(db, run_id)


# ---------------------------------------------------------------------------------------------
# a stop shared by the run


@pytest.mark.slow
def test_a_failed_batch_stops_every_process_and_the_resume_finishes_each_key_once(
    workdir: Path, db: str
) -> None:
    make_items(db, 1200)
    needing = 960
    # a non-data error (a scope violation: the apply changes a column outside target.columns
    # for one key) stops the stage, whoever runs that batch
    sql(
        db, "ALTER TABLE items ADD COLUMN other int DEFAULT 0, ADD COLUMN bad boolean DEFAULT false"
    )
    sql(db, "UPDATE items SET bad = true WHERE id = 601")
    apply_sql = (
        "UPDATE items SET val = 'new', updated_at = '2030-01-01',"
        " other = CASE WHEN bad THEN other + 1 ELSE other END"
        " WHERE id = ANY($1) AND val IS DISTINCT FROM 'new' AND (SELECT pg_sleep(0.1)) IS NOT NULL"
    )
    plan = write_plan(workdir / "p.json", apply__sql=apply_sql, batching__size=20)
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    code, out = finish(leader)
    jcode, jout = finish(joiner)
    assert code != 0, out
    assert jcode != 0, jout
    stopped = val(db, "SELECT stopped FROM backfill.work WHERE run_id = $1", run_id)
    assert stopped, "the failure did not stop the stage"
    # nothing committed after the stop was recorded
    # fix the data, resume: one process finishes it, each key once
    sql(db, "UPDATE items SET bad = false")
    again = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    code, out = finish(again)
    assert code == 3, out
    each_key_once(db, run_id, needing)
    no_open_lease(db, run_id)


# ---------------------------------------------------------------------------------------------
# a lease taken over while its owner is splitting it


# not idempotent on purpose: each application moves updated_at one day on (a counter)
COUNTING_POISON_APPLY = (
    "UPDATE items SET val = 'new', updated_at = updated_at + interval '1 day'"
    " + (raw::int * interval '0 s') WHERE id = ANY($1) AND (SELECT pg_sleep({s})) IS NOT NULL"
)


@pytest.mark.slow
def test_a_lease_taken_over_while_its_owner_splits_it_is_not_applied_twice(
    workdir: Path, db: str
) -> None:
    # FOUND: the takeover relies on the batch row's primary key (one commit per batch
    # number). A batch that failed on its data is split by its owner into parts with NEW
    # numbers (Claims.allocate), and the lease's own number gets its 'split' row only when the
    # whole split is over. An owner paused (SIGSTOP: a VM freeze, a GC pause) mid-split for
    # longer than lease_timeout loses the lease: another process re-pages the range and
    # applies the keys not yet done under the lease's number; when the owner continues, its
    # remaining parts (other numbers) apply the same keys again. Keys applied twice, the
    # poisoned key split and quarantined twice, and one of the two 'split'/'done' rows of the
    # lease's number silently dropped (record_settled_batch: ON CONFLICT DO NOTHING).
    # (runner/engine/claims.py take_over / ledger.take_over: no look at split parts in the
    # lease's range; runner/engine/quarantine.py _Split: parts keep running after the lease
    # was lost)
    make_items(db, 400)
    sql(
        db,
        "ALTER TABLE items ADD COLUMN raw text; UPDATE items SET raw = id::text;"
        " UPDATE items SET raw = 'abc' WHERE id IN (117, 237, 357)",
    )
    plan = write_plan(
        workdir / "p.json",
        apply__sql=COUNTING_POISON_APPLY.format(s=0.4),
        batching__size=20,
        batching__lease_timeout=3,
        batching__min_failure_sample=10,
        batching__max_failure_rate=0.5,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    try:
        me = process_of(db, run_id, joiner)
        # the joiner is splitting one of its leases: a part of it committed, the lease open
        wait_for(
            db,
            "SELECT l.batch_no FROM backfill.leases l JOIN backfill.batches b"
            " ON b.run_id = l.run_id AND b.process = l.owner AND b.batch_no > l.batch_no"
            " AND b.status = 'done' AND b.first_key[1]::bigint > coalesce(l.after_key[1], '0')"
            "::bigint AND b.last_key[1]::bigint <= l.last_key[1]::bigint"
            " WHERE l.owner = $1 AND NOT EXISTS (SELECT 1 FROM backfill.batches s"
            " WHERE s.run_id = l.run_id AND s.batch_no = l.batch_no)",
            me,
            timeout=120,
        )
        joiner.send_signal(signal.SIGSTOP)
        wait_for(db, "SELECT 1 FROM backfill.leases WHERE takeovers > 0 AND run_id = $1", run_id)
        time.sleep(1.5)
        joiner.send_signal(signal.SIGCONT)
        finish(leader)
        finish(joiner)
    finally:
        joiner.send_signal(signal.SIGCONT)
        kill(joiner)
        kill(leader)
    twice = [
        r["id"] for r in sql(db, "SELECT id FROM items WHERE updated_at > '2020-01-02' ORDER BY id")
    ]
    assert not twice, f"keys applied twice: {twice}"
    attempts = {
        r["key"][0]: r["attempts"]
        for r in sql(db, "SELECT key, attempts FROM backfill.quarantine WHERE run_id = $1", run_id)
    }
    assert set(attempts.values()) <= {1}, attempts


@pytest.mark.slow
def test_control_without_a_pause_a_counting_apply_applies_each_key_once(
    workdir: Path, db: str
) -> None:
    make_items(db, 400)
    sql(
        db,
        "ALTER TABLE items ADD COLUMN raw text; UPDATE items SET raw = id::text;"
        " UPDATE items SET raw = 'abc' WHERE id IN (117, 237, 357)",
    )
    plan = write_plan(
        workdir / "p.json",
        apply__sql=COUNTING_POISON_APPLY.format(s=0.05),
        batching__size=20,
        batching__lease_timeout=3,
        batching__min_failure_sample=10,
        batching__max_failure_rate=0.5,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    code, out = finish(leader)
    jcode, jout = finish(joiner)
    assert code == 3, out
    assert jcode == 0, jout
    assert val(db, "SELECT count(*) FROM items WHERE updated_at > '2020-01-02'") == 0
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 3
    no_open_lease(db, run_id)


COUNTING_APPLY = (
    "UPDATE items SET val = 'new', updated_at = updated_at + interval '1 day'"
    " WHERE id = ANY($1) AND (SELECT pg_sleep({s})) IS NOT NULL"
)


@pytest.mark.slow
def test_a_resumed_leader_does_not_re_page_the_keys_of_a_paused_joiners_open_batch(
    workdir: Path, db: str
) -> None:
    # FOUND: a leader that starts (apply --run) when no lease is held by a LIVE process resets
    # the stage's cursor and DELETES every open lease (ledger.lead_work), then pages from the
    # resume point under NEW batch numbers. A joiner that was only paused (SIGSTOP: a VM
    # freeze; its heartbeat stale) with a batch in flight still commits that batch when it
    # continues: its keys are applied by its batch AND by the leader's batch of another
    # number — the batch-number primary key that protects a takeover does not protect a
    # reset. (runner/ledger.py lead_work: DELETE of open leases; BatchRun.run's cursor)
    make_items(db, 600)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=COUNTING_APPLY.format(s=0.5),
        batching__size=20,
        batching__lease_timeout=3,
        batching__max_retries=30,
        batching__lock_timeout="1s",
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    again: subprocess.Popen[str] | None = None
    try:
        me = process_of(db, run_id, joiner)
        wait_for(db, "SELECT 1 FROM backfill.batches WHERE process = $1", me)
        wait_for(
            db,
            "SELECT l.batch_no FROM backfill.leases l WHERE l.owner = $1 AND NOT EXISTS ("
            " SELECT 1 FROM backfill.batches b WHERE b.run_id = l.run_id"
            " AND b.batch_no = l.batch_no)",
            me,
        )
        time.sleep(0.1)
        joiner.send_signal(signal.SIGSTOP)
        kill(leader)
        time.sleep(4.5)  # the joiner's heartbeat is older than the lease timeout
        again = start_runner(
            ["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db
        )
        wait_for(
            db,
            "SELECT 1 FROM backfill.processes WHERE run_id = $1 AND pid = $2",
            run_id,
            again.pid,
        )
        time.sleep(3)
        joiner.send_signal(signal.SIGCONT)
        code, out = finish(again)
        finish(joiner)
    finally:
        joiner.send_signal(signal.SIGCONT)
        kill(joiner)
        kill(leader)
        if again is not None:
            kill(again)
    twice = [
        r["id"] for r in sql(db, "SELECT id FROM items WHERE updated_at > '2020-01-02' ORDER BY id")
    ]
    assert not twice, f"keys applied twice: {twice}"
    assert code == 3, out


# ---------------------------------------------------------------------------------------------
# other commands while a joiner still works


@pytest.mark.slow
def test_a_rollback_is_not_undone_by_a_joiner_that_keeps_applying(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    # FOUND: a joiner holds no run lock (phase_frame join mode: "the leader holds it"). Once
    # the leader is gone (killed), `backfill rollback RUN` takes the run lock and undoes every
    # committed batch while the joiner goes on claiming pages and committing batches; the
    # rollback reports success and the table ends up partly backfilled again. Nothing checks,
    # before a joiner's batch, that the run was rolled back (rollback_note is read once when a
    # command starts), and the rollback does not look for live processes of the run.
    # (runner/phases/common.py run_lock/phase_frame join mode; runner/commands/rollback.py;
    # runner/engine/batch_run.py _produce_claimed)
    from tests.helpers import differing, env_for, snapshot

    make_items(db, 1000)
    snapshot(db, "items")
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.3),
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
        time.sleep(0.5)
        undone = cli("rollback", run_id, "--env", "staging", env=env_for(db))
        rolled_back_while_joiner_ran = undone.exit_code == 0 and joiner.poll() is None
        finish(joiner)
    finally:
        kill(joiner)
    if undone.exit_code != 0:
        return  # refused while a process of the run works: fine
    assert not rolled_back_while_joiner_ran or differing(db, "items") == 0, (
        f"the rollback said {undone.output!r} while the joiner was still applying; "
        f"rows changed after it: {differing(db, 'items')}"
    )


# ---------------------------------------------------------------------------------------------
# the canary across processes


def _start(args: list[str], workdir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
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
def test_the_canary_runs_its_batch_count_across_processes(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    from tests.helpers import run_id_of

    staging, prod = make_db(), make_db()
    make_items(staging, 300)
    make_items(prod, 1500)
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    plan = write_plan(
        workdir / "plan.json",
        apply__sql=SLOW_APPLY.format(s=0.2),
        batching__size=20,
        batching__workers=2,
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
    assert batches >= 5, batches
    args = ["apply", str(mini), "-e", "prod", "--run", run_id, "-q"]
    leader = _start(args, workdir, env)
    wait_for(prod, "SELECT 1 FROM backfill.work WHERE stage = 'canary'")
    joiners = [_start(args, workdir, env) for _ in range(2)]
    code, out = finish(leader)
    outs = [finish(j) for j in joiners]
    assert code == 3, out
    assert all(c == 0 for c, _ in outs), outs
    done = val(
        prod,
        "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND stage = 'canary'"
        " AND status = 'done'",
        run_id,
    )
    assert done == batches, (done, batches)
    procs = val(
        prod,
        "SELECT count(DISTINCT process) FROM backfill.batches WHERE run_id = $1"
        " AND stage = 'canary' AND status = 'done'",
        run_id,
    )
    assert procs >= 2, (procs, outs)
    changed = val(prod, "SELECT count(*) FROM items WHERE updated_at = '2030-01-01'")
    assert changed == batches * 20, (changed, batches)


@pytest.mark.slow
def test_a_cancel_stops_every_process_and_nothing_commits_after_it(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 1500)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.2),
        batching__size=20,
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    me = process_of(db, run_id, joiner)
    wait_for(db, "SELECT 1 FROM backfill.batches WHERE process = $1", me)
    cancelled = cli("cancel", run_id, "--env", "staging", env=env_for(db))
    assert cancelled.exit_code == 0, cancelled.output
    at = val(db, "SELECT clock_timestamp()")
    code, out = finish(leader)
    jcode, jout = finish(joiner)
    assert code != 0, out
    assert jcode != 0, jout
    assert code == jcode, (out, jout)
    # in-flight batches finish; none starts more than one batch later
    late = val(
        db,
        "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND started_at > $2",
        run_id,
        at,
    )
    assert late <= 2, late
    no_open_lease(db, run_id)
