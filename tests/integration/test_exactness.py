"""Exactness under hostile conditions: session settings, triggers, dotted names, kills, restarts.

Each test here failed before the fix it pins (issue #16). Rows are compared bytewise
(`record_image_eq`) against a snapshot taken before the apply, never through text made under
the settings being tested.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.db import PINNED_SETTINGS
from tests.conftest import make_items, pg_ctl, run, sql, val, write_plan
from tests.helpers import (
    HOSTILE_PSQL_ENV,
    differing,
    env_for,
    rollback_file,
    run_id_of,
    run_psql,
    set_on_database,
    snapshot,
    start_runner,
)

# -- helpers ------------------------------------------------------------------------------------


# -- 1. floats on a database that prints them rounded -------------------------------------------

FLOATS = """
CREATE TABLE floats (id int PRIMARY KEY, f float8, r real, done boolean NOT NULL DEFAULT false);
INSERT INTO floats (id, f, r) SELECT g, g * 0.1::float8 + 0.2, (g * 0.1)::real
FROM generate_series(1, 300) AS g;
INSERT INTO floats (id, f, r) VALUES
    (1001, 1.7976931348623157e308, 3.4028235e38), (1002, 0.30000000000000004, 0.1),
    (1003, 5e-324, 1e-45), (1004, 'NaN', '-Infinity'), (1005, -0.0, -0.0);
"""


def _apply_floats(cli: Callable[..., Any], workdir: Path, db: str) -> str:
    sql(db, FLOATS)
    snapshot(db, "floats")
    set_on_database(db, extra_float_digits="0")
    plan = write_plan(
        workdir / "p.json",
        target={"table": "floats", "key": ["id"], "columns": ["f", "r", "done"]},
        discovery__sql="SELECT id FROM floats WHERE NOT done",
        apply__sql="UPDATE floats SET f = 0, r = 0, done = true WHERE id = ANY($1)",
        batching__size=50,
        soak__checks=[],
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert differing(db, "floats") == 305
    return run_id_of(result.output)


def test_floats_are_restored_exactly_by_the_runner_on_a_database_printing_them_rounded(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id = _apply_floats(cli, workdir, db)
    done = cli("rollback", run_id, "--env", "staging", env=env_for(db))
    assert done.exit_code == 0, done.output
    assert "checksum verified" in done.output
    assert differing(db, "floats") == 0


def test_verification_fails_when_a_float_differs_by_one_ulp(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id = _apply_floats(cli, workdir, db)
    assert cli("rollback", run_id, "--env", "staging", env=env_for(db)).exit_code == 0
    # 0.30000000000000004 and the next double both print as 0.3 with extra_float_digits = 0
    sql(db, "UPDATE floats SET f = 0.30000000000000010 WHERE id = 1002")
    again = cli("rollback", run_id, "--env", "staging", env=env_for(db))
    assert again.exit_code == 1, again.output
    assert "NOT verified" in again.output


def test_floats_are_restored_exactly_by_the_file_in_a_session_printing_them_rounded(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id = _apply_floats(cli, workdir, db)
    done = run_psql(db, rollback_file(workdir, run_id), HOSTILE_PSQL_ENV)
    assert done.returncode == 0, done.stderr
    assert differing(db, "floats") == 0
    assert " t\n" in done.stdout  # checksum_matches


# -- 2. the rollback file in an operator's session with other settings --------------------------

MOMENTS = """
CREATE TYPE mood AS ENUM ('calm', 'angry');
CREATE TABLE moments (
    id int PRIMARY KEY, ts timestamptz, t timestamp, d date, iv interval, b bytea, f float8,
    m money, md mood, arr timestamptz[], done boolean NOT NULL DEFAULT false
);
INSERT INTO moments (id, ts, t, d, iv, b, f, m, md, arr)
SELECT g, '2026-03-08 01:59:59.123456+00'::timestamptz + g * interval '37 min 3.25 s',
       '2026-01-02 03:04:05.678901'::timestamp + g * interval '1 day', DATE '2026-01-02' + g,
       make_interval(months => g, days => -g, secs => g * 1.5), decode(md5(g::text), 'hex'),
       g / 3.0::float8, g * 1.01, CASE WHEN g % 2 = 0 THEN 'calm' ELSE 'angry' END::mood,
       ARRAY['2026-01-02 03:04:05+05:30'::timestamptz, NULL]
