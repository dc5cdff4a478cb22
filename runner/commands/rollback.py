"""`backfill rollback`: emit SQL, dry-run, or restore batched and verified, in one environment."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import asyncpg
import structlog

from runner import events, ledger
from runner.artifacts import RunDir
from runner.commands.decide import plan_for
from runner.db import Databases
from runner.errors import EXIT_DONE, EXIT_FAILED, BackfillError, InvalidInput, WorkFailed
from runner.phases.common import command_prefix, operator_name, run_lock
from runner.plan import LoadedPlan, parse_duration
from runner.reports.rollback import render_rollback
from runner.rollback import RollbackResult, emit_rollback_file, parse_batch_range, run_rollback

log = structlog.get_logger("backfill.rollback")


@dataclass
class UndoOutcome:
    exit_code: int
    lines: list[str] = field(default_factory=list)
    result: RollbackResult | None = None
    path: Path | None = None


async def _tell_later_stages(loaded: LoadedPlan, dbs: Databases, run_id: str, env: str) -> None:
    """A staging rollback is also recorded in the prod ledger, when the run reached it: the prod
    apply reads only prod's ledger, and must not go on from a staging rehearsal that was undone."""
    plan = loaded.plan
    if plan.is_mini or env != plan.pipeline.staging or plan.pipeline.prod not in plan.environments:
        return
    try:
        async with dbs.connection(plan.pipeline.prod) as prod:
            if await ledger.get_run(prod, run_id) is None:
                return  # the run never reached prod; its gates there stay not-reached
            await ledger.ensure_ledger(prod)
            await ledger.record_event(prod, run_id, env, "rollback", operator_name(), {})
    except (BackfillError, OSError, asyncpg.PostgresError) as e:
        log.warning(
            "rollback.prod_not_told",
            run_id=run_id,
            error=str(e),
            hint="the prod ledger does not know of this rollback: do not approve or run prod "
            "phases of this run",
        )


async def _emit(
    conn: asyncpg.Connection,
    run: ledger.RunRow,
    dbs: Databases,
    env: str,
    span: tuple[int, int] | None,
    since: datetime | None,
) -> UndoOutcome:
    """The rollback as a psql file, for whoever restores by hand."""
    path = RunDir.of(run.run_id).env(env) / f"rollback_{datetime.now(UTC):%Y-%m-%d}.sql"
    await emit_rollback_file(
        conn, run, path, display_dsn=dbs.display_dsn(env), batches=span, since=since
    )
    return UndoOutcome(
        EXIT_DONE,
        [f"wrote {path}", f'run it: psql -X -v ON_ERROR_STOP=1 -d "$DSN" -f {path}'],
        path=path,
    )


async def _stop_other_processes(conn: asyncpg.Connection, run: ledger.RunRow) -> None:
    """Processes that joined the run (engine.claims) hold no run lock: stop them and wait for
    the batches they are applying, so the rollback covers them and nothing commits after it."""
    timeout = parse_duration((run.plan.get("batching") or {}).get("lease_timeout") or 30.0)
    deadline = time.monotonic() + timeout + 10
    reason = f"rolled back by {operator_name()}"
    while (live := (await ledger.close_work(conn, run.run_id, reason, timeout))[0]) > 0:
        if time.monotonic() > deadline:
            who = "; ".join(
                f"{p['host']} pid {p['pid']} ({p['env']} {p['phase']})"
                for p in await ledger.live_processes(conn, run.run_id, timeout)
            )
            raise WorkFailed(
                f"run {run.run_id}: {live} batch(es) of other processes are still being applied "
                f"({who}); nothing was rolled back",
                hint="stop those processes (or wait for them), then roll back again",
            )
        await anyio.sleep(0.5)


