"""Late review (processes, windows after the review, totals, manifest, impact): where the code
is silently wrong (xfail, strict: each fails on the code as reviewed) and what was checked and
found right (plain tests)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner import ledger
from runner.errors import WorkFailed
from runner.phases.common import run_lock
from tests.conftest import make_items, run, sql, val, write_plan
from tests.helpers import env_for, run_id_of
from tests.integration.test_windows import make_events, windows_of, windows_plan

BAD_ROW = "ALTER TABLE events ADD CONSTRAINT not_700 CHECK (id <> 700 OR n = 0)"
SECRET = "tok-9f8e7d6c5b4a3210-zz"


def _logs(workdir: Path, run_id: str, name: str, env: str = "staging") -> Path:
    return next((workdir / "backfill_logs").rglob(f"{run_id}/{env}/{name}"))


def _rollout_to_rest(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> tuple[str, str, dict[str, str]]:
    """A plain plan through staging, the prod canary and the prod rest; (run, prod dsn, env)."""
    staging, prod = make_db(), make_db()
    make_items(staging, 1500)
    make_items(prod, 1500)
    env = {"STAGING_DSN": staging, "PROD_DSN": prod}
    plan = write_plan(workdir / "p.json", soak__duration="1s", soak__interval="1s")
    first = cli("pipeline", str(plan), "-q", env=env)
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    for gate in ("apply-staging", "soak-staging", "health-prod", "canary-prod"):
        assert cli("approve", run_id, "--gate", gate, "--as", "alice", env=env).exit_code == 0
        step = cli("pipeline", str(plan), "--run", run_id, "-q", env=env)
        assert step.exit_code in (0, 3), (gate, step.output)
    assert val(prod, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    return run_id, prod, env


# -- findings ---------------------------------------------------------------------------------


def test_the_prod_rest_process_is_recorded_as_rest_with_its_batches(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    run_id, prod, env = _rollout_to_rest(cli, workdir, make_db)
    rest_batches = val(
        prod,
        "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND stage = 'rest'"
        " AND status = 'done'",
        run_id,
    )
    assert rest_batches > 0
    shown = json.loads(cli("status", run_id, "--json", env=env).output)["processes"]
    in_prod = [(p["phase"], p["batches"]) for p in shown if p["env"] == "prod"]
    assert ("rest", rest_batches) in in_prod, in_prod


def test_a_process_records_the_operator_who_ran_it(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 500)
    plan = write_plan(workdir / "p.json")
    first = cli(
        "apply",
        str(plan),
        "-e",
        "staging",
        "--max-rows",
        "200",
        env={**env_for(db), "BACKFILL_ACTOR": "alice"},
    )
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    again = cli(
        "apply",
        str(plan),
        "-e",
        "staging",
        "--run",
        run_id,
        env={**env_for(db), "BACKFILL_ACTOR": "bob"},
    )
    assert again.exit_code == 3, again.output
    operators = [
        r["operator"]
        for r in sql(
            db,
            "SELECT operator FROM backfill.processes WHERE run_id = $1 ORDER BY started_at",
            run_id,
        )
    ]
    assert operators == ["alice", "bob"]


def test_the_refusal_does_not_name_a_killed_process_as_the_holder(db: str) -> None:
    make_items(db, 10)

    async def go() -> str:
        holder = await asyncpg.connect(db)
        other = await asyncpg.connect(db)
        try:
            await holder.execute(
                "INSERT INTO backfill.runs (run_id, env, plan_name, plan_digest, plan,"
                " target_table, key_columns, columns, key_types, column_types, operator)"
                " VALUES ('r1', 'staging', 'p', 'd', '{}', 'items', '{id}', '{val}', '{int}',"
                " '{text}', 'alice')"
            )
            # an apply killed an hour ago: no end recorded, its heartbeat long silent
            await ledger.register_process(
                holder, "r1", "box-7:4242:ab", "staging", "apply", "box-7", 4242, "alice"
            )
            await holder.execute(
                "UPDATE backfill.processes SET started_at = started_at - interval '1 hour',"
                " heartbeat = heartbeat - interval '1 hour'"
            )
            # now a rollback holds the run (commands/rollback.py: run_lock, no process row)
            assert await ledger.try_run_lock(holder, "r1")
            try:
                async with run_lock(other, "r1", wait_seconds=0.3):
                    raise AssertionError("the lock is held: this must not run")
            except WorkFailed as e:
                return e.message
            raise AssertionError("no error")
        finally:
            await holder.close()
            await other.close()

    message = run(go)
    assert "box-7 pid 4242" not in message, message


def test_a_secret_as_a_manifest_key_never_reaches_the_manifest(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    manifest = (
        "SELECT json_build_object('${TENANT_TOKEN}', count(*)) AS by_tenant "
        "FROM events WHERE id = ANY($1)"
    )
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
    stored = val(db, "SELECT string_agg(manifest::text, '') FROM backfill.batches")
    text = _logs(workdir, run_id, "manifest.jsonl").read_text()
    assert SECRET not in stored
    assert SECRET not in text


# -- checked and found right ------------------------------------------------------------------


def test_the_rest_stage_totals_are_its_own_batches_across_the_canary(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[[], str]
) -> None:
    run_id, prod, _ = _rollout_to_rest(cli, workdir, make_db)
    for stage in ("canary", "rest"):
        doc = json.loads(
            _logs(workdir, run_id, f"{stage}_execution_results.json", "prod").read_text()
        )
        want = sql(
            prod,
            "SELECT count(*) AS b, coalesce(sum(changed), 0) AS c FROM backfill.batches"
            " WHERE run_id = $1 AND stage = $2 AND status = 'done'",
            run_id,
            stage,
        )[0]
        assert (doc["totals"]["batches"], doc["totals"]["changed"]) == (want["b"], want["c"])
    assert val(prod, "SELECT count(*) FROM items WHERE val = 'new'") == 1500


def test_a_quarantined_key_is_not_walked_again_by_the_window_recount(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    sql(db, BAD_ROW)
    plan = windows_plan(workdir / "p.json", batching__size=25)
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    # the key is tried once: one quarantine row, one 'quarantined' batch, nothing applied twice
    assert val(db, "SELECT count(*) FROM backfill.quarantine WHERE run_id = $1", run_id) == 1
    assert (
        val(
            db,
            "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND status = 'quarantined'",
            run_id,
        )
        == 1
    )
    assert val(db, "SELECT count(*) FROM events WHERE n > 1") == 0
    assert [(w["keys"], w["quarantined"]) for w in windows_of(db, run_id)] == [
        (310, 0),
        (290, 0),
        (309, 1),
    ]


# checked: a windowed run's quarantined key is not reported as a late arrival
def test_a_quarantined_key_is_not_reported_as_a_late_arrival(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    sql(db, BAD_ROW)
    plan = windows_plan(workdir / "p.json", batching__size=25)
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    doc = json.loads(_logs(workdir, run_id, "execution_results.json").read_text())
    late = [w for w in doc["warnings"] if "arrived in, or moved into" in w]
    assert (late, doc["totals"]["remaining"]) == ([], 0), (late, doc["totals"])


def test_an_apply_that_reconnected_records_how_it_ended(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    import threading
    import time

    make_items(db, 1000)
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND (SELECT pg_sleep(0.05)) IS NOT NULL",
        batching__size=20,
    )
    killed: list[int] = []

    def cut() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (
                val(
                    db,
                    "SELECT count(*) FROM backfill.batches WHERE to_regclass('backfill.batches')"
                    " IS NOT NULL",
                )
                >= 3
            ):
                break
            time.sleep(0.05)
        # the phase's own connection: the one holding the run lock
        killed.extend(
            r["pid"]
            for r in sql(
                db,
                "SELECT pg_terminate_backend(pid), pid FROM pg_locks WHERE locktype = 'advisory'"
                " AND granted AND database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())",
            )
        )

    t = threading.Thread(target=cut)
    t.start()
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    t.join()
    assert killed, "no connection was cut"
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM items WHERE val IS DISTINCT FROM 'new'") == 0
    rows = sql(db, "SELECT outcome, finished_at FROM backfill.processes")
    assert [r["outcome"] for r in rows] == ["finished"], rows


def test_a_plain_run_capped_then_retried_then_continued_applies_each_row_once(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    # resume_point treats the retry's batch (made between two commands) as transparent
    make_events(db)
    sql(db, "ALTER TABLE events ADD CONSTRAINT not_30 CHECK (id <> 30 OR n = 0)")
    env = env_for(db)
    plan = windows_plan(workdir / "p.json", windows=None, batching__size=25)
    first = cli("apply", str(plan), "-e", "staging", "--max-rows", "100", env=env)
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    sql(db, "ALTER TABLE events DROP CONSTRAINT not_30")
    retried = cli("quarantine", run_id, "--env", "staging", "--retry", "--plan", str(plan), env=env)
    assert retried.exit_code == 0, retried.output
    again = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env)
    assert again.exit_code == 3, again.output
    assert val(db, "SELECT count(*) FROM events WHERE n > 1") == 0
    assert val(db, "SELECT count(*) FROM events WHERE n = 1") == 960
    doc = json.loads(_logs(workdir, run_id, "execution_results.json").read_text())
    # the stage's totals are its own batches (the retry's are its own stage)
    apply_changed = val(
        db,
        "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1 AND stage = 'apply'"
        " AND status = 'done'",
        run_id,
    )
    assert doc["totals"]["changed"] == apply_changed == 959
    assert not [w for w in doc["warnings"] if "interrupted" in w], doc["warnings"]


def test_a_hook_that_truncates_a_table_the_run_writes_is_refused(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    # a maintenance function the hook calls (a bare TRUNCATE does not prepare: validate
    # refuses it); it empties a table the run writes
    sql(
        db,
        "CREATE FUNCTION reset_events() RETURNS void LANGUAGE sql AS 'TRUNCATE events'",
    )
    plan = windows_plan(workdir / "p.json", windows__after_each="SELECT reset_events()")
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 1, result.output
    assert "wrote public.events" in result.output
    assert val(db, "SELECT count(*) FROM events") == 960


def test_the_manifest_bound_is_in_bytes_for_non_ascii_rows(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(
        workdir / "p.json",
        manifest={
            # '€' is 3 bytes in UTF-8: 3 rows of 20,000 characters, 180 KB
            "sql": "SELECT id, repeat('€', 20000) AS note FROM events "
            "WHERE id = ANY($1) ORDER BY id LIMIT 3"
        },
        batching__size=400,
    )
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    biggest = val(db, "SELECT max(octet_length(manifest::text)) FROM backfill.batches")
    assert biggest <= 64 * 1024 + 1024, biggest


def _shown_bytes(output: str) -> float:
    import re

    m = re.search(r"size: about (-?[\d.,]+) (B|kB|KB|MB|GB|TB)", output)
    assert m, output
    unit = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[m.group(2)]
    return float(m.group(1).replace(",", "")) * unit


def test_the_dry_run_size_of_an_unanalysed_table_is_not_the_table_times_the_rows(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)  # never analysed: reltuples = -1
    table = val(db, "SELECT pg_total_relation_size('events')")
    plan = windows_plan(workdir / "p.json")
    result = cli("apply", str(plan), "-e", "staging", "--dry-run", env=env_for(db))
    assert result.exit_code == 0, result.output
    assert _shown_bytes(result.output) <= table * 1.1, (result.output, table)


def test_a_size_sql_that_returns_no_number_of_bytes_is_refused_with_its_name(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_events(db)
    plan = windows_plan(workdir / "p.json", discovery__size_sql="SELECT 'unknown'::text")
    result = cli("apply", str(plan), "-e", "staging", "--dry-run", env=env_for(db))
    assert "internal error" not in result.output, result.output
    assert "discovery.size_sql" in result.output, result.output


def test_the_heartbeat_survives_a_failed_reconnect(
    cli: Callable[..., Any], workdir: Path, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    from runner.phases import common

    monkeypatch.setattr(common, "HEARTBEAT_SECONDS", 0.3)
    make_items(db, 2000)
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND (SELECT pg_sleep(0.1)) IS NOT NULL",
        batching__size=20,
    )
    name = val(db, "SELECT current_database()")
    admin = db.replace(f"/{name}?", "/postgres?")
    seen: dict[str, Any] = {}

    def outage() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if val(db, "SELECT to_regclass('backfill.processes') IS NOT NULL") and val(
                db, "SELECT count(*) FROM backfill.processes"
            ):
                break
            time.sleep(0.05)
        time.sleep(1.0)  # a few beats on the heartbeat's own connection
        sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            # the heartbeat's connection drops (as in a restart) and cannot come back yet
            seen["cut"] = sql(
                admin,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1"
                " AND query LIKE 'UPDATE backfill.processes SET heartbeat%'",
                name,
            )
            time.sleep(1.5)
        finally:
            sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        time.sleep(0.3)
        before = val(db, "SELECT heartbeat FROM backfill.processes")
        time.sleep(2.0)
        seen["advanced"] = val(db, "SELECT heartbeat FROM backfill.processes") > before
        seen["running"] = val(db, "SELECT outcome IS NULL FROM backfill.processes")

    t = threading.Thread(target=outage)
    t.start()
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    t.join()
    assert seen.get("cut"), seen
    assert seen["running"], (seen, result.output)  # the apply still ran when it was looked at
    assert result.exit_code == 3, result.output
    assert seen["advanced"], seen


def test_processes_of_a_capped_then_continued_apply_each_count_their_batches(
    cli: Callable[..., Any], workdir: Path, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    # a hostname with ':' (an IPv6-ish name): host and pid are recorded as they are, not parsed
    monkeypatch.setattr("socket.gethostname", lambda: "fe80::1:box")
    make_items(db, 500)
    plan = write_plan(workdir / "p.json")
    first = cli("apply", str(plan), "-e", "staging", "--max-rows", "200", env=env_for(db))
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    again = cli("apply", str(plan), "-e", "staging", "--run", run_id, env=env_for(db))
    assert again.exit_code == 3, again.output
    total = val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'")
    assert total > 2
    shown = json.loads(cli("status", run_id, "--json", env=env_for(db)).output)["processes"]
    assert [(p["host"], p["pid"], p["outcome"], p["batches"]) for p in shown] == [
        ("fe80::1:box", os.getpid(), "finished", 2),
        ("fe80::1:box", os.getpid(), "finished", total - 2),
    ]
    assert all(p["finished_at"] and p["started_at"] and p["heartbeat"] for p in shown)


def test_a_hook_gets_partition_labels_with_quotes_and_null_bounds_as_parameters(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(
        db,
        """
        CREATE TABLE files (id bigint, day date NOT NULL, state text NOT NULL DEFAULT 'new',
                            PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
        CREATE TABLE "files_o'jan" PARTITION OF files
            FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
        CREATE TABLE files_default PARTITION OF files DEFAULT;
        INSERT INTO files (id, day) SELECT g, CASE g % 2 WHEN 0 THEN DATE '2024-01-15'
                                              ELSE DATE '2025-06-01' END
        FROM generate_series(1, 100) AS g;
        CREATE TABLE window_log (what text, lower text, upper text);
        """,
    )
    plan = write_plan(
        workdir / "p.json",
        target__table="files",
        target__key=["id", "day"],
        target__columns=["state"],
        discovery__sql="SELECT id, day FROM files WHERE state = 'new'",
        apply__sql="UPDATE files SET state = 'done' WHERE (id, day) IN "
        "(SELECT * FROM unnest($1::bigint[], $2::date[]))",
        windows={
            "by_partition": True,
            # a '$1' in a string and a comment is not a parameter; the real ones are
            "before_each": "INSERT INTO window_log VALUES ($3 || ' $1', $1, $2) -- not $2",
        },
        batching__size=20,
        soak__checks=[{"name": "x", "sql": "SELECT 0", "pass_if": "== 0"}],
    )
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 3, result.output
    rows = [tuple(r) for r in sql(db, "SELECT what, lower, upper FROM window_log ORDER BY 1")]
    # each hook ran once, with the label (a quote in it) intact and the '$1' in the string
    # literal left alone; a partition window has no bounds: $1 and $2 are NULL (README does not
    # say so for partitions; see the report)
    assert rows == [("public.files_default $1", None, None), ("public.files_o'jan $1", None, None)]
    assert val(db, "SELECT count(*) FROM files WHERE state = 'done'") == 100
