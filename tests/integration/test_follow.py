"""The rollback file and the manifest are prepared while the batches run (phases.follow): what
the apply writes must be exactly what reading the ledger after the last batch writes, whatever
the follower saw, missed, or failed to read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import structlog

from runner import ledger
from runner.phases.apply import write_manifest
from runner.phases.follow import Follower
from runner.rollback import emit_rollback_file
from tests.conftest import make_items, run, sql, val, write_plan
from tests.helpers import env_for, rollback_file, run_id_of

# values that quoting, escaping or encoding could get wrong on the way through the spool
HOSTILE = (
    "UPDATE items SET val = CASE id % 4 WHEN 0 THEN E'it''s \\\\ a\\nline' "
    "WHEN 1 THEN 'é—✓ 𝄞' WHEN 2 THEN NULL ELSE '' END WHERE id % 5 <> 0"
)


def comparable(path: Path) -> list[str]:
    """The file's lines but when it was generated, its own name and the DSN shown."""
    return [
        line
        for line in path.read_text().splitlines()
        if not line.startswith(("-- generated:", "-- Run it:", "-- environment:"))
    ]


async def from_ledger(
    db: str, run_id: str, out: Path, stage: str, env: str = "staging"
) -> tuple[Path, str]:
    """The rollback file and the manifest as read from the ledger now, with no follower."""
    conn = await asyncpg.connect(db)
    try:
        row = await ledger.get_run(conn, run_id)
        assert row is not None
        rollback = await emit_rollback_file(conn, row, out / "again.sql", display_dsn="x")
        manifest = await write_manifest(conn, row, env, stage)
        return rollback, manifest.read_text()
    finally:
        await conn.close()


def test_files_written_while_batches_ran_equal_the_ledgers_also_for_an_earlier_commands_batches(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 1500)
    sql(db, HOSTILE)
    plan = write_plan(workdir / "p.json", batching__size=70, batching__workers=2)
    # a first command capped part-way: its batches were never seen by the follower of the next
    first = cli("apply", str(plan), "-e", "staging", "--max-rows", "500", env=env_for(db))
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    result = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env_for(db))
    assert result.exit_code == 3, result.output
    batches = val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1", run_id)
    assert batches == 18  # 1,200 rows needing it in batches of 70
    written = rollback_file(workdir, run_id)
    manifest = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/manifest.jsonl"))
    as_written = manifest.read_text()
    again, manifest_again = run(lambda: from_ledger(db, run_id, workdir, "apply"))
    assert comparable(written) == comparable(again)
    assert as_written == manifest_again
    assert as_written.count("\n") == 18
    assert "-- restores:     1200 row(s) in 18 batch(es)" in written.read_text()


async def _follow(
    db: str,
    run_id: str,
    folder: Path,
    batch_nos: list[int],
    connect: Callable[[], Any],
) -> Follower:
    conn = await asyncpg.connect(db)
    try:
        row = await ledger.get_run(conn, run_id)
        assert row is not None
    finally:
        await conn.close()
    follower = Follower(row, "apply", folder)
    async with follower.running(connect):
        for no in batch_nos:
            follower.committed(no)
    return follower


async def _write_with(db: str, run_id: str, folder: Path, follower: Follower) -> tuple[Path, str]:
    conn = await asyncpg.connect(db)
    try:
        row = await ledger.get_run(conn, run_id)
        assert row is not None
        rollback = await emit_rollback_file(
            conn, row, folder / "followed.sql", display_dsn="x", spool=follower.spool
        )
        manifest = await write_manifest(conn, row, "staging", "apply", follower.manifest)
        return rollback, manifest.read_text()
    finally:
        await conn.close()
        follower.close()


@pytest.fixture
def applied(cli: Callable[..., Any], workdir: Path, db: str) -> str:
    make_items(db, 800)
    sql(db, HOSTILE)
    plan = write_plan(workdir / "p.json", batching__size=90)
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    structlog.reset_defaults()  # the CLI logged to its captured output, closed now
    return run_id_of(result.output)


