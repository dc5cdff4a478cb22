"""Images compared under a nondeterministic collation (#11): an image of one text column in a
case-insensitive collation ('abc' = 'ABC') is still compared byte for byte, so a change of case
is a change (recorded by the apply, undone by the rollback) and a row changed since only in case
is a conflict. These need ICU collations (skipped on a server without them, as the embedded
one); CI runs them against PostgreSQL 15:
    BACKFILL_TEST_DSN=postgresql://postgres@/postgres?host=…&port=… \\
        uv run pytest tests/integration/test_collation_images.py
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import plan_dict, sql, val
from tests.helpers import case_insensitive_collation, env_for, roll_back, run_id_of


def _apply(cli: Callable[..., Any], plan: dict[str, Any], workdir: Path, db: str) -> str:
    path = workdir / "p.json"
    path.write_text(json.dumps(plan))
    result = cli("apply", str(path), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    return run_id_of(result.output)


@pytest.mark.parametrize("how", ["runner", "psql"])
def test_a_change_of_case_is_recorded_and_undone(
    cli: Callable[..., Any], workdir: Path, db: str, how: str
) -> None:
    """The plain path: an UPDATE that only changes the case of a declared column changes each
    row (not a no-op), and the rollback puts the old case back."""
    case_insensitive_collation(db)
    sql(
        db,
        "CREATE TABLE items (id bigint PRIMARY KEY, name text COLLATE ci NOT NULL); "
        "INSERT INTO items SELECT g, 'name ' || g FROM generate_series(1, 30) AS g",
    )
    plan = plan_dict(
        target={"table": "items", "key": ["id"], "columns": ["name"]},
        discovery={"sql": "SELECT id FROM items WHERE name::bytea <> upper(name)::bytea"},
        apply={"sql": "UPDATE items SET name = upper(name) WHERE id = ANY($1)"},
        soak__checks=[],
    )
    run_id = _apply(cli, plan, workdir, db)
    assert val(db, "SELECT count(*) FROM items WHERE name::bytea = upper(name)::bytea") == 30
    changed = val(db, "SELECT sum(changed) FROM backfill.batches WHERE run_id = $1", run_id)
    assert changed == 30
    roll_back(cli, workdir, db, run_id, how)
    assert val(db, "SELECT count(*) FROM items WHERE name::bytea = ('name ' || id)::bytea") == 30


@pytest.mark.parametrize("how", ["runner", "psql"])
def test_a_row_changed_only_in_case_since_the_apply_is_a_conflict(
    cli: Callable[..., Any], workdir: Path, db: str, how: str
) -> None:
    """A shaped run whose [[writes]] table has one column (its key and whole image): a row it
    inserted whose value changed case since is not the row it inserted; a row of the target it
    updated whose declared column changed case since is not the row it left. Both stay."""
    case_insensitive_collation(db)
    sql(
        db,
        "CREATE TABLE src (id bigint PRIMARY KEY, name text COLLATE ci NOT NULL); "
        "CREATE TABLE seen (name text COLLATE ci PRIMARY KEY); "
        "INSERT INTO src SELECT g, 'name ' || g FROM generate_series(1, 30) AS g",
    )
    plan = plan_dict(
        target={"table": "src", "key": ["id"], "columns": ["name"]},
        discovery={"sql": "SELECT id FROM src WHERE name::bytea <> upper(name)::bytea"},
        apply={
            "statements": [
                "INSERT INTO seen SELECT name FROM src WHERE id = ANY($1)",
                "UPDATE src SET name = upper(name) WHERE id = ANY($1)",
            ]
        },
        writes=[{"table": "seen", "key": ["name"], "operations": ["insert"], "images": "whole"}],
        soak__checks=[],
    )
    run_id = _apply(cli, plan, workdir, db)
    sql(
        db,
        "UPDATE src SET name = lower(name) WHERE id = 7; "
        "UPDATE seen SET name = upper(name) WHERE name::bytea = 'name 8'::bytea",
    )
    roll_back(cli, workdir, db, run_id, how)
    assert [r["name"] for r in sql(db, "SELECT name FROM seen ORDER BY name")] == ["NAME 8"]
    assert val(db, "SELECT name FROM src WHERE id = 7") == "name 7"  # as changed since
    assert val(db, "SELECT count(*) FROM src WHERE name::bytea = ('name ' || id)::bytea") == 30
