"""`backfill pause`, `resume`, `cancel`: requests recorded in an environment's ledger, with who
and when, and obeyed by the running apply before its next batch (engine/watch.py).

The allowed transitions, in one place: running → paused → running (resume); running or paused
→ cancelled, which is final (the run's committed batches stay; `backfill rollback` undoes them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncpg

from runner import ledger
from runner.artifacts import RunDir
from runner.commands.decide import plan_for
from runner.db import Databases
from runner.errors import InvalidInput, NoGo
from runner.phases.common import command_prefix, operator_name
from runner.plan import LoadedPlan

# action → the control states it may follow (None: never paused or cancelled)
ALLOWED: dict[str, tuple[str | None, ...]] = {
    "pause": (None, "resume"),
    "resume": ("pause",),
    "cancel": (None, "pause", "resume"),
}


@dataclass(frozen=True)
class ControlOutcome:
    run_id: str
    env: str
    action: str
    actor: str
    running: bool  # whether a process holds the run now (it obeys before its next batch)
    message: str


def _plan_for_env(run_id: str, env: str, plan_path: Path | None) -> LoadedPlan:
    """The plan whose environments include `env`: the run's plan, or prod's mini plan."""
    loaded = plan_for(run_id, "plan_path", plan_path)
    if env in loaded.plan.environments or plan_path is not None:
        return loaded
    if "mini_plan_path" in RunDir.of(run_id).read_manifest():
        return plan_for(run_id, "mini_plan_path", None)
    return loaded


async def _request(
    action: str, run_id: str, env: str, note: str, plan_path: Path | None
) -> ControlOutcome:
    loaded = _plan_for_env(run_id, env, plan_path)
    loaded.plan.env(env)  # an unknown environment is named
    actor = operator_name()
    async with Databases(loaded.plan) as dbs, dbs.connection(env) as conn:
        if await ledger.get_run(conn, run_id) is None:
            raise InvalidInput(
                f"run {run_id} has no ledger row in environment {env!r}: nothing to {action}",
                hint="check --env; each environment keeps its own ledger",
            )
        await ledger.ensure_ledger(conn)
        current = await ledger.control_state(conn, run_id)
        state = current.action if current else None
        if state == "cancel":
            raise NoGo(
                f"run {run_id} was cancelled by {current.actor if current else '?'}: "
                "a cancel is final",
                hint=f"undo it with `{command_prefix()} rollback {run_id} --env {env}`, "
                "or start a new run",
            )
        if state not in ALLOWED[action]:
            raise InvalidInput(
                f"run {run_id} is {'paused' if state == 'pause' else 'not paused'} in {env}: "
                f"nothing to {action}"
            )
        await ledger.request_control(conn, run_id, env, action, actor, note)
        running = await ledger.run_is_locked(conn, run_id)
    return ControlOutcome(run_id, env, action, actor, running, _said(action, run_id, running))


def _said(action: str, run_id: str, running: bool) -> str:
    cmd = command_prefix()
    match action:
        case "pause":
            now = (
                "the running apply starts no new batch (those in flight finish)"
                if running
                else "no process runs it now; an apply of it waits until it is resumed"
            )
            return f"run {run_id} paused: {now}; continue with `{cmd} resume {run_id} --env ENV`"
        case "resume":
            return f"run {run_id} resumed" + (
                ": the running apply continues" if running else "; continue it with `--run`"
            )
        case _:
            now = (
                "the running apply stops after the batches in flight"
                if running
                else "it will not go forward"
            )
            return (
                f"run {run_id} cancelled: {now}; committed batches stay, "
                f"`{cmd} rollback {run_id} --env ENV` undoes them"
            )


async def pause(
    run_id: str, env: str, *, note: str = "", plan_path: Path | None = None
) -> ControlOutcome:
    """Ask the run to start no new batch until resumed."""
    return await _request("pause", run_id, env, note, plan_path)


async def resume(
    run_id: str, env: str, *, note: str = "", plan_path: Path | None = None
) -> ControlOutcome:
    """Let a paused run start batches again."""
    return await _request("resume", run_id, env, note, plan_path)


async def cancel(
    run_id: str, env: str, *, note: str = "", plan_path: Path | None = None
) -> ControlOutcome:
    """Stop the run for good after its batches in flight; what it committed stays."""
    return await _request("cancel", run_id, env, note, plan_path)


async def control_note(conn: asyncpg.Connection, run_id: str) -> str:
    """For `status`: paused (by whom), held (by which guard, value vs threshold) or cancelled."""
    if not await conn.fetchval("SELECT to_regclass('backfill.control_requests') IS NOT NULL"):
        return ""
    request = await ledger.control_state(conn, run_id)
    if request is not None and request.action == "cancel":
        return f"cancelled by {request.actor} at {request.requested_at:%Y-%m-%d %H:%M:%S}"
    if request is not None and request.action == "pause":
        note = f" ({request.note})" if request.note else ""
        return f"paused by {request.actor} at {request.requested_at:%Y-%m-%d %H:%M:%S}{note}"
    if await ledger.run_is_locked(conn, run_id) and (hold := await ledger.open_hold(conn, run_id)):
        return f"held: {hold['reason']} (since {hold['started_at']:%H:%M:%S})"
    return ""
