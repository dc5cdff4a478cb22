"""Phase 1 (and 4): discover → batch → apply, rate-limited, resumable; then halt at a gate."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from runner import ledger, rollout
from runner.artifacts import RunDir, check_run_id, new_run_id, write_json
from runner.db import Databases, close_quietly
from runner.engine.batch_run import BatchRun, KeysetSource, RunSettings, RunState, describe
from runner.engine.claims import Claims
from runner.engine.discovery import Page
from runner.engine.executor import (
    RETURNING_OLD_NEW_SINCE,
    BatchExecutor,
    BatchOutcome,
    require_write_tracking,
)
from runner.engine.impact import estimate_impact
from runner.engine.quarantine import Budget, ExcludingSource, Policy, Quarantine
from runner.engine.session import MainSession
from runner.engine.shapes import ShapedRun, resolve_tables, shaped_run
from runner.engine.sizing import BatchSizer
from runner.engine.target import TargetInfo, resolve_target
from runner.engine.throttle import Throttle
from runner.engine.watch import RunWatch
from runner.engine.windows import count_windows, plan_windows
from runner.errors import InvalidInput, NoGo, WorkFailed
from runner.files import writing
from runner.phases.common import (
    PhaseFrame,
    ProgressCallback,
    ReportWriter,
    command_prefix,
    ensure_run,
    gate_state,
    phase_frame,
    plan_binding,
    require_open,
    rollback_note,
)
from runner.phases.follow import Follower, ManifestSpool
from runner.phases.validate import refuse_unfit, validate_env
from runner.phases.verify import run_verify
from runner.phases.windows import WindowWalk, resume_point, window_result
from runner.plan import LoadedPlan
from runner.reports.apply import render_summary, summary_name
from runner.reports.quarantine import write_quarantine_files
from runner.results import (
    ApplyDoc,
    ApplyTiming,
    ApplyTotals,
    BatchMode,
    QuarantineTotals,
    TargetDoc,
    VerifyResult,
    WindowResult,
)
from runner.rollback import emit_rollback_file
from runner.rollout import gate_name

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
    totals: ApplyTotals = field(default_factory=ApplyTotals)
    dry_run: dict[str, Any] | None = None
    quarantine: QuarantineTotals = field(default_factory=QuarantineTotals)  # the run's, so far


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


@dataclass(frozen=True)
class _Sample:
    seconds: float | None
    rows: int
    note: str


async def _sample_batch(
    dbs: Databases, env: str, loaded: LoadedPlan, page: Page | None, sample: bool
) -> _Sample:
    """The first batch's statements, timed inside a transaction that is rolled back: what one
    batch costs here, for the estimate. Nothing is kept (a sequence it draws from is not given
    back: skip it with --no-sample)."""
    if page is None or not sample:
        return _Sample(None, 0, "not sampled" if not sample else "nothing to sample")
    plan = loaded.plan
    async with dbs.connection(env) as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(
                "SELECT set_config('statement_timeout', $1, true)",
                f"{int(plan.batching.statement_timeout * 1000)}ms",
            )
            t0 = time.perf_counter()
            for sql in plan.apply.all:
                await conn.execute(sql, *page.key_arrays)
            seconds = time.perf_counter() - t0
        except asyncpg.PostgresError as e:
            return _Sample(None, 0, f"the sample batch failed: {' '.join(str(e).split())}")
        finally:
            await tx.rollback()
    return _Sample(seconds, page.size, "the plan's statements on the first batch, rolled back")


async def _dry_run(
    loaded: LoadedPlan, dbs: Databases, env: str, stage: str, cmd: str, sample: bool
) -> ApplyResult:
    plan = loaded.plan
    async with dbs.connection(env, read_only=True) as conn, conn.transaction(readonly=True):
        target = await resolve_target(conn, plan.target)
        source = KeysetSource(target, plan.discovery.sql, plan.batching.size)
        windows: list[dict[str, Any]] | None = None
        outside = 0
        if plan.windows is not None:
            walk = await plan_windows(conn, target, plan.windows, plan.discovery.sql)
            outside = await source.count(conn)
            windows = await count_windows(conn, walk)
            source.narrow(walk.span)
        needing = await source.count(conn)
        outside -= needing
        t_page = time.perf_counter()
        page = await source.next_page(conn, None)
        page_seconds = time.perf_counter() - t_page
        explain: list[str] = []
        if page is not None:
            for sql in plan.apply.all:
                explain += [
                    elide_arrays(r[0]) for r in await conn.fetch("EXPLAIN " + sql, *page.key_arrays)
                ]
        if plan.shaped:
            statements = shaped_statements(await shaped_run(conn, plan, target))
        else:
            statements = await batch_statements(conn, target, plan.apply.sql or "")
        impact = await estimate_impact(conn, target, plan.discovery, source.discovery_sql, needing)
    batches = math.ceil(needing / plan.batching.size)
    throttle = Throttle(
        plan.batching.batches_per_minute, plan.batching.rows_per_second, plan.batching.size
    )
    floor = throttle.seconds_for(batches, needing)
    measured = await _sample_batch(dbs, env, loaded, page, sample)
    if measured.seconds is not None and measured.rows:
        # T = N·t/C: the batches, each as long as finding its page and the sample per row,
        # over the workers
        per_batch = page_seconds + measured.seconds / measured.rows * min(
            plan.batching.size, needing
        )
        work = batches * per_batch / plan.batching.workers
        impact["sample"] = {
            "rows": measured.rows,
            "seconds": round(measured.seconds, 4),
            "page_seconds": round(page_seconds, 4),
            "note": measured.note,
        }
        impact["estimated_seconds"] = round(max(work, floor if throttle.limited else 0.0), 1)
    else:
        impact["sample"] = {"rows": 0, "seconds": None, "note": measured.note}
        impact["estimated_seconds"] = floor if throttle.limited else None
    if windows is not None:
        per_row = (
            impact["estimated_seconds"] / needing
            if impact["estimated_seconds"] and needing
            else None
        )
        for row in windows:
            row["batches"] = math.ceil(row["rows"] / plan.batching.size)
            row["estimated_seconds"] = round(row["rows"] * per_row, 1) if per_row else None
        impact["windows"] = windows
        impact["windows_total"] = len(walk.windows)
        impact["outside_windows"] = outside
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
        "batch_statements": statements,
        "impact": impact,
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


_LONG_ARRAY = re.compile(r"'\{([^'{}]*)\}'")


def elide_arrays(text: str, keep: int = 3) -> str:
    """An EXPLAIN line with long array literals (a batch's keys) shortened to their first items."""

    def short(m: re.Match[str]) -> str:
        items = m.group(1).split(",")
        if len(items) <= keep + 1:
            return m.group(0)
        return "'{" + ",".join(items[:keep]) + f",… {len(items) - keep} more}}'"

    return _LONG_ARRAY.sub(short, text)


async def batch_statements(
    conn: asyncpg.Connection, target: TargetInfo, apply_sql: str
) -> list[dict[str, str]]:
    """The statements one batch's transaction will run here, in order, with what binds them
    (a dry run's offline view, as alembic's --sql prints a migration)."""
    keys = ", ".join(
        f"${i + 1} = the batch's {k.name} keys ({k.type}[])" for i, k in enumerate(target.key)
    )
    one = target.returning_apply(apply_sql)
    no_ledger_yet = ""
    try:
        async with conn.transaction():  # a savepoint: a refused PREPARE must not end the dry run
            await conn.prepare(one.sql)
    except asyncpg.UndefinedTableError as e:
        # a database without the ledger yet: the plan's statement comes first in the batch
        # statement and was analysed without error, so on 18+ the batch runs as one statement
        # (the real apply creates the ledger's tables before its first batch)
        version = int(await conn.fetchval("SHOW server_version_num"))
        if "backfill." not in str(e) or version < RETURNING_OLD_NEW_SINCE:
            return _capture_statements(target, apply_sql, keys, " ".join(str(e).split()))
        no_ledger_yet = " (the ledger's tables are created by the first apply)"
    except asyncpg.PostgresError as e:
        return _capture_statements(target, apply_sql, keys, " ".join(str(e).split()))
    return [
        {
            "what": f"one statement (RETURNING OLD/NEW){no_ledger_yet}; {keys}; then binds "
            + ", ".join(one.params[len(target.key) :]),
            "sql": one.sql.strip(),
        },
        {"what": "then the scope guard: the transaction's write counters, then COMMIT", "sql": ""},
    ]


def _capture_statements(
    target: TargetInfo, apply_sql: str, keys: str, reason: str
) -> list[dict[str, str]]:
    capture = target.capture
    finalize = target.finalize
    return [
        {"what": f"capture path ({reason}); BEGIN ISOLATION LEVEL REPEATABLE READ", "sql": ""},
        {"what": f"1. before-images of the batch's rows; {keys}", "sql": capture.sql.strip()},
        {"what": f"2. the plan's apply; {keys}", "sql": apply_sql.strip()},
        {
            "what": "3. compare, images, ledger row; binds " + ", ".join(finalize.params),
            "sql": finalize.sql.strip(),
        },
        {"what": "4. the scope guard: the transaction's write counters, then COMMIT", "sql": ""},
    ]


def shaped_statements(shape: ShapedRun) -> list[dict[str, str]]:
    """What a shaped batch's transaction runs, in order (a dry run's offline view)."""
    keys = ", ".join(
        f"${i + 1} = the batch's {k.name} keys ({k.type}[])" for i, k in enumerate(shape.target.key)
    )
    if shape.direct is not None:
        out = [{"what": f"BEGIN (READ COMMITTED); {keys}", "sql": ""}]
        for n, step in enumerate(shape.steps, start=1):
            out.append(
                {
                    "what": f"{step.where}: insert into {step.table.display}, in the same "
                    "statement each inserted row's key and digest stored"
                    + (", and the batch's ledger row" if n == len(shape.steps) else ""),
                    "sql": step.sql.strip(),
                }
            )
        out.append(
            {
                "what": "the scope guard (write counters) and the tables' columns checked; COMMIT",
                "sql": "",
            }
        )
        return out
    out = [{"what": f"BEGIN ISOLATION LEVEL REPEATABLE READ; {keys}", "sql": ""}]
    for step in shape.steps:
        imaged = (
            "each inserted row recorded by its digest"
            if step.table.digest is not None
            else "its rows imaged whole"
        )
        out.append(
            {
                "what": f"{step.where}: {step.op} of {step.table.display}, {imaged} "
                "(RETURNING OLD/NEW on PostgreSQL 18+; on older servers an update or upsert is "
                "probed in a savepoint first)",
                "sql": step.sql.strip(),
            }
        )
    out.append(
        {
            "what": "net images per table checked against the plan's [target] and [[writes]], "
            "stored, the ledger row; the scope guard; COMMIT",
            "sql": "",
        }
    )
    return out


async def apply(
    loaded: LoadedPlan,
    dbs: Databases,
    *,
    env: str,
    run_id: str | None = None,
    dry_run: bool = False,
    operator: str,
    progress: ProgressCallback | None = None,
    max_rows: int | None = None,
    sample: bool = True,
) -> ApplyResult:
    """Run (or continue) the apply of `loaded` on `env`. Returns where it stopped and why.
    `max_rows` (or the plan's `batching.max_rows_per_run`, the smaller) caps this command."""
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
        return await _dry_run(loaded, dbs, env, stage, cmd, sample)

    timeout = plan.batching.lease_timeout

    async def ledger_connection() -> asyncpg.Connection:
        # a transaction on the ledger left idle this long (this process frozen while it holds
        # the shared cursor's row) is ended by the server, so the other processes go on
        c = await dbs.connect(env)
        await c.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', $1, false)",
            f"{int(timeout * 1000)}ms",
        )
        return c

    conn = await ledger_connection()
    session: MainSession | None = None
    try:
        target, run = await _open_run(conn, dbs, loaded, env, run_id, operator)
        session = MainSession(
            conn, ledger_connection, run.run_id, retries=plan.batching.max_retries
        )
        not_joinable = _not_joinable(loaded)
        async with phase_frame(
            conn,
            run,
            env,
            stage,
            connect=lambda: dbs.connect(env),
            join=(
                (lambda c: ledger.joinable_stage(c, run.run_id, timeout))
                if run_id is not None and not not_joinable
                else None
            ),
            not_joinable=not_joinable,
            lease_timeout=timeout,
        ) as frame:
            log.info(
                "apply.start",
                run_id=run.run_id,
                env=env,
                stage=frame.phase,
                plan_digest=loaded.digest,
                joined=frame.joined,
            )
            if (rolled_back := await rollback_note(conn, run.run_id)) is not None:
                raise NoGo(
                    f"the {stage} of run {run.run_id} cannot go on: {rolled_back}",
                    hint=f"start a new run: {cmd} apply {loaded.path} --env {env}",
                )
            if frame.joined:
                session.holds_run_lock = False  # the leader holds it
                return await _join(
                    conn, session, dbs, loaded, target, frame, progress, cmd, max_rows
                )
            if plan.is_mini:
                await frame.set_phase(await _prod_stage(conn, loaded, run.run_id, env, cmd))
                if frame.phase == "finished":
                    return await _finished_result(conn, dbs, run.run_id, env, "rest", cmd, loaded)
            elif (row := await ledger.get_phase(conn, run.run_id, "apply")) and row.finished_at:
                return await _finished_result(conn, dbs, run.run_id, env, "apply", cmd, loaded)
            await frame.started()
            return await _lead(session, dbs, loaded, target, frame, progress, cmd, max_rows)
    finally:
        await close_quietly(conn)
        if session is not None:
            await session.close()


