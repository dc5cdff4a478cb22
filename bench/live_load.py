"""What a running backfill costs the application beside it (issue #13), in one run on one server.

    uv run python bench/live_load.py [--rows 1000000] [--seconds 20] [--clients 4] [--scale 10]

pgbench (TPC-B-like) runs alone, then again (in runs of the same length, one after another,
for as long as the backfill takes) while `backfill apply` updates a table of 1M ~250-byte rows,
unthrottled, with the default guards. Printed: pgbench's TPS and p99 latency over the seconds the
backfill ran, as ratios of the solo runs (one before, one after the backfill's vacuum and
checkpoint: their mean), its failed transactions, and whether the backfill finished (what held
it, and how long it yielded to the busy sessions). The target (README): TPS >= 0.8x solo, 0
failed transactions.
Set BACKFILL_BENCH_DSN to use another server instead of the embedded one; PGBENCH names the
pgbench binary (default: on PATH, else /usr/bin/pgbench).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from bench_support import bench_database, sql

BATCH = 5_000


def pgbench_binary() -> str:
    return os.environ.get("PGBENCH") or shutil.which("pgbench") or "/usr/bin/pgbench"


def make_target(dsn: str, rows: int) -> None:
    sql(
        dsn,
        "DROP TABLE IF EXISTS target",
        f"""CREATE TABLE target AS
            SELECT g::bigint AS id, g % 1000 AS tenant, repeat(md5(g::text), 6) AS payload,
                   'v1' AS version, now() AS updated_at
            FROM generate_series(1, {rows}) AS g""",
        "ALTER TABLE target ADD PRIMARY KEY (id)",
        "VACUUM ANALYZE target",
        "CHECKPOINT",
    )


def pgbench_start(
    dsn: str, work: Path, label: str, seconds: int, clients: int
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            pgbench_binary(),
            "-n",
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-T",
            str(seconds),
            "--log",
            f"--log-prefix={work / f'pgbench_{label}'}",
            dsn,
        ],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pgbench_failed(proc: subprocess.Popen[str]) -> int:
    """Wait for one pgbench run; its failed transactions."""
    out, err = proc.communicate()
    if proc.returncode not in (0, 2):  # 2: some transactions failed (reported below)
        raise SystemExit(f"pgbench failed ({proc.returncode}):\n{out}\n{err}")
    failed = re.search(r"number of failed transactions: (\d+)", out)
    return int(failed.group(1)) if failed else 0


class PgbenchBeside:
    """pgbench in runs of `chunk` seconds, one after another, until stopped: it covers a
    backfill of any length (pgbench cannot be stopped early without losing its log's tail)."""

    def __init__(self, dsn: str, work: Path, clients: int, chunk: int) -> None:
        self.dsn, self.work, self.clients, self.chunk = dsn, work, clients, chunk
        self.stop = threading.Event()
        self.failed = 0
        self.runs = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            proc = pgbench_start(
                self.dsn, self.work, f"beside{self.runs}", self.chunk, self.clients
            )
            self.runs += 1
            self.failed += pgbench_failed(proc)

    def __enter__(self) -> PgbenchBeside:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def pgbench_result(
    work: Path, label: str, failed: int, window: tuple[float, float] | None = None
) -> dict[str, Any]:
    """TPS, p99 latency (ms) and failures, from pgbench's per-transaction logs (every run whose
    log prefix starts with `label`): over the whole run, or over `window` (epoch seconds)."""
    done: list[tuple[float, float]] = []  # (completed at, latency ms)
    for log in work.glob(f"pgbench_{label}*.*"):
        for line in log.read_text().splitlines():
            f = line.split()
            if len(f) >= 6 and f[2].isdigit():
                done.append((int(f[4]) + int(f[5]) / 1e6, int(f[2]) / 1000.0))
        log.unlink()
    if window is None:
        window = (
            min(t for t, _ in done) if done else 0.0,
            max(t for t, _ in done) if done else 0.0,
        )
    inside = sorted(ms for t, ms in done if window[0] <= t <= window[1])
    span = max(window[1] - window[0], 1e-6)
    return {
        "tps": len(inside) / span,
        "p99_ms": inside[min(len(inside) - 1, int(len(inside) * 0.99))] if inside else 0.0,
        "transactions": len(inside),
        "seconds": span,
        "failed": failed,
    }


def start_backfill(dsn: str, work: Path) -> subprocess.Popen[bytes]:
    plan = {
        "plan": {"name": "bench_live"},
        "environments": {"staging": {"dsn": dsn}, "prod": {"dsn": dsn}},
        "target": {"table": "target", "key": ["id"], "columns": ["version"]},
        "discovery": {"sql": "SELECT id FROM target WHERE version IS DISTINCT FROM 'v2'"},
        "apply": {"sql": "UPDATE target SET version = 'v2' WHERE id = ANY($1)"},
        "batching": {"size": BATCH, "statement_timeout": "10m"},
    }
    path = work / "live.json"
    path.write_text(json.dumps(plan))
    env = {**os.environ, "BACKFILL_LOGS": str(work / "logs"), "BACKFILL_ACTOR": "bench"}
    with (work / "backfill.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "runner", "apply", str(path), "--env", "staging", "--quiet"],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def committed(dsn: str) -> int:
    async def go() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            if not await conn.fetchval("SELECT to_regclass('backfill.batches') IS NOT NULL"):
                return 0
            return int(await conn.fetchval("SELECT count(*) FROM backfill.batches"))
        finally:
            await conn.close()

    return int(anyio.run(go))


def held_and_yielded(dsn: str) -> tuple[dict[str, float], tuple[float, int, float]]:
    """Seconds held by signal; seconds yielded to busy sessions, batches that waited, the
    largest factor."""

    async def go() -> tuple[dict[str, float], tuple[float, int, float]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT signal, sum(extract(epoch FROM last_seen_at - started_at))::float8 AS s"
                " FROM backfill.guard_holds GROUP BY 1 ORDER BY 2 DESC"
            )
            y = await conn.fetchrow(
                "SELECT coalesce(sum(seconds), 0) AS s, coalesce(sum(batches), 0) AS b,"
                " coalesce(max(max_factor), 0) AS f FROM backfill.yields"
            )
            return {r["signal"]: float(r["s"]) for r in rows}, (
                float(y["s"]),
                int(y["b"]),
                float(y["f"]),
            )
        finally:
            await conn.close()

    return anyio.run(go)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--scale", type=int, default=10)
    args = ap.parse_args()
    with bench_database() as (work, dsn, where):
        print(
            f"server: {where}; pgbench scale {args.scale}, {args.clients} clients, {args.seconds} s"
        )
        subprocess.run(
            [pgbench_binary(), "-i", "-q", "-s", str(args.scale), dsn],
            check=True,
            capture_output=True,
        )
        make_target(dsn, args.rows)
        before_run = pgbench_start(dsn, work, "solo_before", args.seconds, args.clients)
        before = pgbench_result(work, "solo_before", pgbench_failed(before_run))

        # pgbench first (its connections are in place), then the backfill; the comparison is
        # over the time both ran: from the backfill's start to its end
        with PgbenchBeside(dsn, work, args.clients, args.seconds) as beside_runs:
            time.sleep(1.0)
            started = time.time()
            backfill = start_backfill(dsn, work)
            while backfill.poll() is None:
                time.sleep(0.05)
            ended = time.time()
        code = backfill.returncode
        beside = pgbench_result(work, "beside", beside_runs.failed, (started, ended))
        # solo again after: the machine's own drift over the run shows, and the baseline is
        # the mean of the two solo runs; the backfill's vacuum and checkpoint are paid first,
        # so that the run after does not pay them
        sql(dsn, "VACUUM target", "CHECKPOINT")
        after_run = pgbench_start(dsn, work, "solo_after", args.seconds, args.clients)
        after = pgbench_result(work, "solo_after", pgbench_failed(after_run))
        solo = {k: (before[k] + after[k]) / 2 for k in ("tps", "p99_ms", "transactions", "seconds")}
        solo["failed"] = before["failed"] + after["failed"]
        log = (work / "backfill.log").read_text()
        results = next((work / "logs").rglob("execution_results.json"), None)
        data = json.loads(results.read_text()) if results else {}
        held, (yielded, waited, most) = held_and_yielded(dsn)

    totals = data.get("totals", {})
    for label, run in (("before", before), ("after", after)):
        print(
            f"  pgbench solo {label + ':':7}  {run['tps']:,.0f} tps, p99 {run['p99_ms']:.1f} ms, "
            f"{run['failed']} failed of {run['transactions']:,} ({run['seconds']:.1f} s)"
        )
    print(
        f"  pgbench beside apply:  {beside['tps']:,.0f} tps, p99 {beside['p99_ms']:.1f} ms, "
        f"{beside['failed']} failed ({beside['transactions']:,} transactions in the "
        f"{beside['seconds']:.1f} s the backfill ran)"
    )
    print(f"  pgbench solo (mean):   {solo['tps']:,.0f} tps, p99 {solo['p99_ms']:.1f} ms")
    tps_ratio = beside["tps"] / solo["tps"] if solo["tps"] else 0.0
    p99_ratio = beside["p99_ms"] / solo["p99_ms"] if solo["p99_ms"] else 0.0
    print(
        f"  TPS ratio (beside/solo): {tps_ratio:.2f}x  target >= 0.8x: "
        f"{'met' if tps_ratio >= 0.8 else 'NOT met'}"
    )
    print(f"  p99 latency ratio:       {p99_ratio:.2f}x")
    print(
        f"  failed transactions:     {beside['failed']}  target 0: "
        f"{'met' if beside['failed'] == 0 else 'NOT met'}"
    )
    print(
        f"  backfill: exit {code} ({'finished' if code == 3 else 'did NOT finish'}), "
        f"{totals.get('changed', 0):,} rows in {totals.get('batches', 0)} batches, "
        f"{ended - started:.1f} s as a command ({data.get('timing', {}).get('elapsed_seconds', 0):.1f} s "
        "batch loop)"
    )
    print(
        "  held by guards: " + (", ".join(f"{s} {sec:.1f} s" for s, sec in held.items()) or "never")
    )
    print(
        f"  yielded to busy sessions: {yielded:.1f} s after {waited} batches "
        f"(at most {most:.1f}x the batch time; guards.yield_to_busy)"
    )
    if code != 3:
        print(log[-2000:])


if __name__ == "__main__":
    main()
