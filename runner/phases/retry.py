"""`backfill quarantine RUN --env E --retry`: the run's quarantined keys, re-tried as new batches
of the same run (stage `retry`): images, ledger rows and rollback as for any batch; a key that
still fails is split off and quarantined again (its attempts counted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from runner import ledger
from runner.artifacts import RunDir
from runner.db import Databases, close_quietly
from runner.engine.batch_run import BatchRun, KeysetSource, RunSettings
from runner.engine.executor import BatchExecutor
from runner.engine.quarantine import Budget, Policy, Quarantine, RetrySource
from runner.engine.session import MainSession
from runner.engine.shapes import shaped_run
from runner.engine.target import TargetInfo, resolve_target
from runner.engine.throttle import Throttle
from runner.errors import InvalidInput, NoGo
from runner.phases.apply import BatchConnections, BatchRecorder, resume_point
from runner.phases.common import command_prefix, rollback_note, run_lock
from runner.plan import LoadedPlan
from runner.reports.quarantine import write_quarantine_files

STAGE = "retry"


@dataclass
class RetryResult:
    run_id: str
    env: str
    tried: int = 0  # keys re-tried
    released: int = 0  # of those, committed now
    still: int = 0  # keys still quarantined after the retry
    batches: int = 0
    files: list[Path] = field(default_factory=list)


async def retry_quarantined(
    loaded: LoadedPlan, dbs: Databases, env: str, run_id: str
) -> RetryResult:
    """Re-try every key of `run_id` still quarantined in `env`, with `loaded`'s apply."""
    plan = loaded.plan
    conn = await dbs.connect(env)
    result = RetryResult(run_id, env)
    try:
        run = await ledger.get_run(conn, run_id)
        if run is None:
            raise InvalidInput(
                f"run {run_id} has no ledger row in environment {env!r}: nothing to re-try",
                hint="check --env; each environment keeps its own ledger",
            )
        await ledger.ensure_ledger(conn)
        if (rolled_back := await rollback_note(conn, run_id)) is not None:
            raise NoGo(f"run {run_id} cannot be re-tried: {rolled_back}")
        target = await resolve_target(conn, plan.target)
        if run.target_oid is not None and target.oid != run.target_oid:
            raise InvalidInput(
                f"{target.display} is not the table run {run_id} wrote (oid {run.target_oid}, "
                f"now {target.oid}): it was dropped and created again",
                hint="start a new run",
            )
        async with run_lock(conn, run_id):
            await ledger.release_retried(conn, run_id)  # a retry killed after its commits
            rows = await ledger.open_quarantine(conn, run_id, [k.type for k in target.key])
            result.tried = len(rows)
            if rows:
                result.batches = await _retry(conn, dbs, loaded, env, run_id, target, rows)
            result.released = await ledger.release_retried(conn, run_id)
            left = await ledger.open_quarantine(conn, run_id, [k.type for k in target.key])
            result.still = len(left)
            result.files = await write_quarantine_files(conn, run_id, RunDir.of(run_id).env(env))
    finally:
        await close_quietly(conn)
    return result


async def _retry(
    conn: asyncpg.Connection,
    dbs: Databases,
    loaded: LoadedPlan,
    env: str,
    run_id: str,
    target: TargetInfo,
    rows: list[asyncpg.Record],
) -> int:
    """The retry's batches (numbered after the run's last), through the batch machine."""
    plan = loaded.plan
    b = plan.batching
    session = MainSession(conn, lambda: dbs.connect(env), run_id, retries=b.max_retries)
    reader = MainSession(
        await dbs.connect(env, read_only=True),
        lambda: dbs.connect(env, read_only=True),
        run_id,
        retries=b.max_retries,
        holds_run_lock=False,
    )
    try:
        _, next_no, _ = resume_point(await ledger.batch_states(conn, run_id))
        shape = await shaped_run(conn, plan, target) if plan.shaped else None
        width = len(target.key)
        source = RetrySource(
            KeysetSource(target, plan.discovery.sql, b.size),
            [(list(r["key"]), tuple(r[f"k{i}"] for i in range(width))) for r in rows],
            b.size,
        )
        resume = f"{command_prefix()} quarantine {run_id} --env {env} --retry"
        # no budget: these keys failed before; what fails again is quarantined again
        quarantine = Quarantine(
            Policy(b.on_error == "split", tuple(b.quarantine_sqlstates)),
            None,
            reader,
            target,
            Budget(None, 0),
            resume,
        )
        connect = BatchConnections(dbs, env, b.lock_timeout, b.statement_timeout)
        machine = BatchRun(
            reader,
            source,
            Throttle(b.batches_per_minute, b.rows_per_second, b.size),
            RunSettings(
                run_id=run_id,
                stage=STAGE,
                workers=1,
                max_passes=1,
                stop_after=None,
                resume=resume,
            ),
            new_executor=lambda: BatchExecutor(
                target,
                plan.apply.sql or "",
                run_id,
                connect.for_batches,
                max_retries=b.max_retries,
                shape=shape,
            ),
            checker_connection=connect.for_checks,
            record=BatchRecorder(session, RunDir.of(run_id).env(env) / "batches", STAGE, None, env),
            on_data_error=quarantine,
        )
        state = await machine.run(None, next_no)
        return sum(1 for o in state.outcomes if o.status == "done")
    finally:
        await reader.close()