async def _lead(
    session: MainSession,
    dbs: Databases,
    loaded: LoadedPlan,
    target: TargetInfo,
    frame: PhaseFrame,
    progress: ProgressCallback | None,
    cmd: str,
    max_rows: int | None,
) -> ApplyResult:
    """The stage this command leads: its batches, then its files, or the row cap reached.

    The files are prepared while the batches run (`phases.follow`), unless a row cap may end the
    command before the stage: a capped command writes no files, and the one that finishes the
    stage reads every earlier command's batches then."""
    plan = loaded.plan
    follower = (
        Follower(frame.run, frame.phase, frame.dir)
        if _cap(plan.batching.max_rows_per_run, max_rows) is None
        else None
    )
    try:
        async with (
            follower.running(lambda: dbs.connect(frame.env))
            if follower
            else contextlib.nullcontext()
        ):
            state = await _batch_machine(
                session,
                dbs,
                loaded,
                target,
                frame,
                progress,
                cmd,
                max_rows,
                on_committed=follower.committed if follower else None,
            )
        if state.capped:
            return await session.run(lambda c: _capped(c, frame, loaded, state, cmd))
        return await session.run(
            lambda c: _finish(c, frame, dbs, loaded, target, state, cmd, follower)
        )
    finally:
        if follower is not None:
            follower.close()