async def undo(
    run_id: str,
    env: str,
    *,
    dry_run: bool,
    emit: bool,
    batches: str | None,
    since: datetime | None,
    plan_path: Path | None,
    workers: int | None = None,
) -> UndoOutcome:
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    span = parse_batch_range(batches)
    loaded = plan_for_env(run_id, env, plan_path)
    events.add_secrets(loaded.secrets)
    run_dir = RunDir.of(run_id)
    async with Databases(loaded.plan) as dbs, dbs.connection(env) as conn:
        run = await ledger.get_run(conn, run_id)
        if run is None:
            raise InvalidInput(
                f"run {run_id} changed nothing in environment {env!r}: nothing to roll back",
                hint="check --env; each environment keeps its own ledger",
            )
        await ledger.ensure_ledger(conn)
        if emit:
            return await _emit(conn, run, dbs, env, span, since)
        events.attach(run_dir.env(env) / "events.jsonl")
        async with run_lock(conn, run_id):
            if not dry_run:
                await _stop_other_processes(conn, run)
                # recorded before the first row is restored: a rollback stopped half-way has
                # changed the data too, and the run must not go forward on it
                await ledger.record_event(
                    conn,
                    run_id,
                    env,
                    "rollback",
                    operator_name(),
                    {"batches": batches, "since": since.isoformat() if since else None},
                )
                await _tell_later_stages(loaded, dbs, run_id, env)
            bpm = (run.plan.get("batching") or {}).get("batches_per_minute")
            result = await run_rollback(
                conn,
                run,
                dry_run=dry_run,
                batches=span,
                since=since,
                batches_per_minute=bpm,
                workers=workers or int((run.plan.get("batching") or {}).get("workers") or 1),
                connect=lambda: dbs.connect(env),
                on_batch=lambda no, r, c: log.info(
                    "rollback.batch", batch=no, restored=r, conflicts=c
                ),
            )
        path = render_rollback(
            run,
            env,
            dbs.display_dsn(env),
            result,
            {"batches": batches, "since": since},
            command_prefix(),
        )
    lines = _outcome_lines(result, run_id, env, dry_run, path)
    ok = dry_run or result.verified
    return UndoOutcome(EXIT_DONE if ok else EXIT_FAILED, lines, result, path)


def plan_for_env(run_id: str, env: str, plan_path: Path | None) -> LoadedPlan:
    """The plan the run used in `env`: its plan, or for prod the mini plan health wrote."""
    manifest = RunDir.of(run_id).read_manifest()
    key = (
        "mini_plan_path"
        if "plan_path" not in manifest and "mini_plan_path" in manifest
        else "plan_path"
    )
    loaded = plan_for(run_id, key, plan_path)
    if env in loaded.plan.environments:
        return loaded
    if key == "mini_plan_path" or "mini_plan_path" not in manifest:
        raise InvalidInput(
            f"environment {env!r} is not one of run {run_id}'s environments",
            hint=f"use one of: {', '.join(sorted(loaded.plan.environments))}",
        )
    return plan_for(run_id, "mini_plan_path", plan_path)


def _outcome_lines(
    result: RollbackResult, run_id: str, env: str, dry_run: bool, path: Path
) -> list[str]:
    lines = [f"rollback of run {run_id} on {env}{' (dry run: nothing changed)' if dry_run else ''}"]
    if dry_run:
        lines.append(
            f"  would restore {result.restorable:,} row(s) in {len(result.batches)} batch(es); "
            f"{result.already:,} already at their before-image; {result.conflicts:,} conflict(s)"
        )
    else:
        lines.append(
            f"  restored {result.restored:,} row(s) in {len(result.batches)} batch(es); "
            f"{result.already:,} were already at their before-image; {result.conflicts:,} conflict(s) left alone"
        )
        lines.append(
            f"  checksum {'verified' if result.verified else 'NOT verified'} "
            f"({result.actual_checksum} vs expected {result.expected_checksum})"
        )
        lines.append(
            f"  {result.elapsed_seconds:.1f} s with {result.workers} worker(s), of which "
            f"verification {result.verify_seconds:.1f} s"
        )
        if result.note:
            lines.append(f"  note: {result.note}")
    lines.append(f"  report: {path}")
    if not dry_run:
        lines.append(
            f"  run {run_id} is recorded as rolled back in {env}: its later phases and gates "
            "there refuse to go forward; start a new run to try again"
        )
    return lines
