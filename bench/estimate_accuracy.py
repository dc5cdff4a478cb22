"""How close the dry run's duration estimate comes to the apply it predicts (issue #14).

    uv run python bench/estimate_accuracy.py [--rows 200000] [--workers 1]

`backfill apply --dry-run` times one sample batch (run and rolled back) and estimates
T = batches x the sample's time per row x batch size / workers; then `backfill apply` runs for
real on the same table. Printed: the estimate, the batch loop's measured time and their ratio,
beside the target (within 2x either way). Set BACKFILL_BENCH_DSN to use another server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_support import bench_database, sql

BATCH = 2_000


def _runner(args: list[str], workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BACKFILL_LOGS": str(workdir / "logs"), "BACKFILL_ACTOR": "bench"}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    with bench_database() as (workdir, dsn, server):
        sql(
            dsn,
            "DROP TABLE IF EXISTS target",
            f"""CREATE TABLE target AS
                SELECT g::bigint AS id, repeat(md5(g::text), 6) AS payload, 'v1' AS version,
                       now() - g * interval '1 minute' AS created_at
                FROM generate_series(1, {args.rows}) AS g""",
            "ALTER TABLE target ADD PRIMARY KEY (id)",
            "VACUUM ANALYZE target",
        )
        plan = {
            "plan": {"name": "bench_estimate"},
            "environments": {"staging": {"dsn": dsn}, "prod": {"dsn": dsn}},
            "target": {"table": "target", "key": ["id"], "columns": ["version"]},
            "discovery": {
                "sql": "SELECT id FROM target WHERE version IS DISTINCT FROM 'v2'",
                "time_column": "created_at",
            },
            "apply": {"sql": "UPDATE target SET version = 'v2' WHERE id = ANY($1)"},
            "batching": {"size": BATCH, "workers": args.workers, "statement_timeout": "10m"},
        }
        path = workdir / "plan.json"
        path.write_text(json.dumps(plan))
        dry = _runner(["apply", str(path), "--env", "staging", "--dry-run"], workdir)
        if dry.returncode != 0:
            raise SystemExit(dry.stdout + dry.stderr)
        m = re.search(r"estimated duration: about ([\d,]+) s", dry.stdout)
        if not m:
            raise SystemExit("no estimate in:\n" + dry.stdout)
        estimate = float(m.group(1).replace(",", ""))
        t0 = time.perf_counter()
        real = _runner(["apply", str(path), "--env", "staging", "--quiet"], workdir)
        wall = time.perf_counter() - t0
        if real.returncode != 3:
            raise SystemExit(real.stdout + real.stderr)
        results = next((workdir / "logs").rglob("execution_results.json"))
        loop = json.loads(results.read_text())["timing"]["elapsed_seconds"]
        ratio = estimate / loop if loop else float("inf")
        within = 0.5 <= ratio <= 2.0
        print(
            f"rows: {args.rows:,}; batches of {BATCH:,}; {args.workers} worker(s); server: {server}"
        )
        print("dry run:")
        for line in dry.stdout.splitlines():
            if any(w in line for w in ("size:", "created_at:", "sample batch:", "estimated")):
                print(f"  {line.strip()}")
        print(
            f"estimate {estimate:,.0f} s; measured batch loop {loop:,.1f} s (whole command {wall:,.1f} s)"
        )
        print(
            f"estimate / measured: {ratio:.2f}x  (target: within 2x either way)  "
            + ("met" if within else "NOT met")
        )


if __name__ == "__main__":
    main()
