"""The cost of splitting (#12): the same backfill with and without poison rows, side by side.

    uv run python bench/split_cost.py [--rows 1000000] [--poison 0.001] [--batch 1000]

Two fresh copies of one table of ~250-byte rows; in one, a share of the rows (`--poison`, spread
evenly) holds a value the apply cannot parse (SQLSTATE 22P02). `backfill apply` runs on each as an
operator runs it (its own process, unthrottled, the plan's defaults otherwise): on the poisoned
copy every batch holding a poison row fails, is halved down to single keys, and the poison keys
are quarantined. Printed: both times and their ratio. Set BACKFILL_BENCH_DSN to use another server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_support import bench_database, sql


def make_table(dsn: str, name: str, rows: int, every: int | None) -> None:
    poison = f"CASE WHEN g % {every} = 0 THEN 'abc' ELSE g::text END" if every else "g::text"
    sql(
        dsn,
        f"DROP TABLE IF EXISTS {name}",
        f"""CREATE TABLE {name} AS
            SELECT g::bigint AS id, g % 1000 AS tenant, repeat(md5(g::text), 6) AS payload,
                   {poison} AS raw, 'v1' AS version, now() AS updated_at
            FROM generate_series(1, {rows}) AS g""",
        f"ALTER TABLE {name} ADD PRIMARY KEY (id)",
        f"VACUUM ANALYZE {name}",
        "CHECKPOINT",
    )


def runner_apply(dsn: str, table: str, batch: int, workdir: Path) -> dict[str, Any]:
    """`backfill apply` in its own process; wall time, batch-loop time, rows changed, keys
    quarantined, batches split."""
    plan = {
        "plan": {"name": f"bench_{table}"},
        "environments": {"staging": {"dsn": dsn}, "prod": {"dsn": dsn}},
        "target": {"table": table, "key": ["id"], "columns": ["version"]},
        "discovery": {"sql": f"SELECT id FROM {table} WHERE version IS DISTINCT FROM 'v2'"},
        "apply": {
            "sql": f"UPDATE {table} SET version = 'v' || (raw::int * 0 + 2)::text "
            "WHERE id = ANY($1)"
        },
        "batching": {"size": batch, "statement_timeout": "10m"},
    }
    path = workdir / f"{table}.json"
    path.write_text(json.dumps(plan))
    env = {**os.environ, "BACKFILL_LOGS": str(workdir / "logs"), "BACKFILL_ACTOR": "bench"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "apply", str(path), "--env", "staging", "--quiet"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 3:
        raise SystemExit(f"runner failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    run_dir = next((workdir / "logs").rglob(f"bench_{table}/*/staging"))
    data = json.loads((run_dir / "execution_results.json").read_text())
    statuses: dict[str, int] = {}
    for f in run_dir.glob("batches/batch_*.json"):
        status = json.loads(f.read_text())["status"]
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "wall": wall,
        "loop": data["timing"]["elapsed_seconds"],
        "changed": data["totals"]["changed"],
        "quarantined": data.get("quarantine", {}).get("quarantined", 0),
        "statuses": statuses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--poison", type=float, default=0.001, help="share of rows that fail")
    ap.add_argument("--batch", type=int, default=1000, help="batching.size (the plan default)")
    args = ap.parse_args()
    every = round(1 / args.poison)
    with bench_database() as (work, dsn, where):
        print(
            f"rows: {args.rows:,} of ~250 bytes; batches of {args.batch:,}; poison: every "
            f"{every:,}th row ({args.rows // every:,} rows); server: {where}"
        )
        make_table(dsn, "t_clean", args.rows, None)
        clean = runner_apply(dsn, "t_clean", args.batch, work)
        make_table(dsn, "t_poison", args.rows, every)
        poison = runner_apply(dsn, "t_poison", args.batch, work)
        assert clean["changed"] == args.rows, clean
        assert poison["changed"] == args.rows - args.rows // every, poison
        assert poison["quarantined"] == args.rows // every, poison
        print(f"\n{'run':<34} {'loop s':>8} {'command s':>10} {'rows/s':>10}  batches")
        for name, r in (("without poison", clean), ("with poison (split, quarantine)", poison)):
            batches = ", ".join(f"{n:,} {s}" for s, n in sorted(r["statuses"].items()))
            print(
                f"{name:<34} {r['loop']:8.2f} {r['wall']:10.2f} "
                f"{r['changed'] / r['loop']:10,.0f}  {batches}"
            )
        print(
            f"\nratio, poisoned / clean: batch loop {poison['loop'] / clean['loop']:.2f}x, "
            f"whole command {poison['wall'] / clean['wall']:.2f}x "
            f"({poison['quarantined']:,} keys quarantined)"
        )


if __name__ == "__main__":
    main()