def _not_joinable(loaded: LoadedPlan) -> str:
    """Why a second process may not join a run of this plan ("" when it may)."""
    plan = loaded.plan
    if plan.shaped:
        return (
            "a run that writes declared tables ([[writes]]) is applied by one process: its "
            "batches commit in batch order, the order its rollback undoes"
        )
    if plan.windows is not None:
        return (
            "a windowed run is walked by one process: window after window, each window's hooks once"
        )
    return ""


async def _join(
    conn: asyncpg.Connection,
    session: MainSession,
    dbs: Databases,
    loaded: LoadedPlan,
    target: TargetInfo,
    frame: PhaseFrame,
    progress: ProgressCallback | None,
    cmd: str,
    max_rows: int | None,
) -> ApplyResult:
    """Work on the stage another process leads (engine.claims) until it is done; the leader
    finishes it (summary, rollback file, gate)."""
    run_id, env, stage = frame.run_id, frame.env, frame.phase
    expected = await _prod_stage(conn, loaded, run_id, env, cmd) if loaded.plan.is_mini else "apply"
    if expected != stage:
        raise InvalidInput(
            f"run {run_id}: another process is applying its {stage} in {env!r}, but this plan's "
            f"stage there is {expected!r}",
            hint="pass the plan (or mini plan) the running process was started with",
        )
    state = await _batch_machine(
        session, dbs, loaded, target, frame, progress, cmd, max_rows, join=True
    )
    totals = _command_totals(state)
    log.info("apply.joined_end", run_id=run_id, stage=stage, batches=totals.batches)
    work = await session.run(
        lambda c: ledger.get_work(c, run_id, stage, loaded.plan.batching.lease_timeout)
    )
    if not state.capped and (work is None or not work.done):
        raise WorkFailed(
            f"run {run_id}: this process committed {totals.batches:,} batch(es) of the {stage}, but "
            "the process that led the stage ended (killed, cut off, stopped or capped) before "
            "the stage was finished: no process leads it now, so it has no summary, rollback "
            "file or gate yet",
            hint=f"continue it (this command then leads): {cmd} apply {loaded.path} --env "
            f"{env} --run {run_id}",
        )
    return ApplyResult(
        run_id,
        env,
        stage,
        "joined",
        None,
        f"{cmd} status {run_id} --env {env}",
        totals=totals,
    )


def table_identities(tables: list[dict[str, Any]] | None) -> list[tuple[str, str, int, str]] | None:
    """Each table as a run is bound to it: name, oid and every column with its type."""
    if tables is None:
        return None
    return [
        (
            t["schema"],
            t["name"],
            t["oid"],
            ", ".join(f"{n} {ty}" for n, ty in t["image"])
            + ("; inserted rows kept as digests" if t.get("digest") is not None else ""),
        )
        for t in tables
    ]


