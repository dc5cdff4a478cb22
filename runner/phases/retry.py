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
from runner.engine.batch_run import BatchRun, KeysetSource, RunSettings, RunState
from runner.engine.executor import BatchExecutor
from runner.engine.quarantine import Budget, Policy, Quarantine, RetrySource
from runner.engine.session import MainSession
from runner.engine.shapes import resolve_tables, shaped_run
from runner.engine.target import TargetInfo, resolve_target
from runner.engine.throttle import Throttle
from runner.engine.watch import RunWatch
from runner.errors import InvalidInput, NoGo, WorkFailed
from runner.phases.apply import (
    BatchConnections,
    BatchRecorder,
    table_identities,
    write_manifest,
)
from runner.phases.common import command_prefix, gate_state, rollback_note, run_lock
from runner.plan import LoadedPlan
from runner.reports.quarantine import write_quarantine_files
from runner.rollback import emit_rollback_file
from runner.rollout import gate_name

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
        target = await _same_run_shape(conn, loaded, run, env)
        await _refuse_stopped(conn, loaded, run, env)
        async with run_lock(conn, run_id):
            timeout = loaded.plan.batching.lease_timeout
            if live := await ledger.live_processes(conn, run_id, timeout, joined=True):
                # joined processes (engine.claims) hold no run lock: a retry beside them could
                # apply a key while they page past it
                who = "; ".join(f"{p['host']} pid {p['pid']} ({p['phase']})" for p in live)
                raise InvalidInput(
                    f"run {run_id} is still being applied by other processes ({who}); a "
                    "quarantine retry runs alone",
                    hint="wait for them to finish (`backfill status` shows them), then re-try",
                )
            await ledger.release_retried(conn, run_id)  # a retry killed after its commits
            rows = await ledger.open_quarantine(conn, run_id, [k.type for k in target.key])
            result.tried = len(rows)
            gone: list[list[str]] = []
            if rows:
                result.batches, gone = await _retry(conn, dbs, loaded, env, run_id, target, rows)
            result.released = await ledger.release_retried(conn, run_id)
            result.released += await ledger.release_gone(conn, run_id, gone)
            await _rewrite_files(conn, dbs, run, env)
            left = await ledger.open_quarantine(conn, run_id, [k.type for k in target.key])
            result.still = len(left)
            result.files = await write_quarantine_files(conn, run_id, RunDir.of(run_id).env(env))
    finally:
        await close_quietly(conn)
    return result


async def _same_run_shape(
    conn: asyncpg.Connection, loaded: LoadedPlan, run: ledger.RunRow, env: str
) -> TargetInfo:
    """The plan may have been fixed since the run, but it must write what the run wrote: the
    same table, key and columns (and, for a shaped run, the same tables), or the retry's images
    would not match the run's and its rollback would not restore them."""
    target = await resolve_target(conn, loaded.plan.target)
    same = (
        (run.target_oid is None or target.oid == run.target_oid)
        and [k.name for k in target.key] == run.key_columns
        and [c.name for c in target.columns] == run.columns
    )
    tables = (
        [t.doc() for t in await resolve_tables(conn, loaded.plan)] if loaded.plan.shaped else None
    )
    recorded, now = table_identities(run.tables), table_identities(tables)
    if not same or recorded != now:
        raise InvalidInput(
            f"the plan now writes {target.display} key ({', '.join(k.name for k in target.key)}) "
            f"columns ({', '.join(c.name for c in target.columns)}), but run {run.run_id} wrote "
            f"{run.target_table} key ({', '.join(run.key_columns)}) columns "
            f"({', '.join(run.columns)}){' and other tables' if recorded != now else ''}: a retry "
            "must write what the run wrote, or its rollback could not restore it",
            hint="fix the apply without changing the columns it writes; to change them, roll "
            "this run back and start a new one",
        )
    return target


async def _refuse_stopped(
    conn: asyncpg.Connection, loaded: LoadedPlan, run: ledger.RunRow, env: str
) -> None:
    """A cancelled run, or one whose apply gate was rejected, takes no more batches."""
    request = await ledger.control_state(conn, run.run_id)
    if request is not None and request.action == "pause":
        raise WorkFailed(
            f"run {run.run_id} is paused by {request.actor}"
            + (f" ({request.note})" if request.note else "")
            + ": a retry starts batches of the run, so it waits for the same resume",
            hint=f"{command_prefix()} resume {run.run_id} --env {env}, then re-try",
        )
    if request is not None and request.action == "cancel":
        raise NoGo(
            f"run {run.run_id} was cancelled by {request.actor}: a cancelled run takes no more "
            "batches",
            hint="start a new run",
        )
    stage = "apply" if not loaded.plan.is_mini else "canary"
    state = await gate_state(conn, run.run_id, stage, gate_name(stage, env), loaded.digest, loaded)
    if state.status == "rejected":
        raise NoGo(
            f"run {run.run_id}'s gate {state.gate} was rejected: {state.reason}",
            hint="a reject is final for the run: start a new run",
        )


async def _rewrite_files(
    conn: asyncpg.Connection, dbs: Databases, run: ledger.RunRow, env: str
) -> None:
    """The run's rollback files written again, and the retry's manifest: the psql file as the
    apply left it would leave the retried rows changed. (A stage's own manifest lists only its
    batches, which the retry does not change.)"""
    await write_manifest(conn, run, env, STAGE)  # retry_manifest.jsonl: the retry's batches
    # every apply stage's rollback file covers the whole run here; stages of one day share one
    files = set()
    for stage in ("apply", "canary", "rest"):
        row = await ledger.get_phase(conn, run.run_id, stage)
        if row is not None and row.result and row.doc.rollback_file:
            files.add(row.doc.rollback_file)
    for name in sorted(files):
        await emit_rollback_file(
            conn, run, RunDir.of(run.run_id).env(env) / name, display_dsn=dbs.display_dsn(env)
        )


async def _retry(
    conn: asyncpg.Connection,
    dbs: Databases,
    loaded: LoadedPlan,
    env: str,
    run_id: str,
    target: TargetInfo,
    rows: list[asyncpg.Record],
) -> tuple[int, list[list[str]]]:
    """The retry's batches (numbered after the run's last), through the batch machine; and the
    keys discovery no longer returns (not written)."""
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
        # above every number the run used or claimed (an open lease keeps its own: #15)
        next_no = await ledger.next_free_batch_no(conn, run_id)
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
        state = RunState()
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
                manifest_sql=m.sql if (m := plan.manifest) else None,
            ),
            checker_connection=connect.for_checks,
            record=BatchRecorder(session, RunDir.of(run_id).env(env) / "batches", STAGE, None, env),
            on_data_error=quarantine,
            state=state,
            # a pause, a cancel and the guards hold a retry as they hold the apply
            watch=RunWatch(
                session, reader, plan.guards, target.oid, stage=STAGE, state=state, resume=resume
            ),
        )
        state = await machine.run(None, next_no)
        return sum(1 for o in state.outcomes if o.status == "done"), source.gone
    finally:
        await reader.close()