FROM generate_series(1, 240) AS g;
"""


def test_the_file_restores_exactly_under_hostile_session_settings_and_environment(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(db, MOMENTS)
    snapshot(db, "moments")
    # hostile defaults for every session, the runner's own included
    set_on_database(
        db,
        TimeZone="Asia/Kathmandu",
        DateStyle="German, DMY",
        IntervalStyle="iso_8601",
        extra_float_digits="-3",
        bytea_output="escape",
    )
    columns = ["ts", "t", "d", "iv", "b", "f", "m", "md", "arr", "done"]
    plan = write_plan(
        workdir / "p.json",
        target={"table": "moments", "key": ["id"], "columns": columns},
        discovery__sql="SELECT id FROM moments WHERE NOT done",
        apply__sql="UPDATE moments SET ts = now(), t = NULL, d = NULL, iv = '1 s', b = '\\x00', "
        "f = 1, m = 0, md = 'calm', arr = NULL, done = true WHERE id = ANY($1)",
        batching__size=40,
        soak__checks=[],
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert differing(db, "moments") == 240
    done = run_psql(db, rollback_file(workdir, run_id_of(result.output)), HOSTILE_PSQL_ENV)
    assert done.returncode == 0, done.stderr
    assert differing(db, "moments") == 0
    assert " t\n" in done.stdout  # checksum_matches
    assert (
        "restores:     240 row(s)" in rollback_file(workdir, run_id_of(result.output)).read_text()
    )


# -- 3. writes the apply statement does not return ----------------------------------------------

TRIGGERS = {
    "audit-trigger": (
        """CREATE TABLE audit (id bigserial PRIMARY KEY, item_id bigint);
        CREATE FUNCTION audit_items() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO audit (item_id) VALUES (NEW.id); RETURN NULL; END $$;
        CREATE TRIGGER items_audit AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION audit_items()""",
        "UPDATE items SET val = 'new' WHERE id = ANY($1) AND val IS DISTINCT FROM 'new'",
        "public.audit: ",
        "inserted",
    ),
    "same-table-trigger": (
        """CREATE FUNCTION touch_other() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF pg_trigger_depth() = 1 THEN
                UPDATE items SET val = 'touched' WHERE id = NEW.id + 150;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER items_touch AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION touch_other()""",
        "UPDATE items SET val = 'new' WHERE id = ANY($1) AND val IS DISTINCT FROM 'new'",
        "public.items: ",
        "updated beyond the",
    ),
    # a write the plan's text does not show (validation refuses a visible one up front)
    "function-writing-another-table": (
        """CREATE TABLE other (id bigint PRIMARY KEY, v text);
        INSERT INTO other SELECT g, 'x' FROM generate_series(1, 300) g;
        CREATE FUNCTION touch_other(k bigint) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN UPDATE other SET v = 'y' WHERE id = k; RETURN true; END $$""",
        "UPDATE items SET val = 'new' WHERE id = ANY($1) AND val IS DISTINCT FROM 'new' "
        "AND touch_other(id)",
        "public.other: ",
        "updated",
    ),
}


@pytest.mark.parametrize("suffix", ["", " RETURNING id"], ids=["one-statement", "capture"])
@pytest.mark.parametrize("case", sorted(TRIGGERS))
def test_writes_by_triggers_and_ctes_are_scope_violations_naming_table_and_counts(
    cli: Callable[..., Any], workdir: Path, db: str, case: str, suffix: str
) -> None:
    setup, apply_sql, table, what = TRIGGERS[case]
    make_items(db, 300)
    sql(db, setup)
    snapshot(db, "items")
    plan = write_plan(
        workdir / "p.json",
        target__columns=["val"],
        apply__sql=apply_sql + suffix,
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    out = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "scope_violation" in out
    assert table in out, out
    assert what in out, out
    assert "rolled back" in out
    assert differing(db, "items") == 0
    if case == "audit-trigger":
        assert val(db, "SELECT count(*) FROM audit") == 0
    if case == "function-writing-another-table":
        assert val(db, "SELECT count(*) FROM other WHERE v <> 'x'") == 0
    assert val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'") == 0
    assert val(db, "SELECT count(*) FROM backfill.row_images") == 0


def test_a_delete_or_another_tables_update_in_the_plan_is_refused_before_anything_runs(
    cli: Callable[..., Any], workdir: Path, bare_db: str
) -> None:
    db = bare_db  # nothing may be created, not even the ledger schema
    make_items(db, 300)
    sql(db, "CREATE TABLE other (id bigint PRIMARY KEY, v text)")
    for apply_sql, said in (
        ("DELETE FROM items WHERE id = ANY($1)", "DELETE"),
        (
            "WITH o AS (UPDATE other SET v = 'y' WHERE id = ANY($1)) "
            "UPDATE items SET val = 'new' WHERE id = ANY($1)",
            "other",
        ),
    ):
        plan = write_plan(workdir / "p.json", apply__sql=apply_sql)
        result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
        assert result.exit_code == 2, result.output
        assert said in result.output
    assert val(db, "SELECT to_regnamespace('backfill')") is None  # nothing was written


@pytest.mark.parametrize("suffix", ["", " RETURNING id"], ids=["one-statement", "capture"])
def test_a_delete_hidden_in_a_function_is_a_violation_naming_the_operation(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    make_items(db, 300)
    sql(
        db,
        """CREATE FUNCTION drop_row(k bigint) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN DELETE FROM items WHERE id = k + 1000; RETURN true; END $$;
        INSERT INTO items (id, grp, val) SELECT g + 1000, 0, 'x' FROM generate_series(1, 300) g""",
    )
    plan = write_plan(
        workdir / "p.json",
        discovery__sql="SELECT id FROM items WHERE id <= 300 AND val IS DISTINCT FROM 'new'",
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND drop_row(id)" + suffix,
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    out = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "public.items: " in out
    assert "deleted" in out
    assert ", , " not in out, out
    assert val(db, "SELECT count(*) FROM items") == 600


# -- 4. a schema whose name has a dot ------------------------------------------------------------

DOTTED = """
CREATE SCHEMA "my.schema"; CREATE SCHEMA my;
CREATE TABLE "my.schema"."order" (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE my."schema.order" (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO "my.schema"."order" SELECT g, 'old' FROM generate_series(1, 200) AS g;
INSERT INTO my."schema.order" SELECT g, 'twin' FROM generate_series(1, 200) AS g;
"""


def _apply_dotted(cli: Callable[..., Any], workdir: Path, db: str) -> str:
    sql(db, DOTTED)
    plan = write_plan(
        workdir / "p.json",
        target={"table": '"my.schema"."order"', "key": ["id"], "columns": ["v"]},
        discovery__sql="""SELECT id FROM "my.schema"."order" WHERE v = 'old'""",
        apply__sql="""UPDATE "my.schema"."order" SET v = 'new' WHERE id = ANY($1)""",
        batching__size=50,
        soak__checks=[],
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert val(db, """SELECT count(*) FROM "my.schema"."order" WHERE v = 'new'""") == 200
    return run_id_of(result.output)


def _dotted_state(db: str) -> tuple[int, int]:
    return (
        val(db, """SELECT count(*) FROM "my.schema"."order" WHERE v = 'old'"""),
        val(db, """SELECT count(*) FROM my."schema.order" WHERE v = 'twin'"""),
    )


@pytest.mark.parametrize("how", ["psql", "runner"])
def test_a_dotted_schema_name_restores_the_table_that_was_applied_and_no_other(
    cli: Callable[..., Any], workdir: Path, db: str, how: str
) -> None:
    run_id = _apply_dotted(cli, workdir, db)
    if how == "psql":
        done = run_psql(db, rollback_file(workdir, run_id))
        assert done.returncode == 0, done.stderr
        assert " t\n" in done.stdout
    else:
        result = cli("rollback", run_id, "--env", "staging", env=env_for(db))
        assert result.exit_code == 0, result.output
    assert _dotted_state(db) == (200, 200)


def test_a_table_dropped_and_created_again_is_not_restored_by_either_path(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id = _apply_dotted(cli, workdir, db)
    sql(
        db,
        """DROP TABLE "my.schema"."order";
        CREATE TABLE "my.schema"."order" (id int PRIMARY KEY, v text NOT NULL);
        INSERT INTO "my.schema"."order" SELECT g, 'new' FROM generate_series(1, 200) AS g""",
    )
    result = cli("rollback", run_id, "--env", "staging", env=env_for(db))
    assert result.exit_code == 2, result.output
    assert "is not the table this run changed" in " ".join(result.output.split())
    done = run_psql(db, rollback_file(workdir, run_id))
    assert done.returncode != 0
    assert "is not the table run" in done.stderr
    assert val(db, """SELECT count(*) FROM "my.schema"."order" WHERE v = 'new'""") == 200


def test_health_sampling_reads_tables_whose_names_need_quoting(db: str) -> None:
    from runner.db import qualified
    from runner.engine import dbhealth

    sql(
        db,
        DOTTED
        + """; CREATE TABLE public."Order Items" (id int PRIMARY KEY);
        INSERT INTO public."Order Items" SELECT generate_series(1, 10); ANALYZE""",
    )

    async def go() -> list[dict[str, float | None]]:

        conn = await asyncpg.connect(db, server_settings=PINNED_SETTINGS)
        try:
            return [
                await dbhealth.sample(conn, qualified(schema, name))
                for schema, name in (("my.schema", "order"), ("public", "Order Items"))
            ]
        finally:
            await conn.close()

    dotted, spaced = run(go)
    assert dotted["db.dead_tuples"] is not None
    assert spaced["db.dead_tuples"] is not None


# -- 5. killed after the stage was recorded finished --------------------------------------------


def test_a_finished_apply_whose_files_were_not_written_writes_them_when_resumed(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 300)
    plan = write_plan(workdir / "p.json")
    first = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert first.exit_code == 3, first.output
    run_id = run_id_of(first.output)
    staging = next((workdir / "backfill_logs").rglob(f"{run_id}/staging"))
    files = ["backfill_summary.md", "execution_results.json", rollback_file(workdir, run_id).name]
    wanted = {name: (staging / name).read_text() for name in files}
    # what a kill between recording the stage finished and writing its files leaves behind
    for name in files:
        (staging / name).unlink()
    sql(db, "UPDATE backfill.phases SET report_digest = NULL WHERE run_id = $1", run_id)
    again = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env_for(db))
    assert again.exit_code == 3, again.output
    for name in files:
        assert (staging / name).is_file(), name
    assert (staging / "backfill_summary.md").read_text() == wanted["backfill_summary.md"]
    results = json.loads((staging / "execution_results.json").read_text())
    assert results["run_totals"]["changed"] == 240
    approved = cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env_for(db))
    assert approved.exit_code == 0, approved.output


# -- 6. a failing batch beside another worker ---------------------------------------------------


def test_a_failing_batch_with_two_workers_reports_its_own_error(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 2000)
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = CASE WHEN id = 1201 THEN (1 / 0)::text ELSE 'new' END "
        "WHERE id = ANY($1) AND val IS DISTINCT FROM 'new'",
        batching__size=20,
        batching__workers=2,
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    out = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "division by zero" in out
    assert "another operation is in progress" not in out


# -- 7. every connection dropped, as a restart or a failover does -------------------------------


@pytest.mark.slow
def test_the_apply_survives_every_connection_being_dropped_twice(workdir: Path, db: str) -> None:
    make_items(db, 1500)
    plan = write_plan(
        workdir / "p.json",
        # ~120 ms a batch, 60 batches on 2 workers: both drops land while batches run
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND pg_sleep(0.006) IS NOT NULL",
        batching__size=20,
        batching__workers=2,
    )
    dropped: list[int] = []

    def drop_everything() -> None:
        # the drops are timed from the first committed batches, not from the start: on a loaded
        # machine start-up alone can take 1.5 s, and a drop before the batch loop (setting up the
        # run) is a different case (it stops the command, which says to continue with --run)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not val(
            db, "SELECT count(*) >= 2 FROM backfill.batches WHERE status = 'done'"
        ):
            time.sleep(0.02)
        for delay in (0.3, 1.0):
            time.sleep(delay)
            dropped.append(
                int(
                    val(
                        db,
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'backfill' AND datname = current_database()",
                    )
                )
            )

    proc = start_runner(["apply", str(plan), "--env", "staging", "--quiet"], workdir, db)
    killer = threading.Thread(target=drop_everything)
    killer.start()
    out, _ = proc.communicate(timeout=180)
    killer.join()
    assert proc.returncode == 3, out
    assert sum(dropped) >= 3, f"too few connections were dropped to prove anything: {dropped}"
    assert val(db, "SELECT count(*) FROM items WHERE val <> 'new'") == 0
    run_id = run_id_of(out)
    assert val(db, "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1", run_id) == 1200
    # a dropped session is reconnected and asked again, not read as guards that cannot be read
    assert val(db, "SELECT count(*) FROM backfill.guard_holds WHERE run_id = $1", run_id) == 0
    assert (
        val(
            db,
            "SELECT count(DISTINCT key) FROM backfill.row_images WHERE run_id = $1 AND op = 'U'",
            run_id,
        )
        == 1200
    )


# -- found by the hostile pass ------------------------------------------------------------------


def test_the_file_uses_its_own_temp_table_even_if_another_user_planted_one(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    snapshot(db, "items")
    plan = write_plan(workdir / "p.json")
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    # a table of the same name where the file's search_path looks first, with a trigger that
    # would rewrite every image loaded into it
    sql(
        db,
        """CREATE TABLE public.backfill_rollback_images
               (batch_no int, key text[], before text[], after text[]);
        CREATE FUNCTION pwn() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN NEW.before := array['PWNED', '2020-01-01']; RETURN NEW; END $$;
        CREATE TRIGGER pwn BEFORE INSERT ON public.backfill_rollback_images
            FOR EACH ROW EXECUTE FUNCTION pwn()""",
    )
    done = run_psql(db, rollback_file(workdir, run_id_of(result.output)))
    assert done.returncode == 0, done.stderr
    assert differing(db, "items") == 0
    assert val(db, "SELECT count(*) FROM public.backfill_rollback_images") == 0


def test_array_nulls_off_in_the_session_does_not_turn_nulls_into_text(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    make_items(db, 100)
    sql(db, "UPDATE items SET val = NULL WHERE id % 2 = 0")
    snapshot(db, "items")
    set_on_database(db, array_nulls="off")
    plan = write_plan(workdir / "p.json")
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    done = run_psql(
        db, rollback_file(workdir, run_id_of(result.output)), {"PGOPTIONS": "-c array_nulls=off"}
    )
    assert done.returncode == 0, done.stderr
    assert differing(db, "items") == 0
    assert val(db, "SELECT count(*) FROM items WHERE val = 'NULL'") == 0


@pytest.mark.parametrize(
    ("ddl", "key", "columns", "said"),
    [
        (
            "CREATE TABLE t (code text UNIQUE, v text); INSERT INTO t VALUES ('a', 'x'), (NULL, 'x')",
            ["code"],
            ["v"],
            "allow NULL",
        ),
        (
            "CREATE TABLE t (id int PRIMARY KEY, r regclass); INSERT INTO t VALUES (1, 'pg_class')",
            ["id"],
            ["r"],
            "reg* values",
        ),
    ],
    ids=["nullable-key", "regclass-column"],
)
def test_keys_and_columns_that_cannot_be_restored_exactly_are_refused(
    cli: Callable[..., Any],
    workdir: Path,
    db: str,
    ddl: str,
    key: list[str],
    columns: list[str],
    said: str,
) -> None:
    sql(db, ddl)
    plan = write_plan(
        workdir / "p.json",
        target={"table": "t", "key": key, "columns": columns},
        discovery__sql=f"SELECT {key[0]} FROM t",
        apply__sql=f"UPDATE t SET {columns[0]} = {columns[0]} WHERE {key[0]} = ANY($1)",
        soak__checks=[],
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split())


@pytest.mark.parametrize("suffix", ["", " RETURNING id"], ids=["one-statement", "capture"])
def test_a_partitioned_target_is_applied_and_restored(
    cli: Callable[..., Any], workdir: Path, db: str, suffix: str
) -> None:
    sql(
        db,
        """CREATE TABLE p (id int, region text, v text, PRIMARY KEY (id, region))
               PARTITION BY LIST (region);
        CREATE TABLE p_us PARTITION OF p FOR VALUES IN ('us');
        CREATE TABLE p_eu PARTITION OF p FOR VALUES IN ('eu');
        INSERT INTO p SELECT g, CASE WHEN g % 2 = 0 THEN 'us' ELSE 'eu' END, 'old'
        FROM generate_series(1, 300) g""",
    )
    snapshot(db, "p")
    plan = write_plan(
        workdir / "p.json",
        target={"table": "p", "key": ["id", "region"], "columns": ["v"]},
        discovery__sql="SELECT id, region FROM p WHERE v = 'old'",
        apply__sql="UPDATE p SET v = 'new' WHERE (id, region) IN "
        "(SELECT * FROM unnest($1::int[], $2::text[]))" + suffix,
        soak__checks=[],
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM p WHERE v = 'new'") == 300
    done = cli("rollback", run_id_of(result.output), "--env", "staging", env=env_for(db))
    assert done.exit_code == 0, done.output
    assert differing(db, "p", "id, region") == 0


def test_a_libpq_keyword_dsn_connects(cli: Callable[..., Any], workdir: Path, db: str) -> None:
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(db)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    host = query.get("host") or parts.hostname or "localhost"
    port = query.get("port") or str(parts.port or 5432)
    keyword = f"host={host} port={port} user={parts.username} dbname={parts.path.lstrip('/')}"
    make_items(db, 50)
    plan = write_plan(workdir / "p.json")
    checked = cli("validate", str(plan), "--env", "staging", env=env_for(keyword))
    assert checked.exit_code == 0, checked.output


def _stop_and_start(db: str) -> tuple[list[str], list[str]] | None:
    """`pg_ctl stop` and `start` (with the options it ran with) for the embedded test server (its
    data directory is its socket directory), as the user it runs as; None for a server the
    tests did not start."""
    from urllib.parse import parse_qs, urlsplit

    if os.environ.get("BACKFILL_TEST_DSN"):
        return None
    pgdata = Path(parse_qs(urlsplit(db).query).get("host", [""])[0])
    opts = pgdata / "postmaster.opts"
    if not opts.exists():
        return None
    _, *tokens = shlex.split(opts.read_text())
    i = tokens.index("-D")
    options = " ".join(shlex.quote(t) for t in tokens[:i] + tokens[i + 2 :])
    log = pgdata / "restart.log"  # the started server must not hold the test's pipes open
    stop = [*pg_ctl(pgdata), "-D", str(pgdata), "-m", "fast", "-w", "stop"]
    start = [*pg_ctl(pgdata), "-D", str(pgdata), "-l", str(log), "-o", options, "-w", "start"]
    return stop, start


def _wait_for(db: str, condition: str, seconds: float = 60) -> None:
    """Until `condition` (a query returning a boolean) holds, the tables it reads existing."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncpg.UndefinedTableError):
            if val(db, condition):
                return
        time.sleep(0.1)
    raise AssertionError(f"never true: {condition}")


def _down_for_a_while(commands: tuple[list[str], list[str]], seconds: float = 1.5) -> None:
    stop, start = commands
    for command in (stop, start):
        done = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False
        )
        assert done.returncode == 0, command
        if command is stop:
            time.sleep(seconds)


@pytest.mark.slow
def test_the_apply_survives_a_postgresql_restart(workdir: Path, db: str) -> None:
    commands = _stop_and_start(db)
    if commands is None:
        pytest.skip("needs the embedded test server, which the test stops and starts")
    make_items(db, 1500)
    plan = write_plan(
        workdir / "p.json",
        apply__sql="UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE id = ANY($1) "
        "AND val IS DISTINCT FROM 'new' AND pg_sleep(0.003) IS NOT NULL",
        batching__size=20,
        batching__workers=2,
    )
    proc = start_runner(["apply", str(plan), "--env", "staging", "--quiet"], workdir, db)
    _wait_for(db, "SELECT count(*) >= 5 FROM backfill.batches WHERE status = 'done'")
    _down_for_a_while(commands)  # mid-run: batches committed, more to come
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 3, out
    run_id = run_id_of(out)
    assert val(db, "SELECT count(*) FROM items WHERE val <> 'new'") == 0
    assert val(db, "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1", run_id) == 1200
    assert (
        val(
            db,
            "SELECT count(DISTINCT key) FROM backfill.row_images WHERE run_id = $1 AND op = 'U'",
            run_id,
        )
        == 1200
    )


@pytest.mark.slow
def test_the_rollback_survives_a_postgresql_restart(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    commands = _stop_and_start(db)
    if commands is None:
        pytest.skip("needs the embedded test server, which the test stops and starts")
    make_items(db, 1000)
    snapshot(db, "items")
    plan = write_plan(workdir / "p.json", batching__size=20, batching__batches_per_minute=600)
    applied = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert applied.exit_code == 3, applied.output
    proc = start_runner(["rollback", run_id_of(applied.output), "--env", "staging"], workdir, db)
    _wait_for(db, "SELECT count(*) >= 3 FROM backfill.rollback_batches")
    _down_for_a_while(commands)  # mid-rollback
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "checksum verified" in out
    assert differing(db, "items") == 0


def test_a_single_partition_can_be_the_target(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(
        db,
        """CREATE TABLE p (id int, region text, v text, PRIMARY KEY (id, region))
               PARTITION BY LIST (region);
        CREATE TABLE p_us PARTITION OF p FOR VALUES IN ('us');
        CREATE TABLE p_eu PARTITION OF p FOR VALUES IN ('eu');
        INSERT INTO p SELECT g, CASE WHEN g % 2 = 0 THEN 'us' ELSE 'eu' END, 'old'
        FROM generate_series(1, 300) g""",
    )
    plan = write_plan(
        workdir / "p.json",
        target={"table": "p_us", "key": ["id", "region"], "columns": ["v"]},
        discovery__sql="SELECT id, region FROM p_us WHERE v = 'old'",
        apply__sql="UPDATE p_us SET v = 'new' WHERE (id, region) IN "
        "(SELECT * FROM unnest($1::int[], $2::text[]))",
        soak__checks=[],
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM p WHERE v = 'new'") == 150
