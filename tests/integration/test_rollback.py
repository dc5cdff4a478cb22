"""Invariant 7: rollback is exact (psql and runner), careful with conflicts, resumable, targeted."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import make_items, sql, val, write_plan
from tests.helpers import (
    CHECKSUM,
    HOSTILE_PSQL_ENV,
    differing,
    env_for,
    run_id_of,
    run_psql,
    set_on_database,
    snapshot,
)

HOSTILE = """
CREATE TABLE hostile (
    id int, k text, t text, n numeric, f float8, b boolean, ts timestamptz, d date,
    j jsonb, by bytea, ta text[], ia int[], u uuid, iv interval, done boolean NOT NULL DEFAULT false,
    PRIMARY KEY (id, k)
)"""

texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
hostile_texts = st.one_of(
    texts,
    st.sampled_from(
        [
            "'",
            "''",
            "\\",
            "\\'",
            "$$",
            "$x$ $$;",
            "--",
            "/*",
            ":var",
            ":'var'",
            "\\q",
            "\n\\! echo pwned\n",
            "é漢🙂",
            "NULL",
            "",
        ]
    ),
)
rows = st.lists(
    st.tuples(
        hostile_texts,
        st.one_of(st.none(), hostile_texts),
        st.one_of(
            st.none(),
            st.decimals(
                allow_nan=False,
                allow_infinity=False,
                places=6,
                min_value=Decimal("-1e12"),
                max_value=Decimal("1e12"),
            ),
        ),
        st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
        st.one_of(st.none(), st.booleans()),
        st.one_of(st.none(), st.lists(st.one_of(st.none(), hostile_texts), max_size=3)),
        st.one_of(st.none(), st.binary(max_size=8)),
    ),
    min_size=1,
    max_size=6,
)


def fill_hostile(db: str, data: list[tuple[Any, ...]]) -> None:
    """The hostile table's rows from hypothesis' tuples (key, text, numeric, float, bool, text[],
    bytea), with the other columns derived from them."""
    for i, (k, t, n, f, b, ta, by) in enumerate(data):
        sql(
            db,
            """INSERT INTO hostile (id, k, t, n, f, b, ts, d, j, by, ta, ia, u, iv)
                   VALUES ($1::int, $2::text, $3::text, $4::numeric, $5::float8, $6::boolean,
                           now() - $1::int * interval '1 day 3 hours', current_date,
                           jsonb_build_object('t', $3::text, 'n', $1::int), $7::bytea, $8::text[],
                           ARRAY[$1::int, NULL], md5($2::text)::uuid, $1::int * interval '1 min 3.5 s')
                   ON CONFLICT DO NOTHING""",
            i,
            k,
            t,
            n,
            f,
            b,
            by,
            ta,
        )


@pytest.mark.slow
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=rows)
# found by hypothesis: a carriage return must survive every step into the file, unchanged
@example(
    data=[
        ("", None, None, None, None, None, None),
        ("\r", "a\rb\r\n", None, None, None, None, None),
    ]
)
@pytest.mark.parametrize("session", ["default", "hostile"])
def test_emitted_sql_restores_any_type_and_value_exactly_with_psql(
    cli: Callable[..., Any], workdir: Path, db: str, data: list[tuple[Any, ...]], session: str
) -> None:
    """Also with hostile settings on the database (so in the runner's sessions) and in psql's
    environment: rows are compared bytewise, never through text made under those settings."""
    if session == "hostile":
        set_on_database(
            db,
            TimeZone="Pacific/Chatham",
            DateStyle="SQL, DMY",
            IntervalStyle="sql_standard",
            extra_float_digits="0",
            bytea_output="escape",
        )
    psql_env = HOSTILE_PSQL_ENV if session == "hostile" else {}
    sql(db, "DROP TABLE IF EXISTS hostile; DROP SCHEMA IF EXISTS backfill CASCADE; " + HOSTILE)
    fill_hostile(db, data)
    snapshot(db, "hostile")
    columns = ["t", "n", "f", "b", "ts", "d", "j", "by", "ta", "ia", "u", "iv", "done"]
    plan = write_plan(
        workdir / "p.json",
        target={"table": "hostile", "key": ["id", "k"], "columns": columns},
        discovery__sql="SELECT id, k FROM hostile WHERE NOT done",
        apply__sql="UPDATE hostile SET t = 'x', n = 1, f = 2, b = NULL, ts = now(), d = NULL, j = '{}', "
        "by = NULL, ta = '{}', ia = NULL, u = NULL, iv = NULL, done = true "
        "WHERE (id, k) IN (SELECT * FROM unnest($1::int[], $2::text[]))",
        batching__size=2,
        soak__checks=[],
    )
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    assert differing(db, "hostile", "id, k") == len({(i, r[0]) for i, r in enumerate(data)})
    rollback = next(
        (workdir / "backfill_logs").rglob(f"{run_id_of(result.output)}/staging/rollback_*.sql")
    )
    done = run_psql(db, rollback, psql_env)
    assert done.returncode == 0, done.stderr
    assert differing(db, "hostile", "id, k") == 0
    assert " t\n" in done.stdout  # checksum_matches
    again = run_psql(db, rollback, psql_env)  # running it twice is safe
    assert again.returncode == 0
    assert differing(db, "hostile", "id, k") == 0


def _applied(
    cli: Callable[..., Any], workdir: Path, db: str, n: int = 500, **over: Any
) -> tuple[str, str, Path]:
    make_items(db, n)
    before = val(db, CHECKSUM.format(table="items"))
    plan = write_plan(workdir / "p.json", **over)
    result = cli("apply", str(plan), "-e", "staging", "-q", env=env_for(db))
    assert result.exit_code == 3, result.output
    run_id = run_id_of(result.output)
    return (
        run_id,
        before,
        next((workdir / "backfill_logs").rglob(f"{run_id}/staging/rollback_*.sql")),
    )


def test_runner_rollback_restores_exactly_and_is_a_noop_the_second_time(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id, before, _ = _applied(cli, workdir, db)
    dry = cli("rollback", run_id, "-e", "staging", "--dry-run", env=env_for(db))
    assert dry.exit_code == 0
    assert "would restore 400 row(s) in 4 batch(es)" in dry.output
    assert val(db, "SELECT count(*) FROM items WHERE val = 'new'") == 500
    done = cli("rollback", run_id, "-e", "staging", env=env_for(db))
    assert done.exit_code == 0, done.output
    assert "restored 400 row(s)" in done.output
    assert "checksum verified" in done.output
    assert val(db, CHECKSUM.format(table="items")) == before
    assert val(db, "SELECT count(*) FROM backfill.rollback_batches") == 4
    again = cli("rollback", run_id, "-e", "staging", env=env_for(db))
    assert again.exit_code == 0
    assert val(db, CHECKSUM.format(table="items")) == before
    report = next((workdir / "backfill_logs").rglob("rollback_report.md")).read_text()
    assert "**Verified.** 400 row(s) restored" in report


def test_rows_changed_since_are_left_alone_by_both_paths_and_reported(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id, _, emitted = _applied(cli, workdir, db, 300)
    sql(db, "UPDATE items SET val = 'edited by app' WHERE id IN (1, 2, 3)")
    sql(db, "DELETE FROM items WHERE id = 4")
    psql_run = run_psql(db, emitted)
    assert psql_run.returncode == 0, psql_run.stderr
    assert "edited by app" in psql_run.stdout  # the conflicts query lists them
    assert val(db, "SELECT count(*) FROM items WHERE val = 'edited by app'") == 3
    assert val(db, "SELECT val FROM items WHERE id = 6") == "old6"
    # the runner path: re-apply first, then edit again, then roll back through the runner
    sql(db, "UPDATE items SET val = 'new', updated_at = '2030-01-01' WHERE val LIKE 'old%'")
    result = cli("rollback", run_id, "-e", "staging", env=env_for(db))
    assert result.exit_code == 0, result.output
    assert "4 conflict(s) left alone" in result.output
    assert "checksum verified" in result.output
    assert val(db, "SELECT count(*) FROM items WHERE val = 'edited by app'") == 3
    report = next((workdir / "backfill_logs").rglob("rollback_report.md")).read_text()
    assert (
        "| 1 | 1 | new, 2030-01-01 00:00:00+00 | edited by app, 2030-01-01 00:00:00+00 |" in report
    )
    assert "(row deleted)" in report


def test_batches_and_since_target_part_of_the_run(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id, _, _ = _applied(cli, workdir, db, 500)
    result = cli("rollback", run_id, "-e", "staging", "--batches", "2-3", env=env_for(db))
    assert result.exit_code == 0, result.output
    assert val(db, "SELECT min(id), max(id) FROM items WHERE val LIKE 'old%'") == 126
    assert val(db, "SELECT count(*) FROM items WHERE val LIKE 'old%'") == 200
    cutoff = val(
        db, "SELECT committed_at FROM backfill.batches WHERE run_id = $1 AND batch_no = 3", run_id
    )
    emitted = cli(
        "rollback",
        run_id,
        "-e",
        "staging",
        "--emit",
        "--since",
        cutoff.isoformat(),
        env=env_for(db),
    )
    assert emitted.exit_code == 0, emitted.output
    text = next((workdir / "backfill_logs").rglob("rollback_*.sql")).read_text()
    assert "-- batch 4:" in text
    assert "-- batch 3:" not in text
    assert "-- batch 1:" not in text


def test_rollback_of_unknown_run_or_env_is_a_clear_error(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id, _, _ = _applied(cli, workdir, db, 100)
    missing = cli("rollback", "20200101T000000Z-items_new-abcd", "-e", "staging", env=env_for(db))
    assert missing.exit_code == 2
    assert "has no run.json" in missing.output
    bad = cli("rollback", run_id, "-e", "staging", "--batches", "9-2", env=env_for(db))
    assert bad.exit_code == 2
    assert "--batches" in bad.output


@pytest.mark.slow
def test_killed_rollback_resumes_to_the_exact_pre_apply_state(
    workdir: Path, db: str, cli: Callable[..., Any]
) -> None:
    run_id, before, _ = _applied(
        cli, workdir, db, 3000, batching__size=40, batching__batches_per_minute=900
    )
    env = {
        **os.environ,
        "STAGING_DSN": db,
        "PROD_DSN": db,
        "BACKFILL_LOGS": str(workdir / "backfill_logs"),
    }
    restored = 0
    for pause in (0.05, 0.2, 0.12):  # kill shortly after each start has committed some batches
        with (workdir / "rb.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runner", "rollback", run_id, "-e", "staging"],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while val(db, "SELECT count(*) FROM backfill.rollback_batches") <= restored:
            assert time.monotonic() < deadline, (workdir / "rb.log").read_text()
            time.sleep(0.05)
        time.sleep(pause)
        proc.kill()
        proc.wait()
        restored = val(db, "SELECT count(*) FROM backfill.rollback_batches")
    partial = val(db, "SELECT count(*) FROM backfill.rollback_batches")
    assert 0 < partial < 60
    final = subprocess.run(
        [sys.executable, "-m", "runner", "rollback", run_id, "-e", "staging"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert final.returncode == 0, final.stdout + final.stderr
    assert "checksum verified" in final.stdout
    assert val(db, CHECKSUM.format(table="items")) == before
    assert val(db, "SELECT count(*) FROM backfill.rollback_batches") == 60


def test_two_workers_restore_side_by_side_exactly(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id, before, _ = _applied(cli, workdir, db, n=2000, batching__size=50)
    done = cli("rollback", run_id, "-e", "staging", "--workers", "2", env=env_for(db))
    assert done.exit_code == 0, done.output
    assert "restored 1,600 row(s)" in done.output
    assert "with 2 worker(s)" in done.output
    assert val(db, CHECKSUM.format(table="items")) == before
    assert val(db, "SELECT count(*) FROM backfill.rollback_batches") == 32


def test_a_key_in_two_batches_is_restored_in_order_even_with_two_workers(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id, _, _ = _applied(cli, workdir, db, n=500)
    # as a row changed back by the application and applied again in a later pass leaves it:
    # key 1 in batch 1 ('old1' → 'new') and in a later batch 99 ('app' → 'new')
    sql(
        db,
        """INSERT INTO backfill.batches (run_id, batch_no, stage, status, selected, changed,
                                         started_at, duration_ms)
           VALUES ($1, 99, 'apply', 'done', 1, 1, now(), 1);
           INSERT INTO backfill.batch_images (run_id, batch_no, key_width, image_width, ops,
                                              keys, befores, afters)
           VALUES ($1, 99, 1, 2, '{U}', '{1}', ARRAY['{app,"2020-01-01 00:00:00+00"}'],
                   ARRAY['{new,"2030-01-01 00:00:00+00"}'])""".replace("$1", f"'{run_id}'"),
    )
    done = cli("rollback", run_id, "-e", "staging", "--workers", "2", env=env_for(db))
    assert "restored one batch at a time, newest first" in done.output
    assert "with 1 worker(s)" in done.output
    # newest first: batch 99 puts back 'app'; batch 1 then finds 'app', not what it wrote
    assert val(db, "SELECT val FROM items WHERE id = 1") == "app"
    assert "1 conflict(s)" in done.output


def test_rollback_in_an_environment_the_run_does_not_have_says_so(
    cli: Callable[..., Any], workdir: Path, db: str
) -> None:
    run_id, _, _ = _applied(cli, workdir, db)
    result = cli("rollback", run_id, "--env", "nope", env=env_for(db))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "'nope' is not one of run" in text
    assert "use one of: prod, staging" in text
