"""Insert-, delete- and multi-table backfills (#11): every table a batch writes is declared, every
row it touches is imaged whole in the batch's transaction, and both rollbacks undo it exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import plan_dict, sql, val
from tests.helpers import (
    HOSTILE_PSQL_ENV,
    PINNED_SETTINGS,
    env_for,
    rollback_file,
    run_id_of,
    run_psql,
    set_on_database,
)
from tests.integration.test_rollback import HOSTILE, fill_hostile
from tests.integration.test_rollback import rows as hostile_rows

SCHEMA = """
CREATE TABLE snaps (
    id         bigint PRIMARY KEY,
    user_id    bigint NOT NULL,
    raw        jsonb NOT NULL,
    processed_at timestamptz
);
CREATE TABLE troops (
    user_id  bigint NOT NULL,
    troop_id int NOT NULL,
    amount   int NOT NULL,
    level    int NOT NULL DEFAULT 1,
    note     text NOT NULL DEFAULT 'kept',
    PRIMARY KEY (user_id, troop_id)
);
CREATE TABLE summary (
    user_id  bigint PRIMARY KEY,
    troops   int NOT NULL,
    score    float8 NOT NULL
);
INSERT INTO snaps (id, user_id, raw)
SELECT g, g % 40, jsonb_build_object('troops', jsonb_build_array(
        jsonb_build_object('id', g % 7, 'amount', g),
        jsonb_build_object('id', 100 + g % 3, 'amount', g * 2)),
    'score', g / 3.0)
FROM generate_series(1, {n}) AS g;
-- some rows exist before the backfill: an upsert updates them, the rollback restores them
INSERT INTO troops (user_id, troop_id, amount, level, note)
SELECT u, 100 + u % 3, -1, 7, 'before' FROM generate_series(0, 39, 2) AS u;
INSERT INTO summary VALUES (0, 0, 0.1), (2, 0, 1.7976931348623157e308);
"""

UPSERT_TROOPS = """
INSERT INTO troops (user_id, troop_id, amount)
SELECT s.user_id, (t->>'id')::int, max((t->>'amount')::int)
FROM snaps s CROSS JOIN jsonb_array_elements(s.raw->'troops') AS t
WHERE s.id = ANY($1)
GROUP BY 1, 2
ON CONFLICT (user_id, troop_id) DO UPDATE SET amount = greatest(troops.amount, excluded.amount)
"""
UPSERT_SUMMARY = """
INSERT INTO summary (user_id, troops, score)
SELECT s.user_id, count(*), max((s.raw->>'score')::float8)
FROM snaps s WHERE s.id = ANY($1) GROUP BY 1
ON CONFLICT (user_id) DO UPDATE SET troops = summary.troops + excluded.troops,
    score = greatest(summary.score, excluded.score)
"""
MARK = "UPDATE snaps SET processed_at = '2030-01-01' WHERE id = ANY($1) AND processed_at IS NULL"


def shaped_plan(path: Path, **over: Any) -> Path:
    defaults: dict[str, Any] = {
        "target": {"table": "snaps", "key": ["id"], "columns": ["processed_at"]},
        "discovery": {"sql": "SELECT id FROM snaps WHERE processed_at IS NULL"},
        "apply": {"statements": [UPSERT_TROOPS, UPSERT_SUMMARY, MARK]},
        "writes": [
            {
                "table": "troops",
                "key": ["user_id", "troop_id"],
                "operations": ["upsert"],
                "columns": ["amount"],
            },
            {
                "table": "summary",
                "key": ["user_id"],
                "operations": ["upsert"],
                "columns": ["troops", "score"],
            },
        ],
        "soak__checks": [
            {
                "name": "all_processed",
                "sql": "SELECT count(*) FROM snaps WHERE processed_at IS NULL",
                "pass_if": "== 0",
            }
        ],
    }
    plan = plan_dict(**{**defaults, **over})
    path.write_text(json.dumps(plan, indent=2))
    return path


def keep(db: str, *tables: str) -> None:
    for t in tables:
        sql(db, f"DROP TABLE IF EXISTS snap_{t}; CREATE TABLE snap_{t} AS SELECT * FROM {t}")


def changed_rows(db: str, table: str, key: str) -> int:
    """Rows of `table` not bytewise equal to its snapshot (missing and extra ones included),
    but for a NaN's sign and payload bits (tests/helpers.differing, for any key)."""
    import asyncpg

    from tests.conftest import run

    async def go() -> int:
        conn = await asyncpg.connect(db, server_settings=PINNED_SETTINGS)
        try:
            return int(
                await conn.fetchval(
                    f"SELECT count(*) FROM {table} AS c FULL JOIN snap_{table} AS s USING ({key}) "
                    "WHERE c IS NULL OR s IS NULL OR NOT record_image_eq(c, s) "
                    # a NaN comes back as PostgreSQL's canonical NaN (README, Guarantees): its
                    # sign and payload bits are the only difference tolerated
                    "AND (c::text <> s::text OR c IS DISTINCT FROM s)"
                )
            )
        finally:
            await conn.close()

    return int(run(go))