@pytest.mark.usefixtures("cli")
def test_a_follower_that_read_some_batches_or_none_gives_the_same_files(
    workdir: Path, db: str, applied: str
) -> None:
    expected, expected_manifest = run(lambda: from_ledger(db, applied, workdir, "apply"))
    for seen in ([], [1, 3], [2, 1, 5, 4, 3, 6, 7, 8]):
        follower = run(
            lambda seen=seen: _follow(db, applied, workdir, seen, lambda: asyncpg.connect(db))
        )
        assert len(follower.manifest) == len(seen)
        assert all(no in follower.manifest for no in seen)
        assert follower.spool is not None
        assert all(no in follower.spool for no in seen)
        got, got_manifest = run(lambda f=follower: _write_with(db, applied, workdir, f))
        assert comparable(got) == comparable(expected), seen
        assert got_manifest == expected_manifest


@pytest.mark.usefixtures("cli")
def test_a_follower_that_cannot_connect_or_loses_its_connection_costs_nothing_but_time(
    workdir: Path, db: str, applied: str
) -> None:
    expected, expected_manifest = run(lambda: from_ledger(db, applied, workdir, "apply"))

    async def refused() -> asyncpg.Connection:
        raise OSError("connection refused")

    follower = run(lambda: _follow(db, applied, workdir, [1, 2], refused))
    assert len(follower.manifest) == 0
    got, got_manifest = run(lambda: _write_with(db, applied, workdir, follower))
    assert comparable(got) == comparable(expected)
    assert got_manifest == expected_manifest

    async def follow_and_cut() -> Follower:
        conn = await asyncpg.connect(db)
        try:
            row = await ledger.get_run(conn, applied)
            assert row is not None
            f = Follower(row, "apply", workdir)
            async with f.running(lambda: asyncpg.connect(db)):
                f.committed(1)
                with anyio.fail_after(10):
                    while 1 not in f.manifest:  # noqa: ASYNC110  (the follower's own dict)
                        await anyio.sleep(0.01)
                # the server ends the follower's connection (the only other one here)
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                for no in (2, 3, 4):
                    f.committed(no)
            return f
        finally:
            await conn.close()

    cut = run(follow_and_cut)
    assert 1 in cut.manifest
    assert len(cut.manifest) == 1
    got, got_manifest = run(lambda: _write_with(db, applied, workdir, cut))
    assert comparable(got) == comparable(expected)
    assert got_manifest == expected_manifest


@pytest.mark.usefixtures("cli")
def test_a_failing_apply_stops_its_follower_at_once(workdir: Path, db: str, applied: str) -> None:
    async def body() -> None:
        conn = await asyncpg.connect(db)
        try:
            row = await ledger.get_run(conn, applied)
        finally:
            await conn.close()
        assert row is not None
        f = Follower(row, "apply", workdir)
        try:
            with anyio.fail_after(5):
                async with f.running(lambda: asyncpg.connect(db)):
                    for no in range(1, 9):
                        f.committed(no)
                    raise RuntimeError("a batch failed")
        finally:
            f.close()

    with pytest.raises(RuntimeError, match="a batch failed"):
        run(body)


def test_a_shaped_runs_rollback_file_is_prepared_while_it_runs_and_equals_the_ledgers(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """A shaped run (upserts into two more tables) spools its images too: a first command capped
    part-way (nothing followed), then one that follows the rest. The file equals the one read
    from the ledger now, and psql restores the three tables exactly with it."""
    from tests.helpers import run_psql
    from tests.integration.test_shapes import SCHEMA, TABLES, _all_back, keep, shaped_plan

    sql(db, SCHEMA.format(n=400))
    keep(db, *TABLES)
    plan = shaped_plan(workdir / "p.json", batching__size=40)
    first = cli("apply", str(plan), "-e", "staging", "--max-rows", "120", env=env_for(db))
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    rest = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env_for(db))
    assert rest.exit_code == 3, rest.output
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1", run_id) == 10
    written = rollback_file(workdir, run_id)
    again, _ = run(lambda: from_ledger(db, run_id, workdir, "apply"))
    assert comparable(written) == comparable(again)
    assert "-- batch 10\nBEGIN;" in written.read_text()
    done = run_psql(db, written)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-2].split("|")[2].strip() == "t", done.stdout
    _all_back(db)
