"""`backfill approve` / `reject`: a decision bound to the plan digest and the reviewed report."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import asyncpg

from runner import ledger, redact
from runner.artifacts import RunDir
from runner.db import Databases, classify_connect_error, close_quietly, connect
from runner.errors import ConnectionFailed, InvalidInput, NoGo
from runner.gates import check_decision, new_decision, text_digest, variable_changes
from runner.phases.common import command_prefix, integrity_problem, rollback_note
from runner.plan import LoadedPlan, load_plan
from runner.rollout import ROLLOUT

# gate phase → which plan the gate's decision binds to
GATE_PHASES = {p.name: p.plan_key for p in ROLLOUT if p.gated}  # phase → the plan it ran from


def plan_for(run_id: str, key: str, override: Path | None) -> LoadedPlan:
    manifest = RunDir.of(run_id).read_manifest()
    if override is not None:
        return load_plan(override)
    if not manifest:
        raise InvalidInput(
            f"run {run_id} has no run.json under {RunDir.of(run_id).root}",
            hint="run this from the directory that holds backfill_logs/, or pass --plan",
        )
    if key not in manifest:
        raise InvalidInput(
            f"run {run_id} has not recorded a {key.replace('_', ' ')} yet", hint="pass --plan PATH"
        )
    return load_plan(manifest[key])


@contextlib.asynccontextmanager
async def _decision_connection(
    loaded: LoadedPlan, dbs: Databases, env: str
) -> AsyncIterator[asyncpg.Connection]:
    """The connection a decision is recorded through: the approver's own login when the plan's
    gates.identity is 'database' (so PostgreSQL, not a flag, says who decided)."""
    if loaded.plan.gates.identity != "database":
        async with dbs.connection(env) as conn:
            yield conn
        return
    dsn = os.environ.get("BACKFILL_APPROVER_DSN", "")
    if not dsn:
        raise InvalidInput(
            "gates.identity = 'database': a decision is recorded through your own database login",
            hint=f"set BACKFILL_APPROVER_DSN to {env}'s database with your login, e.g. "
            "postgresql://alice@db.example.com/app",
        )
    redact.register({dsn})
    try:
        conn = await connect(dsn, what="your approver login (BACKFILL_APPROVER_DSN)")
    except ConnectionFailed as e:
        raise classify_connect_error(e) from None
    try:
        yield conn
    finally:
        await close_quietly(conn)


def split_gate(gate: str) -> tuple[str, str]:
    phase, _, env = gate.partition("-")
    if phase not in GATE_PHASES or not env:
        raise InvalidInput(
            f"--gate {gate!r} is not a gate",
            hint="gates are named <phase>-<env>: " + ", ".join(f"{p}-<env>" for p in GATE_PHASES),
        )
    return phase, env


def _refuse_other_plan(
    gate: str,
    phase: str,
    row: ledger.PhaseRow,
    loaded: LoadedPlan,
    secrets_now: dict[str, str],
) -> None:
    """A decision binds the plan and the variable values the phase ran with: yours must match."""
    ran = row.doc.plan
    changes = variable_changes(
        ran.variables, loaded.plain_values, ran.secret_fingerprints, secrets_now
    )
    if changes:
        raise InvalidInput(
            f"gate {gate}: the {phase} phase ran with other variable values than yours: "
            + "; ".join(c.replace("was approved", "ran") for c in changes),
            hint="a decision binds the values the phase ran with (the report shows them): "
            "set the same values, or re-run the phase with yours",
        )
    if (ran.digest or None) != loaded.digest:
        raise InvalidInput(
            f"gate {gate}: {loaded.path} has changed since the {phase} phase ran "
            f"(digest then {ran.digest[:12]}, now {loaded.digest[:12]})",
            hint="a decision binds to the plan that was run: restore it, or re-run the phase",
        )


def _report_digest_on_disk(gate: str, report: Path, row: ledger.PhaseRow, run_id: str) -> str:
    """The digest of the report the approver read: it must be the one the runner wrote."""
    try:
        on_disk = text_digest(report.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(
            f"gate {gate}: the report {report} is missing",
            hint=f"re-render it with `{command_prefix()} report {run_id}`",
        ) from None
    if on_disk != row.report_digest:
        raise InvalidInput(
            f"gate {gate}: {report} is not the report the runner wrote (it was edited or is stale)",
            hint=f"re-render it with `{command_prefix()} report {run_id}`, review it, then decide",
        )
    return on_disk


async def _approver(conn: asyncpg.Connection, loaded: LoadedPlan, actor: str) -> str:
    """Who decides: `--as`, or with gates.identity = 'database' the login recording it."""
    if loaded.plan.gates.identity != "database":
        return actor
    login = str(await conn.fetchval("SELECT session_user"))
    if actor and actor != login:
        raise InvalidInput(
            f"--as {actor}, but you are logged in as {login}: with gates.identity = "
            "'database' the approver is the database login that records the decision",
            hint="set BACKFILL_APPROVER_DSN to your own login, and leave out --as",
        )
    return login


async def _decidable_phase(
    conn: asyncpg.Connection, run_id: str, gate: str, phase: str, env: str
) -> ledger.PhaseRow:
    """The finished phase before `gate`, in a ledger that may still decide on it."""
    row = await ledger.get_phase(conn, run_id, phase)
    if row is None or row.finished_at is None:
        raise InvalidInput(
            f"gate {gate}: the {phase} phase of run {run_id} has not finished in {env!r}",
            hint=f"see `{command_prefix()} status {run_id}`",
        )
    for problem in (await rollback_note(conn, run_id), await integrity_problem(conn, run_id)):
        if problem is not None:
            raise NoGo(
                f"gate {gate}: no decision is possible: {problem}",
                hint="this run stops here; to go on, start a new run and review it",
            )
    return row


async def _record(conn: asyncpg.Connection, run_id: str, decision: ledger.Decision) -> None:
    """Append the decision to the gate's chain, unless the gate was rejected meanwhile."""
    gate = decision.gate
    async with conn.transaction():
        await ledger.decision_lock(conn, run_id)
        rejected = [d for d in await ledger.decisions(conn, run_id, gate) if d.decision == "reject"]
        if rejected:
            r = rejected[0]
            raise NoGo(
                f"gate {gate} of run {run_id} was rejected by {r.actor} at "
                f"{r.decided_at:%Y-%m-%d %H:%M:%S %Z}"
                + (f" ({r.note})" if r.note else "")
                + ": a reject is final for the run",
                hint="to go on, start a new run; it is reviewed from its own reports",
            )
        await ledger.record_decision(conn, run_id, decision)


