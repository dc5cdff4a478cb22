"""Phase 1 (and 4): discover → batch → apply, rate-limited, resumable; then halt at a gate."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncpg
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from runner import events, ledger, redact
from runner.artifacts import RunDir, check_run_id, new_run_id, write_json
from runner.db import Databases, close_quietly, fetch_one
from runner.engine.discovery import ConvergenceCheck, Discovery, Span, read_only
from runner.engine.executor import Batch, BatchExecutor, BatchOutcome, failure_error
from runner.engine.target import TargetInfo, resolve_target
from runner.engine.throttle import Throttle
from runner.errors import InvalidInput, NoGo, WorkFailed
from runner.gates import gate_name
from runner.phases.apply_summary import render_summary, summary_name
from runner.phases.common import (
    ProgressCallback,
    bound_values,
    command_prefix,
    ensure_run,
    gate_state,
    require_open,
    rollback_note,
    run_lock,
)
from runner.plan import LoadedPlan
from runner.rollback import emit_rollback_file
from runner.validate import refuse_unfit, validate_env

log = structlog.get_logger("backfill.apply")


@dataclass
class ApplyResult:
    run_id: str
    env: str
    stage: str  # apply (staging) | canary | rest (prod)
    status: str  # halted (at a gate) | done | failed | dry-run
    gate: str | None
    next_command: str
    summary_path: Path | None = None
    rollback_path: Path | None = None
    totals: dict[str, Any] = field(default_factory=dict)
    dry_run: dict[str, Any] | None = None


def _stage_for(loaded: LoadedPlan, env: str) -> str:
    plan = loaded.plan
    if plan.is_mini:
        return "canary"
    if env == plan.pipeline.prod:
        raise InvalidInput(
            f"environment {env!r} is the prod stage of this plan; prod is applied from the mini "
            "plan that `backfill health` writes, after its gate is approved",
            hint=f"run `backfill health {loaded.path} --env {env} --run RUN` first",
        )
    if env != plan.pipeline.staging:
        raise InvalidInput(
            f"environment {env!r} has no stage in this plan's pipeline "
            f"(staging = {plan.pipeline.staging!r}, prod = {plan.pipeline.prod!r})"
        )
    return "apply"


async def _resume_point(conn: asyncpg.Connection, run_id: str) -> tuple[list[str] | None, int, int]:
    """(cursor, next batch number, interrupted batches) from the ledger.

    The cursor is the last key of the longest run of consecutive committed batches: every key up
    to it was dispatched and committed. Batches after a gap may be committed too; discovery no
    longer returns their rows, so starting at the gap never applies a row twice.
    """
    rows = await conn.fetch(
        "SELECT batch_no, status, last_key FROM backfill.batches WHERE run_id = $1 ORDER BY batch_no",
        run_id,
    )
    cursor: list[str] | None = None
    expected = 1
    for r in rows:
        if r["batch_no"] != expected or r["status"] != "done":
            break
        cursor = list(r["last_key"])
        expected += 1
    last = rows[-1]["batch_no"] if rows else 0
    done = {r["batch_no"] for r in rows}
    interrupted = sum(1 for n in range(1, last + 1) if n not in done)
    return cursor, last + 1, interrupted


async def _count(conn: asyncpg.Connection, discovery_sql: str) -> int:
    """How many rows discovery returns, in a READ ONLY transaction (invariant 5)."""
    async with read_only(conn):
        return int(await conn.fetchval(f"SELECT count(*) FROM ({discovery_sql}) AS d"))


async def _dry_run(
    loaded: LoadedPlan, dbs: Databases, env: str, stage: str, cmd: str
) -> ApplyResult:
    plan = loaded.plan
    async with dbs.connection(env, read_only=True) as conn, conn.transaction(readonly=True):
        target = await resolve_target(conn, plan.target)
        needing = await _count(conn, plan.discovery.sql)
        page = await Discovery(conn, target, plan.discovery.sql, plan.batching.size).page(None)
        explain: list[str] = []
        if page is not None:
            explain = [
                r[0] for r in await conn.fetch("EXPLAIN " + plan.apply.sql, *page.key_arrays)
            ]
    batches = math.ceil(needing / plan.batching.size)
    throttle = Throttle(
        plan.batching.batches_per_minute, plan.batching.rows_per_second, plan.batching.size
    )
    floor = throttle.seconds_for(batches, needing)
    info = {
        "env": env,
        "target": target.display,
        "rows_needing_backfill": needing,
        "batch_size": plan.batching.size,
        "batches": batches,
        "workers": plan.batching.workers,
        "estimated_seconds_at_rate": floor if throttle.limited else None,
        "first_batch_keys": [page.first_key, page.last_key] if page else None,
        "explain_first_batch": explain,
    }
    return ApplyResult(
        "(dry run)",
        env,
        stage,
        "dry-run",
        None,
        f"{cmd} apply {loaded.path} --env {env}",
        dry_run=info,
    )


async def apply(
    loaded: LoadedPlan,
    dbs: Databases,
    *,
    env: str,
    run_id: str | None = None,
    dry_run: bool = False,
    operator: str,
    progress: ProgressCallback | None = None,
) -> ApplyResult:
    """Run (or continue) the apply of `loaded` on `env`. Returns where it stopped and why."""
    plan = loaded.plan
    cmd = command_prefix()
    stage = _stage_for(loaded, env)
    if plan.is_mini and run_id is None:
        raise InvalidInput(
            "a mini plan continues a run: pass --run RUN (the run its health check belongs to)"
        )
    if run_id is not None:  # before anything is written, even the ledger schema
        check_run_id(run_id, plan.parent.name if plan.parent else plan.name)
    # the discovery and apply must fit the database before a run, or the ledger, is created
    refuse_unfit(await validate_env(loaded, dbs, env, with_checks=False), str(loaded.path))
    if dry_run:
        return await _dry_run(loaded, dbs, env, stage, cmd)

    conn = await dbs.connect(env)
    try:
        target = await resolve_target(conn, plan.target)
        await ledger.ensure_ledger(conn)
        run_id = run_id or new_run_id(plan.name)
        run = await ensure_run(conn, loaded, env, run_id, target, operator, create=not plan.is_mini)
        if run.plan_digest != loaded.digest and not plan.is_mini:
            raise InvalidInput(
                f"run {run_id} was started with plan digest {run.plan_digest[:12]}, but "
                f"{loaded.path} now has digest {loaded.digest[:12]}: the plan changed mid-run",
                hint="restore the plan as it was to continue this run, or start a new run",
            )
        run_dir = RunDir.of(run_id)
        run_dir.record(
            run_id=run_id,
            plan=plan.name,
            envs={env: dbs.display_dsn(env)},
            **{"mini_plan_path" if plan.is_mini else "plan_path": str(loaded.path.resolve())},
        )
        events.attach(run_dir.env(env) / "events.jsonl")
        log.info("apply.start", run_id=run_id, env=env, stage=stage, plan_digest=loaded.digest)

        async with run_lock(conn, run_id):
            if (rolled_back := await rollback_note(conn, run_id)) is not None:
                raise NoGo(
                    f"the {stage} of run {run_id} cannot go on: {rolled_back}",
                    hint=f"start a new run: {cmd} apply {loaded.path} --env {env}",
                )
            if plan.is_mini:
                stage = await _prod_stage(conn, loaded, run_id, env, cmd)
                if stage == "finished":
                    return await _finished_result(conn, run_id, env, "rest", cmd, loaded)
            elif (row := await ledger.get_phase(conn, run_id, "apply")) and row.finished_at:
                return await _finished_result(conn, run_id, env, "apply", cmd, loaded)
            await ledger.save_phase(conn, run_id, stage, status="running", result={})
            await ledger.set_run_status(conn, run_id, f"{stage}:running")
            result = await _run_batches(conn, dbs, loaded, target, run_id, env, stage, progress)
            return await _finish(conn, dbs, loaded, target, run_id, env, stage, result, cmd)
    finally:
        events.detach()
        await close_quietly(conn)


async def _prod_stage(
    conn: asyncpg.Connection, loaded: LoadedPlan, run_id: str, env: str, cmd: str
) -> str:
    """Which prod stage is next (canary, rest, finished), after checking the gates before it."""
    plan = loaded.plan
    assert plan.parent is not None
    health = await gate_state(
        conn, run_id, "health", gate_name("health", env), plan.parent.digest, loaded
    )
    require_open(health, run_id=run_id, before="the prod apply", cmd=cmd)
    health_row = await ledger.get_phase(conn, run_id, "health")
    recorded = health_row.result.get("mini_plan_digest") if health_row else None
    if recorded != loaded.digest:
        raise InvalidInput(
            f"{loaded.path} is not the mini plan the approved health check wrote "
            f"(digest {loaded.digest[:12]}, health wrote {str(recorded)[:12]})",
            hint="use the prod_mini_backfill_plan.json of this run unchanged, or re-run `backfill health`",
        )
    canary = await ledger.get_phase(conn, run_id, "canary")
    if canary is None or canary.finished_at is None:
        return "canary"
    state = await gate_state(
        conn, run_id, "canary", gate_name("canary", env), loaded.digest, loaded
    )
    require_open(state, run_id=run_id, before="the prod rollout after the canary", cmd=cmd)
    rest = await ledger.get_phase(conn, run_id, "rest")
    return "finished" if rest is not None and rest.finished_at else "rest"


@dataclass
class _Pass:
    outcomes: list[BatchOutcome] = field(default_factory=list)
    failure: BatchOutcome | None = None
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    passes: int = 0
    interrupted_before: int = 0
    remaining_after: int = 0
    rows_needing_at_start: int = 0
    batch_mode: str = ""
    batch_mode_reason: str = ""
    counting_seconds: float = 0.0  # whole-table discovery counts: before the run (and see below)
    unverified_spans: int = 0  # spans whose convergence check failed: the pass ends with a count
    stuck: list[str] = field(default_factory=list)  # keys discovery returns after their batch


def _raise_if_stuck(state: _Pass) -> None:
    if state.stuck:
        raise WorkFailed(
            f"discovery does not converge: it still returns rows this run already applied "
            f"(keys: {'; '.join(state.stuck)}); stopped instead of applying them again",
            hint="make the discovery query exclude rows the apply has done (e.g. "
            "`WHERE col IS DISTINCT FROM <new value>`), then continue with --run",
        )


async def _run_batches(
    conn: asyncpg.Connection,
    dbs: Databases,
    loaded: LoadedPlan,
    target: TargetInfo,
    run_id: str,
    env: str,
    stage: str,
    progress: ProgressCallback | None,
) -> _Pass:
    # discovery reads on its own read-only connection (and the plan's read_role, if any):
    # a discovery that calls a writing function fails instead of writing outside any batch
    reader = await dbs.connect(env, read_only=True)
    try:
        return await _run_passes(conn, reader, dbs, loaded, target, run_id, env, stage, progress)
    finally:
        await close_quietly(reader)


async def _run_passes(
    conn: asyncpg.Connection,
    reader: asyncpg.Connection,
    dbs: Databases,
    loaded: LoadedPlan,
    target: TargetInfo,
    run_id: str,
    env: str,
    stage: str,
    progress: ProgressCallback | None,
) -> _Pass:
    plan = loaded.plan
    b = plan.batching
    state = _Pass()
    cursor, next_no, state.interrupted_before = await _resume_point(conn, run_id)
    stop_after: int | None = None
    if stage == "canary":
        assert plan.canary is not None
        done_in_canary = await conn.fetchval(
            "SELECT count(*) FROM backfill.batches WHERE run_id = $1 AND stage = 'canary' AND status = 'done'",
            run_id,
        )
        stop_after = max(plan.canary.batches - int(done_in_canary), 0)
    t_count = time.perf_counter()
    state.rows_needing_at_start = await _count(reader, plan.discovery.sql)
    state.counting_seconds += time.perf_counter() - t_count
    if progress:
        progress(
            "start",
            {
                "rows": state.rows_needing_at_start,
                "batch_size": b.size,
                "run_id": run_id,
                "env": env,
                "stage": stage,
            },
        )
    throttle = Throttle(b.batches_per_minute, b.rows_per_second, b.size)
    discovery = Discovery(reader, target, plan.discovery.sql, b.size)
    run_dir = RunDir.of(run_id)
    batch_dir = run_dir.env(env) / "batches"
    totals: Counter[str] = Counter()

    async def new_conn() -> asyncpg.Connection:
        c = await dbs.connect(env)
        await c.execute(
            "SELECT set_config('lock_timeout', $1, false), set_config('statement_timeout', $2, false)",
            f"{int(b.lock_timeout * 1000)}ms",
            f"{int(b.statement_timeout * 1000)}ms",
        )
        return c

    async def record(outcome: BatchOutcome) -> None:
        # database errors quote values, and values may be secrets: redacted before any write
        outcome.errors = redact.redact_value(outcome.errors)
        outcome.error = None if outcome.error is None else redact.redact_text(outcome.error)
        if outcome.status == "done" and outcome.errors:
            # the executor recorded a retried batch's earlier errors as it committed
            await conn.execute(
                "UPDATE backfill.batches SET errors = $3::jsonb WHERE run_id = $1 AND batch_no = $2",
                run_id,
                outcome.batch_no,
                json.dumps(outcome.errors),
            )
        state.outcomes.append(outcome)
        write_json(batch_dir / f"batch_{outcome.batch_no:05d}.json", outcome.as_json())
        if outcome.status == "failed":
            await conn.execute(
                """INSERT INTO backfill.batches (run_id, batch_no, stage, status, first_key, last_key,
                       selected, attempts, errors, started_at, duration_ms)
                   VALUES ($1, $2, $3, 'failed', $4, $5, $6, $7, $8::jsonb, $9, $10)
                   ON CONFLICT DO NOTHING""",
                run_id,
                outcome.batch_no,
                stage,
                outcome.first_key,
                outcome.last_key,
                outcome.selected,
                outcome.attempts,
                json.dumps(outcome.errors),
                outcome.started_at,
                outcome.duration_ms,
            )
        totals["batches"] += outcome.status == "done"
        totals["changed"] += outcome.changed
        totals["noop"] += outcome.noop
        log.info(
            "batch." + outcome.status,
            batch=outcome.batch_no,
            changed=outcome.changed,
            noop=outcome.noop,
            attempts=outcome.attempts,
            ms=round(outcome.duration_ms, 1),
            error_category=outcome.error_category,
            error=outcome.error,
        )
        if progress:
            progress("batch", {"outcome": outcome, "totals": dict(totals)})

    dispatched = 0

    async def produce(
        send: anyio.abc.ObjectSendStream[Batch], failed: anyio.Event, start: list[str] | None
    ) -> None:
        nonlocal next_no, dispatched
        position = start
        async with send:
            while not failed.is_set():
                if stop_after is not None and dispatched >= stop_after:
                    return
                page = await discovery.page(position)
                if page is None:
                    return
                await throttle.wait(page.size)
                if failed.is_set():
                    return
                batch = Batch(
                    next_no, stage, page.key_arrays, page.first_key, page.last_key, position
                )
                try:
                    await send.send(batch)
                except anyio.BrokenResourceError:  # every worker stopped after a failure
                    return
                next_no += 1
                dispatched += 1
                position = page.last_key

    async def work(
        batches: anyio.abc.ObjectReceiveStream[Batch],
        spans: MemoryObjectSendStream[Span],
        failed: anyio.Event,
    ) -> None:
        executor = BatchExecutor(
            target, plan.apply.sql, run_id, new_conn, max_retries=b.max_retries
        )
        try:
            async with batches, spans:
                async for batch in batches:
                    if failed.is_set():  # finish what runs, start nothing new
                        break
                    outcome = await executor.run(batch)
                    state.batch_mode = executor.mode or state.batch_mode
                    state.batch_mode_reason = executor.mode_reason or state.batch_mode_reason
                    await record(outcome)
                    if outcome.status == "failed":
                        if state.failure is None:
                            state.failure = outcome
                            failed.set()
                    else:
                        spans.send_nowait(Span(batch.after_key, batch.last_key, batch.key_arrays))
        finally:
            await executor.close()

    async def verify(spans: anyio.abc.ObjectReceiveStream[Span], failed: anyio.Event) -> None:
        """Check each committed batch's span behind the workers (ConvergenceCheck)."""
        checker: ConvergenceCheck | None = None

        async def open_checker() -> ConvergenceCheck:
            c = await dbs.connect(env, read_only=True)
            await c.execute(
                "SELECT set_config('statement_timeout', $1, false)",
                f"{int(b.statement_timeout * 1000)}ms",
            )
            return ConvergenceCheck(c, target, plan.discovery.sql, run_id)

        async with spans:
            try:
                with anyio.move_on_after(30):  # before the first batch commits, if it can
                    checker = await open_checker()
            except Exception as exc:
                log.warning("apply.check_failed", error=str(exc))
            try:
                async for span in spans:
                    if state.stuck:
                        continue
                    try:
                        checker = checker or await open_checker()
                        result = await checker.check(span)
                    except Exception as exc:  # unverified: the pass ends with a full count
                        state.unverified_spans += 1
                        log.warning(
                            "apply.check_failed", span=[span.after, span.last], error=str(exc)
                        )
                        if checker is not None:
                            await close_quietly(checker.conn)
                            checker = None
                        continue
                    state.remaining_after += result.remaining
                    if result.stuck:
                        state.stuck = result.stuck
                        failed.set()
            finally:
                if checker is not None:
                    await close_quietly(checker.conn)

    for pass_no in range(1, b.max_passes + 1):
        state.passes = pass_no
        state.remaining_after = state.unverified_spans = 0
        start = cursor if pass_no == 1 else None
        send, receive = anyio.create_memory_object_stream[Batch](0)
        span_send, span_receive = anyio.create_memory_object_stream[Span](math.inf)
        if start is not None:  # a continued run: what earlier commands committed is checked too
            span_send.send_nowait(Span(None, start, None))
        failed = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce, send, failed, start)
            for _ in range(b.workers):
                tg.start_soon(work, receive.clone(), span_send.clone(), failed)
            tg.start_soon(verify, span_receive, failed)
            receive.close()
            span_send.close()
        if state.failure is not None:
            raise failure_error(state.failure)
        _raise_if_stuck(state)
        if stop_after is not None:
            break
        if state.unverified_spans:
            t_count = time.perf_counter()
            state.remaining_after = await _count(reader, plan.discovery.sql)
            state.counting_seconds += time.perf_counter() - t_count
            if state.remaining_after:
                whole = ConvergenceCheck(reader, target, plan.discovery.sql, run_id)
                state.stuck = (await whole.check(Span(None, None, None))).stuck
                _raise_if_stuck(state)
        if state.remaining_after == 0:
            break
        log.info("apply.new_rows", remaining=state.remaining_after, next_pass=pass_no + 1)
    return state


