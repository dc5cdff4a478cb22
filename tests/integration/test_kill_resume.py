"""Invariants 1 and 2 under SIGKILL: resume continues, nothing applied twice, no image lost."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_items, sql, val, write_plan


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (cwd / "runner.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "runner", *args],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log,
            stderr=log,
        )


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_exactly_once(workdir: Path, db: str) -> None:
    make_items(db, 3000)
    expected = {r["id"]: r["val"] for r in sql(db, "SELECT id, val FROM items")}
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND pg_sleep(0.01) IS NOT NULL",
        batching__size=20,
        batching__workers=2,
        batching__lock_timeout="5s",
    )
    env = {
        "STAGING_DSN": db,
        "PROD_DSN": db,
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
        "BACKFILL_ACTOR": "operator",
        "BACKFILL_CMD": "backfill",
    }
    rollbacks_before = val(
        db, "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    )
    rng = random.Random(20261122)
    run_id: str | None = None
    kills = 0
    for _ in range(40):
        args = ["apply", str(plan), "--env", "staging", "--quiet"] + (
            ["--run", run_id] if run_id else []
        )
        proc = _start(args, workdir, env)
        time.sleep((1.5 if run_id is None else 0.6) + rng.random() * 0.8)
        if proc.poll() is not None:
            assert proc.returncode == 3, (workdir / "runner.log").read_text()
            break
        proc.kill()
        proc.wait()
        kills += 1
        if run_id is None:
            runs = list((workdir / "backfill_logs" / "items_new").glob("*"))
            run_id = runs[0].name if runs else None
        if kills >= 12:
            break
    assert run_id is not None
    # enough kills to have landed at many moments (a fast machine finishes sooner; each
    # batch sleeps 200 ms so that its 120 batches outlast the kill cycles even there: a
    # process that starts in ~0.4 s has most of each cycle for its batches)
    assert kills >= 8
    in_flight_seen = val(db, "SELECT count(*) FROM backfill.batches WHERE run_id = $1", run_id)
    assert in_flight_seen < 120, "the runs were killed too late to test anything"
    final = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "apply",
            str(plan),
            "--env",
            "staging",
            "--quiet",
            "--run",
            run_id,
        ],
        cwd=workdir,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert final.returncode == 3, final.stderr

    # the table equals the expected end state
    rows = {
        r["id"]: (r["val"], r["updated_at"].year)
        for r in sql(db, "SELECT id, val, updated_at FROM items")
    }
    for key, old in expected.items():
        assert rows[key] == ("new", 2020 if old == "new" else 2030)
    # every changed row has exactly one before-image, and it is the true before value
    images = sql(
        db, "SELECT key, before FROM backfill.row_images WHERE run_id = $1 AND op = 'U'", run_id
    )
    assert len(images) == 2400
    assert len({tuple(r["key"]) for r in images}) == 2400
    for r in images:
        assert r["before"][0] == expected[int(r["key"][0])]
    # no batch recorded twice, ledger totals match the table and the images
    per_batch = sql(
        db,
        """SELECT b.batch_no, b.changed, count(i.*) AS images
                           FROM backfill.batches b LEFT JOIN backfill.row_images i
                             ON i.run_id = b.run_id AND i.batch_no = b.batch_no AND i.op = 'U'
                           WHERE b.run_id = $1 AND b.status = 'done' GROUP BY b.batch_no, b.changed""",
        run_id,
    )
    assert all(r["changed"] == r["images"] for r in per_batch)
    assert sum(r["changed"] for r in per_batch) == 2400
    # some kills landed inside a batch's transaction: the server rolled those transactions back
    assert (
        val(db, "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()")
        > rollbacks_before
    )
    assert (
        val(
            db,
            "SELECT count(*) FROM backfill.row_images WHERE run_id = $1 AND batch_no NOT IN "
            "(SELECT batch_no FROM backfill.batches WHERE run_id = $1 AND status = 'done')",
            run_id,
        )
        == 0
    )
    # the summary and results count the whole stage, not only the last command's batches
    results = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/execution_results.json"))
    totals = json.loads(results.read_text())["totals"]
    assert (totals["changed"], totals["batches"]) == (2400, len(per_batch))
    summary = results.with_name("backfill_summary.md").read_text()
    assert "| Rows changed | 2,400 |" in summary
