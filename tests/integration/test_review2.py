"""Outside review (review2) of #12 (quarantine) and #14 (row caps): attacks on a real PostgreSQL.
Each test states what should hold; a failing test is a finding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import sql, val, write_plan
from tests.helpers import differing, env_for, rollback_file, run_id_of, run_psql, snapshot
from tests.integration.test_quarantine import BOTH_PATHS, POISON_APPLY, poisoned_items

# the same apply without the "needs it" filter: the keys it is handed are all it is told about
BARE_APPLY = (
    "UPDATE items SET val = 'new', updated_at = '2030-01-01'::timestamptz "
    "+ (raw::int * interval '0 s') WHERE id = ANY($1)"
)


def changed_keys(db: str, run_id: str) -> int:
    return val(
        db,
        "SELECT count(DISTINCT key) FROM backfill.row_images WHERE run_id = $1"
        " AND op IN ('I', 'U', 'D')",
        run_id,
    )


@BOTH_PATHS
@pytest.mark.parametrize("workers", [1, 2])
def test_max_rows_n_changes_exactly_n_rows_with_a_poison_key_in_the_first_n(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str, workers: int
) -> None:
    """`--max-rows N` counts the rows handed to batches (README, plans/README): a key that ends
    quarantined is one of the N, so with 5 poison keys among the first 250, 245 rows change and
    5 are quarantined; the output says so."""
    poisoned_items(db, 3000, 50)  # keys 50, 100, ... are poison
    plan = write_plan(
        workdir / "p.json",
        apply__sql=POISON_APPLY + suffix,
        batching__min_failure_sample=100,
        batching__max_failure_rate=0.5,
        batching__workers=workers,
    )
    result = cli("apply", str(plan), "--env", "staging", "-q", "--max-rows", "250", env=env_for(db))
    assert result.exit_code == 0, result.output
    run_id = run_id_of(result.output)
    q = val(db, "SELECT count(*) FROM backfill.quarantine WHERE run_id = $1", run_id)
    assert q == 5
    assert changed_keys(db, run_id) == 245
    assert "row cap (250 row(s) handed to batches, quarantined ones included)" in " ".join(
        result.output.split()
    )


@BOTH_PATHS
def test_max_rows_keys_handed_equal_changed_plus_quarantined_with_splits_and_2_workers(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    """Whatever the cap counts, it must be exact in keys handed to batches: changed + quarantined
    = N, and a continued run with the same cap adds exactly N more."""
    poisoned_items(db, 3000, 37)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=POISON_APPLY + suffix,
        batching__min_failure_sample=100,
        batching__max_failure_rate=0.5,
        batching__workers=2,
        batching__size=64,
    )
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", "--max-rows", "333", env=env)
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)

    def handled() -> int:
        return changed_keys(db, run_id) + val(
            db, "SELECT count(*) FROM backfill.quarantine WHERE run_id = $1", run_id
        )

    assert handled() == 333
    again = cli(
        "apply", str(plan), "--env", "staging", "-q", "--max-rows", "333", "--run", run_id, env=env
    )
    assert again.exit_code == 0, again.output
    assert handled() == 666
    assert val(db, "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images") == 0


@BOTH_PATHS
def test_retry_of_a_key_fixed_by_hand_to_need_nothing_is_released(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    """A person fixes the bad row by giving it the backfill's value: the retry's batch commits
    with nothing to change; the key must not stay quarantined for ever (gate inconclusive)."""
    poisoned_items(db, 600, 100)
    plan = write_plan(
        workdir / "p.json", apply__sql=POISON_APPLY + suffix, batching__max_failure_rate=0.5
    )
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    sql(db, "UPDATE items SET raw = '0', val = 'new' WHERE raw = 'abc'")
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert retried.exit_code == 0, retried.output
    assert (
        val(
            db,
            "SELECT count(*) FROM backfill.quarantine WHERE run_id = $1 AND released_at IS NULL",
            run_id,
        )
        == 0
    ), retried.output


@BOTH_PATHS
def test_retry_does_not_write_a_row_discovery_no_longer_selects(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    """After the quarantine the application takes a bad row out of the backfill's scope (the
    discovery query no longer returns it). `quarantine --retry` must not write it: the main
    path only ever writes keys discovery returned."""
    poison = poisoned_items(db, 600, 100)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=BARE_APPLY + suffix,
        discovery__sql="SELECT id FROM items WHERE val IS DISTINCT FROM 'new' AND val IS DISTINCT FROM 'app'",
        batching__max_failure_rate=0.5,
    )
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    # the app owns this row now (out of scope), and fixes the other bad rows' data
    sql(db, "UPDATE items SET raw = '0', val = 'app' WHERE id = $1", poison[0])
    sql(db, "UPDATE items SET raw = '0' WHERE raw = 'abc'")
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert val(db, "SELECT val FROM items WHERE id = $1", poison[0]) == "app", retried.output


@BOTH_PATHS
@pytest.mark.parametrize("how", ["runner", "psql"])
def test_rollback_after_two_retries_restores_exactly(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str, how: str
) -> None:
    poisoned_items(db, 1500, 50)
    snapshot(db, "items")
    plan = write_plan(
        workdir / "p.json", apply__sql=POISON_APPLY + suffix, batching__max_failure_rate=0.5
    )
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    # fix half the bad rows, retry; fix the rest, retry again, then once more with nothing left
    sql(db, "UPDATE items SET raw = '7' WHERE raw = 'abc' AND id % 100 = 0")
    r1 = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    sql(db, "UPDATE items SET raw = '9' WHERE raw = 'abc'")
    r2 = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert r2.exit_code == 0, r1.output + r2.output
    r3 = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert r3.exit_code == 0, r3.output
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert val(db, "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images") == 0
    if how == "runner":
        undone = cli("rollback", run_id, "--env", "staging", env=env)
        assert undone.exit_code == 0, undone.output
    else:
        ran = run_psql(db, rollback_file(workdir, run_id))
        assert ran.returncode == 0, ran.stderr
        assert "| t\n" in ran.stdout  # it says verified ...
    # the snapshot was taken before the data fixes; compare only what the backfill wrote
    assert val(db, "SELECT count(*) FROM items WHERE updated_at = '2030-01-01'") == 0
    assert differing(db, "items") == 24  # the bad rows: only their `raw` (the fixes) differs


@pytest.mark.parametrize("how", ["cancel", "reject"])
def test_retry_refuses_a_cancelled_or_rejected_run(
    cli: Callable[..., Any], workdir: Path, db: str, how: str
) -> None:
    """`cancel`: "stop a run for good"; a reject "is final for the run". A retry must not write
    more rows into such a run."""
    poisoned_items(db, 600, 100)
    plan = write_plan(workdir / "p.json", apply__sql=POISON_APPLY, batching__max_failure_rate=0.5)
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    if how == "cancel":
        stop = cli("cancel", run_id, "--env", "staging", "--note", "stop it", env=env)
    else:
        stop = cli(
            "reject", run_id, "--gate", "apply-staging", "--as", "bob", "--note", "no", env=env
        )
    assert stop.exit_code == 0, stop.output
    sql(db, "UPDATE items SET raw = '0' WHERE raw = 'abc'")
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 4, (
        stop.output + retried.output
    )


@BOTH_PATHS
def test_report_rerenders_every_artifact_byte_for_byte_after_splits_and_a_retry(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    poisoned_items(db, 1500, 50)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=POISON_APPLY + suffix,
        batching__max_failure_rate=0.5,
        batching__workers=2,
    )
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    out = next((workdir / "backfill_logs").rglob(f"{run_id}/staging"))
    names = ["backfill_summary.md", "manifest.jsonl", "quarantine.json", "quarantine.csv"]
    before = {n: (out / n).read_bytes() for n in names}
    again = cli("report", run_id, env=env)
    assert again.exit_code == 0, again.output
    after = {n: (out / n).read_bytes() for n in names}
    assert [n for n in names if before[n] != after[n]] == []


def test_report_after_a_retry_writes_a_rollback_file_that_covers_the_retry(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    poisoned_items(db, 600, 100)
    plan = write_plan(workdir / "p.json", apply__sql=POISON_APPLY, batching__max_failure_rate=0.5)
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    run_id = run_id_of(first.output)
    sql(db, "UPDATE items SET raw = '0' WHERE raw = 'abc'")
    assert cli("quarantine", run_id, "--env", "staging", "--retry", env=env).exit_code == 0
    rendered = cli("report", run_id, env=env)
    assert rendered.exit_code == 0, rendered.output
    ran = run_psql(db, rollback_file(workdir, run_id))
    assert ran.returncode == 0, ran.stderr
    assert val(db, "SELECT count(*) FROM items WHERE updated_at = '2030-01-01'") == 0, ran.stdout[
        -800:
    ]


@pytest.mark.parametrize("how", ["runner", "psql-after-report"])
def test_shaped_run_capped_continued_retried_then_rolled_back_exactly(
    cli: Callable[..., Any], workdir: Path, db: str, how: str
) -> None:
    """A poison key in a shaped (three tables) run, under a row cap, continued, its quarantined
    keys re-tried after a fix, then undone: every table back where the run found it (but the
    fixed `raw` of the bad snapshots)."""
    from tests.integration.test_quarantine import quarantined
    from tests.integration.test_shapes import SCHEMA, TABLES, changed_rows, keep, shaped_plan

    sql(db, SCHEMA.format(n=500))
    sql(
        db,
        "UPDATE snaps SET raw = jsonb_set(raw, '{troops,0,amount}', '\"abc\"') WHERE id % 50 = 7",
    )
    keep(db, *TABLES)
    plan = shaped_plan(
        workdir / "p.json", batching__size=64, batching__max_failure_rate=0.05, batching__workers=2
    )
    env = env_for(db)
    capped = cli("apply", str(plan), "-e", "staging", "-q", "--max-rows", "100", env=env)
    assert capped.exit_code == 0, capped.output
    run_id = run_id_of(capped.output)
    processed = val(db, "SELECT count(*) FROM snaps WHERE processed_at IS NOT NULL")
    assert processed + len(quarantined(db, run_id)) == 100, capped.output
    rest = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env)
    assert rest.exit_code == 3, rest.output
    assert len(quarantined(db, run_id)) == 10
    sql(db, "UPDATE snaps SET raw = jsonb_set(raw, '{troops,0,amount}', '5') WHERE id % 50 = 7")
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert retried.exit_code == 0, retried.output
    assert val(db, "SELECT count(*) FROM snaps WHERE processed_at IS NULL") == 0
    if how == "runner":
        undone = cli("rollback", run_id, "--env", "staging", env=env)
        assert undone.exit_code == 0, undone.output
    else:
        assert cli("report", run_id, env=env).exit_code == 0
        ran = run_psql(db, rollback_file(workdir, run_id))
        assert ran.returncode == 0, ran.stderr
        assert "| t\n" in ran.stdout
    assert changed_rows(db, "troops", TABLES["troops"]) == 0
    assert changed_rows(db, "summary", TABLES["summary"]) == 0
    assert changed_rows(db, "snaps", TABLES["snaps"]) == 10


def _runner_env(workdir: Path, db: str) -> dict[str, str]:
    import os

    return {
        **os.environ,
        **env_for(db),
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
        "BACKFILL_ACTOR": "operator",
        "BACKFILL_CMD": "backfill",
    }


def _kill_after(
    args: list[str],
    workdir: Path,
    env: dict[str, str],
    delay: float,
    after: Callable[[], bool] | None = None,
) -> int | None:
    """Run the runner and SIGKILL it `delay` seconds after it started, or after `after()`
    first holds (a start-up on a loaded machine can take longer than any fixed delay)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    with (workdir / "runner.log").open("a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", *args],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while after is not None and proc.poll() is None and time.monotonic() < deadline:
        if after():
            break
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    return proc.returncode


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_moments_with_2_workers_and_splits_then_retry_killed_too(
    workdir: Path, db: str, seed: int
) -> None:
    import random
    import subprocess
    import sys

    from tests.integration.test_quarantine import quarantined

    rnd = random.Random(seed)
    poison = poisoned_items(db, 2000, 40)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=POISON_APPLY + " AND (SELECT pg_sleep(0.01)) IS NOT NULL",
        batching__size=128,
        batching__workers=2,
        batching__min_failure_sample=100,
        batching__max_failure_rate=0.1,
    )
    env = _runner_env(workdir, db)
    base = ["apply", str(plan), "--env", "staging", "-q"]
    # the first kill lands once the run has committed a batch: its run folder and ledger exist
    first = "SELECT count(*) > 0 FROM backfill.batches WHERE status = 'done'"
    _kill_after(base, workdir, env, rnd.random(), after=lambda: bool(val(db, first)))
    run_id = next((workdir / "backfill_logs" / "items_new").iterdir()).name
    for _ in range(4):
        _kill_after([*base, "--run", run_id], workdir, env, 0.8 + rnd.random() * 1.5)
    done = subprocess.run(
        [sys.executable, "-m", "runner", *base, "--run", run_id],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 3, done.stdout + done.stderr + (workdir / "runner.log").read_text()
    assert [r["id"] for r in sql(db, "SELECT id FROM items WHERE val <> 'new' ORDER BY id")] == (
        poison
    )
    assert quarantined(db, run_id) == [(str(p), "22P02") for p in poison]
    assert val(db, "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images") == 0
    assert val(db, "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1", run_id) == (
        1600 - len(poison)
    )
    # fix the data, kill the retry part-way, retry again: every key released once
    sql(db, "UPDATE items SET raw = '0' WHERE raw = 'abc'")
    _kill_after(["quarantine", run_id, "--env", "staging", "--retry"], workdir, env, 0.6)
    again = subprocess.run(
        [sys.executable, "-m", "runner", "quarantine", run_id, "--env", "staging", "--retry"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    assert val(db, "SELECT count(*) - count(DISTINCT key) FROM backfill.row_images") == 0
    assert val(db, "SELECT count(*) FROM backfill.quarantine WHERE released_at IS NULL") == 0
    undone = subprocess.run(
        [sys.executable, "-m", "runner", "rollback", run_id, "--env", "staging"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert val(db, "SELECT count(*) FROM items WHERE updated_at = '2030-01-01'") == 0


@BOTH_PATHS
def test_a_retry_whose_fixed_plan_writes_another_column_is_refused_and_changes_nothing(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    """ "Fix the data or the plan": a plan fixed to repair `raw` too (a column added to
    target.columns) would write rows the run's images do not cover (found by review: the
    rollback then left them changed and said verified). A retry must write what the run wrote:
    refused, nothing changed; the apply fixed without a new column retries fine."""
    poisoned_items(db, 600, 100)
    plan = write_plan(
        workdir / "p.json", apply__sql=POISON_APPLY + suffix, batching__max_failure_rate=0.5
    )
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    before = val(db, "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM items AS i")
    write_plan(
        plan,
        target__columns=["val", "updated_at", "raw"],
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01', raw = '0'"
        " WHERE id = ANY($1) AND val IS DISTINCT FROM 'new'" + suffix,
        batching__max_failure_rate=0.5,
    )
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert retried.exit_code == 2, retried.output
    assert "a retry must write what the run wrote" in " ".join(retried.output.split())
    assert val(db, "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM items AS i") == before


def test_retry_obeys_a_pause(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    """`pause`: start no new batch until resumed. A retry starts batches of the same run."""
    poisoned_items(db, 600, 100)
    plan = write_plan(workdir / "p.json", apply__sql=POISON_APPLY, batching__max_failure_rate=0.5)
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    paused = cli("pause", run_id, "--env", "staging", "--note", "incident", env=env)
    sql(db, "UPDATE items SET raw = '0' WHERE raw = 'abc'")
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 4, (
        paused.output + retried.output
    )


def test_capped_output_and_status_say_the_cap(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    poisoned_items(db, 3000, 50)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=POISON_APPLY,
        batching__max_failure_rate=0.5,
        batching__max_rows_per_run=250,
    )
    env = env_for(db)
    piped = cli("pipeline", str(plan), env=env)
    assert piped.exit_code == 0, piped.output
    run_id = run_id_of(piped.output)
    status = cli("status", run_id, "--json", env=env)
    import json

    assert '"capped"' in status.output, status.output
    assert (
        changed_keys(db, run_id)
        + val(db, "SELECT count(*) FROM backfill.quarantine WHERE run_id = $1", run_id)
        == 250
    )
    again = cli("pipeline", str(plan), "--run", run_id, env=env)
    assert again.exit_code == 0, again.output
    assert (
        changed_keys(db, run_id)
        + val(db, "SELECT count(*) FROM backfill.quarantine WHERE run_id = $1", run_id)
        == 500
    ), again.output
    assert json
    # the pipeline's line says 245 (changed + noop), the 5 quarantined keys of the 250 unsaid
    assert "250" in piped.output, piped.output


def test_manifests_list_the_keys_a_retry_changed(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """#14: manifest.jsonl lists each committed batch's changed keys. A retry's batches commit
    rows of the run too; after `report`, some manifest must list them."""
    poison = poisoned_items(db, 600, 100)
    plan = write_plan(workdir / "p.json", apply__sql=POISON_APPLY, batching__max_failure_rate=0.5)
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    run_id = run_id_of(first.output)
    sql(db, "UPDATE items SET raw = '0' WHERE raw = 'abc'")
    assert cli("quarantine", run_id, "--env", "staging", "--retry", env=env).exit_code == 0
    assert cli("report", run_id, env=env).exit_code == 0
    text = "".join(
        p.read_text() for p in (workdir / "backfill_logs").rglob(f"{run_id}/**/*manifest*.jsonl")
    )
    listed = [p for p in poison if f'["{p}"]' in text]
    assert listed == poison, text[:400]


def test_rollback_of_a_split_batch_by_number_undoes_its_parts(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """`rollback --batches 1-1` where batch 1 was split: its rows committed in its parts (later
    numbers). Undoing "batch 1" must undo them, or say it does not."""
    poisoned_items(db, 600, 50)
    plan = write_plan(workdir / "p.json", apply__sql=POISON_APPLY, batching__max_failure_rate=0.5)
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    assert (
        val(db, "SELECT status FROM backfill.batches WHERE run_id = $1 AND batch_no = 1", run_id)
        == "split"
    )
    undone = cli("rollback", run_id, "--env", "staging", "--batches", "1-1", env=env)
    restored = val(db, "SELECT count(*) FROM items WHERE id <= 120 AND val IS DISTINCT FROM 'new'")
    assert undone.exit_code != 0 or restored > 2, undone.output


def test_control_rollback_of_one_plain_batch_by_number(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """Control for the test above: a batch that was not split, undone by number."""
    poisoned_items(db, 600, 1000)
    plan = write_plan(workdir / "p.json", apply__sql=POISON_APPLY)
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    run_id = run_id_of(first.output)
    undone = cli("rollback", run_id, "--env", "staging", "--batches", "1-1", env=env)
    assert undone.exit_code == 0, undone.output
    assert "restored 100 row(s) in 1 batch(es)" in undone.output, undone.output


@BOTH_PATHS
def test_retry_of_a_key_whose_row_was_deleted_is_released(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    """The bad row was deleted by the application: nothing is left to backfill; the retry
    commits a batch that changes nothing and must not keep the key quarantined for ever."""
    poison = poisoned_items(db, 600, 100)
    plan = write_plan(
        workdir / "p.json", apply__sql=POISON_APPLY + suffix, batching__max_failure_rate=0.5
    )
    env = env_for(db)
    first = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    run_id = run_id_of(first.output)
    sql(db, "DELETE FROM items WHERE id = $1", poison[0])
    sql(db, "UPDATE items SET raw = '0' WHERE raw = 'abc'")
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert retried.exit_code == 0, retried.output
