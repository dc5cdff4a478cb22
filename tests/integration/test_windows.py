"""Windows (#14): a run walked window by window, each window once, resumable where it stopped,
its counts checked against discovery; partitions as windows."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from runner.engine.target import TABLE_SIZE_SQL
from tests.conftest import sql, val, write_plan
from tests.helpers import env_for, run_id_of

EVENTS = """
DROP TABLE IF EXISTS events, window_log;
CREATE TABLE events (id bigint PRIMARY KEY, created date NOT NULL, n int NOT NULL DEFAULT 0,
                     note text);
-- 3 months of 2024, 10 rows a day, and rows outside the windows on both sides
INSERT INTO events (id, created)
SELECT g, DATE '2023-12-30' + (g / 10)::int FROM generate_series(0, 959) AS g;
CREATE TABLE window_log (at timestamptz DEFAULT clock_timestamp(), what text, lower text,
                         upper text);
"""


def make_events(db: str) -> None:
    sql(db, EVENTS)


def windows_plan(path: Path, **over: Any) -> Path:
    base: dict[str, Any] = {
        "target__columns": ["n"],
        "discovery__sql": "SELECT id FROM events WHERE n = 0",
        "apply__sql": "UPDATE events SET n = n + 1 WHERE id = ANY($1)",
        "target__table": "events",
        "windows": {
            "column": "created",
            "since": "2024-01-01",
            "until": "2024-04-01",
            "step": "1 month",
            "before_each": "INSERT INTO window_log (what, lower, upper) VALUES ('before', $1, $2)",
            "after_each": "INSERT INTO window_log (what, lower, upper) VALUES ('after', $1, $2)",
        },
        "batching__size": 40,
        "soak__checks": [
            {"name": "done", "sql": "SELECT count(*) FROM events WHERE n > 1", "pass_if": "== 0"}
        ],
    }
    return write_plan(path, **{**base, **over})


PAUSE_LOCK = 4242


def paused_window_hook(lower: str) -> str:
    """A before_each that waits, in window `lower`'s start, for `while_paused` (it writes
    nothing itself: a hook may not write the run's tables)."""
    return f"SELECT pg_advisory_xact_lock({PAUSE_LOCK}) WHERE $1 = '{lower}'"


def while_paused(db: str, action: str) -> threading.Thread:
    """Hold the window's start (see paused_window_hook) until `action` ran in another session,
    as an application's write would: rows arrive, or move, after the window was counted."""
    ready = threading.Event()

    async def go() -> None:
        conn = await asyncpg.connect(db)
        try:
            await conn.execute(f"SELECT pg_advisory_lock({PAUSE_LOCK})")
            ready.set()
            waiting = (
                "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' "
                f"AND objid = {PAUSE_LOCK} AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
            )
            for _ in range(3000):  # up to a minute
                if await conn.fetchval(waiting):
                    break
                await asyncio.sleep(0.02)
            await conn.execute(action)
            await conn.execute(f"SELECT pg_advisory_unlock({PAUSE_LOCK})")
        finally:
            await conn.close()

    t = threading.Thread(target=lambda: asyncio.run(go()))
    t.start()
    ready.wait(10)
    return t


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


