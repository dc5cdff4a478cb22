"""What every phase does the same way: the run row, the run lock, gate checks, who is operating."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from runner import events, ledger
from runner.artifacts import RunDir
from runner.engine.target import TargetInfo
from runner.errors import GateClosed, InvalidInput, NoGo, WorkFailed
from runner.gates import GateState, evaluate
from runner.plan import LoadedPlan
from runner.results import PhaseResult, PlanBinding

ProgressCallback = Callable[[str, dict[str, Any]], None]


def operator_name() -> str:
    """Who runs this command: `$BACKFILL_ACTOR`, else the OS user."""
    return os.environ.get("BACKFILL_ACTOR") or getpass.getuser()


def command_prefix() -> str:
    """How the operator invokes the tool, for the next-step commands printed in reports."""
    if os.environ.get("BACKFILL_CMD"):
        return os.environ["BACKFILL_CMD"]
    return "uv run backfill" if os.environ.get("UV") else "backfill"


async def ensure_run(
    conn: asyncpg.Connection,
    loaded: LoadedPlan,
    env: str,
    run_id: str,
    target: TargetInfo,
    operator: str,
    *,
    create: bool,
    tables: list[dict[str, Any]] | None = None,
) -> ledger.RunRow:
    """The run's row in this environment's ledger, created when allowed."""
    run = await ledger.get_run(conn, run_id)
    if run is not None:
        if run.plan_name != loaded.plan.name:
            raise InvalidInput(
                f"run {run_id} belongs to plan {run.plan_name!r}, not {loaded.plan.name!r}",
                hint="pass the plan the run was started with",
            )
        if run.target_oid is not None and run.target_oid != target.oid and run.env == env:
            raise InvalidInput(
                f"run {run_id} applied to {run.target_table} (oid {run.target_oid}), but "
                f"{target.table} is now another table (oid {target.oid}): it was dropped and "
                "created again, or the plan names another table",
                hint="start a new run for the new table; this run's images belong to the old one",
            )
        return run
    if not create:
        raise InvalidInput(
            f"run {run_id} does not exist in environment {env!r}",
            hint="check the run id with `backfill status`, or start a new run without --run",
        )
    await ledger.insert_run(
        conn,
        ledger.NewRun(
            run_id=run_id,
            env=env,
            plan_name=loaded.plan.name,
            plan_digest=loaded.digest,
            plan=loaded.raw,
            target_table=target.display,
            key_columns=[k.name for k in target.key],
            columns=[c.name for c in target.columns],
            key_types=[k.type for k in target.key],
            column_types=[c.type for c in target.columns],
            operator=operator,
            target_schema=target.schema,
            target_name=target.name,
            target_oid=target.oid,
            search_schemas=_search_schemas(target, tables),
            tables=tables,
        ),
    )
    run = await ledger.get_run(conn, run_id)
    assert run is not None
    return run


def _search_schemas(target: TargetInfo, tables: list[dict[str, Any]] | None) -> list[str]:
    """Where a rollback compares values: the tables' schemas and those of their types."""
    found = list(target.search_schemas)
    for t in tables or []:
        for schema in (t["schema"], *t["type_schemas"]):
            if schema not in found:
                found.append(schema)
    return found


Join = Callable[[asyncpg.Connection], Awaitable[str | None]]