TABLES = {"snaps": "id", "troops": "user_id, troop_id", "summary": "user_id"}


def _all_back(db: str) -> None:
    for table, key in TABLES.items():
        assert changed_rows(db, table, key) == 0, table


def test_an_upsert_backfill_of_three_tables_is_imaged_and_rolled_back_exactly(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(db, SCHEMA.format(n=500))
    keep(db, *TABLES)
    plan = shaped_plan(workdir / "p.json", batching__size=64)
    env = env_for(db)
    dry = cli("apply", str(plan), "-e", "staging", "--dry-run", env=env)
    assert dry.exit_code == 0, dry.output
    assert "upsert of public.troops" in dry.output
    assert val(db, "SELECT to_regclass('backfill.runs')") is not None  # template's ledger only
    assert val(db, "SELECT count(*) FROM backfill.runs") == 0

    applied = cli("apply", str(plan), "-e", "staging", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert val(db, "SELECT count(*) FROM snaps WHERE processed_at IS NULL") == 0
    assert val(db, "SELECT count(*) FROM troops WHERE note = 'before' AND amount = -1") == 0
    per_op = dict(
        sql(
            db,
            "SELECT rel::text || op::text, count(*) FROM backfill.row_images WHERE run_id = $1 "
            "GROUP BY 1",
            run_id,
        )
    )
    troops_new = val(db, "SELECT count(*) FROM troops") - val(
        db, "SELECT count(*) FROM snap_troops"
    )
    assert per_op["2I"] == troops_new
    assert per_op["1U"] == 500  # every snapshot marked
    assert per_op["3I"] == 38  # users 1…39 but 2; users 0 and 2 existed
    # later batches update rows earlier ones inserted (and the 20 that existed): one net image
    # per row and batch
    assert per_op["2U"] >= 20
    assert per_op["3U"] >= 2

    undone = cli("rollback", run_id, "--env", "staging", env=env)
    assert undone.exit_code == 0, undone.output
    assert "verified" in undone.output
    _all_back(db)


def test_the_psql_file_undoes_an_upsert_backfill_exactly(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(db, SCHEMA.format(n=300))
    keep(db, *TABLES)
    plan = shaped_plan(workdir / "p.json", batching__size=50)
    applied = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert applied.exit_code == 3, applied.output
    done = run_psql(db, rollback_file(workdir, run_id_of(applied.output)))
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-2]  # checksum | expected | checksum_matches
    assert last.split("|")[0].strip() == last.split("|")[1].strip(), done.stdout
    assert last.split("|")[2].strip() == "t", done.stdout
    _all_back(db)


ARCHIVE = """
CREATE TABLE events (id bigint PRIMARY KEY, kind text NOT NULL, at timestamptz NOT NULL,
                     payload bytea, score float8);
CREATE TABLE events_archive (id bigint PRIMARY KEY, kind text NOT NULL, at timestamptz NOT NULL,
                             payload bytea, score float8,
                             archived_at timestamptz NOT NULL DEFAULT '2031-01-01');
INSERT INTO events SELECT g, CASE WHEN g % 3 = 0 THEN 'old' ELSE 'new' END,
    '2020-01-01'::timestamptz + g * interval '1 hour', decode(md5(g::text), 'hex'), g / 7.0
FROM generate_series(1, {n}) AS g;
"""


def archive_plan(path: Path, **over: Any) -> Path:
    plan = plan_dict(
        target={"table": "events", "key": ["id"], "operations": ["delete"]},
        discovery={"sql": "SELECT id FROM events WHERE kind = 'old'"},
        apply={
            "statements": [
                "INSERT INTO events_archive (id, kind, at, payload, score) "
                "SELECT id, kind, at, payload, score FROM events WHERE id = ANY($1)",
                "DELETE FROM events WHERE id = ANY($1)",
            ]
        },
        writes=[{"table": "events_archive", "key": ["id"], "operations": ["insert"]}],
        soak__checks=[
            {
                "name": "none_old",
                "sql": "SELECT count(*) FROM events WHERE kind = 'old'",
                "pass_if": "== 0",
            }
        ],
        **over,
    )
    path.write_text(json.dumps(plan, indent=2))
    return path


@pytest.mark.parametrize("how", ["runner", "psql"])
def test_archive_and_delete_is_undone_exactly(
    cli: Callable[..., Any], workdir: Path, db: str, how: str
) -> None:
    sql(db, ARCHIVE.format(n=400))
    keep(db, "events", "events_archive")
    plan = archive_plan(workdir / "p.json", batching__size=30, batching__workers=2)
    applied = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert val(db, "SELECT count(*) FROM events") == 267
    assert val(db, "SELECT count(*) FROM events_archive") == 133
    if how == "runner":
        undone = cli("rollback", run_id, "--env", "staging", env=env_for(db))
        assert undone.exit_code == 0, undone.output
    else:
        done = run_psql(db, rollback_file(workdir, run_id))
        assert done.returncode == 0, done.stdout + done.stderr
    assert changed_rows(db, "events", "id") == 0
    assert changed_rows(db, "events_archive", "id") == 0


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (  # a table the plan does not declare
            {"writes": []},
            "writes public.troops, which the plan does not declare",
        ),
        (  # an operation the plan does not declare on it
            {
                "writes": [
                    {"table": "troops", "key": ["user_id", "troop_id"], "operations": ["insert"]},
                    {
                        "table": "summary",
                        "key": ["user_id"],
                        "operations": ["upsert"],
                        "columns": ["troops", "score"],
                    },
                ]
            },
            "is an UPSERT of public.troops, but the plan allows only ['insert']",
        ),
    ],
)
def test_undeclared_tables_and_operations_are_refused_before_anything_is_written(
    cli: Callable[..., Any], workdir: Path, db: str, change: dict[str, Any], said: str
) -> None:
    sql(db, SCHEMA.format(n=50))
    keep(db, *TABLES)
    plan = shaped_plan(workdir / "p.json")
    raw = json.loads(plan.read_text())
    raw.update(change)
    plan.write_text(json.dumps(raw))
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split())
    _all_back(db)