def test_a_run_walks_its_windows_in_order_with_counts_that_match_discovery(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(workdir / "p.json")
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    windows = windows_of(db, run_id)
    assert [w["label"] for w in windows] == [
        "[2024-01-01, 2024-02-01)",
        "[2024-02-01, 2024-03-01)",
        "[2024-03-01, 2024-04-01)",
    ]
    assert [w["discovered"] for w in windows] == [310, 290, 310]
    assert all(w["status"] == "done" and w["keys"] == w["discovered"] for w in windows)
    # only rows inside [since, until) were changed, each once
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 910
    assert val(db, "SELECT count(*) FROM events WHERE n > 1") == 0
    outside = "SELECT count(*) FROM events WHERE n = 0 AND created NOT BETWEEN '2024-01-01' AND '2024-03-31'"
    assert val(db, outside) == 50
    # a batch never spans windows: each batch's keys lie in one month
    spans = sql(
        db,
        "SELECT b.batch_no, count(DISTINCT date_trunc('month', e.created)) AS months "
        "FROM backfill.batches b JOIN events e ON e.id BETWEEN b.first_key[1]::bigint "
        "AND b.last_key[1]::bigint AND e.n = 1 WHERE b.run_id = $1 GROUP BY b.batch_no",
        run_id,
    )
    assert spans
    assert all(r["months"] == 1 for r in spans)
    log = sql(db, "SELECT what, lower, upper FROM window_log ORDER BY at")
    assert [(r["what"], r["lower"]) for r in log] == [
        ("before", "2024-01-01"),
        ("after", "2024-01-01"),
        ("before", "2024-02-01"),
        ("after", "2024-02-01"),
        ("before", "2024-03-01"),
        ("after", "2024-03-01"),
    ]
    summary = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/backfill_summary.md"))
    text = summary.read_text()
    assert "## Windows" in text
    assert "[2024-02-01, 2024-03-01)" in text
    doc = json.loads(
        next(
            (workdir / "backfill_logs").rglob(f"{run_id}/staging/execution_results.json")
        ).read_text()
    )
    assert [w["matches"] for w in doc["windows"]] == [True, True, True]
    # the rollback undoes every window
    back = cli("rollback", run_id, "-e", "staging", env=env_for(db))
    assert back.exit_code == 0, back.output
    assert val(db, "SELECT count(*) FROM events WHERE n <> 0") == 0


def _runner(args: list[str], workdir: Path, db: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **env_for(db),
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
        "BACKFILL_ACTOR": "operator",
        "BACKFILL_CMD": "backfill",
    }
    with (workdir / "runner.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "runner", *args], cwd=workdir, env=env, stdout=out, stderr=out
        )


def test_a_run_killed_in_window_two_resumes_there_and_does_each_window_once(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        apply__sql="UPDATE events SET n = n + 1 WHERE id = ANY($1) AND (SELECT pg_sleep(0.05)) IS NOT NULL",
        batching__size=10,
    )
    proc = _runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    deadline = time.monotonic() + 60
    run_id = None
    while time.monotonic() < deadline:
        rows = sql(
            db,
            "SELECT run_id, window_no, status FROM backfill.windows WHERE status = 'running'"
            " AND window_no = 2 AND EXISTS (SELECT FROM backfill.batches b WHERE"
            " b.run_id = windows.run_id AND b.batch_no > windows.first_batch + 2)",
        )
        if rows:
            run_id = rows[0]["run_id"]
            break
        time.sleep(0.05)
    assert run_id is not None, (workdir / "runner.log").read_text()
    proc.kill()
    proc.wait()
    assert [w["status"] for w in windows_of(db, run_id)] == ["done", "running", "pending"]
    status = cli("status", run_id, env=env_for(db))
    assert "windows on staging: 1/3 done; window 2 [2024-02-01, 2024-03-01) running" in (
        status.output
    ), status.output
    shown = json.loads(cli("status", run_id, "--json", env=env_for(db)).output)["windows"]
    assert [(w["env"], w["no"], w["status"]) for w in shown] == [
        ("staging", 1, "done"),
        ("staging", 2, "running"),
        ("staging", 3, "pending"),
    ]
    partial = val(db, "SELECT count(*) FROM events WHERE n = 1 AND created >= '2024-02-01'")
    assert 0 < partial < 290
    resumed = _runner(["apply", str(plan), "-e", "staging", "-q", "--run", run_id], workdir, db)
    assert resumed.wait(timeout=120) == 3, (workdir / "runner.log").read_text()
    windows = windows_of(db, run_id)
    assert [w["status"] for w in windows] == ["done", "done", "done"]
    assert [(w["discovered"], w["keys"]) for w in windows] == [(310, 310), (290, 290), (310, 310)]
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 910
    assert val(db, "SELECT count(*) FROM events WHERE n > 1") == 0  # nothing applied twice
    # every changed row has its image, once
    assert (
        val(
            db,
            "SELECT count(*), count(DISTINCT key) FROM backfill.row_images WHERE run_id = $1",
            run_id,
        )
        == 910
    )
    doc = json.loads(
        next(
            (workdir / "backfill_logs").rglob(f"{run_id}/staging/execution_results.json")
        ).read_text()
    )
    assert doc["totals"]["changed"] == 910, doc["totals"]  # the whole run, both commands
    hooks = sql(db, "SELECT what, lower, count(*) AS n FROM window_log GROUP BY 1, 2")
    assert sorted((r["what"], r["lower"], r["n"]) for r in hooks) == [
        ("after", "2024-01-01", 1),
        ("after", "2024-02-01", 1),
        ("after", "2024-03-01", 1),
        ("before", "2024-01-01", 1),
        ("before", "2024-02-01", 1),
        ("before", "2024-03-01", 1),
    ]


def test_a_window_whose_batches_do_more_than_discovery_counted_fails_the_criteria(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    # rows arrive in window 2 after it was counted (an application inserts them while the
    # window's start waits)
    plan = windows_plan(workdir / "p.json", windows__before_each=paused_window_hook("2024-02-01"))
    arrivals = while_paused(
        db,
        "INSERT INTO events (id, created) SELECT 10000 + g, DATE '2024-02-10' "
        "FROM generate_series(1, 5) g",
    )
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    arrivals.join()
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    windows = windows_of(db, run_id)
    assert [(w["discovered"], w["keys"]) for w in windows] == [(310, 310), (290, 295), (310, 310)]
    status = json.loads(cli("status", run_id, "--json", env=env_for(db)).output)
    assert status["steps"][0]["gate"]["criteria"] == "fail"
    summary = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/backfill_summary.md"))
    assert "window 2 [2024-02-01, 2024-03-01): discovery counted 290" in summary.read_text()


def test_an_approval_of_one_window_range_does_not_open_another(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        params={"since": {"type": "date", "default": "2024-01-01"}},
        windows__since="${since}",
    )
    env = env_for(db)
    applied = cli("--param", "since=2024-01-01", "apply", str(plan), "-e", "staging", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    approve = ["approve", run_id, "--gate", "apply-staging", "--as", "alice"]
    assert cli("--param", "since=2024-01-01", *approve, env=env).exit_code == 0
    same = json.loads(
        cli("--param", "since=2024-01-01", "status", run_id, "--json", env=env).output
    )
    assert same["steps"][0]["gate"]["status"] == "open"
    other = json.loads(
        cli("--param", "since=2024-02-01", "status", run_id, "--json", env=env).output
    )
    assert other["steps"][0]["gate"]["status"] == "closed"
    soak = cli(
        "--param", "since=2024-02-01", "soak", str(plan), "-e", "staging", "--run", run_id, env=env
    )
    assert soak.exit_code != 0, soak.output


PARTITIONED = """
DROP TABLE IF EXISTS files;
CREATE TABLE files (id bigint, day date NOT NULL, state text NOT NULL DEFAULT 'new',
                    PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE files_2024_01 PARTITION OF files FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
CREATE TABLE files_2024_02 PARTITION OF files FOR VALUES FROM ('2024-02-01') TO ('2024-03-01');
CREATE TABLE files_default PARTITION OF files DEFAULT;
-- ids interleave across partitions: a keyset batch over the whole table would span them
INSERT INTO files (id, day)
SELECT g, CASE g % 3 WHEN 0 THEN DATE '2024-01-15' WHEN 1 THEN DATE '2024-02-15'
                     ELSE DATE '2025-06-01' END
FROM generate_series(1, 600) AS g;
"""


def test_a_partitioned_target_is_walked_partition_by_partition(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(db, PARTITIONED)
    plan = write_plan(
        workdir / "p.json",
        target__table="files",
        target__key=["id", "day"],
        target__columns=["state"],
        discovery__sql="SELECT id, day FROM files WHERE state = 'new'",
        apply__sql="UPDATE files SET state = 'done' WHERE (id, day) IN "
        "(SELECT * FROM unnest($1::bigint[], $2::date[]))",
        windows={"by_partition": True},
        batching__size=50,
        soak__checks=[
            {
                "name": "done",
                "sql": "SELECT count(*) FROM files WHERE state = 'new'",
                "pass_if": "== 0",
            }
        ],
    )
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    windows = windows_of(db, run_id)
    assert [w["label"] for w in windows] == [
        "public.files_2024_01",
        "public.files_2024_02",
        "public.files_default",
    ]
    assert [(w["discovered"], w["keys"]) for w in windows] == [(200, 200), (200, 200), (200, 200)]
    assert val(db, "SELECT count(*) FROM files WHERE state = 'new'") == 0
    # no batch spans partitions
    spans = sql(
        db,
        "SELECT r.batch_no, count(DISTINCT f.tableoid) AS parts FROM backfill.row_images r "
        "JOIN files f ON f.id = r.key[1]::bigint AND f.day = r.key[2]::date "
        "WHERE r.run_id = $1 GROUP BY r.batch_no",
        run_id,
    )
    assert len(spans) == 12
    assert all(r["parts"] == 1 for r in spans)
    back = cli("rollback", run_id, "-e", "staging", env=env_for(db))
    assert back.exit_code == 0, back.output
    assert val(db, "SELECT count(*) FROM files WHERE state <> 'new'") == 0


def test_a_partitioned_target_is_sized_by_its_partitions(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """The parent of a partitioned table stores nothing: the dry run's and prod health's size
    of it is its leaf partitions' (it was 0 bytes)."""
    sql(db, PARTITIONED + "ANALYZE files;")
    size = sql(db, TABLE_SIZE_SQL, val(db, "SELECT 'files'::regclass::oid"))[0]
    leaves = val(
        db,
        "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('files') WHERE isleaf",
    )
    assert (size["bytes"], size["rows"]) == (leaves, 600)
    assert leaves > 0
    # a plain table: its own size, as before
    sql(db, "CREATE TABLE plain AS SELECT g FROM generate_series(1, 100) AS g; ANALYZE plain;")
    plain = sql(db, TABLE_SIZE_SQL, val(db, "SELECT 'plain'::regclass::oid"))[0]
    assert (plain["bytes"], plain["rows"]) == (
        val(db, "SELECT pg_total_relation_size('plain')"),
        100,
    )
    plan = write_plan(
        workdir / "p.json",
        target__table="files",
        target__key=["id", "day"],
        target__columns=["state"],
        discovery__sql="SELECT id, day FROM files WHERE state = 'new'",
        apply__sql="UPDATE files SET state = 'done' WHERE (id, day) IN "
        "(SELECT * FROM unnest($1::bigint[], $2::date[]))",
        windows={"by_partition": True},
    )
    dry = cli("apply", str(plan), "-e", "staging", "--dry-run", "--no-sample", env=env_for(db))
    assert dry.exit_code == 0, dry.output
    assert "size: about 0.0 MB" not in dry.output, dry.output


def test_windows_that_do_not_fit_the_table_are_refused_before_anything_runs(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    cases = [
        ({"windows__column": "note"}, "events.note is text; windows are cut from a date"),
        ({"windows__column": "nope"}, "has no column 'nope'"),
        ({"windows__since": "2024-05-01"}, "is not before until"),
        ({"windows__step": "-1 day"}, "is not positive"),
        ({"windows__since": "last tuesday"}, "do not fit created (date)"),
        ({"windows__by_partition": True}, "by_partition = true makes each partition a window"),
        ({"windows": {"by_partition": True}}, "public.events is not a partitioned table"),
    ]
    for over, message in cases:
        plan = windows_plan(workdir / "p.json", **over)
        result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
        assert result.exit_code == 2, (over, result.output)
        assert message in " ".join(result.output.split()), (over, result.output)
        assert val(db, "SELECT count(*) FROM events WHERE n <> 0") == 0
        assert val(db, "SELECT count(*) FROM backfill.runs") == 0  # refused before a run
        checked = cli("validate", str(plan), "--env", "staging", env=env_for(db))
        assert checked.exit_code != 0, checked.output


def test_the_dry_run_estimates_each_window_and_counts_what_lies_outside(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        manifest={"sql": MONTHS},
        discovery__time_column="created",
        discovery__size_sql="SELECT sum(1000) FROM events AS e JOIN discovered AS d USING (id)",
    )
    checked = cli("validate", str(plan), "--env", "staging", env=env_for(db))
    assert checked.exit_code == 0, checked.output
    assert "3 window(s): [2024-01-01, 2024-02-01) … [2024-03-01, 2024-04-01)" in checked.output
    assert "manifest.sql" in checked.output
    result = cli("apply", str(plan), "-e", "staging", "--dry-run", env=env_for(db))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rows needing the backfill: 910" in out
    # the span of what the run will touch: within the windows (discovery returns rows on both
    # sides of them too)
    assert "created: from 2024-01-01 to 2024-03-31" in out, out
    assert "windows: 3; rows discovery returns outside them (not touched): 50" in out
    # the size and the span are those of what the run will do: within the windows
    assert "size: about 0.9 MB (discovery.size_sql)" in out
    assert "created: from 2024-01-01 to 2024-03-31" in out
    assert "1. [2024-01-01, 2024-02-01): 310 row(s), 8 batch(es), about" in out
    assert "2. [2024-02-01, 2024-03-01): 290 row(s), 8 batch(es)" in out
    assert val(db, "SELECT count(*) FROM events WHERE n <> 0") == 0
    assert val(db, "SELECT count(*) FROM window_log") == 0  # the hooks run only for real


def test_a_windowed_rollout_walks_staging_then_prod_where_the_canary_stops_inside_a_window(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    staging, prod = make_db(), make_db()
    make_events(staging)
    make_events(prod)
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    plan = windows_plan(
        workdir / "p.json",
        soak__duration="1s",
        soak__interval="1s",
        discovery__time_column="created",
    )
    first = cli("pipeline", str(plan), "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    for gate in ("apply-staging", "soak-staging", "health-prod"):
        assert cli("approve", run_id, "--gate", gate, "--as", "alice", env=env).exit_code == 0
        step = cli("pipeline", str(plan), "--run", run_id, "-q", env=env)
        assert step.exit_code == 3, (gate, step.output)
    health_md = next((workdir / "backfill_logs").rglob(f"{run_id}/prod/prod_health_check.md"))
    assert "| Size of what needs it |" in health_md.read_text()
    assert "| `created` of what needs it | 2024-01-01 … 2024-03-31 |" in health_md.read_text()
    assert "| Rows needing the backfill (discovery count) | 910 |" in health_md.read_text()
    assert "| 2 | [2024-02-01, 2024-03-01) | 290 |" in health_md.read_text()
    # the canary: its batches lie in the first window, which it leaves running
    assert [w["status"] for w in windows_of(prod, run_id)] == ["running", "pending", "pending"]
    canary_rows = val(prod, "SELECT count(*) FROM events WHERE n = 1")
    assert 0 < canary_rows < 310
    # the canary's summary shows what the window it stopped in did so far
    canary_md = next((workdir / "backfill_logs").rglob(f"{run_id}/prod/canary_summary.md"))
    row = f"| 1 | [2024-01-01, 2024-02-01) | running | 310 | {canary_rows} | {canary_rows} | 0 | 0 | — |"
    assert row in canary_md.read_text(), canary_md.read_text()
    assert cli("approve", run_id, "--gate", "canary-prod", "--as", "alice", env=env).exit_code == 0
    rest = cli("pipeline", str(plan), "--run", run_id, "-q", env=env)
    assert rest.exit_code == 0, rest.output
    windows = windows_of(prod, run_id)
    assert [w["status"] for w in windows] == ["done", "done", "done"]
    # window 1 was counted once, when the canary started it; the rest did what it left
    assert [(w["discovered"], w["keys"]) for w in windows] == [(310, 310), (290, 290), (310, 310)]
    assert val(prod, "SELECT count(*) FROM events WHERE n = 1") == 910
    assert val(prod, "SELECT count(*) FROM events WHERE n > 1") == 0
    assert val(prod, "SELECT count(*) FROM window_log WHERE what = 'before'") == 3
    rest_md = next((workdir / "backfill_logs").rglob(f"{run_id}/prod/rest_summary.md"))
    assert "## Windows" in rest_md.read_text()


MONTHS = (
    "SELECT to_char(created, 'YYYY-MM') AS month, count(*) AS rows FROM events "
    "WHERE id = ANY($1) GROUP BY 1 ORDER BY 1"
)


def test_the_manifest_records_each_batch_with_its_manifest_rows_and_each_window(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(workdir / "p.json", manifest={"sql": MONTHS}, batching__size=100)
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    path = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/manifest.jsonl"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    batches = [x for x in lines if "batch_no" in x]
    windows = [x for x in lines if "batch_no" not in x]
    assert sum(b["changed"] for b in batches) == 910
    assert [b["window"] for b in batches] == [1] * 4 + [2] * 3 + [3] * 4
    first = batches[0]["manifest"]
    assert first == {"rows": [{"month": "2024-01", "rows": 100}], "truncated": False}
    # in the query's column order (the ledger's jsonb would put `rows` first)
    assert [list(r) for r in first["rows"]] == [["month", "rows"]]
    assert sum(r["rows"] for b in batches for r in b["manifest"]["rows"]) == 910
    assert [(w["window"], w["discovered"], w["keys"], w["matches"]) for w in windows] == [
        (1, 310, 310, True),
        (2, 290, 290, True),
        (3, 310, 310, True),
    ]


def test_a_manifest_query_that_writes_fails_its_batch_and_changes_nothing(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    writes = (
        "WITH x AS (UPDATE events SET note = 'oops' WHERE id = ANY($1) RETURNING id) "
        "SELECT count(*) AS n FROM x"
    )
    plan = windows_plan(workdir / "p.json", manifest={"sql": writes})
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 2, result.output  # refused before a run: it cannot even prepare
    assert "manifest.sql: FeatureNotSupported" in result.output
    assert "must be at the top level" in result.output
    # nor through a function that writes: the query runs in a read-only savepoint
    sql(
        db,
        "CREATE FUNCTION stamp(ids bigint[]) RETURNS int LANGUAGE sql AS "
        "$$ UPDATE events SET note = 'oops' WHERE id = ANY(ids) RETURNING 1 $$",
    )
    plan = windows_plan(workdir / "p.json", manifest={"sql": "SELECT stamp($1) AS n"})
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert "read-only transaction" in result.output
    assert "the plan's manifest.sql failed" in result.output
    assert val(db, "SELECT count(*) FROM events WHERE n <> 0 OR note IS NOT NULL") == 0


def test_a_failing_hook_stops_the_phase_with_the_window_untouched_and_the_run_continues(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    # a hook that prepares (checked before the run) but fails when it runs
    sql(
        db, "CREATE TABLE window_done (lower text CONSTRAINT not_yet CHECK (lower <> '2024-01-01'))"
    )
    plan = windows_plan(
        workdir / "p.json",
        windows__after_each="INSERT INTO window_done (lower) VALUES ($1)",
    )
    failed = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert failed.exit_code == 1, failed.output
    assert "windows.after_each failed for window 1 [2024-01-01, 2024-02-01)" in failed.output
    assert 'violates check constraint "not_yet"' in failed.output
    run_id = run_id_of(failed.output)
    # window 1's batches committed; it is not recorded done, window 2 never started
    assert [w["status"] for w in windows_of(db, run_id)] == ["running", "pending", "pending"]
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 310
    sql(db, "ALTER TABLE window_done DROP CONSTRAINT not_yet")
    again = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env_for(db))
    assert again.exit_code == 3, again.output
    assert [w["status"] for w in windows_of(db, run_id)] == ["done", "done", "done"]
    assert [r["lower"] for r in sql(db, "SELECT lower FROM window_done ORDER BY 1")] == [
        "2024-01-01",
        "2024-02-01",
        "2024-03-01",
    ]
    assert [r["what"] for r in sql(db, "SELECT what FROM window_log ORDER BY at")] == ["before"] * 3
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 910


def test_a_row_cap_counts_across_windows_and_the_next_command_continues_inside_one(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(workdir / "p.json")
    env = env_for(db)
    first = cli("apply", str(plan), "-e", "staging", "--max-rows", "400", env=env)
    assert first.exit_code == 0, first.output
    assert "capped" in first.output
    run_id = run_id_of(first.output)
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 400  # exactly: 310 + 90
    assert [w["status"] for w in windows_of(db, run_id)] == ["done", "running", "pending"]
    second = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert second.exit_code == 3, second.output
    windows = windows_of(db, run_id)
    assert [(w["status"], w["discovered"], w["keys"]) for w in windows] == [
        ("done", 310, 310),
        ("done", 290, 290),
        ("done", 310, 310),
    ]
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 910


def test_a_manifest_query_or_a_hook_that_does_not_fit_is_refused_before_anything_runs(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """Found by a batch, it would stop the phase inside a window, its before_each run (the
    jobs it pauses left paused)."""
    make_events(db)
    cases = [
        ({"manifest": {"sql": "SELECT nope FROM events WHERE id = ANY($1)"}}, "manifest.sql"),
        ({"windows__after_each": "UPDATE window_logg SET what = $3"}, "windows.after_each"),
        ({"windows__before_each": "INSERT INTO window_log (what) VALUES (1, 2)"}, "before_each"),
    ]
    for over, where in cases:
        plan = windows_plan(workdir / "p.json", **over)
        result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
        assert result.exit_code == 2, (over, result.output)
        assert f"{where}" in result.output, (over, result.output)
        assert "nothing was written" in " ".join(result.output.split()), result.output
        assert val(db, "SELECT count(*) FROM window_log") == 0
        assert val(db, "SELECT count(*) FROM events WHERE n <> 0") == 0
    # as the plan is, each prepares; `validate --env` lists them
    verify = [{"name": "once", "sql": "SELECT count(*) FROM events WHERE n > 1", "pass_if": "== 0"}]
    plan = windows_plan(workdir / "p.json", manifest={"sql": MONTHS}, verify=verify)
    shown = cli("validate", str(plan), "--env", "staging", env=env_for(db))
    assert shown.exit_code == 0, shown.output
    for where in ("manifest.sql", "windows.before_each", "windows.after_each", "verify.once.sql"):
        assert f"ok   {where}" in shown.output, shown.output
