"""`backfill status`: where a run stands in every environment, its decisions, what to run next.

`read_steps` is the one reading of the ledgers that `pipeline`, `status` and the next-step hint
share: the rollout table (`runner.rollout`) in order, each phase's state and its gate.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import ledger, rollout
from runner.artifacts import RunDir, list_runs
from runner.commands.control import control_note
from runner.commands.decide import plan_for
from runner.db import EMBEDDED, Databases, close_quietly
from runner.errors import BackfillError
from runner.gates import GateState
from runner.phases.common import GONE_AFTER, command_prefix, gate_state
from runner.phases.windows import window_result
from runner.plan import LoadedPlan
from runner.rollout import gate_name

STOPPED = ("no-go", "rejected", "rolled-back", "tampered")  # gates no approval opens


@dataclass(frozen=True)
class Step:
    phase: str  # apply | soak | health | canary | rest
    env: str
    finished: bool
    gate: GateState | None
    state: str = "not run"  # finished | not run | running now | interrupted (what is kept)

    @property
    def interrupted(self) -> bool:
        return self.state.startswith("interrupted")

    @property
    def kind(self) -> str:
        """finished | not-run | running | paused | held | cancelled | interrupted | capped |
        unknown"""
        for word in ("paused", "held", "cancelled"):
            if f"— {word}" in self.state:
                return word
        for prefix, kind in (
            ("finished", "finished"),
            ("not run", "not-run"),
            ("running", "running"),
            ("interrupted", "interrupted"),
            ("capped", "capped"),
        ):
            if self.state.startswith(prefix):
                return kind
        return "unknown"


async def read_steps(
    loaded: LoadedPlan, dbs: Databases, run_id: str, *, tolerant: bool = False
) -> list[Step]:
    """The rollout's steps in order, from the staging and prod ledgers. With `tolerant` (for
    `status`), an environment that cannot be reached yet shows as such instead of failing."""
    mini_digest: str | None = None
    steps: list[Step] = []
    stopped: GateState | None = None  # a gate no later gate can pass (rolled back, tampered)
    for env, specs in rollout.by_environment(loaded.plan.pipeline):
        try:
            conn = await dbs.connect(env)
        except BackfillError as e:
            if not tolerant:
                raise
            why = " ".join(e.message.split())
            steps += [Step(s.name, env, False, None, f"unknown: {why}") for s in specs]
            continue
        async with _closing(conn):
            for spec in specs:
                phase = spec.name
                row = await ledger.get_phase(conn, run_id, phase)
                finished = row is not None and row.finished_at is not None
                if phase == "health" and row is not None:
                    mini_digest = row.doc.mini_plan_digest
                digest = mini_digest if phase == "canary" and mini_digest else loaded.digest
                gate = (
                    None
                    if not spec.gated
                    else await gate_state(
                        conn, run_id, phase, gate_name(phase, env), digest, loaded
                    )
                )
                if gate is not None and stopped is not None:
                    gate = GateState(gate.gate, stopped.status, stopped.reason, gate.criteria)
                elif gate is not None and gate.status in ("rolled-back", "tampered"):
                    stopped = gate
                state = "finished" if finished else "not run"
                if row is not None and not finished:
                    state = await _unfinished_state(conn, run_id, phase, row.status)
                steps.append(Step(phase, env, finished, gate, state))
    return steps


async def _unfinished_state(conn: Any, run_id: str, phase: str, recorded: str = "") -> str:
    """A phase that started and did not finish: running in a process now, or interrupted (a
    Ctrl-C, a kill, a lost connection), and what it kept."""
    note = await control_note(conn, run_id)  # paused, held or cancelled
    note = f" — {note}" if note else ""
    if await ledger.run_is_locked(conn, run_id):
        return "running now" + note
    progress = await ledger.phase_progress(conn, run_id, phase)
    if recorded == "capped":  # stopped by its row cap: the next command continues it
        return f"capped ({progress} kept)" + note
    kept = f"interrupted ({progress} kept)" if progress else "interrupted (nothing kept yet)"
    return kept + note


@contextlib.asynccontextmanager
async def _closing(conn: Any) -> AsyncIterator[Any]:
    try:
        yield conn
    finally:
        await close_quietly(conn)


def report_of(run_id: str, step: Step) -> Path:
    return RunDir.of(run_id).root / step.env / rollout.phase(step.phase).report


def list_run_rows() -> list[dict[str, Any]]:
    return [RunDir(p).read_manifest() for p in list_runs()]


@dataclass
class RunStatus:
    """Where a run stands, as `status` prints it and `status --json` gives it to scripts."""

    run_id: str
    plan: str
    digest: str
    variables: dict[str, str]  # plain values; secrets as "(secret)"
    steps: list[Step]
    decisions: list[dict[str, Any]]
    rollbacks: list[dict[str, Any]]
    next: str
    windows: list[dict[str, Any]] = field(default_factory=list)  # a windowed run's, per env
    processes: list[dict[str, Any]] = field(default_factory=list)  # every command that ran it

    def lines(self) -> list[str]:
        out = [f"run {self.run_id} — plan {self.plan} (digest {self.digest[:12]})"]
        if self.variables:
            shown = ", ".join(f"{k}={v}" for k, v in self.variables.items())
            out.append(f"  variables now: {shown}")
        for s in self.steps:
            gate = (
                "" if s.gate is None else f"  gate {s.gate.gate}: {s.gate.status} — {s.gate.reason}"
            )
            out.append(f"  {s.phase:<7} on {s.env:<8} {s.state:<9}{gate}")
        for d in self.decisions:
            extra = " OVERRIDE" if d["override"] else ""
            login = f" (database login {d['db_user']})" if d["db_user"] else ""
            out.append(
                f"  decision: {d['gate']} {d['decision']}{extra} by {d['actor']}{login} at "
                f"{d['at']:%Y-%m-%d %H:%M:%S}" + (f" — {d['note']}" if d["note"] else "")
            )
        for env in dict.fromkeys(w["env"] for w in self.windows):
            mine = [w for w in self.windows if w["env"] == env]
            done = sum(w["status"] == "done" for w in mine)
            now = next((w for w in mine if w["status"] == "running"), None)
            out.append(
                f"  windows on {env}: {done}/{len(mine)} done"
                + (
                    f"; window {now['no']} {now['label']} running ({now['discovered']:,} row(s) "
                    "counted at its start)"
                    if now
                    else ""
                )
            )
        for p in self.processes:
            out.append(
                f"  process {p['host']} pid {p['pid']} ({p['env']} {p['phase']}): {_life(p)}"
            )
        for e in self.rollbacks:
            out.append(
                f"  ROLLED BACK in {e['env']} at {e['at']:%Y-%m-%d %H:%M:%S} by {e['actor']}"
                + (f" (batches {e['batches']})" if e["batches"] else "")
                + (f" (since {e['since']})" if e["since"] else "")
            )
        out.append(self.next)
        return out

    def doc(self) -> dict[str, Any]:
        """The same as JSON: states as a word a script can switch on, times as ISO 8601."""
        return {
            "run_id": self.run_id,
            "plan": self.plan,
            "digest": self.digest,
            "variables": self.variables,
            "steps": [
                {
                    "phase": s.phase,
                    "env": s.env,
                    "state": s.kind,
                    "detail": s.state,
                    "gate": None
                    if s.gate is None
                    else {
                        "name": s.gate.gate,
                        "status": s.gate.status,
                        "reason": s.gate.reason,
                        "criteria": s.gate.criteria,
                    },
                }
                for s in self.steps
            ],
            "decisions": [{**d, "at": d["at"].isoformat()} for d in self.decisions],
            "rollbacks": [{**e, "at": e["at"].isoformat()} for e in self.rollbacks],
            "windows": self.windows,
            "processes": [
                {
                    **p,
                    "started_at": p["started_at"].isoformat(),
                    "heartbeat": p["heartbeat"].isoformat(),
                    "finished_at": p["finished_at"].isoformat() if p["finished_at"] else None,
                }
                for p in self.processes
            ],
            "next": self.next.removeprefix("next: "),
        }


async def read_status(run_id: str, plan_path: Path | None) -> RunStatus:
    loaded = plan_for(run_id, "plan_path", plan_path)
    variables = {k: repr(v) for k, v in loaded.plain_values.items()}
    variables.update(dict.fromkeys(loaded.secret_fingerprints(b""), "(secret)"))
    async with Databases(loaded.plan) as dbs:
        steps = await read_steps(loaded, dbs, run_id, tolerant=True)
        decisions, rollbacks = await _ledger_facts(loaded, dbs, run_id, steps)
        windows = await _windows(loaded, dbs, run_id, steps)
        processes = await _processes(loaded, dbs, run_id, steps)
    return RunStatus(
        run_id,
        loaded.plan.name,
        loaded.digest,
        variables,
        steps,
        decisions,
        rollbacks,
        _next_line(loaded, run_id, steps, command_prefix()),
        windows,
        processes,
    )


async def _windows(
    loaded: LoadedPlan, dbs: Databases, run_id: str, steps: list[Step]
) -> list[dict[str, Any]]:
    """A windowed run's windows in each environment it reached (engine.windows)."""
    if loaded.plan.windows is None:
        return []
    found: list[dict[str, Any]] = []
    for env in dict.fromkeys(s.env for s in steps if not s.state.startswith("unknown")):
        async with dbs.connection(env) as conn:
            if await conn.fetchval("SELECT to_regclass('backfill.windows') IS NULL"):
                continue
            found += [
                {"env": env} | window_result(r).model_dump(include=WINDOW_FIELDS)
                for r in await ledger.window_rows(conn, run_id, env)
            ]
    return found