@contextlib.asynccontextmanager
async def run_lock(
    conn: asyncpg.Connection,
    run_id: str,
    wait_seconds: float = 30.0,
    *,
    join: Join | None = None,
    not_joinable: str = "",
) -> AsyncIterator[str | None]:
    """One process at a time leads a run (None is yielded). A killed process's lock goes with
    its connection. With `join`, a process that finds the run held asks it for a stage it may
    join instead (engine.claims): that stage is yielded and no lock is taken."""
    deadline = anyio.current_time() + wait_seconds
    while not await ledger.try_run_lock(conn, run_id):
        if join is not None and (stage := await join(conn)) is not None:
            yield stage
            return
        if anyio.current_time() > deadline:
            # only a process that is beating holds it; a rollback or a quarantine retry takes
            # the run without a heartbeat, and a killed process's row has none any more
            holder = next(
                (
                    p
                    for p in reversed(await ledger.run_processes(conn, run_id))
                    if not p["outcome"] and p["silent"] < GONE_AFTER
                ),
                None,
            )
            who = (
                f" ({holder['host']} pid {holder['pid']}, {holder['phase']} in {holder['env']} "
                f"since {holder['started_at']:%Y-%m-%d %H:%M:%S}, last heartbeat "
                f"{holder['silent']:,.0f} s ago)"
                if holder is not None
                else ""
            )
            raise WorkFailed(
                f"run {run_id} is being worked on by another backfill process{who}"
                + (f"; {not_joinable}" if not_joinable else ""),
                hint="wait for it to finish, or stop it; a killed process releases the run "
                "as soon as the database notices its connection is gone",
            )
        await anyio.sleep(0.5)
    try:
        await ledger.lock_losers_gone(conn, run_id)
        yield None
    finally:
        with contextlib.suppress(Exception):
            await ledger.release_run_lock(conn, run_id)


async def integrity_problem(conn: asyncpg.Connection, run_id: str) -> str | None:
    """Why this ledger's gate records of the run cannot be trusted, or None when every decision's
    chain hash and every finished phase's seal verify under the ledger's key."""
    if not await conn.fetchval("SELECT to_regclass('backfill.digest_key') IS NOT NULL"):
        return None
    key = await ledger.digest_key(conn)
    broken = ledger.broken_link(key, await ledger.decisions(conn, run_id))
    if broken is not None:
        return (
            f"the ledger's decisions were changed outside backfill: decision #{broken.id} "
            f"({broken.decision} of {broken.gate} by {broken.actor}) does not verify against "
            "the chain of decisions"
        )
    for row in await ledger.phases(conn, run_id):
        if (
            row.finished_at is not None
            and (row.report_digest or row.seal)
            and not ledger.seal_holds(key, row)
        ):
            return (
                f"the ledger's record of the {row.phase} phase was changed outside backfill "
                "(its criteria or result no longer match the seal written when it finished)"
            )
    return None


async def rollback_note(conn: asyncpg.Connection, run_id: str) -> str | None:
    """Why the run cannot go forward in this environment after a rollback, or None."""
    events = [e for e in await ledger.run_events(conn, run_id) if e.kind == "rollback"]
    if not events:
        return None
    e = events[0]
    return (
        f"run {run_id} was rolled back in {e.env} at {e.at:%Y-%m-%d %H:%M:%S %Z} by {e.actor}: "
        "a rolled-back run does not go forward"
    )


async def refuse_forgeable_ledger(conn: asyncpg.Connection) -> None:
    """With gates.identity = 'database', a gate trusts decisions only if the login running the
    phases cannot write them: not a superuser, not the owner, no write privilege."""
    if await ledger.login_can_write_decisions(conn):
        who = await conn.fetchval("SELECT session_user")
        raise InvalidInput(
            f"gates.identity = 'database', but this login ({who}) can write "
            "backfill.gate_decisions (superuser, owner, or a write privilege), so it could "
            "forge an approval",
            hint="run phases with a login that may only read that table; SECURITY.md shows "
            "the setup",
        )


async def gate_state(
    conn: asyncpg.Connection,
    run_id: str,
    phase: str,
    gate: str,
    plan_digest: str,
    bound: LoadedPlan | None = None,
) -> GateState:
    """The gate after `phase`, evaluated against what would run now: `bound`'s variables."""
    if bound is not None and bound.plan.gates.identity == "database":
        await refuse_forgeable_ledger(conn)
    row = await ledger.get_phase(conn, run_id, phase)
    criteria = row.criteria if row and row.finished_at else None
    secrets: dict[str, str] = {}
    if bound is not None and await conn.fetchval(
        "SELECT to_regclass('backfill.digest_key') IS NOT NULL"
    ):
        secrets = bound.secret_fingerprints(await ledger.digest_key(conn))
    return evaluate(
        gate,
        criteria,
        await ledger.decisions(conn, run_id, gate),
        plan_digest,
        row.report_digest if row else None,
        variables=bound.plain_values if bound is not None else None,
        secret_hashes=secrets,
        phase_seal=row.seal if row and row.finished_at else None,
        tampered=await integrity_problem(conn, run_id),
        rolled_back=await rollback_note(conn, run_id),
        policy=bound.plan.gates if bound is not None else None,
        operator=row.doc.operator if row else None,
    )