async def _finish(
    conn: asyncpg.Connection,
    dbs: Databases,
    loaded: LoadedPlan,
    target: TargetInfo,
    run_id: str,
    env: str,
    stage: str,
    state: _Pass,
    cmd: str,
) -> ApplyResult:
    plan = loaded.plan
    b = plan.batching
    elapsed = time.perf_counter() - state.started
    done = [o for o in state.outcomes if o.status == "done"]
    changed = sum(o.changed for o in done)
    noop = sum(o.noop for o in done)
    warnings: list[str] = []
    if state.remaining_after and stage != "canary":
        warnings.append(
            f"{state.remaining_after} row(s) still need the backfill after {state.passes} pass(es): "
            "rows keep arriving; continue the run with --run to catch up"
        )
    if state.interrupted_before:
        warnings.append(
            f"{state.interrupted_before} batch number(s) were interrupted before commit by an "
            "earlier stop; their rows were rediscovered and applied in later batches"
        )
    criteria = "pass" if not warnings or stage == "canary" else "inconclusive"
    run_dir = RunDir.of(run_id)
    rollback_path = run_dir.env(env) / f"rollback_{datetime.now(UTC):%Y-%m-%d}.sql"
    run = await ledger.get_run(conn, run_id)
    assert run is not None
    gate = None if stage == "rest" else gate_name(stage, env)
    next_command = (
        f"{cmd} approve {run_id} --gate {gate} --as <approver>"
        if gate
        else f"{cmd} status {run_id}"
    )
    result: dict[str, Any] = {
        "plan": {
            "name": plan.name,
            "digest": loaded.digest,
            "path": str(loaded.path),
            "description": plan.plan.description,
            "owner": plan.plan.owner,
            **await bound_values(conn, loaded),
        },
        "env": env,
        "dsn": dbs.display_dsn(env),
        "operator": run.operator,
        "target": {
            "table": target.display,
            "key": [k.name for k in target.key],
            "columns": [c.name for c in target.columns],
        },
        "settings": b.model_dump(),
        "batch_mode": {"mode": state.batch_mode, "reason": state.batch_mode_reason},
        "canary_batches": plan.canary.batches if plan.canary else None,
        "totals": {
            "rows_needing_at_start": state.rows_needing_at_start,
            "batches": len(done),
            "batches_this_command": len(state.outcomes),
            "changed": changed,
            "noop": noop,
            "retried_batches": sum(1 for o in done if o.attempts > 1),
            "remaining": state.remaining_after,
            "passes": state.passes,
        },
        "timing": {
            "started_at": state.started_at.isoformat(),
            "elapsed_seconds": round(elapsed, 3),
            "counting_seconds": round(state.counting_seconds, 3),
            "rows_per_second": round((changed + noop) / elapsed, 1) if elapsed > 0 else None,
            "batches_per_minute": round(len(done) / elapsed * 60, 2) if elapsed > 0 else None,
        },
        "warnings": warnings,
        "rollback_file": rollback_path.name,
        "report_file": summary_name(stage),
        "next_command": next_command,
        "cmd": cmd,
    }
    await ledger.save_phase(
        conn, run_id, stage, status="finished", result=result, criteria=criteria, finished=True
    )
    await ledger.set_run_status(conn, run_id, f"{stage}:finished")
    totals_all = await fetch_one(
        conn,
        "SELECT count(*) FILTER (WHERE status = 'done') AS batches, coalesce(sum(changed), 0) AS changed,"
        " coalesce(sum(noop), 0) AS noop FROM backfill.batches WHERE run_id = $1",
        run_id,
    )
    write_json(
        run_dir.env(env) / "execution_results.json"
        if stage == "apply"
        else run_dir.env(env) / f"{stage}_execution_results.json",
        {
            **result,
            "run_id": run_id,
            "stage": stage,
            "errors_by_category": dict(
                Counter(e["category"] for o in state.outcomes for e in o.errors)
            ),
            "run_totals": dict(totals_all),
        },
    )
    side = await dbs.connect(env)
    try:
        await emit_rollback_file(
            conn, run, rollback_path, display_dsn=dbs.display_dsn(env), checksum_conn=side
        )
    finally:
        await close_quietly(side)
    summary_path, digest = await render_summary(conn, run, env, stage, dbs.display_dsn(env))
    await ledger.set_report_digest(conn, run_id, stage, digest)
    log.info(
        "apply.finished",
        run_id=run_id,
        stage=stage,
        changed=changed,
        noop=noop,
        seconds=round(elapsed, 2),
        criteria=criteria,
    )
    return ApplyResult(
        run_id,
        env,
        stage,
        "halted" if gate else "done",
        gate,
        next_command,
        summary_path,
        rollback_path,
        result["totals"],
    )


async def _finished_result(
    conn: asyncpg.Connection, run_id: str, env: str, stage: str, cmd: str, loaded: LoadedPlan
) -> ApplyResult:
    """Re-running a finished apply is a no-op: say where things stand."""
    row = await ledger.get_phase(conn, run_id, stage)
    assert row is not None
    gate = None if stage == "rest" else gate_name(stage, env)
    if gate:
        state = await gate_state(conn, run_id, stage, gate, loaded.digest, loaded)
        status = "done" if state.is_open else "halted"
        next_command = (
            f"{cmd} pipeline {loaded.path} --run {run_id}"
            if state.is_open
            else f"{cmd} approve {run_id} --gate {gate} --as <approver>"
        )
    else:
        status, next_command = "done", f"{cmd} status {run_id}"
    run_dir = RunDir.of(run_id).env(env)
    return ApplyResult(
        run_id,
        env,
        stage,
        status,
        gate,
        next_command,
        run_dir / summary_name(stage),
        totals=dict(row.result.get("totals", {})),
    )