LEASES_SHOWN = 5  # a process's open leases listed by status


def _life(p: dict[str, Any]) -> str:
    started = f"started {p['started_at']:%Y-%m-%d %H:%M:%S}"
    done = f"{p['batches']:,} batch(es) committed"
    if p.get("leases"):
        shown = p["leases"][:LEASES_SHOWN]
        held = ", ".join(map(str, shown)) + (" …" if len(p["leases"]) > len(shown) else "")
        done += f"; lease(s) on batch(es) {held} not committed"
    if p["finished_at"] is not None:
        return f"{started}, ended {p['finished_at']:%H:%M:%S} ({p['outcome']}); {done}"
    if p["silent"] > p.get("gone_after", GONE_AFTER):
        return (
            f"{started}, no heartbeat for {p['silent']:,.0f} s: killed, or its connection was "
            f"lost (it did not record an end); {done}"
        )
    return f"{started}, running (last heartbeat {p['silent']:,.0f} s ago); {done}"


async def _processes(
    loaded: LoadedPlan, dbs: Databases, run_id: str, steps: list[Step]
) -> list[dict[str, Any]]:
    """Every process that worked on the run, from each ledger it reached."""
    found: list[dict[str, Any]] = []
    for env in _ledger_envs(loaded, dbs, steps):
        async with dbs.connection(env) as conn:
            found += [
                {k: r[k] for k in PROCESS_FIELDS}
                | {
                    "silent": round(r["silent"], 1),
                    "leases": list(r["leases"] or []),
                    # silent this long, its leases are taken over: it is gone for status too
                    "gone_after": min(GONE_AFTER, loaded.plan.batching.lease_timeout),
                }
                for r in await ledger.run_processes(conn, run_id)
            ]
    return sorted(found, key=lambda p: p["started_at"])