def test_an_undeclared_column_or_a_trigger_write_rolls_the_batch_back(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(db, SCHEMA.format(n=50))
    keep(db, *TABLES)
    # the upsert also changes `note`, which troops does not declare
    sneaky = UPSERT_TROOPS.replace(
        "amount = greatest(troops.amount, excluded.amount)",
        "amount = greatest(troops.amount, excluded.amount), note = 'changed'",
    )
    plan = shaped_plan(workdir / "p.json", apply={"statements": [sneaky, UPSERT_SUMMARY, MARK]})
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "public.troops: an update changed a column outside its declared columns" in text
    assert "rolled back" in text
    _all_back(db)
    # a trigger writing a table nobody declared: the write counters see it
    sql(
        db,
        "CREATE TABLE audit (n int); CREATE FUNCTION log_it() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO audit VALUES (1); RETURN NEW; END $$; "
        "CREATE TRIGGER t AFTER INSERT ON summary FOR EACH ROW EXECUTE FUNCTION log_it()",
    )
    plan = shaped_plan(workdir / "p2.json")
    result = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "public.audit" in text
    assert "not declared in the plan" in text
    _all_back(db)


# -- hostile values through insert-, upsert- and delete-style runs, back byte for byte -----------

HOSTILE_COPIES = """
CREATE TABLE hostile_archive (LIKE hostile INCLUDING ALL);
CREATE TABLE hostile_copy (LIKE hostile INCLUDING ALL);
-- half the rows have an older copy already: the upsert updates those and inserts the rest
INSERT INTO hostile_copy SELECT * FROM hostile WHERE id % 2 = 0;
UPDATE hostile_copy SET t = 'older', f = -0.0, by = '\\x00ff';
"""
ALL_COLUMNS = ["t", "n", "f", "b", "ts", "d", "j", "by", "ta", "ia", "u", "iv", "done"]
IN_BATCH = "(id, k) IN (SELECT * FROM unnest($1::int[], $2::text[]))"


@pytest.mark.slow
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=hostile_rows)
@pytest.mark.parametrize("how", ["runner", "psql"])
def test_hostile_values_through_insert_upsert_and_delete_come_back_byte_for_byte(
    cli: Callable[..., Any], workdir: Path, db: str, data: list[tuple[Any, ...]], how: str
) -> None:
    set_on_database(db, TimeZone="Pacific/Chatham", DateStyle="SQL, DMY", extra_float_digits="0")
    sql(
        db,
        "DROP TABLE IF EXISTS hostile, hostile_archive, hostile_copy; "
        "DROP SCHEMA IF EXISTS backfill CASCADE; " + HOSTILE,
    )
    fill_hostile(db, data)
    sql(db, HOSTILE_COPIES)
    keep(db, "hostile", "hostile_archive", "hostile_copy")
    sets = ", ".join(f"{c} = excluded.{c}" for c in ALL_COLUMNS)
    plan = shaped_plan(
        workdir / "p.json",
        target={"table": "hostile", "key": ["id", "k"], "operations": ["delete"]},
        discovery={"sql": "SELECT id, k FROM hostile"},
        apply={
            "statements": [
                f"INSERT INTO hostile_archive SELECT * FROM hostile WHERE {IN_BATCH}",
                f"INSERT INTO hostile_copy SELECT * FROM hostile WHERE {IN_BATCH} "
                f"ON CONFLICT (id, k) DO UPDATE SET {sets}",
                f"DELETE FROM hostile WHERE {IN_BATCH}",
            ]
        },
        writes=[
            {"table": "hostile_archive", "key": ["id", "k"], "operations": ["insert"]},
            {
                "table": "hostile_copy",
                "key": ["id", "k"],
                "operations": ["upsert"],
                "columns": ALL_COLUMNS,
            },
        ],
        batching={"size": 2, "workers": 1, "lock_timeout": "1s", "statement_timeout": "20s"},
        soak__checks=[],
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM hostile") == 0
    run_id = run_id_of(result.output)
    if how == "runner":
        undone = cli("rollback", run_id, "--env", "staging", env=env_for(db))
        assert undone.exit_code == 0, undone.output
    else:
        done = run_psql(db, rollback_file(workdir, run_id), HOSTILE_PSQL_ENV)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-2].split("|")[2].strip() == "t", done.stdout
    for table in ("hostile", "hostile_archive", "hostile_copy"):
        assert changed_rows(db, table, "id, k") == 0, table


