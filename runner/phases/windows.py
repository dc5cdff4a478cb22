"""An apply stage walked window by window (`[windows]`, engine.windows).

Each window runs the stage's batch machine over discovery restricted to the window, from where
the window stopped (its batches are the run's batches numbered from its first one). A window
starts in one transaction with its `before_each` SQL and ends in one with its `after_each` SQL and
its counts, so each runs once per window however often the run is stopped and continued.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import asyncpg
import structlog

from runner import ledger
from runner.engine.batch_run import BatchRun, KeysetSource, RunState
from runner.engine.executor import counters, write_delta
from runner.engine.session import MainSession
from runner.engine.windows import Window, WindowPlan
from runner.errors import InvalidInput, WorkFailed
from runner.phases.common import ProgressCallback
from runner.plan import Windows, sql_code
from runner.results import WindowResult

log = structlog.get_logger("backfill.apply")

SETTLED = ("done", "split", "quarantined")  # batch rows whose keys need nothing more


def resume_point(rows: list[asyncpg.Record], first: int = 1) -> tuple[list[str] | None, int, int]:
    """(cursor, next batch number, interrupted batches) from batch rows numbered from `first`
    (the run's, or a window's), in order.

    The cursor is the last key of the longest run of consecutive committed batches: every key up
    to it was dispatched and committed. Batches after a gap may be committed too; discovery no
    longer returns their rows, so starting at the gap never applies a row twice.
    """
    cursor: list[str] | None = None
    expected = first
    for r in rows:
        if r["batch_no"] == expected and _retry(r):
            # a quarantine retry's batch (made between two commands of the stage) is not on
            # the stage's keyset path: it neither moves the cursor nor breaks the run of batches
            expected += 1
            continue
        # split and quarantined rows are written once every key of theirs is accounted for
        if r["batch_no"] != expected or r["status"] not in SETTLED:
            break
        cursor = list(r["last_key"])
        expected += 1
    last = rows[-1]["batch_no"] if rows else first - 1
    recorded = {r["batch_no"] for r in rows}  # committed, or failed and recorded as such
    interrupted = sum(1 for n in range(first, last + 1) if n not in recorded)
    return cursor, last + 1, interrupted


def _retry(row: Any) -> bool:
    try:
        return bool(row["stage"] == "retry")
    except (KeyError, IndexError):  # rows without a stage (older callers, unit tests)
        return False


def window_result(row: asyncpg.Record) -> WindowResult:
    keys = row["keys"]
    quarantined = row["quarantined"]
    discovered = row["discovered"]
    done = row["status"] == "done"
    return WindowResult(
        no=row["window_no"],
        label=row["label"],
        status=row["status"],
        discovered=discovered,
        keys=keys,
        changed=row["changed"],
        noop=row["noop"],
        quarantined=quarantined,
        matches=(discovered == keys + quarantined) if done else None,
        started_at=row["started_at"].isoformat() if row["started_at"] else None,
        finished_at=row["finished_at"].isoformat() if row["finished_at"] else None,
        seconds=(
            round((row["finished_at"] - row["started_at"]).total_seconds(), 3)
            if row["started_at"] and row["finished_at"]
            else None
        ),
    )


_BOUND_PARAM = re.compile(r"\$([1-3])(?!\d)")
HOOK = "backfill_window_hook"  # the hook's prepared statement, for one execution


def hook_prepare_sql(sql: str) -> str | None:
    """A hook that uses its window's bounds or label, prepared with all three as text (so a
    hook may use `$3` alone, or cast `$1::date`); None: it uses none of them (then it may be
    several statements, run as written)."""
    if not _BOUND_PARAM.search(sql_code(sql)):
        return None
    return f"PREPARE {HOOK} (text, text, text) AS {sql}"


async def _run_hook(
    conn: asyncpg.Connection, what: str, sql: str | None, w: Window, guarded: set[int]
) -> None:
    """A window's before_each / after_each: `$1`, `$2`, `$3` are its bounds and label. It may
    write what the window needs (a job's flag, a log row), but no table the run writes: those
    writes would have no image, and a rollback would not undo them."""
    if sql is None:
        return
    prepare = hook_prepare_sql(sql)
    try:
        async with conn.transaction():  # a savepoint: the ledger's row is not written either
            before = await counters(conn)
            files = await _storage(conn, guarded)
            if prepare is None:
                await conn.execute(sql)  # several statements may run this way
            else:
                await conn.execute(prepare)
                args = ", ".join(
                    "NULL" if v is None else "'" + v.replace("'", "''") + "'"
                    for v in (w.lower, w.upper, w.label)
                )
                await conn.execute(f"EXECUTE {HOOK} ({args})")
            after = await counters(conn)
            written = write_delta(before, after)
            # TRUNCATE (or a rewrite) moves no write counter: its table gets new storage
            moved = await _storage(conn, guarded)
            wrote = sorted(
                {f"{after[oid][0]}.{after[oid][1]}" for oid in written if oid in guarded}
                | {name for name, nodes in moved.items() if files.get(name) != nodes}
            )
            if wrote:
                raise WorkFailed(
                    f"windows.{what} wrote {', '.join(wrote)}, a table the run writes: its rows "
                    "would have no image and a rollback would not undo them; rolled back, "
                    f"the window was not {'started' if what == 'before_each' else 'recorded done'}",
                    hint=f"keep windows.{what} to what the window needs (a job's flag, a log "
                    "table); write the run's tables in the apply",
                )
    except asyncpg.PostgresError as e:
        raise WorkFailed(
            f"windows.{what} failed for window {w.no} {w.label}: {' '.join(str(e).split())}; "
            f"the window was not {'started' if what == 'before_each' else 'recorded done'}",
            hint=f"if what windows.{what} needs is missing (a table, a grant), fix that and "
            "continue the run with --run; if the statement itself is wrong, the plan changes: "
            "start a new run (`backfill rollback` undoes this one's batches)",
        ) from None
    finally:
        await _deallocate(conn)  # the savepoint is over: the transaction around it is usable


_STORAGE = """
SELECT format('%I.%I', n.nspname, r.relname) AS name,
       array_agg(pg_relation_filenode(t.relid)::bigint ORDER BY t.relid) AS nodes
FROM unnest($1::oid[]) AS g(oid)
CROSS JOIN LATERAL (SELECT relid FROM pg_partition_tree(g.oid)
                    UNION SELECT g.oid::regclass) AS t  -- a plain table has no partition tree
JOIN pg_class AS r ON r.oid = g.oid
JOIN pg_namespace AS n ON n.oid = r.relnamespace
GROUP BY 1"""


async def _storage(conn: asyncpg.Connection, guarded: set[int]) -> dict[str, list[int]]:
    """The storage files of the run's tables (their partitions too), by table."""
    if not guarded:
        return {}
    rows = await conn.fetch(_STORAGE, sorted(guarded))
    return {r["name"]: list(r["nodes"]) for r in rows}


async def _deallocate(conn: asyncpg.Connection) -> None:
    """The hook's prepared statement is the session's (a rolled-back savepoint keeps it)."""
    if await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_prepared_statements WHERE name = $1)", HOOK
    ):
        await conn.execute(f"DEALLOCATE {HOOK}")


