"""The shipped archive-and-delete example plan (#11): old events copied to events_archive and
deleted, then undone by the runner and by the psql file, both tables bytewise as before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.db import PINNED_SETTINGS
from tests.conftest import ROOT, run, sql, val
from tests.helpers import env_for, rollback_file, run_id_of, run_psql

PLAN = ROOT / "plans" / "archive_old_events.toml"

SCHEMA = r"""
CREATE TABLE events (
    id         bigint PRIMARY KEY,
    kind       text NOT NULL,
    created_at timestamptz NOT NULL,
    payload    bytea,
    attrs      jsonb,
    score      float8
);
CREATE TABLE events_archive (
    id          bigint PRIMARY KEY,
    kind        text NOT NULL,
    created_at  timestamptz NOT NULL,
    payload     bytea,
    attrs       jsonb,
    score       float8,
    archived_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO events
SELECT g,
       (ARRAY['login', E'quote''s \\ back\nslash', 'ünïcødé ✓', '', 'NULL'])[1 + g % 5],
       CASE WHEN g = 7 THEN '-infinity'::timestamptz
            ELSE now() - g * interval '1 hour 17 minutes 3.000042 seconds' END,
       CASE WHEN g % 4 = 0 THEN NULL ELSE decode(md5(g::text) || '00ff00', 'hex') END,
       CASE WHEN g % 3 = 0 THEN NULL
            ELSE jsonb_build_object('n', g, 'tags', jsonb_build_array('a', g % 7), 'f', g / 3.0) END,
       (ARRAY['NaN', '-0', 'Infinity', '-Infinity', '1e-310', NULL, '0.1'])[1 + g % 7]::float8
FROM generate_series(1, {n}) AS g;
-- archived by an earlier run: must stay as they are
INSERT INTO events_archive (id, kind, created_at, payload, attrs, score, archived_at)
SELECT 100000 + g, 'old', '2020-01-01', '\x00', '{{}}', -0.0, '2021-01-01'
FROM generate_series(1, 25) AS g;
"""

KEYS = {"events": "id", "events_archive": "id"}


def keep(db: str) -> None:
    for t in KEYS:
        sql(db, f"DROP TABLE IF EXISTS snap_{t}; CREATE TABLE snap_{t} AS SELECT * FROM {t}")


def changed_rows(db: str, table: str) -> int:
    """Rows of `table` not bytewise equal to its snapshot (missing and extra ones included)."""

    async def go() -> int:
        conn = await asyncpg.connect(db, server_settings=PINNED_SETTINGS)
        try:
            return int(
                await conn.fetchval(
                    f"SELECT count(*) FROM {table} AS c FULL JOIN snap_{table} AS s "
                    f"USING ({KEYS[table]}) WHERE c IS NULL OR s IS NULL "
                    "OR NOT record_image_eq(c, s)"
                )
            )
        finally:
            await conn.close()

    return int(run(go))


@pytest.mark.parametrize("undo", ["runner", "psql"])
def test_the_archive_plan_moves_old_events_and_is_undone_exactly(
    cli: Callable[..., Any], workdir: Path, db: str, undo: str
) -> None:
    sql(db, SCHEMA.format(n=1500))
    keep(db)
    env = {**env_for(db), "RETENTION_DAYS": "30"}
    old = val(db, "SELECT count(*) FROM events WHERE created_at < now() - interval '30 days'")
    assert 500 < old < 1500

    checked = cli("validate", str(PLAN), "--env", "staging", env=env)
    assert checked.exit_code == 0, checked.output
    applied = cli("apply", str(PLAN), "-e", "staging", "-q", env=env)
    assert applied.exit_code == 3, applied.output
    run_id = run_id_of(applied.output)
    assert val(db, "SELECT count(*) FROM events") == 1500 - old
    assert val(db, "SELECT count(*) FROM events_archive") == 25 + old
    # the copies are the events, byte for byte (archived_at aside)
    assert (
        val(
            db,
            "SELECT count(*) FROM snap_events AS s JOIN events_archive AS a USING (id) "
            "WHERE NOT record_image_eq(ROW(s.kind, s.created_at, s.payload, s.attrs, s.score), "
            "ROW(a.kind, a.created_at, a.payload, a.attrs, a.score))",
        )
        == 0
    )
    ops = dict(
        sql(
            db,
            "SELECT rel::text || op::text, count(*) FROM backfill.row_images WHERE run_id = $1 "
            "GROUP BY 1",
            run_id,
        )
    )
    assert ops == {"1D": old, "2I": old}

    if undo == "runner":
        undone = cli("rollback", run_id, "--env", "staging", env=env)
        assert undone.exit_code == 0, undone.output
        assert "checksum verified" in undone.output
    else:
        done = run_psql(db, rollback_file(workdir, run_id))
        assert done.returncode == 0, done.stdout + done.stderr
    assert changed_rows(db, "events") == 0
    assert changed_rows(db, "events_archive") == 0