def _tables_text(tables: list[tuple[str, str, int, str]] | None) -> str:
    if tables is None:
        return "only its target (a plain run)"
    return "; ".join(f"{s}.{n} (oid {o}: {cols})" for s, n, o, cols in tables)


async def _open_run(
    conn: asyncpg.Connection,
    dbs: Databases,
    loaded: LoadedPlan,
    env: str,
    run_id: str | None,
    operator: str,
) -> tuple[TargetInfo, ledger.RunRow]:
    """The target, and the run's row (created for a new run): the ledger is created here, after
    everything that can refuse the command without writing has passed."""
    plan = loaded.plan
    target = await resolve_target(conn, plan.target)
    tables = [t.doc() for t in await resolve_tables(conn, plan)] if plan.shaped else None
    await require_write_tracking(conn)
    await ledger.ensure_ledger(conn)
    run_id = run_id or new_run_id(plan.name)
    run = await ensure_run(
        conn, loaded, env, run_id, target, operator, create=not plan.is_mini, tables=tables
    )
    recorded = table_identities(run.tables)
    resolved = table_identities(tables)
    if recorded != resolved:
        raise InvalidInput(
            f"run {run_id} writes {_tables_text(recorded)} in {env!r}, but the plan now resolves "
            f"to {_tables_text(resolved)}: a table was dropped and created again, its columns "
            "changed, the plan declares other tables, or this version of backfill records "
            "inserted rows otherwise than the one that started the run",
            hint="start a new run; this run's images belong to the tables it recorded",
        )
    if run.plan_digest != loaded.digest and not plan.is_mini:
        raise InvalidInput(
            f"run {run_id} was started with plan digest {run.plan_digest[:12]}, but "
            f"{loaded.path} now has digest {loaded.digest[:12]}: the plan changed mid-run",
            hint="restore the plan as it was to continue this run, or start a new run",
        )
    RunDir.of(run_id).record(
        run_id=run_id,
        plan=plan.name,
        envs={env: dbs.display_dsn(env)},
        **{"mini_plan_path" if plan.is_mini else "plan_path": str(loaded.path.resolve())},
    )
    return target, run


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
    recorded = health_row.doc.mini_plan_digest if health_row else None
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


async def _batch_machine(
    session: MainSession,
    dbs: Databases,
    loaded: LoadedPlan,
    target: TargetInfo,
    frame: PhaseFrame,
    progress: ProgressCallback | None,
    cmd: str,
    max_rows: int | None,
    *,
    join: bool = False,
    on_committed: Callable[[int], None] | None = None,
) -> RunState:
    """Set up the engine's batch machine for this stage (resume point, canary stop, recording)
    and run it (`join`: on the stage another process leads).

    Discovery reads on its own read-only connection (under the plan's read_role, if any): a
    discovery that calls a writing function fails instead of writing outside any batch."""
    env = frame.env
    reader = MainSession(
        await dbs.connect(env, read_only=True),
        lambda: dbs.connect(env, read_only=True),
        frame.run_id,
        retries=loaded.plan.batching.max_retries,
        holds_run_lock=False,
    )
    try:
        state = RunState()
        machine, keyset = await _machine(
            session,
            reader,
            dbs,
            loaded,
            target,
            frame,
            state,
            progress,
            cmd,
            max_rows,
            on_committed,
        )
        windows = loaded.plan.windows
        if join:
            await _start(session, reader, machine, state, frame, progress, resume=False)
            return await machine.join()
        if windows is None:
            return await machine.run(
                *await _start(session, reader, machine, state, frame, progress)
            )
        walk = await reader.run(
            lambda c: plan_windows(c, target, windows, loaded.plan.discovery.sql)
        )
        keyset.narrow(walk.span)
        await _start(session, reader, machine, state, frame, progress, resume=False)
        await WindowWalk(
            session,
            reader,
            windows,
            walk,
            frame.run_id,
            frame.env,
            progress,
            {target.oid, target.root_oid} | {int(t["oid"]) for t in frame.run.tables or []},
        ).run(machine, keyset, state)
        return state
    finally:
        await reader.close()


async def _start(
    session: MainSession,
    reader: MainSession,
    machine: BatchRun,
    state: RunState,
    frame: PhaseFrame,
    progress: ProgressCallback | None,
    *,
    resume: bool = True,
) -> tuple[list[str] | None, int]:
    """Where the machine starts (from the ledger), and the count of rows needing the backfill.
    Without `resume`: only the count (a windowed run resumes each window where it stopped,
    phases.windows; a joined process works where the leader's cursor is)."""
    run_id = frame.run_id
    cursor: list[str] | None = None
    next_no = 1
    if resume:
        cursor, next_no, state.interrupted_before = resume_point(
            await session.run(lambda c: ledger.batch_states(c, run_id))
        )
    t_count = time.perf_counter()
    state.rows_needing_at_start = await reader.run(machine.source.count)
    state.counting_seconds += time.perf_counter() - t_count
    if progress:
        progress(
            "start",
            {
                "rows": state.rows_needing_at_start,
                "batch_size": machine.throttle.batch_size,
                "run_id": run_id,
                "env": frame.env,
                "stage": frame.phase,
            },
        )
    return cursor, next_no


