"""Review of windows and the manifest (#14): where they are silently wrong (xfail, strict: each
fails on the code as reviewed) and what was checked and found right (plain tests)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import sql, val, write_plan
from tests.helpers import env_for, run_id_of
from tests.integration.test_windows import (
    _runner,
    make_events,
    paused_window_hook,
    while_paused,
    windows_of,
    windows_plan,
)

# id 700 lies in March (window 3 oldest first, window 1 newest first); a CHECK makes its update
# fail on its data, so the run quarantines it; dropping the CHECK is the "fix" a retry needs
BAD_ROW = "ALTER TABLE events ADD CONSTRAINT not_700 CHECK (id <> 700 OR n = 0)"
FIX_ROW = "ALTER TABLE events DROP CONSTRAINT not_700"


def _logs(workdir: Path, run_id: str, name: str, env: str = "staging") -> Path:
    return next((workdir / "backfill_logs").rglob(f"{run_id}/{env}/{name}"))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _criteria(cli: Callable[..., Any], run_id: str, env: dict[str, str]) -> str:
    status = json.loads(cli("status", run_id, "--json", env=env).output)
    return str(status["steps"][0]["gate"]["criteria"])


# -- findings ---------------------------------------------------------------------------------


def test_a_retry_between_two_commands_of_a_window_is_not_counted_into_that_window(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    sql(db, BAD_ROW)
    env = env_for(db)
    plan = windows_plan(workdir / "p.json", windows__order="newest_first")
    first = cli("apply", str(plan), "-e", "staging", "--max-rows", "400", env=env)
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    assert [w["status"] for w in windows_of(db, run_id)] == ["done", "running", "pending"]
    w1 = windows_of(db, run_id)[0]
    assert (w1["discovered"], w1["keys"], w1["quarantined"]) == (310, 309, 1)
    sql(db, FIX_ROW)
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", "--plan", str(plan), env=env)
    assert retried.exit_code == 0, retried.output
    rest = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert rest.exit_code == 3, rest.output
    # every row once
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 910
    assert val(db, "SELECT count(*) FROM events WHERE n > 1") == 0
    windows = windows_of(db, run_id)
    # window 2 (February) did its 290 keys; key 700 (March, window 1) is not one of them
    assert (windows[1]["discovered"], windows[1]["keys"]) == (290, 290), windows
    assert _criteria(cli, run_id, env) == "pass"


def test_the_retry_manifest_does_not_label_a_retried_key_with_the_last_window(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    sql(db, BAD_ROW)
    env = env_for(db)
    plan = windows_plan(workdir / "p.json", windows__order="newest_first")
    first = cli("apply", str(plan), "-e", "staging", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    sql(db, FIX_ROW)
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", "--plan", str(plan), env=env)
    assert retried.exit_code == 0, retried.output
    lines = _jsonl(_logs(workdir, run_id, "retry_manifest.jsonl"))
    batches = [x for x in lines if "batch_no" in x]
    assert [b["keys"] for b in batches] == [[["700"]]]
    # id 700 is a March row (window 1, newest first): a retry's batch belongs to no window (its
    # key was counted in window 1 when it was quarantined), so it is not labelled with the last
    # window walked (window 3, January)
    assert batches[0]["window"] is None, batches
    assert "retry" in _logs(workdir, run_id, "retry_manifest.jsonl").name


SECRET = "s3cr3t-tenant-token-4711"


def test_a_secret_variable_in_the_manifest_query_never_reaches_the_manifest(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    manifest = "SELECT '${TENANT_TOKEN}' AS tenant, count(*) AS n FROM events WHERE id = ANY($1)"
    # declared secret (a `${VAR}` is secret when declared, named SECRET_*, or in a DSN)
    plan = windows_plan(
        workdir / "p.json",
        manifest={"sql": manifest},
        batching__size=400,
        variables={"secret": ["TENANT_TOKEN"]},
    )
    env = {**env_for(db), "TENANT_TOKEN": SECRET}
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    assert SECRET not in result.output
    text = _logs(workdir, run_id, "manifest.jsonl").read_text()
    assert SECRET not in text
    stored = val(db, "SELECT string_agg(manifest::text, '') FROM backfill.batches")
    assert SECRET not in stored


def test_rows_that_move_into_a_done_window_are_reported_not_silently_left(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    # while window 2 runs, the application moves 5 March rows (window 3, not counted yet) to
    # January (window 1, done): no window counts them, none applies them
    plan = windows_plan(
        workdir / "p.json",
        windows__before_each=paused_window_hook("2024-02-01"),
        target__columns=["n", "created"],
    )
    env = env_for(db)
    moved = while_paused(
        db, "UPDATE events SET created = '2024-01-15' WHERE id BETWEEN 700 AND 704"
    )
    result = cli("apply", str(plan), "-e", "staging", env=env)
    moved.join()
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    left = val(
        db,
        "SELECT count(*) FROM events WHERE n = 0 AND created >= '2024-01-01' "
        "AND created < '2024-04-01'",
    )
    assert left == 5  # discovery within [since, until) still returns them after the run
    doc = json.loads(_logs(workdir, run_id, "execution_results.json").read_text())
    said = " ".join(doc["warnings"])
    # the run must not end saying nothing about rows its own span still returns
    assert doc["totals"]["remaining"] == 5 or "5 row(s)" in said, (doc["totals"], said)


def test_a_discovery_column_named_like_the_window_column_does_not_redefine_the_windows(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    # discovery returns a due date under the column's name (created + 31 days)
    plan = windows_plan(
        workdir / "p.json",
        discovery__sql="SELECT id, created + 31 AS created FROM events WHERE n = 0",
    )
    env = env_for(db)
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert result.exit_code == 3, result.output
    outside = val(
        db,
        "SELECT count(*) FROM events WHERE n <> 0 AND "
        "(created < '2024-01-01' OR created >= '2024-04-01')",
    )
    assert outside == 0  # nothing outside [since, until) of events.created was touched
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 910


def test_a_discovery_with_the_window_column_twice_runs_its_windows_on_the_targets_column(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """Once refused only after the run existed (the window filtered discovery's own column,
    ambiguous here); a window is now always the target's column, so nothing is ambiguous."""
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        discovery__sql="SELECT e.id, e.created, e.created FROM events e WHERE n = 0",
    )
    env = env_for(db)
    checked = cli("validate", str(plan), "--env", "staging", env=env)
    assert checked.exit_code == 0, checked.output
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 910


