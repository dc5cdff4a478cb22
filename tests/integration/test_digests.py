"""Rows inserted into an insert-only table are recorded by a 64-bit digest of the row as the batch
left it (#11): a rollback deletes a row only while its digest still matches, by the runner and by
the psql file alike; `images = "whole"` keeps the whole row instead."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

from runner.plan import Write
from tests.conftest import plan_dict, sql, val
from tests.helpers import (
    case_insensitive_collation,
    env_for,
    finish,
    roll_back,
    run_id_of,
    set_on_database,
    start_runner,
    wait_for,
)
from tests.integration.test_rollback import HOSTILE, fill_hostile
from tests.integration.test_rollback import rows as hostile_rows

SCHEMA = """
CREATE TABLE src (id bigint PRIMARY KEY, v text NOT NULL, n numeric NOT NULL, j jsonb,
                  ts timestamptz NOT NULL, iv interval, f float8);
CREATE TABLE dst (LIKE src INCLUDING ALL);
CREATE TABLE dst_before (id bigint);
INSERT INTO src SELECT g, 'v' || g, g / 4.0, jsonb_build_object('g', g, 'h', 'x'),
       '2026-01-01 00:00+00'::timestamptz + g * interval '1 minute', g * interval '1 hour', g / 3.0
FROM generate_series(1, 120) AS g;
-- rows already there before the run: never touched, never deleted
INSERT INTO dst SELECT * FROM src WHERE id > 100;
"""
INSERT = "INSERT INTO dst SELECT * FROM src WHERE id = ANY($1)"


def _plan(path: Path, **write: Any) -> Path:
    plan = plan_dict(
        target={"table": "src", "key": ["id"], "columns": ["v"]},
        discovery={
            "sql": "SELECT s.id FROM src s WHERE NOT EXISTS (SELECT 1 FROM dst d WHERE d.id = s.id)"
        },
        apply={"statements": [INSERT]},
        writes=[{"table": "dst", "key": ["id"], "operations": ["insert"], **write}],
        batching={"size": 25, "workers": 1, "lock_timeout": "1s", "statement_timeout": "20s"},
        soak__checks=[],
    )
    path.write_text(json.dumps(plan))
    return path


@pytest.mark.parametrize("how", ["runner", "psql"])
def test_inserted_rows_are_digested_and_deleted_only_while_unchanged(
    cli: Callable[..., Any], workdir: Path, db: str, how: str
) -> None:
    sql(db, SCHEMA)
    result = cli("apply", str(_plan(workdir / "p.json")), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    assert val(db, "SELECT count(*) FROM dst") == 120
    # 100 rows inserted, each kept as a digest (no whole after-image), in 4 batches
    digests = sql(
        db,
        "SELECT count(*) AS n, count(after_digest) AS digests, count(after) AS whole "
        "FROM backfill.row_images WHERE run_id = $1 AND op = 'I'",
        run_id,
    )[0]
    assert (digests["n"], digests["digests"], digests["whole"]) == (100, 100, 0)
    assert val(db, "SELECT bool_and(digests) FROM backfill.batch_images WHERE run_id = $1", run_id)
    # after the apply: an equal value with another text (1.00 for 0.25 … ) is a change; the same
    # values written again are not; a row deleted since is already gone
    sql(
        db,
        "UPDATE dst SET n = n::numeric(10, 4) WHERE id = 1; "  # 0.25 -> 0.2500
        "UPDATE dst SET v = v WHERE id = 2; "  # written again, unchanged
        "UPDATE dst SET v = 'app wrote' WHERE id = 3; "
        'UPDATE dst SET j = \'{"h": "x", "g": 4}\' WHERE id = 4; '  # the same jsonb
        "DELETE FROM dst WHERE id = 5",
    )
    printed = roll_back(cli, workdir, db, run_id, how)
    if how == "runner":
        report = next((workdir / "backfill_logs").rglob(f"{run_id}/staging/rollback_report*.md"))
        text = report.read_text()
        assert "(the row it inserted, kept as digest" in text
        assert "app wrote" in text
    else:
        # the two rows changed since are the rows not back (conflicts), so the checksum differs
        lines = [" ".join(line.split()) for line in printed.splitlines()]
        assert "public.dst | 100 | 2" in lines, printed
    # only the two rows changed since stay, with the 20 that were there before
    assert [r["id"] for r in sql(db, "SELECT id FROM dst WHERE id <= 100 ORDER BY id")] == [1, 3]
    assert val(db, "SELECT count(*) FROM dst WHERE id > 100") == 20


def test_images_whole_keeps_each_inserted_row_whole(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(db, SCHEMA)
    plan = _plan(workdir / "p.json", images="whole")
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    whole = sql(
        db,
        "SELECT count(after) AS whole, count(after_digest) AS digests "
        "FROM backfill.row_images WHERE run_id = $1 AND op = 'I'",
        run_id,
    )[0]
    assert (whole["whole"], whole["digests"]) == (100, 0)
    sql(db, "UPDATE dst SET v = 'app wrote' WHERE id = 3")
    undone = cli("rollback", run_id, "--env", "staging", env=env_for(db))
    assert undone.exit_code == 0, undone.output
    assert [r["id"] for r in sql(db, "SELECT id FROM dst WHERE id <= 100")] == [3]


def test_a_write_beside_the_inserts_is_refused_and_rolled_back(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """The digest path keeps the scope guard: a trigger that changes the inserted row (its image
    would be stale) or writes another table rolls the batch back."""
    sql(db, SCHEMA)
    sql(
        db,
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN UPDATE dst SET v = 'by trigger' WHERE id = NEW.id; RETURN NULL; END $$; "
        "CREATE TRIGGER t AFTER INSERT ON dst FOR EACH ROW EXECUTE FUNCTION touch()",
    )
    result = cli("apply", str(_plan(workdir / "p.json")), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "public.dst: 25 updated beyond the 0 its statements returned" in text, text
    assert val(db, "SELECT count(*) FROM dst") == 20
    assert val(db, "SELECT count(*) FROM backfill.batch_images") == 0


def test_a_column_added_while_an_insert_waits_for_it_rolls_the_batch_back(
    workdir: Path, db: str
) -> None:
    """A column added to an insert-only table mid-run (the ALTER waits for the batch in flight,
    the next INSERT for the ALTER) is not in the run's digests: the batch that inserted after it
    sees the change (READ COMMITTED: a snapshot taken after its INSERT) and is rolled back."""
    sql(db, SCHEMA)
    plan = _plan(workdir / "p.json")
    raw = json.loads(plan.read_text())
    raw["apply"]["statements"] = [INSERT + " AND pg_sleep(0.01) IS NOT NULL"]
    plan.write_text(json.dumps(raw))
    proc = start_runner(["apply", str(plan), "--env", "staging"], workdir, db)
    wait_for(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'")
    sql(db, "ALTER TABLE dst ADD COLUMN extra int")
    code, out = finish(proc)
    assert code == 1, out
    text = " ".join(out.split())
    assert "a declared table's columns changed while the run was going" in text, text
    done = val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'")
    assert 1 <= done < 4
    # nothing of the refused batch stayed: only the committed batches' rows, and the 20 before
    assert val(db, "SELECT count(*) FROM dst") == 20 + 25 * done
    assert val(db, "SELECT count(*) FROM backfill.row_images") == 25 * done


def test_a_run_recorded_with_whole_images_is_not_continued_with_digests(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """A run started by a backfill that kept inserted rows whole (before digests) is refused,
    not continued with images its rollback would read as whole rows."""
    sql(db, SCHEMA)
    plan = _plan(workdir / "p.json")
    env = env_for(db)
    first = cli("apply", str(plan), "-e", "staging", "-q", "--max-rows", "25", env=env)
    assert first.exit_code == 0, first.output
    run_id = run_id_of(first.output)
    # as the previous version recorded it: no digest
    sql(
        db,
        "UPDATE backfill.runs SET tables = (SELECT jsonb_agg(t - 'digest') "
        "FROM jsonb_array_elements(tables) AS t) WHERE run_id = $1",
        run_id,
    )
    again = cli("apply", str(plan), "-e", "staging", "-q", "--run", run_id, env=env)
    assert again.exit_code == 2, again.output
    text = " ".join(again.output.split())
    assert "records inserted rows otherwise than the one that started the run" in text, text
    assert val(db, "SELECT count(*) FROM dst") == 45


def test_a_digest_is_only_for_an_insert_only_table() -> None:
    with pytest.raises(ValidationError, match="a digest is kept only for a table the batches only"):
        Write(table="t", key=["id"], operations=["upsert"], columns=["v"], images="digest")
    assert Write(table="t", key=["id"], operations=["insert"]).digested
    assert not Write(table="t", key=["id"], operations=["insert"], images="whole").digested
    assert not Write(table="t", key=["id"], operations=["insert", "delete"]).digested


def test_a_case_change_under_a_case_insensitive_collation_is_a_change(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """'abc' and 'ABC' are equal under a nondeterministic collation, and hash alike under it:
    the digest hashes a text's bytes, so the row changed since is left alone."""
    case_insensitive_collation(db)
    sql(
        db,
        "CREATE TABLE src (id bigint PRIMARY KEY, v text, name text COLLATE ci NOT NULL); "
        "CREATE TABLE dst (LIKE src INCLUDING ALL); "
        "INSERT INTO src SELECT g, NULL, 'name ' || g FROM generate_series(1, 30) AS g",
    )
    plan = _plan(workdir / "p.json")
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    sql(db, "UPDATE dst SET name = upper(name) WHERE id = 7")
    undone = cli("rollback", run_id, "--env", "staging", env=env_for(db))
    assert undone.exit_code == 0, undone.output
    assert [r["name"] for r in sql(db, "SELECT name FROM dst")] == ["NAME 7"]