class WindowWalk:
    """The windows of one apply stage, on the stage's batch machine."""

    def __init__(
        self,
        session: MainSession,
        reader: MainSession,
        windows: Windows,
        walk: WindowPlan,
        run_id: str,
        env: str,
        progress: ProgressCallback | None,
        guarded: set[int] | None = None,
    ) -> None:
        self.session = session
        self.reader = reader
        self.windows = windows
        self.walk = walk
        self.run_id = run_id
        self.env = env
        self.guarded = guarded or set()  # the oids of the tables the run writes
        self.progress = progress

    async def recorded(self) -> list[asyncpg.Record]:
        """The run's windows as the ledger has them; a run that computes other windows now (the
        calendar or the partitions changed) is refused."""
        now = [w.identity for w in self.walk.windows]
        rows = await self.session.run(
            lambda c: ledger.record_windows(c, self.run_id, self.env, now)
        )
        then = [(r["window_no"], r["label"], r["lower_bound"], r["upper_bound"]) for r in rows]
        if then != now:
            at = next(
                i
                for i in range(max(len(then), len(now)))
                if i >= min(len(then), len(now)) or then[i] != now[i]
            )
            was = then[at] if at < len(then) else "nothing"
            now_is = now[at] if at < len(now) else "nothing"
            raise InvalidInput(
                f"run {self.run_id} recorded {len(then)} window(s), but its plan now gives "
                f"{len(now)} (window {at + 1}: recorded {was}, now {now_is}): a partition was "
                "added or removed, or the windows' settings resolve differently",
                hint="finish this run with the windows it recorded (restore the partitions), or "
                "start a new run",
            )
        return rows

    async def run(self, machine: BatchRun, source: KeysetSource, state: RunState) -> None:
        """Each window not done yet, in order, until the stage stops (canary, cap) or all are."""
        rows = await self.recorded()
        total = len(self.walk.windows)
        for w, row in zip(self.walk.windows, rows, strict=True):
            if row["status"] == "done":
                continue
            source.narrow(w.sql)
            if row["status"] == "pending":
                first = await self.session.run(partial(ledger.last_batch_no, run_id=self.run_id))
                first += 1
                discovered = await self.reader.run(source.count)
                await self.session.run(
                    partial(self._start, w=w, first=first, discovered=discovered)
                )
                cursor, next_no = None, first
            else:
                first, discovered = row["first_batch"], row["discovered"]
                rows_from = await self.session.run(
                    partial(ledger.batch_states, run_id=self.run_id, first=first)
                )
                cursor, next_no, interrupted = resume_point(rows_from, first)
                state.interrupted_before += interrupted
            # a continued window (a canary's, a killed run's) says what is left, not its count
            left = discovered if row["status"] == "pending" else await self.reader.run(source.count)
            log.info(
                "apply.window",
                window=w.no,
                of=total,
                label=w.label,
                discovered=discovered,
                left=left,
            )
            if self.progress:
                self.progress(
                    "window",
                    {
                        "no": w.no,
                        "of": total,
                        "label": w.label,
                        "rows": left,
                        "counted": None if row["status"] == "pending" else discovered,
                    },
                )
            if not await self._walk(machine, state, cursor, next_no):
                return  # the stage ends inside this window: the next command continues it
            done = await self.session.run(partial(self._finish, w=w))
            log.info(
                "apply.window_done",
                window=w.no,
                keys=done["keys"],
                discovered=done["discovered"],
                quarantined=done["quarantined"],
            )
        await self.after_last(machine, source, state)

    async def _walk(
        self, machine: BatchRun, state: RunState, cursor: list[str] | None, next_no: int
    ) -> bool:
        """The window's batches, from `cursor`, then again from its start while discovery still
        returns rows in it (they arrived behind the cursor, after their span was checked; the
        canary's machine makes one pass only), up to `max_passes`. False: the stage stopped
        inside the window (the canary's last batch, a row cap)."""
        stop_after = machine.settings.stop_after
        for _ in range(machine.settings.max_passes):
            await machine.run(cursor, next_no)
            if state.capped or (stop_after is not None and state.dispatched >= stop_after):
                return False
            state.remaining_after = await self.reader.run(machine.source.count)
            if not state.remaining_after:
                break
            cursor, next_no = None, machine.next_no
            log.info("apply.window_again", remaining=state.remaining_after)
        return True

    async def after_last(self, machine: BatchRun, source: KeysetSource, state: RunState) -> None:
        """Every window done: what discovery still returns within them (rows that arrived in, or
        moved into, a window after it ended) is counted, so the stage says so."""
        source.narrow(self.walk.span)
        state.remaining_after = await self.reader.run(machine.source.count)

    async def _start(
        self, conn: asyncpg.Connection, w: Window, first: int, discovered: int
    ) -> None:
        async with conn.transaction():
            # a retried call (the connection dropped after COMMIT) must not run the hook twice
            if await ledger.window_status(conn, self.run_id, self.env, w.no) != "pending":
                return
            await _run_hook(conn, "before_each", self.windows.before_each, w, self.guarded)
            await ledger.start_window(conn, self.run_id, self.env, w.no, first, discovered)

    async def _finish(self, conn: asyncpg.Connection, w: Window) -> asyncpg.Record:
        async with conn.transaction():
            if await ledger.window_status(conn, self.run_id, self.env, w.no) != "done":
                await _run_hook(conn, "after_each", self.windows.after_each, w, self.guarded)
                await ledger.finish_window(conn, self.run_id, self.env, w.no)
            return next(
                r
                for r in await ledger.window_rows(conn, self.run_id, self.env)
                if r["window_no"] == w.no
            )