async def plan_binding(conn: asyncpg.Connection, loaded: LoadedPlan) -> PlanBinding:
    """The plan a phase ran, as its result records it: name, digest, path, and the values it ran
    with besides the plan's text (plain variables' values; secret ones as names and keyed hashes,
    never their values). An approval binds these."""
    key = await ledger.digest_key(conn)
    fingerprints = loaded.secret_fingerprints(key)
    return PlanBinding(
        name=loaded.plan.name,
        digest=loaded.digest,
        path=str(loaded.path),
        description=loaded.plan.plan.description,
        owner=loaded.plan.plan.owner,
        variables=loaded.plain_values,
        secret_variables=sorted(fingerprints),
        secret_fingerprints=fingerprints,
    )


def require_open(state: GateState, *, run_id: str, before: str, cmd: str) -> None:
    """Refuse to start a phase unless the gate before it is open; say what to run instead."""
    if state.is_open:
        return
    approve = f"{cmd} approve {run_id} --gate {state.gate} --as <approver>"
    message = f"{before} cannot start: gate {state.gate} is {state.status}: {state.reason}"
    if state.status in ("rejected", "rolled-back"):
        raise NoGo(message, hint="this run stops here; to go on, start a new run and review it")
    if state.status == "tampered":
        raise NoGo(
            message,
            hint="the ledger's gate records were edited outside backfill: investigate (see "
            "SECURITY.md); this run cannot go forward, start a new run",
        )
    if state.status == "no-go":
        raise NoGo(message, hint="fix the cause and re-run the phase before this gate")
    if state.status == "not-reached":
        raise GateClosed(
            message, hint="run the phase before this gate first (`backfill pipeline` does)"
        )
    raise GateClosed(message, hint=f"review the report, then: {approve}")


ReportWriter = Callable[[asyncpg.Connection, ledger.RunRow, str], Awaitable[tuple[Path, str]]]


@dataclass
class PhaseFrame:
    """One phase's turn on one run in one environment: what every phase does the same way.

    `phase_frame` opens it (events to the run's `events.jsonl`, the run lock); `started` and
    `finish` record the phase in the ledger, and `finish` renders its report from there and
    records the report's digest, which seals the phase for its gate (invariant 6)."""

    conn: asyncpg.Connection
    run: ledger.RunRow
    env: str
    phase: str
    process_id: str = ""  # this command in backfill.processes
    joined: bool = False  # working on a stage another process leads (no run lock)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    async def set_phase(self, phase: str) -> None:
        """The phase is known only now (a prod apply: canary or rest): the process says so."""
        self.phase = phase
        if self.process_id:
            await ledger.set_process_phase(self.conn, self.run_id, self.process_id, phase)

    @property
    def dir(self) -> Path:
        return RunDir.of(self.run_id).env(self.env)

    async def started(self) -> None:
        await ledger.save_phase(self.conn, self.run_id, self.phase, status="running", result=None)
        await ledger.set_run_status(self.conn, self.run_id, f"{self.phase}:running")

    async def finish(
        self,
        doc: PhaseResult,
        *,
        criteria: str,
        report: ReportWriter,
        conn: asyncpg.Connection | None = None,
    ) -> Path:
        """Record the phase finished with `doc`, render its report, record the report's digest.
        `conn`: the phase's connection now, if it was re-opened since the frame was."""
        c = conn or self.conn
        await ledger.save_phase(
            c,
            self.run_id,
            self.phase,
            status="finished",
            result=doc,
            criteria=criteria,
            finished=True,
        )
        await ledger.set_run_status(c, self.run_id, f"{self.phase}:finished")
        path, digest = await report(c, self.run, self.env)
        await ledger.set_report_digest(c, self.run_id, self.phase, digest)
        return path