# -- killed mid-run, resumed: no row inserted twice, none lost, every image present --------------


@pytest.mark.slow
def test_an_insert_style_run_killed_at_random_moments_resumes_exactly_once(
    workdir: Path, db: str
) -> None:
    import os
    import random
    import subprocess
    import sys
    import time

    from tests.conftest import cli_subprocess

    env = {
        **os.environ,
        **env_for(db),
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
        "BACKFILL_CMD": "backfill",
    }

    sql(
        db,
        "CREATE TABLE src (id bigint PRIMARY KEY, v text NOT NULL); "
        "CREATE TABLE dst (id bigint PRIMARY KEY, v text NOT NULL, n bigserial NOT NULL); "
        "INSERT INTO src SELECT g, md5(g::text) FROM generate_series(1, 2000) AS g",
    )
    keep(db, "dst")
    plan = workdir / "p.json"
    plan.write_text(
        json.dumps(
            plan_dict(
                target={"table": "src", "key": ["id"], "columns": ["v"]},
                discovery={
                    "sql": "SELECT id FROM src s WHERE NOT EXISTS (SELECT 1 FROM dst d WHERE d.id = s.id)"
                },
                apply={
                    "statements": [
                        "INSERT INTO dst (id, v) SELECT id, v FROM src "
                        "WHERE id = ANY($1) AND pg_sleep(0.002) IS NOT NULL"
                    ]
                },
                writes=[{"table": "dst", "key": ["id"], "operations": ["insert"]}],
                batching={"size": 20, "workers": 2, "lock_timeout": "5s"},
                soak__checks=[],
            )
        )
    )
    rng = random.Random(20261201)
    run_id: str | None = None
    kills = 0
    for _ in range(10):
        args = ["apply", str(plan), "--env", "staging", "--quiet"] + (
            ["--run", run_id] if run_id else []
        )
        with (workdir / "runner.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runner", *args],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=log,
            )
        time.sleep((1.2 if run_id is None else 0.5) + rng.random() * 0.6)
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills += 1
        if run_id is None:
            runs = list((workdir / "backfill_logs" / "items_new").glob("*"))
            run_id = runs[0].name if runs else None
    assert run_id is not None
    assert kills >= 3
    final = cli_subprocess(
        ["apply", str(plan), "--env", "staging", "--run", run_id], workdir, env_for(db)
    )
    assert final.returncode == 3, final.stdout + final.stderr
    assert val(db, "SELECT count(*) FROM dst") == 2000
    assert val(db, "SELECT count(*) FROM src s JOIN dst d USING (id) WHERE s.v <> d.v") == 0
    # every inserted row has exactly one image, in a committed batch
    assert (
        val(
            db,
            "SELECT count(*) FROM backfill.row_images r JOIN backfill.batches b "
            "USING (run_id, batch_no) WHERE r.run_id = $1 AND r.op = 'I' AND b.status = 'done'",
            run_id,
        )
        == 2000
    )
    assert (
        val(
            db,
            "SELECT count(*) FROM (SELECT key FROM backfill.row_images WHERE run_id = $1 "
            "AND op = 'I' GROUP BY key HAVING count(*) > 1) AS twice",
            run_id,
        )
        == 0
    )
    undone = cli_subprocess(["rollback", run_id, "--env", "staging"], workdir, env_for(db))
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert changed_rows(db, "dst", "id") == 0


