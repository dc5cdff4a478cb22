"""Insert-, delete- and multi-table backfills (#11): every table a batch writes is declared, every
row it touches is imaged whole in the batch's transaction, and both rollbacks undo it exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import plan_dict, sql, val
from tests.helpers import PINNED_SETTINGS, env_for, rollback_file, run_id_of, run_psql

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
    defaults: dict[str, Any] = dict(
        target={"table": "snaps", "key": ["id"], "columns": ["processed_at"]},
        discovery={"sql": "SELECT id FROM snaps WHERE processed_at IS NULL"},
        apply={"statements": [UPSERT_TROOPS, UPSERT_SUMMARY, MARK]},
        writes=[
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
        soak__checks=[
            {
                "name": "all_processed",
                "sql": "SELECT count(*) FROM snaps WHERE processed_at IS NULL",
                "pass_if": "== 0",
            }
        ],
    )
    plan = plan_dict(**{**defaults, **over})
    path.write_text(json.dumps(plan, indent=2))
    return path


def keep(db: str, *tables: str) -> None:
    for t in tables:
        sql(db, f"DROP TABLE IF EXISTS snap_{t}; CREATE TABLE snap_{t} AS SELECT * FROM {t}")


def changed_rows(db: str, table: str, key: str) -> int:
    """Rows of `table` not bytewise equal to its snapshot (missing and extra ones included)."""
    import asyncpg

    from tests.conftest import run

    async def go() -> int:
        conn = await asyncpg.connect(db, server_settings=PINNED_SETTINGS)
        try:
            return int(
                await conn.fetchval(
                    f"SELECT count(*) FROM {table} AS c FULL JOIN snap_{table} AS s USING ({key}) "
                    "WHERE c IS NULL OR s IS NULL OR NOT record_image_eq(c, s)"
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
    troops_new = val(db, "SELECT count(*) FROM troops") - val(db, "SELECT count(*) FROM snap_troops")
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
            {"writes": [{"table": "troops", "key": ["user_id", "troop_id"], "operations": ["insert"]},
                        {"table": "summary", "key": ["user_id"], "operations": ["upsert"],
                         "columns": ["troops", "score"]}]},
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
    plan = shaped_plan(
        workdir / "p.json", apply={"statements": [sneaky, UPSERT_SUMMARY, MARK]}
    )
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