PROCESS_FIELDS = (
    "process_id",
    "env",
    "phase",
    "host",
    "pid",
    "operator",
    "started_at",
    "heartbeat",
    "finished_at",
    "outcome",
    "batches",
    "leases",
)


WINDOW_FIELDS = {"no", "label", "status", "discovered", "keys", "quarantined", "matches"}


def _ledger_envs(loaded: LoadedPlan, dbs: Databases, steps: list[Step]) -> list[str]:
    """One reachable environment per ledger (staging and prod may share a database)."""
    reachable = {s.env for s in steps if not s.state.startswith("unknown")}
    ledgers: dict[str, str] = {}
    for env in (loaded.plan.pipeline.staging, loaded.plan.pipeline.prod):
        raw = dbs.raw_dsn(env)
        if env in reachable:
            ledgers.setdefault(f"{raw}#{env}" if raw == EMBEDDED else raw, env)
    return list(ledgers.values())


async def _ledger_facts(
    loaded: LoadedPlan, dbs: Databases, run_id: str, steps: list[Step]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every decision and rollback of the run, once per ledger (staging and prod may share a
    database), from the environments that can be reached."""
    decisions: list[dict[str, Any]] = []
    rollbacks: list[dict[str, Any]] = []
    for env in _ledger_envs(loaded, dbs, steps):
        async with dbs.connection(env) as conn:
            decisions += [
                {
                    "gate": d.gate,
                    "decision": d.decision,
                    "override": d.override,
                    "actor": d.actor,
                    "db_user": d.db_user,
                    "note": d.note,
                    "at": d.decided_at,
                }
                for d in await ledger.decisions(conn, run_id)
            ]
            rollbacks += [
                {
                    "env": ev.env,
                    "actor": ev.actor,
                    "at": ev.at,
                    "batches": ev.detail.get("batches"),
                    "since": ev.detail.get("since"),
                }
                for ev in await ledger.run_events(conn, run_id)
            ]
    return decisions, rollbacks


def _next_line(loaded: LoadedPlan, run_id: str, steps: list[Step], cmd: str) -> str:
    """What to run next, from the first step that is not done or whose gate is not open."""
    nxt = next((s for s in steps if not s.finished or (s.gate and not s.gate.is_open)), None)
    if nxt is None:
        line = "next: nothing — the rollout is complete"
    elif nxt.gate is not None and nxt.gate.status == "rolled-back":
        line = f"next: nothing — {nxt.gate.reason}; start a new run: {cmd} pipeline {loaded.path}"
    elif nxt.finished and nxt.gate is not None and nxt.gate.status in STOPPED:
        line = (
            f"next: no-go at {nxt.gate.gate}; to undo: "
            f"{cmd} rollback {run_id} --env {nxt.env} --dry-run"
        )
    elif nxt.finished and nxt.gate is not None and nxt.gate.variables_changed:
        line = (
            f"next: run with the values {nxt.gate.gate} approved (the report shows them), or start "
            f"a new run: {cmd} pipeline {loaded.path}"
        )
    elif nxt.finished and nxt.gate is not None:
        line = (
            f"next: review {report_of(run_id, nxt)}, then "
            f"{cmd} approve {run_id} --gate {nxt.gate.gate} --as <approver>"
        )
    elif nxt.interrupted:
        line = (
            f"next: continue the interrupted {nxt.phase}: {cmd} pipeline {loaded.path} --run {run_id}"
            " (it resumes where it stopped; nothing committed is applied twice)"
        )
    else:
        line = f"next: {cmd} pipeline {loaded.path} --run {run_id}"
    return line