# -- foreign keys between the declared tables: children go first, parents come back first --------

FAMILY = """
CREATE TABLE people (id bigint PRIMARY KEY, name text NOT NULL, moved boolean NOT NULL DEFAULT false);
CREATE TABLE households (id bigint PRIMARY KEY, label text NOT NULL);
CREATE TABLE members (household_id bigint NOT NULL REFERENCES households,
                      person_id bigint NOT NULL, PRIMARY KEY (household_id, person_id));
CREATE TABLE old_households (id bigint PRIMARY KEY, label text NOT NULL);
CREATE TABLE old_members (household_id bigint NOT NULL REFERENCES old_households,
                          person_id bigint NOT NULL, PRIMARY KEY (household_id, person_id));
INSERT INTO people SELECT g, 'p' || g FROM generate_series(1, 120) AS g;
INSERT INTO old_households SELECT g, 'old ' || g FROM generate_series(1, 120) AS g;
INSERT INTO old_members SELECT g, g FROM generate_series(1, 120) AS g;
"""


@pytest.mark.parametrize("how", ["runner", "psql"])
def test_rows_linked_by_foreign_keys_are_undone_in_an_order_the_keys_allow(
    cli: Callable[..., Any], workdir: Path, db: str, how: str
) -> None:
    """Each batch inserts parents then children into one pair of tables and deletes children
    then parents from another: undoing must delete the new children before their parents and
    re-insert the old parents before their children, whatever order the plan lists them in."""
    sql(db, FAMILY)
    tables = ("people", "households", "members", "old_households", "old_members")
    keep(db, *tables)
    plan = workdir / "p.json"
    plan.write_text(
        json.dumps(
            plan_dict(
                target={"table": "people", "key": ["id"], "columns": ["moved"]},
                discovery={"sql": "SELECT id FROM people WHERE NOT moved"},
                apply={
                    "statements": [
                        "INSERT INTO households SELECT id, 'new ' || id FROM people WHERE id = ANY($1)",
                        "INSERT INTO members SELECT id, id FROM people WHERE id = ANY($1)",
                        "DELETE FROM old_members WHERE person_id = ANY($1)",
                        "DELETE FROM old_households WHERE id = ANY($1)",
                        "UPDATE people SET moved = true WHERE id = ANY($1)",
                    ]
                },
                # listed children first on purpose: the order comes from the foreign keys
                writes=[
                    {
                        "table": "members",
                        "key": ["household_id", "person_id"],
                        "operations": ["insert"],
                    },
                    {"table": "households", "key": ["id"], "operations": ["insert"]},
                    {
                        "table": "old_members",
                        "key": ["household_id", "person_id"],
                        "operations": ["delete"],
                    },
                    {"table": "old_households", "key": ["id"], "operations": ["delete"]},
                ],
                batching__size=25,
                soak__checks=[],
            )
        )
    )
    applied = cli("apply", str(plan), "-e", "staging", env=env_for(db))
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert val(db, "SELECT count(*) FROM members") == 120
    if how == "runner":
        undone = cli("rollback", run_id, "--env", "staging", env=env_for(db))
        assert undone.exit_code == 0, undone.output
    else:
        text = rollback_file(workdir, run_id).read_text()
        # the file says the order it uses: parents first
        header = text[: text.index("-- generated:")]
        assert header.index('"households"') < header.index('"members"')
        done = run_psql(db, rollback_file(workdir, run_id))
        assert done.returncode == 0, done.stderr
    for t, key in (
        ("people", "id"),
        ("households", "id"),
        ("members", "household_id, person_id"),
        ("old_households", "id"),
        ("old_members", "household_id, person_id"),
    ):
        assert changed_rows(db, t, key) == 0, t


