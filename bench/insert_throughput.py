"""Insert-style backfill throughput (#11): rows copied from a source table into a second table.

    uv run python bench/insert_throughput.py [--rows 1000000] [--workers 1] [--repeat 3]
        [--discovery anti-join,probe,watermark] [--profile OUT.svg|OUT.txt]

Each method copies every row of the same source table (~250-byte rows) into its own empty copy
table. The floor is a hand-written `INSERT … SELECT` keyset loop that also records the keys it
inserted (what the cheapest rollback needs: delete them again), one connection, one transaction
per batch. The runner runs a shaped plan ([[writes]] the copy table, insert only) as an operator
runs it: its own process, unthrottled; it also keeps a 64-bit digest of each inserted row (so a
rollback deletes only rows still as inserted), checks the scope by the write counters and writes
its ledger row, in the batch's transaction, and prepares the rollback file and manifest beside.
Three discoveries of the rows still to copy, as a plan would write them: `NOT EXISTS` in the copy
as an anti-join (which PostgreSQL runs as a merge anti-join reading the copy from its first key on
every page: quadratic), the same with `OFFSET 0` in the subquery (a per-row probe of the copy's
key index), and a watermark (source rows above the copy's highest key: the batches of such a run
commit in key order), the hand loop's own cursor kept in the data.
Target: runner (1 worker) >= 0.9x the hand loop.

Then the floor, once per discovery: the runner's own batch statement for the plan (insert, digests,
images, ledger row) run batch for batch beside the hand loop's on one connection, nothing else
running, as is and without its digests. No loop around that statement can do better than it: where
the floor is under 0.9x, the target is out of reach whatever the rest of the runner does.
Set BACKFILL_BENCH_DSN to use another server instead of the embedded one.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import anyio
import asyncpg
from bench_support import bench_database, run_backfill_apply, sql

BATCH = 10_000
COLUMNS = "id, tenant, payload, version, updated_at"


def make_source(dsn: str, rows: int) -> None:
    sql(
        dsn,
        "DROP TABLE IF EXISTS source",
        f"""CREATE TABLE source AS
            SELECT g::bigint AS id, g % 1000 AS tenant, repeat(md5(g::text), 6) AS payload,
                   'v1' AS version, now() AS updated_at
            FROM generate_series(1, {rows}) AS g""",
        "ALTER TABLE source ADD PRIMARY KEY (id)",
        "VACUUM ANALYZE source",
    )


def empty_copy(dsn: str, name: str) -> None:
    sql(
        dsn,
        f"DROP TABLE IF EXISTS {name}",
        f"CREATE TABLE {name} (LIKE source INCLUDING ALL)",
        "CHECKPOINT",
    )


HAND_BATCH = """
WITH batch AS (
    SELECT {columns} FROM source WHERE id > $1 ORDER BY id LIMIT $2
), ins AS (
    INSERT INTO {copy} ({columns}) SELECT {columns} FROM batch RETURNING id
), rec AS (
    INSERT INTO {keys} (id) SELECT id FROM ins RETURNING id
)
SELECT max(id) FROM rec
"""
HAND_LOOP = HAND_BATCH.format(columns=COLUMNS, copy="copy_hand", keys="hand_inserted")


async def hand_loop(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS hand_inserted; CREATE TABLE hand_inserted (id bigint)"
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


DISCOVERY = {
    # PostgreSQL plans this as a merge anti-join whose scan of the copy starts at its first key
    # on every page: each page reads the whole copy so far (quadratic)
    "anti-join": "SELECT s.id FROM source AS s WHERE NOT EXISTS "
    "(SELECT 1 FROM {copy} AS c WHERE c.id = s.id)",
    # OFFSET 0 keeps the subquery a per-row probe of the copy's key index (README, Performance)
    "probe": "SELECT s.id FROM source AS s WHERE NOT EXISTS "
    "(SELECT FROM {copy} AS c WHERE c.id = s.id OFFSET 0)",
    "watermark": "SELECT s.id FROM source AS s WHERE s.id > "
    "(SELECT coalesce(max(c.id), 0) FROM {copy} AS c)",
}


def insert_plan(dsn: str, copy: str, workers: int, discovery: str) -> dict[str, Any]:
    return {
        "plan": {"name": f"bench_{copy}"},
        "environments": {"staging": {"dsn": dsn}, "prod": {"dsn": dsn}},
        # the source is paged, never written; target.operations cannot be empty yet, so it
        # declares an update of one column that no statement makes
        "target": {"table": "source", "key": ["id"], "columns": ["version"]},
        "discovery": {"sql": DISCOVERY[discovery].format(copy=copy)},
        "apply": {
            "statements": [
                f"INSERT INTO {copy} ({COLUMNS}) SELECT {COLUMNS} FROM source WHERE id = ANY($1)"
            ]
        },
        "writes": [{"table": copy, "key": ["id"], "operations": ["insert"]}],
        "batching": {"size": BATCH, "workers": workers, "statement_timeout": "10m"},
        "guards": {"enabled": False},
    }


def _pair(
    dsn: str, work: Path, workers: int, discovery: str, rows: int, floor: bool
) -> tuple[float, dict[str, Any]]:
    """A hand loop, then the runner, from the same state of the server; both copies dropped.
    `floor`: then, before the run's ledger is dropped, the runner's batch statement alone
    (`statement_floor`)."""
    empty_copy(dsn, "copy_hand")
    hand = anyio.run(hand_loop, dsn)
    copy = f"copy_runner{workers}_{discovery.replace('-', '_')}"
    empty_copy(dsn, copy)
    plan = insert_plan(dsn, copy, workers, discovery)
    r = run_backfill_apply(plan, work)
    assert r["changed"] == rows, r
    sql(dsn, "DROP TABLE copy_hand", f"DROP TABLE {copy}")
    if floor:
        r["floor"] = anyio.run(statement_floor, dsn, plan, rows)
    sql(dsn, "DROP SCHEMA backfill CASCADE")
    return hand, r


# the digest each inserted row is recorded by (engine.shapes.row_digest), left out of the
# runner's statement to show what it costs
DIGEST = re.compile(r"hash_record_extended\(ROW\(.*?\), 0\)::text")


async def statement_floor(dsn: str, plan: dict[str, Any], rows: int) -> dict[str, float]:
    """The runner's batch statement alone against the hand loop's, batch for batch on one
    connection with nothing beside them (no discovery, checks, follower or Python between
    batches): what the runner's loop cannot beat. The runner's statement is the one it runs for
    the plan (engine.shapes, the direct path: insert, digests, images and ledger row), on run
    `plan`'s ledger (batch numbers past its own), once as is and once without its digest. The
    three take turns per batch, in alternating order; each writes its own copy. Seconds of
    each, summed over the batches."""
    from runner.engine.shapes import shaped_run  # noqa: PLC0415  (the bench's own imports first)
    from runner.engine.target import resolve_target  # noqa: PLC0415
    from runner.plan import Plan  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        run_id = await conn.fetchval(
            "SELECT run_id FROM backfill.runs WHERE plan_name = $1", plan["plan"]["name"]
        )
        statements: dict[str, str] = {}
        for name in ("floor_runner", "floor_nodigest"):
            await conn.execute(
                f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (LIKE source INCLUDING ALL)"
            )
            p = Plan.model_validate(insert_plan(dsn, name, 1, "watermark"))
            shape = await shaped_run(conn, p, await resolve_target(conn, p.target))
            assert shape.direct is not None, "not the direct path"
            (stmt,) = shape.direct
            params = stmt.params
            statements[name] = (
                stmt.sql if name == "floor_runner" else DIGEST.sub("NULL::text", stmt.sql)
            )
        assert statements["floor_nodigest"] != statements["floor_runner"], "no digest found"
        await conn.execute(
            "DROP TABLE IF EXISTS floor_hand, floor_keys; CREATE TABLE floor_hand (LIKE source "
            "INCLUDING ALL); CREATE TABLE floor_keys (id bigint); CHECKPOINT"
        )
        hand = HAND_BATCH.format(columns=COLUMNS, copy="floor_hand", keys="floor_keys")
        spent = {"hand": 0.0, "floor_runner": 0.0, "floor_nodigest": 0.0}
        for no, lo in enumerate(range(0, rows, BATCH)):
            keys = list(range(lo + 1, min(lo + BATCH, rows) + 1))
            order = list(spent) if no % 2 == 0 else list(reversed(spent))
            for name in order:
                t0 = time.perf_counter()
                async with conn.transaction():
                    if name == "hand":
                        await conn.fetchval(hand, lo, BATCH)
                    else:
                        values = {
                            "k0": keys,
                            "run_id": run_id,
                            "batch_no": 1_000_000 + 2 * no + (name == "floor_nodigest"),
                            "stage": "floor",
                            "first_key": [str(keys[0])],
                            "last_key": [str(keys[-1])],
                            "attempts": 1,
                            "errors": "[]",
                            "started_at": datetime.now(UTC),
                            "batch_size": len(keys),
                            "earlier": 0,
                        }
                        await conn.fetchval(statements[name], *(values[p] for p in params))
                spent[name] += time.perf_counter() - t0
        await conn.execute("DROP TABLE floor_hand, floor_keys, floor_runner, floor_nodigest")
        return spent
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", default="1", help="runner worker counts to measure, e.g. 1,2")
    ap.add_argument(
        "--discovery",
        default=",".join(DISCOVERY),
        help=f"the runner's discoveries to measure, of {', '.join(DISCOVERY)}",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="pairs (hand loop, then runner) per method; the figures are their medians and the "
        "ratio the median of the pairs' ratios",
    )
    ap.add_argument("--profile", type=Path, help="also run the 1-worker runner under py-spy")
    args = ap.parse_args()
    with bench_database() as (work, dsn, where):
        print(f"rows: {args.rows:,} of ~250 bytes; batches of {BATCH:,}; server: {where}")
        make_source(dsn, args.rows)
        sql(dsn, "SELECT count(*) FROM source")  # warm the cache for every method alike
        # each runner beside a hand loop of its own, run just before it in the same state of
        # the server (the copies of the pair before dropped, a checkpoint): a method measured
        # after another's million rows runs slower whatever it is
        print(f"\n{'method':<62} {'seconds':>8} {'rows/s':>10} {'vs hand loop':>13}")
        targets: list[str] = []
        for discovery in args.discovery.split(","):
            for workers in [int(w) for w in args.workers.split(",")]:
                pairs = [
                    _pair(dsn, work, workers, discovery, args.rows, workers == 1 and n == 0)
                    for n in range(args.repeat)
                ]
                hand = median(h for h, _ in pairs)
                loop = median(r["loop"] for _, r in pairs)
                wall = median(r["wall"] for _, r in pairs)
                name = f"backfill apply, {discovery}, {workers} worker(s)"
                for label, secs in [
                    ("hand-written INSERT … SELECT keyset loop + keys, 1 conn", hand),
                    (f"{name}, batch loop", loop),
                    (f"{name}, whole command", wall),
                ]:
                    print(f"{label:<62} {secs:8.2f} {args.rows / secs:10,.0f} {hand / secs:12.2f}x")
                print(f"{'  peak RSS MiB':<62} {max(r['rss'] for _, r in pairs) / 2**20:8.2f}")
                if workers == 1:
                    ratios = sorted(h / r["loop"] for h, r in pairs)
                    ratio = median(ratios)
                    spread = (
                        f" (pairs: {', '.join(f'{x:.2f}' for x in ratios)})"
                        if len(pairs) > 1
                        else ""
                    )
                    targets.append(
                        f"target: runner ({discovery}), 1 worker >= 0.9x the hand loop: "
                        f"{ratio:.2f}x {'met' if ratio >= 0.9 else 'NOT met'}{spread} "
                        f"(whole command {median(h / r['wall'] for h, r in pairs):.2f}x)"
                    )
                    f = pairs[0][1]["floor"]
                    targets.append(
                        f"  floor ({discovery}): the runner's batch statement alone, batch for "
                        f"batch beside the hand loop's on one connection: "
                        f"{f['hand'] / f['floor_runner']:.2f}x; without its digests "
                        f"{f['hand'] / f['floor_nodigest']:.2f}x"
                    )
        print("\n" + "\n".join(targets))
        if args.profile:
            empty_copy(dsn, "copy_profiled")
            plan = insert_plan(dsn, "copy_profiled", 1, "watermark")
            run_backfill_apply(plan, work, profile=args.profile)
            print(f"py-spy flame graph of the 1-worker runner: {args.profile}")


if __name__ == "__main__":
    main()
