"""Rollback speed during an incident, measured side by side in one run.

    uv run python bench/rollback_throughput.py [--rows 1000000]

One table of ~250-byte rows is backfilled by `backfill apply` (2 workers, unthrottled). Then,
from the same applied state each time, every method puts the before-values back:

- a one-shot `UPDATE … FROM` a copy of the table taken before the apply: the physical floor,
  with no safety at all (1.0x);
- `backfill rollback` with 1 and 2 workers, as an operator runs it (its own process), including
  its verification, whose share is printed;
- the emitted rollback file, run by `psql -X -f`.

Between methods the table is put back into the applied state (not timed) and vacuumed. Set
BACKFILL_BENCH_DSN to use another server (e.g. a PostgreSQL 15) instead of the embedded one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anyio
import asyncpg
from bench_support import bench_database, sql

BATCH = 10_000
TABLE = "t_rollback"


async def _timed(dsn: str, statement: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.perf_counter()
        await conn.execute(statement)
        return time.perf_counter() - t0
    finally:
        await conn.close()


def settle(dsn: str) -> None:
    sql(dsn, f"VACUUM ANALYZE {TABLE}", "CHECKPOINT")


def to_applied_state(dsn: str, run_id: str) -> None:
    """Back to the state right after the apply; the ledger forgets the previous rollback."""
    sql(
        dsn,
        f"UPDATE {TABLE} AS t SET version = a.version FROM applied AS a "
        "WHERE t.id = a.id AND t.version IS DISTINCT FROM a.version",
        f"DELETE FROM backfill.rollback_batches WHERE run_id = '{run_id}'",
        f"DELETE FROM backfill.rollback_conflicts WHERE run_id = '{run_id}'",
    )
    settle(dsn)


def check_restored(dsn: str) -> None:
    async def go() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(
                await conn.fetchval(
                    f"SELECT count(*) FROM {TABLE} AS t JOIN before AS b USING (id) "
                    "WHERE t.version IS DISTINCT FROM b.version"
                )
            )
        finally:
            await conn.close()

    differing = anyio.run(go)
    if differing:
        raise SystemExit(f"a method left {differing} row(s) not restored")


def backfill(args: list[str], workdir: Path, expect: int) -> tuple[float, str]:
    env = {**os.environ, "BACKFILL_LOGS": str(workdir / "logs"), "BACKFILL_ACTOR": "bench"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != expect:
        raise SystemExit(
            f"backfill {args[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return wall, proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    psql = shutil.which("psql")
    with bench_database() as (work, dsn, where):
        version = anyio.run(_server_version, dsn)
        print(
            f"rows: {args.rows:,} of ~250 bytes; batches of {BATCH:,}; server: PostgreSQL "
            f"{version} ({where})"
        )
        sql(
            dsn,
            f"""CREATE TABLE {TABLE} AS
                SELECT g::bigint AS id, g % 1000 AS tenant, repeat(md5(g::text), 6) AS payload,
                       'v1' AS version, now() AS updated_at
                FROM generate_series(1, {args.rows}) AS g""",
            f"ALTER TABLE {TABLE} ADD PRIMARY KEY (id)",
            f"CREATE TABLE before AS SELECT id, version FROM {TABLE}",
            "ALTER TABLE before ADD PRIMARY KEY (id)",
        )
        settle(dsn)
        plan = work / "plan.json"
        plan.write_text(
            json.dumps(
                {
                    "plan": {"name": "bench_rollback"},
                    "environments": {"staging": {"dsn": dsn}, "prod": {"dsn": dsn}},
                    "target": {"table": TABLE, "key": ["id"], "columns": ["version"]},
                    "discovery": {
                        "sql": f"SELECT id FROM {TABLE} WHERE version IS DISTINCT FROM 'v2'"
                    },
                    "apply": {"sql": f"UPDATE {TABLE} SET version = 'v2' WHERE id = ANY($1)"},
                    "batching": {"size": BATCH, "workers": 2, "statement_timeout": "10m"},
                }
            )
        )
        _, out = backfill(["apply", str(plan), "--env", "staging", "--quiet"], work, 3)
        m = re.search(r"run (\S+-[0-9a-f]{4})", out)
        if not m:
            raise SystemExit(f"no run id in:\n{out}")
        run_id = m.group(1)
        sql(
            dsn,
            f"CREATE TABLE applied AS SELECT id, version FROM {TABLE}",
            "ALTER TABLE applied ADD PRIMARY KEY (id)",
        )
        settle(dsn)
        rollback_file = next((work / "logs").rglob(f"{run_id}/staging/rollback_*.sql"))

        timings: dict[str, float] = {}
        verify_share: dict[int, tuple[float, float]] = {}
        timings["one-shot UPDATE … FROM a copy"] = anyio.run(
            _timed,
            dsn,
            f"UPDATE {TABLE} AS t SET version = b.version FROM before AS b "
            "WHERE t.id = b.id AND t.version IS DISTINCT FROM b.version",
        )
        check_restored(dsn)
        for workers in (1, 2):
            to_applied_state(dsn, run_id)
            wall, out = backfill(
                ["rollback", run_id, "--env", "staging", "--workers", str(workers)], work, 0
            )
            check_restored(dsn)
            timings[f"backfill rollback, {workers} worker(s), whole command"] = wall
            m = re.search(r"([\d.]+) s with \d+ worker\(s\), of which verification ([\d.]+) s", out)
            if m:
                verify_share[workers] = (float(m.group(1)), float(m.group(2)))
        if psql:
            to_applied_state(dsn, run_id)
            t0 = time.perf_counter()
            done = subprocess.run(
                [
                    psql,
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    dsn,
                    "-f",
                    str(rollback_file),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            timings["emitted rollback file, psql -f"] = time.perf_counter() - t0
            if done.returncode != 0:
                raise SystemExit(f"psql failed:\n{done.stderr}")
            check_restored(dsn)

        base = timings["one-shot UPDATE … FROM a copy"]
        print(f"\n{'method':<52} {'seconds':>8} {'rows/s':>10} {'vs one-shot':>12}")
        for name, secs in timings.items():
            print(f"{name:<52} {secs:8.2f} {args.rows / secs:10,.0f} {base / secs:11.2f}x")
        for workers, (total, verifying) in verify_share.items():
            print(
                f"  {workers} worker(s): restore + verification {total:.2f} s, of which "
                f"verification {verifying:.2f} s ({verifying / total:.0%})"
            )
        print("\ntargets:")
        two = timings["backfill rollback, 2 worker(s), whole command"]
        print(
            f"  runner rollback, 2 workers >= 0.5x one-shot: {base / two:.2f}x  "
            f"{'met' if base / two >= 0.5 else 'NOT met'}"
        )
        if "emitted rollback file, psql -f" in timings:
            f = timings["emitted rollback file, psql -f"]
            print(
                f"  psql file                  >= 0.3x one-shot: {base / f:.2f}x  "
                f"{'met' if base / f >= 0.3 else 'NOT met'}"
            )
        else:
            print("  psql file: psql not found on PATH, not measured")


async def _server_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
