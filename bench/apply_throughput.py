"""Apply throughput and memory, measured side by side in one run (DESIGN.md, performance model).

    uv run python bench/apply_throughput.py [--rows 1000000] [--rss-rows 1000000,3000000]

Every method updates the same fresh copy of a table of ~250-byte rows. Printed as ratios:
throughput against the one-shot UPDATE (1.0x) and against the hand-written keyset loop that
captures before-images in the same statement. The runner is run as an operator runs it (its own
process, unthrottled) and its peak RSS is sampled while it works. Set BACKFILL_BENCH_DSN to use
another server instead of the embedded one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psutil  # type: ignore[import-untyped]
import statement_profile
from bench_support import bench_database, server_cpu, sql

ROOT = Path(__file__).resolve().parent.parent
BATCH = 10_000


def make_source(dsn: str, rows: int) -> None:
    sql(
        dsn,
        "DROP TABLE IF EXISTS source",
        f"""CREATE UNLOGGED TABLE source AS
            SELECT g::bigint AS id, g % 1000 AS tenant, repeat(md5(g::text), 6) AS payload,
                   'v1' AS version, now() AS updated_at
            FROM generate_series(1, {rows}) AS g""",
    )


def fresh_copy(dsn: str, name: str) -> None:
    sql(
        dsn,
        f"DROP TABLE IF EXISTS {name}",
        f"CREATE TABLE {name} AS SELECT * FROM source",
        f"ALTER TABLE {name} ADD PRIMARY KEY (id)",
        f"VACUUM ANALYZE {name}",
        "CHECKPOINT",
    )


async def one_shot(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.perf_counter()
        await conn.execute(
            "UPDATE t_oneshot SET version = 'v2' WHERE version IS DISTINCT FROM 'v2'"
        )
        return time.perf_counter() - t0
    finally:
        await conn.close()


HAND_LOOP = """
WITH old AS (
    SELECT id, version FROM t_hand
    WHERE id > $1 AND version IS DISTINCT FROM 'v2' ORDER BY id LIMIT $2 FOR UPDATE
), upd AS (
    -- bounded to the batch's key range: an unbounded join may merge-join from the start of the
    -- primary key index, a cost that grows with progress
    UPDATE t_hand AS t SET version = 'v2' FROM old
    WHERE t.id = old.id AND t.id > $1 AND t.id <= (SELECT max(id) FROM old)
    RETURNING t.id, old.version
), ins AS (
    INSERT INTO hand_images (id, before) SELECT id, version FROM upd RETURNING id
)
SELECT max(id) FROM ins
"""


async def hand_loop(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS hand_images; CREATE TABLE hand_images (id bigint, before text)"
        )
        t0 = time.perf_counter()
        cursor = 0
        while True:
            async with conn.transaction():
                last = await conn.fetchval(HAND_LOOP, cursor, BATCH)
            if last is None:
                break
            cursor = last
        return time.perf_counter() - t0
    finally:
        await conn.close()


def runner_apply(dsn: str, table: str, workers: int, workdir: Path) -> dict[str, Any]:
    """`backfill apply` in its own process, unthrottled; wall time, batch-loop time and peak RSS."""
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
    t0 = time.perf_counter()
    proc = psutil.Popen(
        [sys.executable, "-m", "runner", "apply", str(path), "--env", "staging", "--quiet"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak = 0
    cpu = 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
            t = proc.cpu_times()
            cpu = t.user + t.system  # the last reading before it exits
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 3:
        raise SystemExit(f"runner failed ({proc.returncode}):\n{out.decode()}\n{err.decode()}")
    results = next((workdir / "logs").rglob(f"bench_{table}/*/staging/execution_results.json"))
    data = json.loads(results.read_text())
    results.unlink()
    batch_files = sorted(results.parent.glob("batches/batch_*.json"))
    per_batch = [json.loads(f.read_text())["duration_ms"] for f in batch_files]
    for f in batch_files:
        f.unlink()
    return {
        "per_batch_ms": per_batch,
        "wall": wall,
        "loop": data["timing"]["elapsed_seconds"],
        "rss": peak,
        "runner_cpu": cpu,
        "counting": data["timing"]["counting_seconds"],
        "changed": data["totals"]["changed"],
    }


def _flatness(ms: list[float]) -> str:
    """Mean batch time over the first, middle and last tenth of the run: flat means keyset
    discovery and the span checks do not grow with progress."""
    if len(ms) < 10:
        return "(too few batches)"
    tenth = len(ms) // 10
    parts = {
        "start": ms[:tenth],
        "middle": ms[len(ms) // 2 - tenth // 2 : len(ms) // 2 + tenth - tenth // 2],
        "end": ms[-tenth:],
    }
    means = {k: sum(v) / len(v) for k, v in parts.items()}
    shown = ", ".join(f"{k} {v:.0f}" for k, v in means.items())
    return f"{shown}; end/start {means['end'] / means['start']:.2f}x"


def _statements(dsn: str, work: Path, where: str, rows: int, server_log: Path | None) -> None:
    """One more hand loop and runner (1 worker), every statement logged: the server's time per
    batch, by kind of statement (statement_profile)."""
    log = work / "pg" / "pgdata" / "log" if where == "embedded" else server_log
    if log is None:
        print("\n(--statements on BACKFILL_BENCH_DSN needs --server-log: the server's log file)")
        return
    batches = -(-rows // BATCH)
    fresh_copy(dsn, "t_hand")
    with statement_profile.logged(dsn, "backfill_bench", log) as read:
        anyio.run(hand_loop, dsn)
        hand = read()
    fresh_copy(dsn, "t_profiled")
    with statement_profile.logged(dsn, "backfill_bench", log) as read:
        runner_apply(dsn, "t_profiled", 1, work)
        runner = read()
    print(
        "\nwhere the server's time goes, per batch (statement durations from the server's log;"
        "\nthe rollback file's, the manifest's, the convergence check's and discovery's"
        "\nstatements run beside the batches, on other connections):"
    )
    for line in statement_profile.table(
        {"hand loop": (hand, batches), "backfill 1w": (runner, batches)}
    ):
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument(
        "--rss-rows", default="1000000,3000000", help="table sizes for the RSS comparison"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every method, alternating; the figures are their medians",
    )
    ap.add_argument(
        "--statements",
        action="store_true",
        help="then profile the hand loop and the runner (1 worker) by the server's statement "
        "durations (read from the embedded server's log, or --server-log's)",
    )
    ap.add_argument(
        "--server-log",
        type=Path,
        help="with BACKFILL_BENCH_DSN and --statements: that server's log file (readable here)",
    )
    args = ap.parse_args()
    with bench_database() as (work, dsn, where):
        print(f"rows: {args.rows:,} of ~250 bytes; batches of {BATCH:,}; server: {where}")
        if args.repeat > 1:
            print(f"medians of {args.repeat} rounds, the methods alternating in each")
        make_source(dsn, args.rows)
        # CPU seconds of the database server (every process of it: backends, WAL writer,
        # checkpointer) and of the client, per method: what a method costs the machine
        cpu_samples: dict[str, list[tuple[float, float, float]]] = {}
        datadir = work / "pg"

        def measured(name: str, fn: Any) -> Any:
            s0, c0 = server_cpu(datadir), time.process_time()
            out = fn()
            wall = out if isinstance(out, float) else out["wall"]
            client = time.process_time() - c0 if isinstance(out, float) else out["runner_cpu"]
            cpu_samples.setdefault(name, []).append((wall, server_cpu(datadir) - s0, client))
            return out

        one_shots, hands = [], []
        samples: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for _ in range(args.repeat):
            fresh_copy(dsn, "t_oneshot")
            one_shots.append(measured("one-shot UPDATE", lambda: anyio.run(one_shot, dsn)))
            fresh_copy(dsn, "t_hand")
            hands.append(
                measured("hand-written keyset loop + images", lambda: anyio.run(hand_loop, dsn))
            )
            for workers in (1, 2):
                name = f"t_runner{workers}"
                fresh_copy(dsn, name)
                r = measured(
                    f"backfill apply, {workers} worker(s), whole command",
                    lambda name=name, workers=workers: runner_apply(dsn, name, workers, work),
                )
                assert r["changed"] == args.rows
                samples[workers].append(r)
        timings: dict[str, float] = {
            "one-shot UPDATE": statistics.median(one_shots),
            "hand-written keyset loop + images, 1 conn": statistics.median(hands),
        }
        runs = {
            w: {k: statistics.median(r[k] for r in rs) for k in ("loop", "wall", "counting")}
            for w, rs in samples.items()
        }
        cpu = {
            name: tuple(statistics.median(x[i] for x in xs) for i in range(3))
            for name, xs in cpu_samples.items()
        }
        for workers in (1, 2):
            timings[f"backfill apply, {workers} worker(s), batch loop"] = runs[workers]["loop"]
            timings[f"  of which the count before the first batch ({workers})"] = runs[workers][
                "counting"
            ]
            timings[f"backfill apply, {workers} worker(s), whole command"] = runs[workers]["wall"]
        base = timings["one-shot UPDATE"]
        hand = timings["hand-written keyset loop + images, 1 conn"]
        print(
            f"\n{'method':<58} {'seconds':>8} {'rows/s':>10} {'vs one-shot':>12} {'vs hand loop':>13}"
        )
        for name, secs in timings.items():
            if name.startswith("  "):  # a part of the row above: seconds only
                print(f"{name:<58} {secs:8.2f}")
                continue
            print(
                f"{name:<58} {secs:8.2f} {args.rows / secs:10,.0f} {base / secs:11.2f}x {hand / secs:12.2f}x"
            )
        r1, r2 = runs[1]["loop"], runs[2]["loop"]
        w1, w2 = runs[1]["wall"], runs[2]["wall"]
        print("\ntargets (batch loop: from the count before the first batch to the last commit")
        print("and its convergence check; whole command: the process from start to exit, with")
        print("start-up, the rollback file, the manifest and the reports):")
        for label, ratio, target in (
            ("batch loop,    1 worker  vs hand loop", hand / r1, 0.9),
            ("batch loop,    2 workers vs one-shot ", base / r2, 1.0),
            ("whole command, 1 worker  vs hand loop", hand / w1, 0.9),
            ("whole command, 2 workers vs one-shot ", base / w2, 1.0),
        ):
            print(
                f"  {label}: {ratio:.2f}x  (target >= {target}x: {'met' if ratio >= target else 'NOT met'})"
            )
        for workers in (1, 2):
            r = runs[workers]
            print(
                f"  whole command, {workers} worker(s): {r['wall'] - r['loop']:.2f} s beside the batch loop"
            )
        if where == "embedded":
            cores = psutil.cpu_count() or 1
            print(f"\nwhere the CPU went ({cores} cores; server: the database's processes):")
            print(
                f"  {'method':<50} {'wall s':>7} {'server CPU s':>13} {'client CPU s':>13} {'server busy':>12}"
            )
            for name, (wall, server, client) in cpu.items():
                print(
                    f"  {name:<50} {wall:7.2f} {server:13.2f} {client:13.2f} {server / (cores * wall):>12.0%}"
                )
            floor = cpu["backfill apply, 2 worker(s), whole command"][1] / cores
            print(
                f"  the runner's server CPU over {cores} cores: {floor:.2f} s, against the one-shot's "
                f"{base:.2f} s wall: at best {base / floor:.2f}x the one-shot on this machine"
            )
        if args.statements:
            _statements(dsn, work, where, args.rows, args.server_log)
        print("\npeak RSS of `backfill apply` (1 worker):")
        rss = {}
        for n in [int(x) for x in args.rss_rows.split(",") if x]:
            make_source(dsn, n)
            fresh_copy(dsn, "t_rss")
            r = runner_apply(dsn, "t_rss", 1, work)
            rss[n] = r["rss"]
            print(f"  {n:>10,} rows: {r['rss'] / 2**20:7.1f} MiB  ({r['wall']:.1f} s)")
            print(f"  {'':>10}       per-batch ms {_flatness(r['per_batch_ms'])}")
        if len(rss) > 1:
            sizes = sorted(rss)
            growth = rss[sizes[-1]] / rss[sizes[0]]
            print(
                f"  RSS {sizes[-1] // sizes[0]}x the rows: {growth:.2f}x the memory; "
                f"target < 200 MiB and flat: {'met' if max(rss.values()) < 200 * 2**20 and growth < 1.3 else 'NOT met'}"
            )


if __name__ == "__main__":
    main()
