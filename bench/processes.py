"""Throughput with several runner processes on one run (#15), measured side by side in one run.

    uv run python bench/processes.py [--rows 1000000] [--processes 1,2,4] [--workers 2]

Each case applies the same fresh copy of a table of ~250-byte rows: one `backfill apply` leads,
the others join it with `--run` as soon as it has started its stage (each its own OS process,
`workers` batch connections each, unthrottled). Printed per case: wall time from the leader's
start to the last process's end, rows per second, the ratio to one process, the batches each
process committed (from the ledger), and where the CPU went: the runner processes' CPU seconds
against the database server's over the same interval (psutil). When the server's CPU is near
the machine's cores x wall time, the database, not the runner, is the limit. Set
BACKFILL_BENCH_DSN to use another server (its CPU is then not measured).
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

import anyio
import asyncpg
import psutil  # type: ignore[import-untyped]
from apply_throughput import fresh_copy, make_source
from bench_support import bench_database, server_cpu

BATCH = 5_000


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    return anyio.run(_fetch, dsn, query, *args)


def _started_run(dsn: str, table: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        try:
            rows = fetch(
                dsn,
                "SELECT w.run_id FROM backfill.work w JOIN backfill.runs r USING (run_id)"
                " WHERE r.target_table LIKE $1 AND NOT w.done",
                f"%{table}",
            )
        except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
            rows = []
        if rows:
            return str(rows[0]["run_id"])
        time.sleep(0.02)
    raise SystemExit(f"the leader on {table} did not start its stage")


def case(dsn: str, table: str, processes: int, workers: int, workdir: Path) -> dict[str, Any]:
    plan = {
        "plan": {"name": f"bench_{table}"},
        "environments": {"staging": {"dsn": dsn}, "prod": {"dsn": dsn}},
        "target": {"table": table, "key": ["id"], "columns": ["version"]},
        "discovery": {"sql": f"SELECT id FROM {table} WHERE version IS DISTINCT FROM 'v2'"},
        "apply": {"sql": f"UPDATE {table} SET version = 'v2' WHERE id = ANY($1)"},
        "batching": {"size": BATCH, "workers": workers, "statement_timeout": "10m"},
    }
    path = workdir / f"{table}.json"
    path.write_text(json.dumps(plan))
    env = {**os.environ, "BACKFILL_LOGS": str(workdir / "logs"), "BACKFILL_ACTOR": "bench"}
    command = [sys.executable, "-m", "runner", "apply", str(path), "--env", "staging", "--quiet"]
    server0 = server_cpu(workdir)
    t0 = time.perf_counter()
    procs = [
        psutil.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ]
    if processes > 1:
        run_id = _started_run(dsn, table, time.monotonic() + 60)
        procs += [
            psutil.Popen(
                [*command, "--run", run_id],
                cwd=workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(processes - 1)
        ]
    runner_cpu = 0.0
    running = list(procs)
    while running:
        for p in list(running):
            if p.poll() is not None:
                running.remove(p)
            else:
                try:  # the last reading before it exits
                    t = p.cpu_times()
                    p.last_cpu = t.user + t.system  # type: ignore[attr-defined]
                except psutil.NoSuchProcess:
                    running.remove(p)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    server_seconds = server_cpu(workdir) - server0
    for i, p in enumerate(procs):
        out, err = p.communicate()
        # a joiner that arrives after the leader finished finds the stage done (exit 3 too)
        expected = (3,) if i == 0 else (0, 3)
        if p.returncode not in expected:
            raise SystemExit(
                f"process {i} failed ({p.returncode}):\n{out.decode()}\n{err.decode()}"
            )
        runner_cpu += getattr(p, "last_cpu", 0.0)
    per_process = fetch(
        dsn,
        "SELECT process, count(*) AS n, sum(changed) AS changed FROM backfill.batches"
        " WHERE run_id = (SELECT run_id FROM backfill.runs WHERE target_table LIKE $1)"
        " AND status = 'done' GROUP BY process ORDER BY n DESC",
        f"%{table}",
    )
    changed = sum(int(r["changed"]) for r in per_process)
    return {
        "processes": processes,
        "wall": wall,
        "changed": changed,
        "batches": [int(r["n"]) for r in per_process],
        "runner_cpu": runner_cpu,
        "server_cpu": server_seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--processes", default="1,2,4")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    cores = psutil.cpu_count() or 1
    with bench_database() as (workdir, dsn, where):
        make_source(dsn, args.rows)
        print(
            f"{args.rows:,} rows, batches of {BATCH:,}, {args.workers} worker(s) per process, "
            f"server: {where}, {cores} core(s)"
        )
        results = []
        for n in counts:
            table = f"t_p{n}"
            fresh_copy(dsn, table)
            r = case(dsn, table, n, args.workers, workdir)
            if r["changed"] != args.rows:
                raise SystemExit(f"{n} process(es) changed {r['changed']:,} of {args.rows:,} rows")
            results.append(r)
        base = results[0]["changed"] / results[0]["wall"]
        print(
            f"{'processes':>9} {'wall s':>8} {'rows/s':>10} {'vs 1':>6} {'runner CPU s':>13} "
            f"{'server CPU s':>13} {'server busy':>12} {'machine busy':>13}  batches per process"
        )
        for r in results:
            rate = r["changed"] / r["wall"]
            capacity = cores * r["wall"]
            server = f"{r['server_cpu'] / capacity:>12.0%}" if where == "embedded" else "n/a"
            machine = (
                f"{(r['server_cpu'] + r['runner_cpu']) / capacity:>13.0%}"
                if where == "embedded"
                else "n/a"
            )
            print(
                f"{r['processes']:>9} {r['wall']:>8.1f} {rate:>10,.0f} {rate / base:>5.2f}x "
                f"{r['runner_cpu']:>13.1f} {r['server_cpu']:>13.1f} {server} {machine}  "
                f"{', '.join(str(b) for b in r['batches'])}"
            )
        print(
            "server busy = the database server's CPU seconds over cores x wall time; machine busy "
            "adds the runners' (all on this machine): near 100 %, the machine is the limit, and "
            "the larger share says whether the database or the runner spends it"
        )


if __name__ == "__main__":
    main()