HEARTBEAT_SECONDS = 5.0  # how often a running phase says it is alive (backfill.processes)
GONE_AFTER = 3 * HEARTBEAT_SECONDS  # a running process silent this long is taken for gone


def process_id(host: str, pid: int) -> str:
    """This process, as the ledger names it: host, pid and a nonce (pids are reused)."""
    return f"{host}:{pid}:{uuid.uuid4().hex[:8]}"


async def _heartbeat(
    connect: Callable[[], Awaitable[asyncpg.Connection]],
    run_id: str,
    me: str,
    every: float = HEARTBEAT_SECONDS,
) -> None:
    """The process's heartbeat, on a connection of its own (the phase's is busy), until
    cancelled; a lost connection is opened again at the next beat."""
    conn: asyncpg.Connection | None = None
    try:
        while True:
            await anyio.sleep(every)
            try:
                conn = conn if conn is not None and not conn.is_closed() else await connect()
                await ledger.beat(conn, run_id, me)
            except Exception:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
                conn = None  # status shows the silence meanwhile
    finally:
        if conn is not None and not conn.is_closed():
            conn.terminate()  # no await: this runs as the task is cancelled


async def _record_end(
    conn: asyncpg.Connection,
    connect: Callable[[], Awaitable[asyncpg.Connection]] | None,
    run_id: str,
    me: str,
    outcome: str,
) -> None:
    """How the process ended, on the phase's connection or, when that one was lost (the phase
    reconnected on another), on a fresh one; a failure here must not hide the phase's own."""
    with contextlib.suppress(Exception):
        await ledger.end_process(conn, run_id, me, outcome)
        return
    if connect is None:
        return
    with contextlib.suppress(Exception):
        fresh = await connect()
        try:
            await ledger.end_process(fresh, run_id, me, outcome)
        finally:
            await fresh.close()


@contextlib.asynccontextmanager
async def phase_frame(
    conn: asyncpg.Connection,
    run: ledger.RunRow,
    env: str,
    phase: str,
    connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
    *,
    join: Join | None = None,
    not_joinable: str = "",
    lease_timeout: float | None = None,
) -> AsyncIterator[PhaseFrame]:
    """The phase's events go to the run's log, and only this process leads the run. The
    process is recorded (`backfill.processes`: host, pid, phase, start) and, given `connect`,
    beats every HEARTBEAT_SECONDS (a third of `lease_timeout` if less) while the phase runs; its end is recorded with how it
    ended. With `join`, a process that finds the run led may join a stage of it instead
    (`PhaseFrame.joined`, the stage as its phase: engine.claims)."""
    events.attach(RunDir.of(run.run_id).env(env) / "events.jsonl")
    host, pid = socket.gethostname(), os.getpid()
    me = process_id(host, pid)
    try:
        async with run_lock(conn, run.run_id, join=join, not_joinable=not_joinable) as joined:
            phase = joined or phase
            await ledger.register_process(
                conn, run.run_id, me, env, phase, host, pid, operator_name(), joined=bool(joined)
            )
            # the batch rows this process records name it (backfill.batches.process)
            await conn.execute("SELECT set_config('backfill.process', $1, false)", me)
            # a plain asyncio task (asyncpg runs on asyncio): a task group around the `yield`
            # would wrap the phase's own errors in an exception group
            every = HEARTBEAT_SECONDS
            if lease_timeout is not None:
                every = min(every, lease_timeout / 3)
            beating = (
                asyncio.create_task(_heartbeat(connect, run.run_id, me, every)) if connect else None
            )
            outcome = "finished"
            try:
                yield PhaseFrame(conn, run, env, phase, me, joined is not None)
            except BaseException as exc:
                outcome = f"stopped: {type(exc).__name__}"
                raise
            finally:
                if beating is not None:
                    beating.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await beating
                with anyio.CancelScope(shield=True):
                    await _record_end(conn, connect, run.run_id, me, outcome)
    finally:
        events.detach()
