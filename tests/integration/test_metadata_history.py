"""The metadata-history scenario (seeds 000/001, #14): the shipped plan emits one ingestion_volume
record per successful event and one ingestion_runtime record per event, month by month, with the
variability jobs paused while each window runs and resumed when it is done, and a manifest of what
each batch emitted (table, kind, version) — checked against an independent reading of the events
in Python; and `backfill demo --scenario metadata` end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.db import PINNED_SETTINGS, EmbeddedServer
from runner.demo import metadata
from runner.plan import load_plan
from tests.conftest import ROOT, run, sql, val
from tests.helpers import env_for, run_id_of

PLAN = ROOT / "plans" / "metadata_history.toml"
SINCE, UNTIL = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 7, 1, tzinfo=UTC))


def seed(db: str, spacing_minutes: float = 240, live_from: str = "2024-07-01") -> dict[str, int]:
    statements = load_plan(PLAN, env={}).plan.apply.all

    async def go() -> dict[str, int]:
        conn = await asyncpg.connect(db, server_settings=PINNED_SETTINGS)
        try:
            return await metadata.seed(
                conn, spacing_minutes=spacing_minutes, live_from=live_from, statements=statements
            )
        finally:
            await conn.close()

    return dict(run(go))


def not_as_before(db: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        conn = await asyncpg.connect(db, server_settings=PINNED_SETTINGS)
        try:
            return await metadata.rows_not_as_before(conn)
        finally:
            await conn.close()

    return dict(run(go))


def _safe_upper(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", part).upper()


def expected(db: str) -> dict[tuple[int, str], tuple[str, str, int]]:
    """(event, kind) → (namespace, entity, version) of every record the backfill must emit:
    events of [SINCE, UNTIL) without the record, read from the seeded copy."""
    had = {
        (r["event_id"], r["kind"])
        for r in sql(db, f"SELECT event_id, kind FROM {metadata.BEFORE_SCHEMA}.metadata_records")
    }
    out = {}
    for e in sql(db, f"SELECT * FROM {metadata.BEFORE_SCHEMA}.ingestion_events"):
        if not SINCE <= e["event_time"] < UNTIL:
            continue
        name = e["table_name"].strip().lower()
        name = name if "." in name else f"public.{name}"
        ns, entity = (_safe_upper(p) for p in name.split(".", 1))
        kinds = {"ingestion_runtime": 1}
        if e["status"] == "success":
            kinds["ingestion_volume"] = 2 if e["mode"] == "incremental" else 1
        for kind, version in kinds.items():
            if (e["id"], kind) not in had:
                out[(e["id"], kind)] = (ns, entity, version)
    return out


def windows_of(db: str, run_id: str) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in sql(
            db,
            "SELECT window_no, label, lower_bound, status, discovered, keys, changed "
            "FROM backfill.windows WHERE run_id = $1 ORDER BY window_no",
            run_id,
        )
    ]


def test_the_metadata_plan_emits_each_record_once_window_by_window_with_its_manifest(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    seed(db)
    want = expected(db)
    assert {k for _, k in want} == {"ingestion_volume", "ingestion_runtime"}
    env = env_for(db)
    applied = cli("apply", str(PLAN), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)

    # exactly the expected records were emitted, once each, normalized; the live ones are kept
    started = val(db, "SELECT min(started_at) FROM backfill.batches WHERE run_id = $1", run_id)
    emitted = {
        (r["event_id"], r["kind"]): (r["namespace"], r["entity"], r["version"])
        for r in sql(db, "SELECT * FROM metadata_records WHERE emitted_at >= $1", started)
    }
    assert emitted == want
    payloads = sql(
        db,
        "SELECT count(*) FILTER (WHERE (r.payload ->> 'rows')::bigint IS DISTINCT FROM e.rows) AS rows,"
        " count(*) FILTER (WHERE r.payload ->> 'run_id' <> e.run_id) AS run_ids"
        " FROM metadata_records r JOIN ingestion_events e ON e.id = r.event_id"
        " WHERE r.kind = 'ingestion_volume'",
    )[0]
    assert (payloads["rows"], payloads["run_ids"]) == (0, 0)
    live = (
        "SELECT count(*) FROM metadata_records cur JOIN "
        f"{metadata.BEFORE_SCHEMA}.metadata_records was USING (event_id, kind) "
        "WHERE NOT record_image_eq(cur, was)"
    )
    assert val(db, live) == 0
    assert val(db, "SELECT count(*) FROM metadata_records") == len(want) + val(
        db, f"SELECT count(*) FROM {metadata.BEFORE_SCHEMA}.metadata_records"
    )

    # six monthly windows, each counted at its start and done in full
    per_month = Counter(
        r["event_time"].strftime("%Y-%m")
        for r in sql(
            db,
            "SELECT event_time FROM ingestion_events WHERE id = ANY($1)",
            list({e for e, _ in want}),
        )
    )
    windows = windows_of(db, run_id)
    assert [w["lower_bound"][:7] for w in windows] == [f"2024-0{m}" for m in range(1, 7)]
    assert [w["discovered"] for w in windows] == [per_month[f"2024-0{m}"] for m in range(1, 7)]
    assert all(w["status"] == "done" and w["keys"] == w["discovered"] for w in windows)
    assert sum(w["changed"] for w in windows) == len(want)

    # the variability jobs: paused once per window, before its first record, resumed after its
    # last; none left paused
    pauses = sql(db, "SELECT * FROM variability_pauses ORDER BY id")
    assert [(p["window_label"], p["jobs_paused"], p["jobs_resumed"]) for p in pauses] == [
        (w["label"], len(metadata.JOBS), len(metadata.JOBS)) for w in windows
    ]
    outside = val(
        db,
        """SELECT count(*) FROM metadata_records r
           JOIN ingestion_events e ON e.id = r.event_id
           JOIN variability_pauses p ON e.event_time >= p.lower_bound::timestamptz
                                    AND e.event_time < p.upper_bound::timestamptz
           WHERE r.emitted_at >= $1
             AND NOT (r.emitted_at > p.paused_at AND r.emitted_at < p.resumed_at)""",
        started,
    )
    assert outside == 0
    assert val(db, "SELECT count(*) FROM variability_jobs WHERE paused") == 0

    # the manifest: per batch, what it emitted per table, kind and version; per window its counts
    out = workdir / "backfill_logs" / "metadata_history" / run_id / "staging"
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    rows = [r for b in lines if "batch_no" in b for r in b["manifest"]["rows"]]
    assert all(list(r) == ["table", "kind", "version", "records"] for r in rows)
    tally: Counter[tuple[str, str, int]] = Counter()
    for r in rows:
        tally[(r["table"], r["kind"], r["version"])] += r["records"]
    assert tally == Counter(
        (f"{ns}.{entity}", kind, version) for (_, kind), (ns, entity, version) in want.items()
    )
    assert [(x["window"], x["matches"]) for x in lines if "batch_no" not in x] == [
        (n, True) for n in range(1, 7)
    ]

    # the soak's validation passes; the rollback deletes exactly what the run emitted
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
    assert not_as_before(db) == dict.fromkeys(metadata.TABLES, 0)


def test_a_run_stopped_inside_a_window_keeps_the_jobs_paused_until_the_window_is_done(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    seed(db)
    env = env_for(db)
    first = cli("apply", str(PLAN), "-e", "staging", "-q", "--max-rows", "300", env=env)
    assert first.exit_code == 0, first.output  # capped
    run_id = run_id_of(first.output)
    assert [w["status"] for w in windows_of(db, run_id)][:3] == ["done", "running", "pending"]
    # window 2 is under way: its jobs are paused, and the verify check sees a window open
    assert val(db, "SELECT count(*) FROM variability_jobs WHERE paused") == len(metadata.JOBS)
    assert val(db, "SELECT count(*) FROM variability_pauses WHERE resumed_at IS NULL") == 1
    rest = cli("apply", str(PLAN), "-e", "staging", "-q", "--run", run_id, env=env)
    assert rest.exit_code == 3, rest.output
    assert "(continued; " in rest.output, rest.output
    windows = windows_of(db, run_id)
    assert all(w["status"] == "done" and w["keys"] == w["discovered"] for w in windows)
    # each window paused and resumed the jobs once, however often the run was stopped
    pauses = sql(db, "SELECT window_label, resumed_at FROM variability_pauses ORDER BY id")
    assert [p["window_label"] for p in pauses] == [w["label"] for w in windows]
    assert all(p["resumed_at"] is not None for p in pauses)
    assert val(db, "SELECT count(*) FROM variability_jobs WHERE paused") == 0
    assert {
        (r["event_id"], r["kind"])
        for r in sql(
            db,
            "SELECT event_id, kind FROM metadata_records WHERE emitted_at > now() - interval '1 hour'",
        )
    } == set(expected(db))


@pytest.mark.slow
def test_the_metadata_demo_walks_the_rollout_and_undoes_staging_exactly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BACKFILL_HOME": str(tmp_path / "home"),
        "BACKFILL_LOGS": str(tmp_path / "logs"),
        "BACKFILL_CMD": "backfill",
    }
    args = ["demo", "--scenario", "metadata", "--scale", "0.25", "--auto-approve"]
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
    for table in metadata.TABLES:
        assert f"staging.{table}: bytewise as before the rollout" in out
    pg = EmbeddedServer(tmp_path / "home")
    pg.start()
    try:
        prod = pg.uri("prod")
        assert not_as_before(pg.uri("staging")) == dict.fromkeys(metadata.TABLES, 0)
        # prod keeps the backfill: every event of the range has its records; jobs resumed
        missing = (
            "SELECT count(*) FROM ingestion_events e WHERE e.event_time >= '2024-01-01' "
            "AND e.event_time < '2024-07-01' AND NOT EXISTS (SELECT FROM metadata_records r "
            "WHERE r.event_id = e.id AND r.kind = 'ingestion_runtime')"
        )
        assert val(prod, missing) == 0
        assert val(prod, "SELECT count(*) FROM variability_jobs WHERE paused") == 0
        assert val(prod, "SELECT count(*) FROM variability_pauses WHERE resumed_at IS NULL") == 0
        statuses = sql(prod, "SELECT DISTINCT status FROM backfill.windows")
        assert [r["status"] for r in statuses] == ["done"]
    finally:
        pg.stop()
