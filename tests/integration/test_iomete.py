"""The IOMETE scenario (seed 004, #14): the shipped plan brings processed_files up to date for a
date range, partition by partition — new files picked up, changed ones redone, failed and stale
ones retried, done ones and files outside the range left bytewise as they were — checked against
an independent reading of the seeded state in Python; and `backfill demo --scenario iomete` end
to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.db import PINNED_SETTINGS, EmbeddedServer
from runner.demo import iomete
from tests.conftest import ROOT, run, sql, val
from tests.helpers import env_for, run_id_of

PLAN = ROOT / "plans" / "iomete_processed_files.toml"
LABELS = [
    "public.source_files_2024_01",
    "public.source_files_2024_02",
    "public.source_files_2024_03",
    "public.source_files_2024_04",
    "public.source_files_default",
]


def seed(db: str, per_day: int = 6, done: float = 0.55) -> dict[str, int]:
    async def go() -> dict[str, int]:
        conn = await asyncpg.connect(db, server_settings=PINNED_SETTINGS)
        try:
            return await iomete.seed(conn, per_day=per_day, done=done)
        finally:
            await conn.close()

    return dict(run(go))


def not_as_before(db: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        conn = await asyncpg.connect(db, server_settings=PINNED_SETTINGS)
        try:
            return await iomete.rows_not_as_before(conn)
        finally:
            await conn.close()

    return dict(run(go))


def states(db: str, since: date, until: date) -> dict[str, str]:
    """path → what the backfill must do to the file, read from the seeded copy in Python: new,
    changed, failed, stale, done; `outside` for files not in [since, until)."""
    files = sql(db, f"SELECT path, day, etag FROM {iomete.BEFORE_SCHEMA}.source_files")
    rows = {
        r["file_path"]: r for r in sql(db, f"SELECT * FROM {iomete.BEFORE_SCHEMA}.processed_files")
    }
    out = {}
    for f in files:
        p = rows.get(f["path"])
        if not since <= f["day"] < until:
            out[f["path"]] = "outside"
        elif p is None:
            out[f["path"]] = "new"
        elif p["status"] == "FAILED":
            out[f["path"]] = "failed"
        elif p["status"] == "PROCESSING":
            out[f["path"]] = "stale"  # every seeded claim is months old
        elif p["file_etag"] != f["etag"]:
            out[f["path"]] = "changed"
        else:
            out[f["path"]] = "done"
    return out


def windows_of(db: str, run_id: str) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in sql(
            db,
            "SELECT window_no, label, status, discovered, keys, changed, quarantined "
            "FROM backfill.windows WHERE run_id = $1 ORDER BY window_no",
            run_id,
        )
    ]


def untouched(db: str, paths: list[str]) -> int:
    """Of `paths`, those whose processed_files row (or its absence) is not bytewise as seeded."""
    return int(
        val(
            db,
            f"SELECT count(*) FROM unnest($1::text[]) AS x(path) "
            f"LEFT JOIN public.processed_files AS cur ON cur.file_path = x.path "
            f"LEFT JOIN {iomete.BEFORE_SCHEMA}.processed_files AS was ON was.file_path = x.path "
            "WHERE (cur IS NULL) <> (was IS NULL) OR NOT record_image_eq(cur, was)",
            paths,
        )
    )


def test_the_iomete_plan_loads_what_needs_it_partition_by_partition_and_skips_the_rest(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    seed(db)
    want = states(db, date(2024, 1, 1), date(2024, 5, 1))
    counts = Counter(want.values())
    assert min(counts[s] for s in ("new", "changed", "failed", "stale", "done", "outside")) > 0
    before = {r["file_path"]: r for r in sql(db, "SELECT * FROM public.processed_files")}
    env = env_for(db)

    applied = cli("apply", str(PLAN), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)

    # every file of the range is loaded, with its current ETag and size
    rows = {
        r["file_path"]: r
        for r in sql(
            db,
            "SELECT p.*, f.etag, f.size_bytes AS file_size FROM public.processed_files p "
            "JOIN public.source_files f ON f.path = p.file_path",
        )
    }
    redo = [p for p, s in want.items() if s in ("new", "changed", "failed", "stale")]
    for path in redo:
        r = rows[path]
        assert (r["status"], r["file_etag"], r["size_bytes"], r["error"]) == (
            "SUCCESS",
            r["etag"],
            r["file_size"],
            None,
        ), path
        assert r["rows_loaded"] == r["file_size"] // 512, path
        # new files start at 0; a redo or retry counts one more attempt
        was = before.get(path)
        assert r["retry_count"] == (0 if was is None else was["retry_count"] + 1), path
    # done files and files outside [since, until) are bytewise as seeded (no row stays no row)
    kept = [p for p, s in want.items() if s in ("done", "outside")]
    assert untouched(db, kept) == 0
    assert len(rows) == len(before) + counts["new"]

    # one window per partition, in order, each counted at its start and done in full
    per_month = Counter(path.split("/month=")[1][:2] for path in redo)
    windows = windows_of(db, run_id)
    assert [w["label"] for w in windows] == LABELS
    assert [w["discovered"] for w in windows] == [
        per_month["01"],
        per_month["02"],
        per_month["03"],
        per_month["04"],
        0,
    ]
    assert all(w["status"] == "done" and w["keys"] == w["discovered"] for w in windows)
    assert sum(w["changed"] for w in windows) == len(redo)
    # no batch spans two partitions
    months = sql(
        db,
        "SELECT r.batch_no, count(DISTINCT date_trunc('month', p.day)) AS n "
        "FROM backfill.row_images r JOIN public.processed_files p ON p.file_path = r.key[1] "
        "WHERE r.run_id = $1 GROUP BY 1",
        run_id,
    )
    assert months
    assert all(m["n"] == 1 for m in months)

    # the manifest: per batch, files loaded first time and again, in the query's column order
    out = workdir / "backfill_logs" / "iomete_processed_files" / run_id / "staging"
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    manifests = [b["manifest"]["rows"] for b in lines if "batch_no" in b]
    assert all(list(r) == ["files", "n", "bytes", "rows_loaded"] for m in manifests for r in m)
    loaded = Counter()
    for m in manifests:
        for r in m:
            loaded[r["files"]] += r["n"]
    assert loaded == {"new": counts["new"], "reloaded": len(redo) - counts["new"]}
    assert [(x["window"], x["matches"]) for x in lines if "batch_no" not in x] == [
        (n, True) for n in range(1, 6)
    ]
    summary = (out / "backfill_summary.md").read_text()
    assert "| 5 | public.source_files_default | done | 0 | 0 | 0 | 0 | 0 | yes |" in summary
    assert "`since` = 2024-01-01, `until` = 2024-05-01" in summary

    # a re-run finds nothing; the soak's checks pass; the rollback restores both tables exactly
    again = cli("apply", str(PLAN), "-e", "staging", "-q", env=env)
    assert again.exit_code == 3, again.output
    assert "0 row(s) need the backfill" in " ".join(again.output.split())
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    soaked = cli(
        "soak", str(PLAN), "-e", "staging", "--run", run_id, "--duration", "1s",
        "--interval", "1s", env=env,
    )  # fmt: skip
    assert soaked.exit_code == 3, soaked.output
    assert "verdict PASS" in soaked.output, soaked.output
    undone = cli("rollback", run_id, "--env", "staging", env=env)
    assert undone.exit_code == 0, undone.output
    assert not_as_before(db) == dict.fromkeys(iomete.TABLES, 0)


def test_a_narrower_range_loads_only_its_files_and_the_dry_run_estimates_it(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    seed(db, per_day=4)
    env = env_for(db)
    feb = ["--param", "since=2024-02-01", "--param", "until=2024-03-01"]
    want = states(db, date(2024, 2, 1), date(2024, 3, 1))
    redo = [p for p, s in want.items() if s in ("new", "changed", "failed", "stale")]

    dry = cli(*feb, "apply", str(PLAN), "-e", "staging", "--dry-run", env=env)
    assert dry.exit_code == 0, dry.output
    out = " ".join(dry.output.split())
    assert f"rows needing the backfill: {len(redo)}" in out, out
    assert f"2. public.source_files_2024_02: {len(redo)} row(s)" in out, out
    assert "1. public.source_files_2024_01: 0 row(s)" in out, out
    assert "modified_at" in out, out  # the span of discovery.time_column
    # the bytes the load will read: the files' own sizes (discovery.size_sql)
    files = sum(
        val(db, "SELECT size_bytes FROM public.source_files WHERE path = $1", p) for p in redo
    )
    shown = f"{files / 1e9:,.1f} GB" if files >= 1e9 else f"{files / 1e6:,.1f} MB"
    assert f"size: about {shown} (discovery.size_sql)" in out, out
    assert not_as_before(db) == dict.fromkeys(iomete.TABLES, 0)  # a dry run writes nothing

    applied = cli(*feb, "apply", str(PLAN), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert [w["discovered"] for w in windows_of(db, run_id)] == [0, len(redo), 0, 0, 0]
    assert untouched(db, [p for p in want if p not in redo]) == 0
    assert val(
        db,
        "SELECT count(*) FROM public.processed_files WHERE file_path = ANY($1) "
        "AND status = 'SUCCESS' AND processed_at > now() - interval '1 hour'",
        redo,
    ) == len(redo)
    summary = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/backfill_summary.md"))
    assert "`since` = 2024-02-01, `until` = 2024-03-01" in summary.read_text()


@pytest.mark.slow
def test_the_iomete_demo_walks_the_rollout_and_undoes_staging_exactly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BACKFILL_HOME": str(tmp_path / "home"),
        "BACKFILL_LOGS": str(tmp_path / "logs"),
        "BACKFILL_CMD": "backfill",
    }
    args = ["demo", "--scenario", "iomete", "--scale", "0.25", "--auto-approve"]
    done = subprocess.run(
        [sys.executable, "-m", "runner", *args, "--soak-seconds", "1", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "the rollout is complete" in out
    assert "soak verdict pass" in out
    for table in iomete.TABLES:
        assert f"staging.{table}: bytewise as before the rollout" in out
    pg = EmbeddedServer(tmp_path / "home")
    pg.start()
    try:
        prod = pg.uri("prod")
        assert not_as_before(pg.uri("staging")) == dict.fromkeys(iomete.TABLES, 0)
        # prod keeps the backfill: nothing of the range left to load, nothing outside it loaded
        left = (
            "SELECT count(*) FROM public.source_files f LEFT JOIN public.processed_files p "
            "ON p.file_path = f.path WHERE f.day >= '2024-01-01' AND f.day < '2024-05-01' "
            "AND (p IS NULL OR p.status <> 'SUCCESS' OR p.file_etag <> f.etag)"
        )
        assert val(prod, left) == 0
        assert val(prod, "SELECT count(DISTINCT stage) FROM backfill.batches") == 2
        statuses = sql(prod, "SELECT DISTINCT status FROM backfill.windows")
        assert [r["status"] for r in statuses] == ["done"]
    finally:
        pg.stop()