def test_a_hook_that_cannot_run_is_refused_before_a_run_exists(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        windows__before_each="INSERT INTO window_log (what, lower) VALUES ('a', $1); "
        "INSERT INTO window_log (what, lower) VALUES ('b', $1)",
    )
    env = env_for(db)
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert val(db, "SELECT count(*) FROM backfill.runs") == 0, result.output
    assert result.exit_code == 2, result.output


def test_a_hook_that_writes_the_target_is_refused_or_rolled_back(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    sql(db, "DROP TABLE IF EXISTS snap; CREATE TABLE snap AS SELECT * FROM events")
    plan = windows_plan(
        workdir / "p.json",
        windows__after_each="UPDATE events SET note = 'touched by hook' WHERE created >= $1::date "
        "AND created < $2::date",
    )
    env = env_for(db)
    result = cli("apply", str(plan), "-e", "staging", env=env)
    # refused when it runs (window 1's end), its writes rolled back
    assert result.exit_code == 1, result.output
    assert "windows.after_each wrote public.events, a table the run writes" in result.output
    assert val(db, "SELECT count(*) FROM events WHERE note IS NOT NULL") == 0
    run_id = run_id_of(result.output)
    back = cli("rollback", run_id, "-e", "staging", env=env)
    assert back.exit_code == 0, back.output
    differing = val(
        db,
        "SELECT count(*) FROM events e JOIN snap s USING (id) "
        "WHERE (e.n, e.note) IS DISTINCT FROM (s.n, s.note)",
    )
    assert differing == 0


def test_the_dry_run_time_span_is_the_span_of_the_windows(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(workdir / "p.json", discovery__time_column="created")
    result = cli("apply", str(plan), "-e", "staging", "--dry-run", "--no-sample", env=env_for(db))
    assert result.exit_code == 0, result.output
    assert "rows discovery returns outside them (not touched): 50" in result.output
    assert "created: from 2024-01-01 to 2024-03-31" in result.output, result.output


def test_a_retry_between_two_commands_does_not_move_the_window_cursor(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    sql(db, BAD_ROW)
    env = env_for(db)
    plan = windows_plan(workdir / "p.json", windows__order="newest_first", batching__max_passes=1)
    first = cli("apply", str(plan), "-e", "staging", "--max-rows", "400", env=env)
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    sql(db, FIX_ROW)
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", "--plan", str(plan), env=env)
    assert retried.exit_code == 0, retried.output
    cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert [w["status"] for w in windows_of(db, run_id)] == ["done", "done", "done"]
    # every February row was applied in window 2
    assert (
        val(
            db,
            "SELECT count(*) FROM events WHERE n = 0 AND created >= '2024-02-01' "
            "AND created < '2024-03-01'",
        )
        == 0
    )


def test_the_dry_run_size_estimate_is_not_larger_than_the_table_on_an_unanalysed_table(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(workdir / "p.json")
    result = cli("apply", str(plan), "-e", "staging", "--dry-run", "--no-sample", env=env_for(db))
    assert result.exit_code == 0, result.output
    table = val(db, "SELECT pg_total_relation_size('events')")
    assert table < 1_000_000
    assert " MB of the table's rows" not in result.output, result.output


def test_a_hook_with_transaction_control_is_refused_or_runs_once(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        windows__before_each="INSERT INTO window_log (what) VALUES ('before'); COMMIT",
        windows__after_each=None,
    )
    env = env_for(db)
    first = cli("apply", str(plan), "-e", "staging", env=env)
    if first.exit_code == 2 and val(db, "SELECT count(*) FROM backfill.runs") == 0:
        return  # refused before anything ran: fine
    run_id = run_id_of(first.output)
    again = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env)
    # window 1 was "not started" twice, yet its before_each committed each time
    assert val(db, "SELECT count(*) FROM window_log") <= 1, (first.output, again.output)


def test_a_manifest_query_without_the_batch_keys_is_refused_before_a_run_exists(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(workdir / "p.json", manifest={"sql": "SELECT count(*) AS n FROM events"})
    env = env_for(db)
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert "lost the connection" not in result.output, result.output
    assert result.exit_code == 2, result.output
    assert val(db, "SELECT count(*) FROM backfill.runs") == 0


def test_the_manifest_bounds_what_it_stores_per_batch(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        manifest={
            "sql": "SELECT id, repeat(md5(id::text), 20000) AS blob FROM events "
            "WHERE id = ANY($1) ORDER BY id LIMIT 3"
        },
        batching__size=400,
    )
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    biggest = val(db, "SELECT max(octet_length(manifest::text)) FROM backfill.batches")
    assert biggest < 1_000_000, biggest


def test_a_hook_may_use_only_the_window_label(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        windows__before_each="INSERT INTO window_log (what) VALUES ($3)",
        windows__after_each=None,
    )
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert [r["what"] for r in sql(db, "SELECT what FROM window_log ORDER BY at")] == [
        "[2024-01-01, 2024-02-01)",
        "[2024-02-01, 2024-03-01)",
        "[2024-03-01, 2024-04-01)",
    ]


def test_rows_arriving_while_the_canary_walks_a_window_are_applied_or_flagged(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    staging, prod = make_db(), make_db()
    make_events(staging)
    make_events(prod)
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    plan = windows_plan(
        workdir / "p.json",
        apply__sql="UPDATE events SET n = n + 1 WHERE id = ANY($1) "
        "AND (SELECT pg_sleep(0.1)) IS NOT NULL",
        soak__duration="1s",
        soak__interval="1s",
        health__canary_percent=60,
    )
    first = cli("pipeline", str(plan), "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    for gate in ("apply-staging", "soak-staging"):
        assert cli("approve", run_id, "--gate", gate, "--as", "alice", env=env).exit_code == 0
        step = cli("pipeline", str(plan), "--run", run_id, "-q", env=env)
        assert step.exit_code == 3, (gate, step.output)
    assert cli("approve", run_id, "--gate", "health-prod", "--as", "alice", env=env).exit_code == 0
    import threading

    def arrive() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if val(prod, "SELECT count(*) FROM backfill.batches WHERE stage = 'canary'"):
                sql(
                    prod,
                    "INSERT INTO events (id, created) SELECT -g, DATE '2024-01-10' "
                    "FROM generate_series(1, 5) g",
                )
                return
            time.sleep(0.02)

    t = threading.Thread(target=arrive)
    t.start()
    canary = cli("pipeline", str(plan), "--run", run_id, "-q", env=env)
    t.join()
    statuses = [w["status"] for w in windows_of(prod, run_id)]
    assert statuses[0] == "done", statuses  # the canary walked window 1 to its end
    w1 = windows_of(prod, run_id)[0]
    left = val(prod, "SELECT count(*) FROM events WHERE id < 0 AND n = 0")
    # the arrivals were applied inside the window (its end re-counts it), and the window does
    # not claim to match what it counted at its start: the canary's criteria fail, a person
    # decides (with --override) whether the arrivals were expected
    assert left == 0, (left, w1)
    assert (w1["discovered"], w1["keys"]) == (310, 315), w1
    assert canary.exit_code == 4, canary.output
    assert "gate canary-prod is no-go: the phase's criteria failed" in canary.output


# -- checked and found right ------------------------------------------------------------------


def test_a_quarantined_key_counts_in_its_window_and_the_window_matches(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    sql(db, BAD_ROW)
    env = env_for(db)
    plan = windows_plan(workdir / "p.json", batching__size=25)
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    windows = windows_of(db, run_id)
    assert [(w["discovered"], w["keys"], w["quarantined"]) for w in windows] == [
        (310, 310, 0),
        (290, 290, 0),
        (310, 309, 1),
    ]
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 909
    assert val(db, "SELECT count(*) FROM events WHERE n > 1") == 0
    doc = json.loads(_logs(workdir, run_id, "execution_results.json").read_text())
    assert [w["matches"] for w in doc["windows"]] == [True, True, True]
    # a quarantined key makes the criteria inconclusive, not a window mismatch
    assert _criteria(cli, run_id, env) == "inconclusive"
    # split parts and the quarantined key's batch are attributed to window 3 in the manifest
    lines = _jsonl(_logs(workdir, run_id, "manifest.jsonl"))
    in_w3 = {b["batch_no"] for b in lines if "batch_no" in b and b["window"] == 3}
    keys_w3 = [k for b in lines if "batch_no" in b and b["window"] == 3 for k in b["keys"]]
    assert len(keys_w3) == 309
    assert ["700"] not in keys_w3
    assert in_w3


@pytest.mark.parametrize("hook", ["before_each", "after_each"])
def test_a_kill_inside_a_window_hook_runs_each_hook_once_on_resume(
    hook: str, cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    # one hook of window 2 is slow: the runner is killed inside the transaction that starts
    # (before_each) or finishes (after_each) the window
    sql(db, "CREATE TABLE slow (lower text PRIMARY KEY)")
    hooks = {
        name: f"INSERT INTO window_log (what, lower, upper) SELECT '{name[:-5]}', $1, $2"
        for name in ("before_each", "after_each")
    }
    hooks[hook] += (
        " FROM pg_sleep(CASE WHEN $1 = '2024-02-01' AND NOT EXISTS (SELECT FROM slow)"
        " THEN 30 ELSE 0 END)"
    )
    plan = windows_plan(
        workdir / "p.json",
        windows__before_each=hooks["before_each"],
        windows__after_each=hooks["after_each"],
        batching__size=100,
    )
    proc = _runner(["apply", str(plan), "-e", "staging", "-q"], workdir, db)
    deadline = time.monotonic() + 60
    sleeping = 0
    while time.monotonic() < deadline:
        # the hook runs as EXECUTE of a prepared statement: its sleep shows as a wait event
        sleeping = val(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
            "AND state = 'active' AND pid <> pg_backend_pid() AND datname = current_database()",
        )
        if sleeping:
            break
        time.sleep(0.05)
    assert sleeping, (workdir / "runner.log").read_text()
    proc.kill()
    proc.wait()
    sql(
        db,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
        "AND pid <> pg_backend_pid() AND datname = current_database()",
    )
    run_id = val(db, "SELECT run_id FROM backfill.runs")
    expected = {"before_each": "pending", "after_each": "running"}[hook]
    assert [w["status"] for w in windows_of(db, run_id)] == ["done", expected, "pending"]
    sql(db, "INSERT INTO slow VALUES ('x')")
    again = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env_for(db))
    assert again.exit_code == 3, again.output
    ran = sql(db, "SELECT what, lower, count(*) AS n FROM window_log GROUP BY 1, 2 ORDER BY 2, 1")
    assert [(r["what"], r["lower"], r["n"]) for r in ran] == [
        ("after", "2024-01-01", 1),
        ("before", "2024-01-01", 1),
        ("after", "2024-02-01", 1),
        ("before", "2024-02-01", 1),
        ("after", "2024-03-01", 1),
        ("before", "2024-03-01", 1),
    ]
    assert [(w["discovered"], w["keys"]) for w in windows_of(db, run_id)] == [
        (310, 310),
        (290, 290),
        (310, 310),
    ]
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 910
    assert val(db, "SELECT count(*) FROM events WHERE n > 1") == 0


PARTS = """
DROP TABLE IF EXISTS files;
CREATE TABLE files (id bigint, day date NOT NULL, state text NOT NULL DEFAULT 'new',
                    PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE files_2024_01 PARTITION OF files FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
CREATE TABLE files_2024_q2 PARTITION OF files FOR VALUES FROM ('2024-04-01') TO ('2024-07-01')
    PARTITION BY RANGE (day);
CREATE TABLE files_2024_04 PARTITION OF files_2024_q2 FOR VALUES FROM ('2024-04-01') TO ('2024-05-01');
CREATE TABLE files_2024_q2_rest PARTITION OF files_2024_q2 DEFAULT;
CREATE TABLE files_default PARTITION OF files DEFAULT;
INSERT INTO files (id, day)
SELECT g, CASE g % 4 WHEN 0 THEN DATE '2024-01-15' WHEN 1 THEN DATE '2024-04-15'
                     WHEN 2 THEN DATE '2024-06-15' ELSE DATE '2025-06-01' END
FROM generate_series(1, 400) AS g;
"""


def _files_plan(path: Path, **over: Any) -> Path:
    return write_plan(
        path,
        **{
            "target__table": "files",
            "target__key": ["id", "day"],
            "target__columns": ["state"],
            "discovery__sql": "SELECT id, day FROM files WHERE state = 'new'",
            "apply__sql": "UPDATE files SET state = 'done' WHERE (id, day) IN "
            "(SELECT * FROM unnest($1::bigint[], $2::date[]))",
            "windows": {"by_partition": True},
            "batching__size": 30,
            "soak__checks": [
                {
                    "name": "done",
                    "sql": "SELECT count(*) FROM files WHERE state = 'new'",
                    "pass_if": "== 0",
                }
            ],
            **over,
        },
    )


def test_sub_partitions_and_default_partitions_are_each_one_window_and_a_change_is_refused(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(db, PARTS)
    env = env_for(db)
    plan = _files_plan(workdir / "p.json")
    first = cli("apply", str(plan), "-e", "staging", "--max-rows", "150", env=env)
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    labels = [w["label"] for w in windows_of(db, run_id)]
    assert labels == [
        "public.files_2024_01",
        "public.files_2024_04",
        "public.files_2024_q2_rest",
        "public.files_default",
    ]
    # a partition added between two commands of the run: refused, nothing written
    done_before = val(db, "SELECT count(*) FROM files WHERE state = 'done'")
    sql(
        db,
        "CREATE TABLE files_2024_02 PARTITION OF files FOR VALUES FROM ('2024-02-01') "
        "TO ('2024-03-01')",
    )
    refused = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert refused.exit_code == 2, refused.output
    assert "a partition was added or removed" in " ".join(refused.output.split())
    assert val(db, "SELECT count(*) FROM files WHERE state = 'done'") == done_before
    # and one detached: refused too
    sql(db, "DROP TABLE files_2024_02")
    sql(db, "ALTER TABLE files_2024_q2 DETACH PARTITION files_2024_q2_rest")
    refused = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert refused.exit_code == 2, refused.output
    assert val(db, "SELECT count(*) FROM files WHERE state = 'done'") == done_before
    sql(db, "ALTER TABLE files_2024_q2 ATTACH PARTITION files_2024_q2_rest DEFAULT")
    rest = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert rest.exit_code == 3, rest.output
    assert [(w["discovered"], w["keys"]) for w in windows_of(db, run_id)] == [
        (100, 100),
        (100, 100),
        (100, 100),
        (100, 100),
    ]
    assert val(db, "SELECT count(*) FROM files WHERE state = 'new'") == 0
    back = cli("rollback", run_id, "-e", "staging", env=env)
    assert back.exit_code == 0, back.output
    assert val(db, "SELECT count(*) FROM files WHERE state <> 'new'") == 0


def test_integer_windows_with_an_unaligned_until_cover_exactly_since_to_until(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        windows={
            "column": "id",
            "since": "5",
            "until": "907",
            "step": "300",
            "order": "newest_first",
        },
    )
    env = env_for(db)
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    windows = windows_of(db, run_id)
    assert [w["label"] for w in windows] == ["[905, 907)", "[605, 905)", "[305, 605)", "[5, 305)"]
    assert [(w["discovered"], w["keys"]) for w in windows] == [
        (2, 2),
        (300, 300),
        (300, 300),
        (300, 300),
    ]
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 902
    assert val(db, "SELECT min(id), max(id) FROM events WHERE n = 1") == 5
    assert val(db, "SELECT max(id) FROM events WHERE n = 1") == 906


def test_timestamptz_month_windows_are_utc_whatever_the_database_time_zone(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(
        db,
        "CREATE TABLE ev (id bigint PRIMARY KEY, at timestamptz(3) NOT NULL, n int NOT NULL "
        "DEFAULT 0); INSERT INTO ev (id, at) SELECT g, TIMESTAMPTZ '2024-01-31 23:30:00+00' "
        "+ g * interval '1 hour' FROM generate_series(0, 1500) g; "
        "CREATE TABLE window_log (what text, lower text, upper text)",
    )
    sql(
        db,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET TimeZone = %L', "
        "current_database(), 'America/New_York'); END $$",
    )
    plan = write_plan(
        workdir / "p.json",
        target__table="ev",
        target__columns=["n"],
        discovery__sql="SELECT id FROM ev WHERE n = 0",
        apply__sql="UPDATE ev SET n = n + 1 WHERE id = ANY($1)",
        windows={
            "column": "at",
            "since": "2024-02-01",
            "until": "2024-03-31 12:00",
            "step": "1 month",
            "before_each": "INSERT INTO window_log VALUES ('b', $1, $2)",
        },
        soak__checks=[{"name": "x", "sql": "SELECT 0", "pass_if": "== 0"}],
    )
    env = env_for(db)
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    windows = windows_of(db, run_id)
    assert [w["label"] for w in windows] == [
        "[2024-02-01, 2024-03-01)",
        "[2024-03-01 00:00:00+00, 2024-03-31 12:00:00+00)",
    ]
    # hours from 2024-02-01 00:30 UTC to 2024-03-31 11:30 UTC
    assert [w["discovered"] for w in windows] == [29 * 24, 30 * 24 + 12]
    assert all(w["keys"] == w["discovered"] for w in windows)
    assert val(db, "SELECT count(*) FROM ev WHERE n = 1") == 59 * 24 + 12
    assert (
        val(
            db,
            "SELECT count(*) FROM ev WHERE n = 1 AND (at < '2024-02-01 00:00+00' "
            "OR at >= '2024-03-31 12:00+00')",
        )
        == 0
    )


def test_a_window_with_no_rows_is_done_once_and_the_manifest_attributes_the_next_ones(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    sql(db, "DELETE FROM events WHERE created >= '2024-02-01' AND created < '2024-03-01'")
    plan = windows_plan(
        workdir / "p.json",
        manifest={"sql": "SELECT count(*) AS n FROM events WHERE id = ANY($1)"},
        batching__size=100,
    )
    env = env_for(db)
    dry = cli("apply", str(plan), "-e", "staging", "--dry-run", "--no-sample", env=env)
    assert "2. [2024-02-01, 2024-03-01): 0 row(s), 0 batch(es)" in dry.output, dry.output
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    windows = windows_of(db, run_id)
    assert [(w["status"], w["discovered"], w["keys"]) for w in windows] == [
        ("done", 310, 310),
        ("done", 0, 0),
        ("done", 310, 310),
    ]
    assert val(db, "SELECT count(*) FROM window_log") == 6
    lines = _jsonl(_logs(workdir, run_id, "manifest.jsonl"))
    batches = [x for x in lines if "batch_no" in x]
    assert [b["window"] for b in batches] == [1] * 4 + [3] * 4
    assert all(b["manifest"]["rows"][0]["n"] == b["changed"] for b in batches)
    assert _criteria(cli, run_id, env) == "pass"


def test_report_re_renders_the_same_windowed_summary_and_the_psql_rollback_restores_exactly(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    from tests.helpers import differing, rollback_file, run_psql, snapshot

    make_events(db)
    snapshot(db, "events")
    plan = windows_plan(
        workdir / "p.json", manifest={"sql": "SELECT max(id) AS top FROM events WHERE id = ANY($1)"}
    )
    env = env_for(db)
    result = cli("apply", str(plan), "-e", "staging", env=env)
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    summary = _logs(workdir, run_id, "backfill_summary.md")
    manifest = _logs(workdir, run_id, "manifest.jsonl")
    before, before_manifest = summary.read_text(), manifest.read_text()
    assert "| 2 | [2024-02-01, 2024-03-01) |" in before or "[2024-02-01, 2024-03-01)" in before
    again = cli("report", run_id, env=env)
    assert again.exit_code == 0, again.output
    assert summary.read_text() == before
    assert manifest.read_text() == before_manifest
    ran = run_psql(db, rollback_file(workdir, run_id))
    assert ran.returncode == 0, ran.stderr
    assert differing(db, "events") == 0


def test_the_manifest_keeps_at_most_100_rows_per_batch_and_says_it_cut(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        manifest={"sql": "SELECT id FROM events WHERE id = ANY($1) ORDER BY id"},
        batching__size=150,
    )
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    batches = [x for x in _jsonl(_logs(workdir, run_id, "manifest.jsonl")) if "batch_no" in x]
    big = [b for b in batches if b["changed"] > 100]
    assert big
    assert all(len(b["manifest"]["rows"]) == 100 for b in big)
    assert all(b["manifest"]["truncated"] for b in big)
    small = [b for b in batches if b["changed"] <= 100]
    assert all(not b["manifest"]["truncated"] for b in small)


def test_a_manifest_query_failing_on_one_batch_stops_the_phase_and_keeps_that_batch_out(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        manifest={
            "sql": "SELECT 1 / (count(*) FILTER (WHERE id = 450) - 1) AS x FROM events "
            "WHERE id = ANY($1)"
        },
        batching__size=50,
    )
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert "the plan's manifest.sql failed" in result.output
    assert val(db, "SELECT count(*) FROM events WHERE id = 450 AND n <> 0") == 0
    run_id = run_id_of(result.output)
    # the window it failed in is still running; nothing after it ran
    assert [w["status"] for w in windows_of(db, run_id)] == ["done", "running", "pending"]
    assert val(db, "SELECT count(*) FROM events WHERE n > 1") == 0