async def decide(
    run_id: str,
    gate: str,
    decision: Literal["approve", "reject"],
    *,
    actor: str,
    note: str,
    override: bool,
    plan_path: Path | None,
) -> str:
    """Record an approval or a reject of `gate`, bound to the plan, its values and the report
    on disk; what to run next."""
    phase, env = split_gate(gate)
    loaded = plan_for(run_id, GATE_PHASES[phase], plan_path)
    run_dir = RunDir.of(run_id)
    async with Databases(loaded.plan) as dbs, _decision_connection(loaded, dbs, env) as conn:
        actor = await _approver(conn, loaded, actor)
        row = await _decidable_phase(conn, run_id, gate, phase, env)
        secrets_now = loaded.secret_fingerprints(await ledger.digest_key(conn))
        _refuse_other_plan(gate, phase, row, loaded, secrets_now)
        on_disk = _report_digest_on_disk(
            gate, run_dir.root / env / row.doc.report_file, row, run_id
        )
        check_decision(
            gate=gate,
            decision=decision,
            actor=actor,
            operator=row.doc.operator,
            policy=loaded.plan.gates,
            criteria=row.criteria,
            note=note,
            override=override,
        )
        made = new_decision(
            gate,
            decision,
            actor,
            note,
            override,
            loaded.digest,
            on_disk,
            row.criteria or "",
            variables=loaded.plain_values,
            secret_hashes=secrets_now,
            phase_seal=row.seal,
        )
        await _record(conn, run_id, made)
    cmd = command_prefix()
    if decision == "reject":
        return f"the rollout of run {run_id} stops here; to undo: {cmd} rollback {run_id} --env {env} --dry-run"
    main = RunDir.of(run_id).read_manifest().get("plan_path", "PLAN")
    return f"{cmd} pipeline {main} --run {run_id}"