def test_prod_health_checks_drift_on_every_declared_table_and_prod_is_undone_exactly(
    cli: Callable[..., Any], workdir: Path, make_db: Callable[..., str]
) -> None:
    staging, prod = make_db(), make_db()
    sql(staging, SCHEMA.format(n=200))
    sql(prod, SCHEMA.format(n=200))
    sql(prod, "ALTER TABLE troops ALTER COLUMN amount TYPE bigint")  # a declared column drifted
    plan = shaped_plan(workdir / "p.json", batching__size=50)
    env = env_for(staging, prod)
    applied = cli("apply", str(plan), "-e", "staging", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert (
        cli("approve", run_id, "--gate", "apply-staging", "--as", "alice", env=env).exit_code == 0
    )
    soaked = cli(
        "soak",
        str(plan),
        "-e",
        "staging",
        "--run",
        run_id,
        "--duration",
        "1s",
        "--interval",
        "1s",
        env=env,
    )
    assert soaked.exit_code == 3, soaked.output
    assert cli("approve", run_id, "--gate", "soak-staging", "--as", "bob", env=env).exit_code == 0
    health = cli("health", str(plan), "-e", "prod", "--run", run_id, env=env)
    assert health.exit_code == 4, health.output  # no-go
    report = next(
        (workdir / "backfill_logs").rglob(f"{run_id}/prod/prod_health_check.md")
    ).read_text()
    assert "public.troops: column amount" in report
    # prod fixed to match staging: go, then the canary and the rest, undone exactly in prod
    sql(prod, "ALTER TABLE troops ALTER COLUMN amount TYPE int")
    keep(prod, *TABLES)
    health = cli("health", str(plan), "-e", "prod", "--run", run_id, env=env)
    assert health.exit_code == 3, health.output
    assert cli("approve", run_id, "--gate", "health-prod", "--as", "alice", env=env).exit_code == 0
    mini = next((workdir / "backfill_logs").rglob(f"{run_id}/prod/prod_mini_backfill_plan.json"))
    canary = cli("apply", str(mini), "-e", "prod", "--run", run_id, env=env)
    assert canary.exit_code == 3, canary.output
    assert cli("approve", run_id, "--gate", "canary-prod", "--as", "bob", env=env).exit_code == 0
    rest = cli("apply", str(mini), "-e", "prod", "--run", run_id, env=env)
    assert rest.exit_code == 0, rest.output
    assert val(prod, "SELECT count(*) FROM snaps WHERE processed_at IS NULL") == 0
    undone = cli("rollback", run_id, "--env", "prod", env=env)
    assert undone.exit_code == 0, undone.output
    _all_back(prod)


def test_a_row_changed_since_is_left_alone_and_the_rest_undone_and_a_dry_run_changes_nothing(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(db, SCHEMA.format(n=200))
    keep(db, *TABLES)
    plan = shaped_plan(workdir / "p.json", batching__size=40)
    env = env_for(db)
    applied = cli("apply", str(plan), "-e", "staging", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    after = val(db, "SELECT md5(string_agg(t::text, ',' ORDER BY user_id, troop_id)) FROM troops t")
    dry = cli("rollback", run_id, "--env", "staging", "--dry-run", env=env)
    assert dry.exit_code == 0, dry.output
    assert "would restore" in dry.output
    assert (
        val(db, "SELECT md5(string_agg(t::text, ',' ORDER BY user_id, troop_id)) FROM troops t")
        == after
    )
    # someone changes a row the run inserted, and one it updated, after the apply
    inserted = sql(
        db,
        "SELECT user_id, troop_id FROM troops EXCEPT SELECT user_id, troop_id FROM snap_troops LIMIT 1",
    )[0]
    sql(
        db,
        f"UPDATE troops SET amount = 999 WHERE user_id = {inserted[0]} AND troop_id = {inserted[1]}",
    )
    sql(db, "UPDATE summary SET score = -1 WHERE user_id = 0")
    undone = cli("rollback", run_id, "--env", "staging", env=env)
    assert undone.exit_code == 0, undone.output
    report = next(
        (workdir / "backfill_logs").rglob(f"{run_id}/staging/rollback_report.md")
    ).read_text()
    assert "public.troops" in report
    assert "public.summary" in report
    assert (
        val(db, "SELECT amount FROM troops WHERE user_id = $1 AND troop_id = $2", *inserted) == 999
    )
    assert val(db, "SELECT score FROM summary WHERE user_id = 0") == -1
    # everything else is back
    sql(db, f"DELETE FROM troops WHERE user_id = {inserted[0]} AND troop_id = {inserted[1]}")
    sql(
        db,
        "UPDATE summary s SET troops = p.troops, score = p.score FROM snap_summary p "
        "WHERE s.user_id = p.user_id AND s.user_id = 0",
    )
    _all_back(db)


def test_a_target_that_is_only_read_feeds_an_insert_and_any_write_to_it_is_refused(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(
        db,
        "CREATE TABLE src (id bigint PRIMARY KEY, v text NOT NULL); "
        "CREATE TABLE dst (id bigint PRIMARY KEY, v text NOT NULL); "
        "INSERT INTO src SELECT g, md5(g::text) FROM generate_series(1, 300) AS g",
    )
    keep(db, "src", "dst")

    def plan_with(statements: list[str], name: str) -> Path:
        path = workdir / name
        path.write_text(
            json.dumps(
                plan_dict(
                    target={"table": "src", "key": ["id"], "operations": []},
                    discovery={
                        "sql": "SELECT id FROM src s WHERE NOT EXISTS "
                        "(SELECT 1 FROM dst d WHERE d.id = s.id)"
                    },
                    apply={"statements": statements},
                    writes=[{"table": "dst", "key": ["id"], "operations": ["insert"]}],
                    batching__size=70,
                    soak__checks=[],
                )
            )
        )
        return path

    copy = "INSERT INTO dst SELECT id, v FROM src WHERE id = ANY($1)"
    touch = "UPDATE src SET v = v WHERE id = ANY($1)"
    refused = cli(
        "apply", str(plan_with([copy, touch], "bad.json")), "-e", "staging", env=env_for(db)
    )
    assert refused.exit_code == 2, refused.output
    assert "UPDATE of public.src, but the plan allows only []" in " ".join(refused.output.split())
    applied = cli("apply", str(plan_with([copy], "p.json")), "-e", "staging", env=env_for(db))
    assert applied.exit_code == 3, applied.output
    assert val(db, "SELECT count(*) FROM dst") == 300
    undone = cli("rollback", run_id_of(applied.output), "--env", "staging", env=env_for(db))
    assert undone.exit_code == 0, undone.output
    assert changed_rows(db, "dst", "id") == 0
    assert changed_rows(db, "src", "id") == 0