def test_validate_and_the_dry_run_say_inserted_rows_are_kept_as_digests(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    sql(db, SCHEMA)
    plan = _plan(workdir / "p.json")
    checked = cli("validate", str(plan), "--env", "staging", env=env_for(db))
    assert checked.exit_code == 0, checked.output
    assert "insert of public.dst (declared; inserted rows kept as digests)" in " ".join(
        checked.output.split()
    )
    dry = cli("apply", str(plan), "-e", "staging", "--dry-run", env=env_for(db))
    assert dry.exit_code == 0, dry.output
    text = " ".join(dry.output.split())
    assert "BEGIN (READ COMMITTED)" in text, text
    assert "each inserted row's key and digest stored, and the batch's ledger row" in text, text
    assert val(db, "SELECT count(*) FROM dst") == 20  # a dry run inserts nothing


def test_report_rerenders_a_digest_runs_files_byte_for_byte(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    """The summary, the manifest and the rollback file (but its `generated` line) of a run whose
    images are digests, written while the batches ran, are what `backfill report` writes from the
    ledger afterwards."""
    sql(db, SCHEMA)
    applied = cli("apply", str(_plan(workdir / "p.json")), "-e", "staging", env=env_for(db))
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    folder = next((workdir / "backfill_logs").rglob(f"{run_id}/staging"))

    def read(p: Path) -> str:
        return "".join(
            line for line in p.read_text().splitlines(True) if not line.startswith("-- generated:")
        )

    files = {
        p: read(p)
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in (".md", ".json", ".sql") and "events" not in p.name
    }
    assert any(p.suffix == ".sql" for p in files)
    again = cli("report", run_id, env=env_for(db))
    assert again.exit_code == 0, again.output
    assert [p.name for p, text in files.items() if read(p) != text] == []


@pytest.mark.slow
@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=hostile_rows)
@pytest.mark.parametrize("how", ["runner", "psql"])
def test_hostile_rows_inserted_by_digest_are_all_deleted_again(
    cli: Callable[..., Any], workdir: Path, db: str, data: list[tuple[Any, ...]], how: str
) -> None:
    """Hostile keys and values (quotes, backslashes, braces, `NULL` as text, NaN, -0, every
    type of the hostile table) inserted on the direct path, digests only: both rollbacks find
    every row as inserted (its digest computed again matches, under other session settings in
    psql) and delete it, and the rollback file's array literals carry the keys exactly."""
    set_on_database(db, TimeZone="Pacific/Chatham", DateStyle="SQL, DMY", extra_float_digits="0")
    sql(
        db,
        "DROP TABLE IF EXISTS hostile, hostile_copy; DROP SCHEMA IF EXISTS backfill CASCADE; "
        + HOSTILE,
    )
    fill_hostile(db, data)
    sql(db, "CREATE TABLE hostile_copy (LIKE hostile INCLUDING ALL)")
    n = val(db, "SELECT count(*) FROM hostile")
    plan = workdir / "p.json"
    plan.write_text(
        json.dumps(
            plan_dict(
                target={"table": "hostile", "key": ["id", "k"], "columns": ["t"]},
                discovery={
                    "sql": "SELECT h.id, h.k FROM hostile AS h WHERE NOT EXISTS (SELECT FROM "
                    "hostile_copy AS c WHERE c.id = h.id AND c.k = h.k OFFSET 0)"
                },
                apply={
                    "statements": [
                        "INSERT INTO hostile_copy SELECT * FROM hostile "
                        "WHERE (id, k) IN (SELECT * FROM unnest($1::int[], $2::text[]))"
                    ]
                },
                writes=[{"table": "hostile_copy", "key": ["id", "k"], "operations": ["insert"]}],
                batching={
                    "size": 3,
                    "workers": 1,
                    "lock_timeout": "1s",
                    "statement_timeout": "20s",
                },
                soak__checks=[],
            )
        )
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert val(db, "SELECT count(*) FROM hostile_copy") == n
    run_id = run_id_of(result.output)
    assert (
        val(db, "SELECT count(after_digest) FROM backfill.row_images WHERE run_id = $1", run_id)
        == n
    )
    printed = roll_back(cli, workdir, db, run_id, how)
    if how == "psql":
        assert printed.strip().splitlines()[-2].split("|")[2].strip() == "t", printed
    assert val(db, "SELECT count(*) FROM hostile_copy") == 0
