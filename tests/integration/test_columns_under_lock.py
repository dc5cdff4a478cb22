"""A column added to a declared table while a batch waits for the ALTER's lock (#11).

A shaped batch that updates or deletes runs at REPEATABLE READ: its snapshot is taken by its first
statement. Taken before an ALTER TABLE commits, while the batch's statements then wait for the
ALTER's lock, that snapshot does not show the new column, though the statements ran against the
table with it: the images, taken from the columns the run resolved, would leave the column out,
and the column check, reading the catalog in the same snapshot, would not see why. The batch
takes its tables' locks before its first snapshot instead, so whatever it waited for is in it.

Run both batch paths:
    uv run pytest tests/integration/test_columns_under_lock.py                   # PostgreSQL 18
    BACKFILL_TEST_DSN=postgresql://postgres@/postgres?host=…&port=… \\
        uv run pytest tests/integration/test_columns_under_lock.py               # capture path
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tests.conftest import plan_dict, sql, val
from tests.helpers import finish, start_runner, wait_for

SCHEMA = """
CREATE TABLE ev (id bigint PRIMARY KEY, v text NOT NULL);
CREATE TABLE ev_archive (id bigint PRIMARY KEY, v text NOT NULL);
INSERT INTO ev SELECT g, 'v' || g FROM generate_series(1, 200) AS g;
"""


def _plan(path: Path) -> Path:
    plan = plan_dict(
        target={"table": "ev", "key": ["id"], "operations": ["delete"]},
        # not reading ev: the next page is ready while the ALTER holds ev's lock
        discovery={
            "sql": "SELECT g::bigint AS id FROM generate_series(1, 200) AS g "
            "WHERE NOT EXISTS (SELECT FROM ev_archive AS a WHERE a.id = g)"
        },
        apply={
            "statements": [
                # slow enough that the ALTER below waits for a batch in flight
                "INSERT INTO ev_archive (id, v) SELECT id, v FROM ev "
                "WHERE id = ANY($1) AND pg_sleep(0.02) IS NOT NULL",
                "DELETE FROM ev WHERE id = ANY($1)",
            ]
        },
        writes=[{"table": "ev_archive", "key": ["id"], "operations": ["insert"]}],
        # the next batch waits out the ALTER's lock rather than time out and retry afresh
        batching={"size": 10, "workers": 1, "lock_timeout": "20s", "statement_timeout": "30s"},
        soak__checks=[{"name": "n", "sql": "SELECT 0", "pass_if": "== 0"}],
    )
    path.write_text(json.dumps(plan))
    return path


def test_a_batch_that_waited_for_an_alter_sees_its_columns(workdir: Path, db: str) -> None:
    """The ALTER adds a column, then holds its lock a while: the batch dispatched meanwhile
    waits for it. That batch must be refused (its tables' columns changed), not commit
    deletes whose images lack the new column (a rollback would re-insert those rows with 'b' in
    it for their 'a', and verify them against the same incomplete images)."""
    sql(db, SCHEMA)
    proc = start_runner(["apply", str(_plan(workdir / "p.json")), "--env", "staging"], workdir, db)
    wait_for(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'")
    altered = threading.Event()

    def alter() -> None:
        sql(
            db,
            # every row reads 'a' in the new column (no row rewritten, so no row conflicts
            # with the batch's deletes); a row inserted again without it would read 'b'
            "BEGIN; ALTER TABLE ev ADD COLUMN extra text NOT NULL DEFAULT 'a'; "
            "ALTER TABLE ev ALTER COLUMN extra SET DEFAULT 'b'; "
            # the rows still there once the ALTER holds its lock: no batch deletes any of
            # them before the ALTER commits
            "CREATE TABLE present AS SELECT id FROM ev; SELECT pg_sleep(1.5); COMMIT",
        )
        altered.set()

    t0 = time.monotonic()
    thread = threading.Thread(target=alter)
    thread.start()
    code, out = finish(proc)
    thread.join()
    assert altered.is_set()
    assert time.monotonic() - t0 >= 1.5, "the run ended before the ALTER held its lock"
    assert code == 1, out
    text = " ".join(out.split())
    assert "a declared table's columns changed while the run was going" in text, text
    # no batch deleted a row that had the new column: each committed batch ran before the ALTER
    assert val(db, "SELECT count(*) FROM present WHERE id NOT IN (SELECT id FROM ev)") == 0
    deleted = val(db, "SELECT 200 - count(*) FROM ev")
    assert deleted == val(db, "SELECT count(*) FROM ev_archive")
    assert deleted == 10 * val(db, "SELECT count(*) FROM backfill.batches WHERE status = 'done'")
