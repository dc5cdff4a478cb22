"""Hostile review of #18 (phases.follow): the rollback file and the manifest an apply writes must
be byte for byte what reading the ledger after the last batch writes, in every situation, and the
follower must change nothing else (errors, hangs, leftovers, extra work)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.phases.apply import manifest_name
from tests.conftest import make_items, run, sql, val, write_plan
from tests.helpers import (
    SLOW_APPLY,
    env_for,
    finish,
    join_gate,
    leader_run,
    open_join_gate,
    run_id_of,
    start_runner,
)
from tests.integration.test_follow import HOSTILE, comparable, from_ledger
from tests.integration.test_quarantine import POISON_APPLY, poisoned_items
from tests.integration.test_windows import make_events, windows_plan


def _folder(workdir: Path, run_id: str, env: str = "staging") -> Path:
    return next((workdir / "backfill_logs").rglob(f"{run_id}/{env}"))


def assert_files_are_the_ledgers(
    db: str, workdir: Path, run_id: str, env: str = "staging", stage: str = "apply"
) -> None:
    folder = _folder(workdir, run_id, env)
    written = sorted(folder.glob("rollback_*.sql"))
    assert len(written) == 1, written
    as_written = comparable(written[0])
    manifest = (folder / manifest_name(stage)).read_text()
    out = workdir / "rerender"
    out.mkdir(exist_ok=True)
    again, manifest_again = run(lambda: from_ledger(db, run_id, out, stage, env))
    assert as_written == comparable(again)
    assert manifest == manifest_again
    # no leftovers of the spool or of the file's writing in the run folder
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert hidden == []


def test_quarantined_keys_split_batches_manifest_sql_and_workers(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    poisoned_items(db, 3000, 97)
    sql(db, HOSTILE.replace("WHERE id % 5 <> 0", "WHERE id % 5 <> 0 AND raw <> 'abc'"))
    plan = write_plan(
        workdir / "p.json",
        apply__sql=POISON_APPLY,
        batching__min_failure_sample=100,
        batching__max_failure_rate=0.05,
        batching__workers=3,
        batching__size=60,
        manifest={"sql": "SELECT id, val, raw FROM items WHERE id = ANY($1) ORDER BY id"},
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'split'") > 0
    assert_files_are_the_ledgers(db, workdir, run_id)


def test_windowed_run(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    make_events(db)
    plan = windows_plan(workdir / "p.json")
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    assert_files_are_the_ledgers(db, workdir, run_id)


def test_windowed_run_capped_then_resumed(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    make_events(db)
    plan = windows_plan(workdir / "p.json")
    first = cli("apply", str(plan), "-e", "staging", "-q", "--max-rows", "300", env=env_for(db))
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    result = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env_for(db))
    assert result.exit_code == 3, result.output
    assert_files_are_the_ledgers(db, workdir, run_id)


def test_two_processes_joined_on_one_run(workdir: Path, db: str) -> None:
    make_items(db, 2000)
    sql(db, HOSTILE)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.03),
        batching__size=25,
        batching__workers=2,
        guards=join_gate(db),
    )
    leader = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    joiner = start_runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    open_join_gate(db, run_id, 1)
    code, out = finish(leader)
    assert code == 3, out
    jcode, jout = finish(joiner)
    assert jcode == 0, jout
    assert (
        val(
            db,
            "SELECT count(DISTINCT process) FROM backfill.batches WHERE run_id = $1"
            " AND status = 'done'",
            run_id,
        )
        == 2
    )
    assert_files_are_the_ledgers(db, workdir, run_id)


def test_killed_mid_run_then_resumed(workdir: Path, db: str) -> None:
    make_items(db, 1500)
    sql(db, HOSTILE)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=0.05),
        batching__size=20,
        batching__workers=2,
    )
    proc = start_runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    run_id = leader_run(db)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        n = val(
            db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND status='done'", run_id
        )
        if n >= 10:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    resumed = start_runner(
        ["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db
    )
    code, out = finish(resumed)
    assert code == 3, out
    assert_files_are_the_ledgers(db, workdir, run_id)


def test_canary_then_rest_on_a_mini_plan(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    staging, prod = make_db(), make_db()
    make_items(staging, 600)
    make_items(prod, 900)
    sql(prod, HOSTILE.replace("WHERE id % 5 <> 0", "WHERE id % 3 <> 0"))
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    plan = write_plan(workdir / "plan.json", batching__size=50, batching__workers=2)
    applied = cli("apply", str(plan), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert_files_are_the_ledgers(staging, workdir, run_id)
    soak = ("soak", str(plan), "-e", "staging", "--run", run_id, "--duration", "1s",
            "--interval", "1s")  # fmt: skip
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    assert cli(*soak, env=env).exit_code == 3
    assert cli("approve", run_id, "--gate", "soak-staging", "--as", "bob", env=env).exit_code == 0
    health = cli("health", str(plan), "-e", "prod", "--run", run_id, env=env)
    assert health.exit_code == 3, health.output
    mini = _folder(workdir, run_id, "prod") / "prod_mini_backfill_plan.json"
    assert cli("approve", run_id, "--gate", "health-prod", "--as", "alice", env=env).exit_code == 0
    prod_apply = ("apply", str(mini), "-e", "prod", "--run", run_id, "-q")
    canary = cli(*prod_apply, env=env)
    assert canary.exit_code == 3, canary.output
    assert_files_are_the_ledgers(prod, workdir, run_id, "prod", "canary")
    assert cli("approve", run_id, "--gate", "canary-prod", "--as", "bob", env=env).exit_code == 0
    rest = cli(*prod_apply, env=env)
    assert rest.exit_code == 0, rest.output
    assert_files_are_the_ledgers(prod, workdir, run_id, "prod", "rest")


def test_stopped_apply_retried_then_continued(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    poisoned_items(db, 3000, 33)
    plan = write_plan(workdir / "p.json", apply__sql=POISON_APPLY, batching__size=70)
    env = env_for(db)
    stopped = cli("apply", str(plan), "--env", "staging", "-q", env=env)
    assert stopped.exit_code == 1, stopped.output
    run_id = run_id_of(stopped.output)
    sql(db, "UPDATE items SET raw = '0' WHERE raw = 'abc'")
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", env=env)
    assert retried.exit_code == 0, retried.output
    finished = cli("apply", str(plan), "--env", "staging", "-q", "--run", run_id, env=env)
    assert finished.exit_code == 3, finished.output
    assert_files_are_the_ledgers(db, workdir, run_id)
    again = cli("report", run_id, env=env)
    assert again.exit_code == 0, again.output
    assert_files_are_the_ledgers(db, workdir, run_id)


def _slow_run(workdir: Path, db: str, n: int = 1500, s: float = 0.05) -> tuple[Any, str, Path]:
    make_items(db, n)
    sql(db, HOSTILE)
    plan = write_plan(
        workdir / "p.json",
        apply__sql=SLOW_APPLY.format(s=s),
        batching__size=20,
        batching__workers=2,
    )
    proc = start_runner(["apply", str(plan), "-e", "staging"], workdir, db)
    run_id = leader_run(db)
    return proc, run_id, plan


def _done(db: str, run_id: str) -> int:
    return int(
        val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND status='done'", run_id)
    )


def _wait(pred: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_the_followers_connection_cut_by_the_server_mid_run(workdir: Path, db: str) -> None:
    proc, run_id, _ = _slow_run(workdir, db)
    # the connection whose last statement read the manifest (both of its statements unnest the
    # images' keys so; a batch of at most 1,000 keys is read by two statements)
    follower = (
        "SELECT pid FROM pg_stat_activity WHERE query LIKE '%unnest(i.ops, i.keys) AS u(op, key)%'"
        " AND pid <> pg_backend_pid() AND datname = current_database()"
    )
    _wait(lambda: val(db, follower) is not None)
    sql(db, f"SELECT pg_terminate_backend(pid) FROM ({follower}) AS f")
    code, out = finish(proc)
    assert code == 3, out
    assert _done(db, run_id) > 20
    assert_files_are_the_ledgers(db, workdir, run_id)


def test_sigint_mid_run_is_still_an_interrupt(workdir: Path, db: str) -> None:
    proc, run_id, _ = _slow_run(workdir, db)
    _wait(lambda: _done(db, run_id) >= 5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc, timeout=60)
    assert code == 130, out
    assert "interrupted" in out
    assert time.monotonic() - t0 < 8, out
    hidden = [p.name for p in _folder(workdir, run_id).iterdir() if p.name.startswith(".")]
    assert hidden == []


def test_shaped_run(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    from tests.integration.test_shapes import SCHEMA, shaped_plan

    sql(db, SCHEMA.format(n=700))
    plan = shaped_plan(workdir / "p.json", batching__size=30)
    first = cli("apply", str(plan), "-e", "staging", "-q", "--max-rows", "200", env=env_for(db))
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    result = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env_for(db))
    assert result.exit_code == 3, result.output
    assert_files_are_the_ledgers(db, workdir, run_id)


def test_a_capped_command_reads_no_images_for_files_it_does_not_write(
    cli: Callable[..., Any], workdir: Path, db: str, monkeypatch: Any
) -> None:
    """A command capped by --max-rows writes neither the rollback file nor the manifest (the
    stage has not finished; the command that finishes it reads every earlier command's batches
    from the ledger anyway). Whatever its follower reads is thrown away: one more connection and
    a second read of every image the command wrote, and a drain of up to DRAIN_SECONDS before
    the command may say it was capped."""
    from runner.phases import follow
    from runner.rollback import plain

    reads: list[int] = []
    real_fetch = plain.ImageSpool.fetch
    real_records = follow.manifest_records

    async def fetch(self: Any, conn: Any, run_id: str, batch_no: int) -> None:
        reads.append(batch_no)
        await real_fetch(self, conn, run_id, batch_no)

    async def records(conn: Any, run_id: str, stage: str, batch_nos: Any = None) -> Any:
        reads.extend(batch_nos or [])
        return await real_records(conn, run_id, stage, batch_nos)

    monkeypatch.setattr(plain.ImageSpool, "fetch", fetch)
    monkeypatch.setattr(follow, "manifest_records", records)
    make_items(db, 1500)
    plan = write_plan(workdir / "p.json", batching__size=50, batching__workers=2)
    capped = cli("apply", str(plan), "-e", "staging", "-q", "--max-rows", "600", env=env_for(db))
    assert capped.exit_code == 0, capped.output
    run_id = run_id_of(capped.output)
    assert val(db, "SELECT status FROM backfill.phases WHERE run_id = $1", run_id) == "capped"
    assert not list(_folder(workdir, run_id).glob("rollback_*.sql"))
    assert reads == [], f"{len(reads)} read(s) of batches for files this command never writes"


def test_a_file_write_killed_part_way_leaves_nothing_the_next_write_does_not_clear(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """The rollback file is written to a temporary file beside it, then renamed. Before #18 its
    name was fixed (.NAME.tmp, .NAME.body), so the next write of the file (the resumed apply, or
    `backfill report`) replaced it; now it carries the writer's pid, so each killed writer leaves
    its own temporary file in the run folder for good."""
    make_items(db, 12000)
    sql(db, "UPDATE items SET val = repeat('y', 4000) || id WHERE val <> 'new'")
    plan = write_plan(workdir / "p.json", batching__size=500, batching__workers=2)
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    folder = _folder(workdir, run_id)

    def leftovers() -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.name.startswith(".rollback_"))

    killed = False
    for _ in range(30):
        proc = start_runner(["report", run_id], workdir, db)
        while proc.poll() is None:
            if any(n.endswith(".tmp") for n in leftovers()):
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
        proc.communicate(timeout=60)
        if killed:
            break
    assert killed, "never caught the file being written"
    assert leftovers()  # the killed writer's temporary file
    again = start_runner(["report", run_id], workdir, db)
    code, out = finish(again)
    assert code == 0, out
    assert leftovers() == [], "a killed writer's temporary file outlives the next write"