async def _machine(
    session: MainSession,
    reader: MainSession,
    dbs: Databases,
    loaded: LoadedPlan,
    target: TargetInfo,
    frame: PhaseFrame,
    state: RunState,
    progress: ProgressCallback | None,
    cmd: str,
    max_rows: int | None,
    on_committed: Callable[[int], None] | None = None,
) -> tuple[BatchRun, KeysetSource]:
    """The stage's batch machine, and the keyset source under its quarantine filter (which a
    windowed run narrows to each window)."""
    run_id, env, stage = frame.run_id, frame.env, frame.phase
    plan = loaded.plan
    b = plan.batching
    stop_after: int | None = None
    done_in_canary = 0
    if stage == "canary":
        assert plan.canary is not None
        done_in_canary = await session.run(lambda c: ledger.committed_batches(c, run_id, "canary"))
        stop_after = max(plan.canary.batches - int(done_in_canary), 0)
    claims = (
        None
        if _not_joinable(loaded)
        else Claims(
            session,
            run_id,
            stage,
            frame.process_id,
            b.lease_timeout,
            b.batches_per_minute,
            b.rows_per_second,
            limit=plan.canary.batches if stage == "canary" and plan.canary else None,
            claimed_before=int(done_in_canary),
        )
    )
    connect = BatchConnections(
        dbs,
        env,
        b.lock_timeout,
        b.statement_timeout,
        process=frame.process_id,
        idle_timeout=b.lease_timeout,
    )
    resume = f"{cmd} apply {loaded.path} --env {env} --run {run_id}"
    shape = await session.run(lambda c: shaped_run(c, plan, target)) if plan.shaped else None
    source, quarantine = await _quarantine(session, reader, loaded, target, run_id, resume)
    # a shaped run's batches may write the same rows (upserts into shared rows): they run one
    # at a time so they commit in batch order, the order its rollback undoes
    workers = 1 if plan.shaped else b.workers
    machine = BatchRun(
        reader,
        source,
        Throttle(b.batches_per_minute, b.rows_per_second, b.largest),
        RunSettings(
            run_id=run_id,
            stage=stage,
            workers=workers,
            max_passes=b.max_passes,
            stop_after=stop_after,
            resume=resume,
            max_rows=_cap(b.max_rows_per_run, max_rows),
            page_size=b.size,
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
        record=BatchRecorder(
            session,
            frame.dir / "batches",
            stage,
            progress,
            env,
            on_committed,
            shared_since=state.started_at if claims is not None else None,
        ),
        state=state,
        watch=RunWatch(
            session,
            reader,
            plan.guards,
            target.oid,
            stage=stage,
            state=state,
            resume=resume,
            workers=workers,
            progress=progress,
        ),
        sizer=BatchSizer(b.size, b.smallest, b.largest, b.target_batch_seconds),
        on_data_error=quarantine,
        claims=claims,
    )
    return machine, source.inner


async def _quarantine(
    session: MainSession,
    reader: MainSession,
    loaded: LoadedPlan,
    target: TargetInfo,
    run_id: str,
    resume: str,
    *,
    budget: bool = True,
) -> tuple[ExcludingSource, Quarantine]:
    """The batch source without the run's quarantined keys, and what splits a batch that fails on
    its data (engine.quarantine), its budget counted from what the run did before."""
    b = loaded.plan.batching
    rows = await session.run(
        lambda c: ledger.open_quarantine(c, run_id, [k.type for k in target.key])
    )
    width = len(target.key)
    source = ExcludingSource(
        KeysetSource(target, loaded.plan.discovery.sql, b.size),
        [tuple(r[f"k{i}"] for i in range(width)) for r in rows],
    )
    done, quarantined = await session.run(lambda c: ledger.failure_base(c, run_id))
    policy = Policy(b.on_error == "split", tuple(b.quarantine_sqlstates))
    return source, Quarantine(
        policy,
        source,
        reader,
        target,
        Budget(
            b.max_failure_rate if budget else None,
            b.min_failure_sample,
            attempted=done + quarantined,
            quarantined=quarantined,
        ),
        resume,
    )


@dataclass(frozen=True)
class BatchConnections:
    """The connections the batch machine opens: batches with the plan's timeouts, checks
    read-only (under the plan's read_role, if any)."""

    dbs: Databases
    env: str
    lock_timeout: float
    statement_timeout: float
    process: str = ""  # this process (backfill.processes): its batch rows name it
    # a batch transaction left idle this long (its process frozen) is ended by the server, so
    # the lease it holds can be taken over (engine.claims)
    idle_timeout: float = 30.0

    async def for_batches(self) -> asyncpg.Connection:
        c = await self.dbs.connect(self.env)
        await c.execute(
            "SELECT set_config('lock_timeout', $1, false), set_config('statement_timeout', $2, "
            "false), set_config('backfill.process', $3, false), "
            "set_config('idle_in_transaction_session_timeout', $4, false)",
            f"{int(self.lock_timeout * 1000)}ms",
            f"{int(self.statement_timeout * 1000)}ms",
            self.process,
            f"{int(self.idle_timeout * 1000)}ms",
        )
        return c

    async def for_checks(self) -> asyncpg.Connection:
        c = await self.dbs.connect(self.env, read_only=True)
        await c.execute(
            "SELECT set_config('statement_timeout', $1, false)",
            f"{int(self.statement_timeout * 1000)}ms",
        )
        return c


class BatchRecorder:
    """What happens to each batch outcome: its JSON file, a failed batch's ledger row, the log
    line and the progress view. (The executor has already redacted its errors.)"""

    def __init__(
        self,
        session: MainSession,
        batch_dir: Path,
        stage: str,
        progress: ProgressCallback | None,
        env: str,
        on_committed: Callable[[int], None] | None = None,
        shared_since: datetime | None = None,
    ) -> None:
        self.session = session
        self.batch_dir = batch_dir
        self.stage = stage
        self.progress = progress
        self.env = env
        self.on_committed = on_committed  # a done batch's number, as soon as it is recorded
        self.totals: Counter[str] = Counter()
        # other processes may work on the stage (engine.claims): the progress shows every
        # process's batches since this command started, read from the ledger now and then
        self.shared_since = shared_since
        self._shared: tuple[float, Counter[str], dict[str, int]] | None = None

    async def _settled(self, conn: asyncpg.Connection, outcome: BatchOutcome) -> None:
        """A failed or split batch's row, or a quarantined key's batch row and quarantine row,
        together."""
        async with conn.transaction():
            await ledger.record_settled_batch(
                conn,
                self.session.run_id,
                self.stage,
                outcome.status,
                outcome.batch_no,
                (outcome.first_key, outcome.last_key),
                outcome.selected,
                outcome.attempts,
                outcome.errors,
                outcome.started_at,
                outcome.duration_ms,
                outcome.split_into,
            )
            if outcome.status == "quarantined":
                await ledger.quarantine_key(
                    conn,
                    self.session.run_id,
                    self.env,
                    self.stage,
                    outcome.batch_no,
                    outcome.first_key,
                    outcome.sqlstate or "",
                    outcome.error or "",
                    outcome.attempts,
                )

    async def __call__(self, outcome: BatchOutcome) -> None:
        write_json(self.batch_dir / f"batch_{outcome.batch_no:05d}.json", outcome.as_json())
        if outcome.status in ("split", "quarantined", "stopped", "failed"):
            await self.session.run(lambda c: self._settled(c, outcome))
        elif outcome.status == "done" and self.on_committed is not None:
            self.on_committed(outcome.batch_no)
        self.totals["batches"] += outcome.status == "done"
        # progress counts the batch's keys: a shaped batch changes rows in several tables
        self.totals["keys"] += outcome.selected if outcome.status == "done" else 0
        self.totals["quarantined"] += outcome.status == "quarantined"
        self.totals["changed"] += outcome.changed
        self.totals["noop"] += outcome.noop
        log.info("batch." + outcome.status, **describe(outcome))
        if self.progress:
            totals = await self._stage_totals() if self.shared_since else dict(self.totals)
            self.progress("batch", {"outcome": outcome, "totals": totals})

    async def _stage_totals(self) -> dict[str, int]:
        """This process's totals with the other processes' batches added: the ledger's count
        of the stage's batches since this command started, read at most every
        SHARED_PROGRESS_EVERY_S, plus this process's own batches since that reading."""
        now = time.monotonic()
        if self._shared is None or now - self._shared[0] >= SHARED_PROGRESS_EVERY_S:
            try:
                read = await self.session.run(
                    lambda c: ledger.batch_totals(
                        c, self.session.run_id, self.stage, since=self.shared_since
                    )
                )
            except Exception as exc:  # only the progress line: the batches go on
                log.info("apply.progress_unread", error=str(exc))
                if self._shared is None:
                    return dict(self.totals)
                self._shared = (now, *self._shared[1:])
            else:
                self._shared = (now, Counter(self.totals), read)
        _, own_then, stage_then = self._shared
        totals = dict(self.totals)
        for k in ("batches", "keys", "changed", "noop"):
            totals[k] = max(totals.get(k, 0), stage_then[k] + totals.get(k, 0) - own_then[k])
        return totals


async def _finish(
    conn: asyncpg.Connection,
    frame: PhaseFrame,
    dbs: Databases,
    loaded: LoadedPlan,
    target: TargetInfo,
    state: RunState,
    cmd: str,
    follower: Follower | None = None,
) -> ApplyResult:
    """Record the stage finished with its results, write its artifacts, say what comes next.
    `follower`: what was read of the stage's batches while they ran, for its files."""
    run_id, env, stage = frame.run_id, frame.env, frame.phase
    b = loaded.plan.batching
    if loaded.plan.windows is None:
        # numbers without a batch row once the stage is done: a page taken over after a stop is
        # applied under its own number, so only what was really left behind counts
        state.interrupted_before = resume_point(await ledger.batch_states(conn, run_id))[2]
    done, open_keys = await ledger.failure_base(conn, run_id)
    attempted = done + open_keys
    rate = open_keys / attempted if attempted else 0.0
    quarantine = QuarantineTotals(
        quarantined=open_keys,
        attempted=attempted,
        rate=round(rate, 6),
        max_rate=b.max_failure_rate,
        over_budget=rate > b.max_failure_rate,
    )
    verify = await run_verify(
        dbs, env, loaded.plan.verify, frame.run.created_at, b.statement_timeout
    )
    windows = (
        [window_result(r) for r in await ledger.window_rows(conn, run_id, env)]
        if loaded.plan.windows
        else []
    )
    warnings = _warnings(state, stage, bool(windows)) + _quarantine_warnings(
        quarantine, verify, run_id, env, cmd
    )
    criteria = "pass" if not warnings or stage == "canary" else "inconclusive"
    if quarantine.quarantined or any(v.verdict != "pass" for v in verify):
        criteria = "inconclusive"  # the canary too: rows left unchanged need a person
    mismatched = _window_warnings(windows)
    if quarantine.over_budget or any(v.verdict == "fail" for v in verify) or mismatched:
        criteria = "fail"
    warnings += mismatched
    rollback_path = frame.dir / f"rollback_{datetime.now(UTC):%Y-%m-%d}.sql"
    gate = gate_name(stage, env) if rollout.phase(stage).gated else None
    next_command = (
        f"{cmd} approve {run_id} --gate {gate} --as <approver>"
        if gate
        else f"{cmd} status {run_id}"
    )
    stage_totals = await ledger.batch_totals(conn, run_id, stage)
    # the throughput while this command led the stage: every process's batches in that time
    led = await ledger.batch_totals(conn, run_id, stage, since=state.started_at)
    doc = _result_doc(loaded, target, state, warnings, stage_totals, led).model_copy(
        update={
            "plan": await plan_binding(conn, loaded),
            "operator": frame.run.operator,
            "env": env,
            "dsn": dbs.display_dsn(env),
            "rollback_file": rollback_path.name,
            "report_file": summary_name(stage),
            "next_command": next_command,
            "cmd": cmd,
            "quarantine": quarantine,
            "verify": verify,
            "windows": windows,
            "windows_setup": w.model_dump() if (w := loaded.plan.windows) else None,
        }
    )
    summary_path = await frame.finish(
        doc, criteria=criteria, report=_artifacts(dbs, stage, follower), conn=conn
    )
    log.info(
        "apply.finished",
        run_id=run_id,
        stage=stage,
        changed=doc.totals.changed,
        noop=doc.totals.noop,
        seconds=doc.timing.elapsed_seconds,
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
        doc.totals,
        quarantine=quarantine,
    )


def _cap(plan_cap: int | None, command_cap: int | None) -> int | None:
    caps = [c for c in (plan_cap, command_cap) if c is not None]
    return min(caps) if caps else None


async def _capped(
    conn: asyncpg.Connection, frame: PhaseFrame, loaded: LoadedPlan, state: RunState, cmd: str
) -> ApplyResult:
    """The command's row cap reached: every committed batch is kept, the stage goes on with
    the next command (no summary or gate yet: the stage has not finished)."""
    run_id, env, stage = frame.run_id, frame.env, frame.phase
    await ledger.save_phase(conn, run_id, stage, status="capped", result=None)
    await ledger.set_run_status(conn, run_id, f"{stage}:capped")
    log.info("apply.capped", run_id=run_id, stage=stage, rows=state.dispatched_rows)
    return ApplyResult(
        run_id,
        env,
        stage,
        "capped",
        None,
        f"{cmd} apply {loaded.path} --env {env} --run {run_id}",
        totals=_command_totals(state),
    )


def _command_totals(state: RunState) -> ApplyTotals:
    """What this command's own batches did (a command that ends before its stage: capped, or
    joined to a stage another process finishes)."""
    done = [o for o in state.outcomes if o.status == "done"]
    return ApplyTotals(
        rows_needing_at_start=state.rows_needing_at_start,
        batches=len(done),
        batches_this_command=len(state.outcomes),
        changed=sum(o.changed for o in done),
        noop=sum(o.noop for o in done),
        passes=state.passes,
        keys=state.dispatched_rows,
    )


def _warnings(state: RunState, stage: str, windowed: bool = False) -> list[str]:
    warnings: list[str] = []
    if state.remaining_after and stage != "canary" and windowed:
        warnings.append(
            f"{state.remaining_after} row(s) within the windows still need the backfill after "
            "every window was done: they arrived in, or moved into, a window after it ended "
            "(its hooks had run); this run does not walk a done window again, a new run "
            "applies them"
        )
    elif state.remaining_after and stage != "canary":
        warnings.append(
            f"{state.remaining_after} row(s) still need the backfill after {state.passes} pass(es): "
            "rows keep arriving; continue the run with --run to catch up"
        )
    if state.interrupted_before:
        warnings.append(
            f"{state.interrupted_before} batch number(s) were interrupted before commit by an "
            "earlier stop; their rows were rediscovered and applied in later batches"
        )
    return warnings


def _window_warnings(windows: list[WindowResult]) -> list[str]:
    """A done window whose batches did not account for exactly what discovery counted in it."""
    return [
        f"window {w.no} {w.label}: discovery counted {w.discovered:,} row(s) when it started, but "
        f"its batches did {w.keys:,} and quarantined {w.quarantined:,}: rows arrived, left or "
        "were changed by someone else during the window; compare before approving"
        for w in windows
        if w.matches is False
    ]


def _quarantine_warnings(
    q: QuarantineTotals, verify: list[VerifyResult], run_id: str, env: str, cmd: str
) -> list[str]:
    warnings: list[str] = []
    if q.quarantined:
        budget = "over" if q.over_budget else "within"
        warnings.append(
            f"{q.quarantined:,} key(s) quarantined ({q.rate:.2%} of {q.attempted:,} row(s) "
            f"attempted, {budget} the failure budget of {q.max_rate or 0:.2%}): they were not "
            f"changed; see quarantine.json, fix them, then `{cmd} quarantine {run_id} --env "
            f"{env} --retry`"
        )
    for v in verify:
        if v.verdict != "pass":
            warnings.append(
                f"check after the apply `{v.name}`: {v.verdict}"
                + (f" (value {v.value:g}, needs {v.threshold})" if v.value is not None else "")
                + (f": {v.detail}" if v.detail else "")
            )
    return warnings


def _result_doc(
    loaded: LoadedPlan,
    target: TargetInfo,
    state: RunState,
    warnings: list[str],
    stage_totals: dict[str, int],
    led: dict[str, int],
) -> ApplyDoc:
    """What the stage did, as recorded in the ledger and rendered in its summary: its totals
    over every command that ran it (`stage_totals`, from the ledger: a stage continued after a
    stop counts what each command committed); its throughput while this command led it (`led`:
    the batches every process committed meanwhile)."""
    plan = loaded.plan
    elapsed = time.perf_counter() - state.started
    rows_now = led["changed"] + led["noop"]
    return ApplyDoc(
        target=TargetDoc(
            table=target.display,
            key=[k.name for k in target.key],
            columns=[c.name for c in target.columns],
        ),
        settings=plan.batching.model_dump(),
        batch_mode=BatchMode(mode=state.batch_mode, reason=state.batch_mode_reason),
        canary_batches=plan.canary.batches if plan.canary else None,
        totals=ApplyTotals(
            rows_needing_at_start=state.rows_needing_at_start,
            batches=stage_totals["batches"],
            batches_this_command=len(state.outcomes),
            changed=stage_totals["changed"],
            noop=stage_totals["noop"],
            retried_batches=stage_totals["retried"],
            remaining=state.remaining_after,
            passes=state.passes,
        ),
        timing=ApplyTiming(
            started_at=state.started_at.isoformat(),
            elapsed_seconds=round(elapsed, 3),
            counting_seconds=round(state.counting_seconds, 3),
            rows_per_second=round(rows_now / elapsed, 1) if elapsed > 0 else None,
            batches_per_minute=round(led["batches"] / elapsed * 60, 2) if elapsed > 0 else None,
        ),
        warnings=warnings,
    )


def _results_path(run_id: str, env: str, stage: str) -> Path:
    name = "execution_results.json" if stage == "apply" else f"{stage}_execution_results.json"
    return RunDir.of(run_id).env(env) / name


SHARED_PROGRESS_EVERY_S = 2.0  # how often the progress of a shared stage reads the ledger
MANIFEST_READ_BATCHES = 500  # batches' manifest rows read at once when writing the manifest


def manifest_name(stage: str) -> str:
    return "manifest.jsonl" if stage == "apply" else f"{stage}_manifest.jsonl"


def manifest_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """A batch's [manifest] rows as recorded, each row's columns in the query's order again
    (the ledger stores them as jsonb, which orders keys its own way)."""
    columns = doc.pop("columns", None)
    if columns:
        doc["rows"] = [{c: row[c] for c in columns if c in row} for row in doc["rows"]]
    return doc


async def write_manifest(
    conn: asyncpg.Connection,
    run: ledger.RunRow,
    env: str,
    stage: str,
    spool: ManifestSpool | None = None,
) -> Path:
    """manifest.jsonl: one line per committed batch and table — which keys it changed (or their
    count and md5 where there are many), from the ledger's images, with the rows of the plan's
    [manifest] sql on the batch's first line; then, for a windowed run, one line per window with
    discovery's count at its start against what its batches did. `spool`: rows of batches read
    while they ran (`phases.follow`); the stage's other committed batches are read now, a few
    hundred at a time, and the file is written as a stream."""
    names = {int(t["rel"]): f"{t['schema']}.{t['name']}" for t in run.tables or []}
    windows = await ledger.window_rows(conn, run.run_id, env) if run.plan.get("windows") else []
    starts = sorted((w["first_batch"], w["window_no"]) for w in windows if w["first_batch"])
    done = await ledger.done_in_stage(conn, run.run_id, stage)
    folder = RunDir.of(run.run_id).env(env)
    rows = ManifestSpool(folder) if spool is None else spool
    path = folder / manifest_name(stage)

    def entry(r: dict[str, Any], first: bool) -> dict[str, Any]:
        """A batch's line for one table (`first`: its first table, which carries the rows of
        the plan's [manifest] sql)."""
        line: dict[str, Any] = {
            "batch_no": r["batch_no"],
            "table": names.get(r["rel"], run.target_table),
            "started_at": r["started_at"],
            "changed": r["changed"],
            "keys_md5": r["keys_md5"],
        }
        if starts:  # a quarantine retry's batch belongs to no window (its keys were counted
            # in theirs when they were quarantined)
            line["window"] = (
                None
                if r["stage"] == "retry"
                else next((w for b, w in reversed(starts) if b <= r["batch_no"]), None)
            )
        if r["keys"] is not None:
            line["keys"] = json.loads(r["keys"])
        if r["manifest"] is not None and first:
            line["manifest"] = manifest_doc(json.loads(r["manifest"]))
        return line

    try:
        missing = [no for no in done if no not in rows]
        for at in range(0, len(missing), MANIFEST_READ_BATCHES):
            await rows.fetch(conn, run.run_id, stage, missing[at : at + MANIFEST_READ_BATCHES])
        with writing(path) as out:
            for no in done:
                for k, r in enumerate(rows.rows(no)):
                    out.write(json.dumps(entry(r, k == 0)) + "\n")
            for w in windows:
                result = window_result(w)
                out.write(
                    json.dumps({"window": result.no} | result.model_dump(exclude={"no"})) + "\n"
                )
    finally:
        if spool is None:
            rows.close()
    return path


def _artifacts(dbs: Databases, stage: str, follower: Follower | None = None) -> ReportWriter:
    """The files of a finished stage, from its ledger rows: the execution results, the rollback
    file and the summary. The summary is the report whose digest the gate binds. `follower`: what
    was read of the batches while they ran (the rest is read now)."""

    async def write(conn: asyncpg.Connection, run: ledger.RunRow, env: str) -> tuple[Path, str]:
        run_id = run.run_id
        row = await ledger.get_phase(conn, run_id, stage)
        assert row is not None
        doc = row.doc_as(ApplyDoc)
        write_json(
            _results_path(run_id, env, stage),
            {
                **row.result,
                "run_id": run_id,
                "stage": stage,
                "errors_by_category": await ledger.errors_by_category(conn, run_id, stage),
                "run_totals": await ledger.batch_totals(conn, run_id),
            },
        )
        await write_manifest(conn, run, env, stage, follower.manifest if follower else None)
        side = await dbs.connect(env)
        try:
            await emit_rollback_file(
                conn,
                run,
                RunDir.of(run_id).env(env) / str(doc.rollback_file),
                display_dsn=dbs.display_dsn(env),
                checksum_conn=side,
                spool=follower.spool if follower else None,
            )
        finally:
            await close_quietly(side)
        await write_quarantine_files(conn, run_id, RunDir.of(run_id).env(env))
        return await render_summary(conn, run, env, stage, dbs.display_dsn(env))

    return write


async def _finished_result(
    conn: asyncpg.Connection,
    dbs: Databases,
    run_id: str,
    env: str,
    stage: str,
    cmd: str,
    loaded: LoadedPlan,
) -> ApplyResult:
    """Re-running a finished apply is a no-op: say where things stand. A command killed after
    the stage was recorded finished but before its files were written left them missing: they
    are written now from the ledger, so the gate has a report to approve."""
    row = await ledger.get_phase(conn, run_id, stage)
    assert row is not None
    run = await ledger.get_run(conn, run_id)
    assert run is not None
    run_dir = RunDir.of(run_id).env(env)
    artifacts = [
        run_dir / summary_name(stage),
        run_dir / str(row.doc.rollback_file or ""),
        _results_path(run_id, env, stage),
        run_dir / manifest_name(stage),
    ]
    if row.report_digest is None or not all(p.is_file() for p in artifacts):
        log.info("apply.artifacts_restored", run_id=run_id, stage=stage)
        _, digest = await _artifacts(dbs, stage)(conn, run, env)
        await ledger.set_report_digest(conn, run_id, stage, digest)
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
        totals=row.doc.totals,
        quarantine=row.doc_as(ApplyDoc).quarantine,
    )
