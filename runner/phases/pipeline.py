"""The whole rollout: which phase is next, run it, stop at the first gate that waits.

`backfill pipeline`, `backfill status` and `backfill report` share one reading of the ledgers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import ledger, rollout
from runner.artifacts import RunDir, check_run_id, list_runs
from runner.db import EMBEDDED, Databases, close_quietly
from runner.errors import EXIT_DONE, EXIT_GATE_WAITING, EXIT_NO_GO, BackfillError, InvalidInput
from runner.gates import GateState
from runner.phases import apply as apply_phase
from runner.phases import health as health_phase
from runner.phases import soak as soak_phase
from runner.phases.apply_summary import render_summary
from runner.phases.common import ProgressCallback, command_prefix, gate_state
from runner.phases.control import control_note
from runner.phases.decide import decide, plan_for
from runner.plan import LoadedPlan, load_plan
from runner.rollback import emit_rollback_file
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
                    state = await _unfinished_state(conn, run_id, phase)
                steps.append(Step(phase, env, finished, gate, state))
    return steps


async def _unfinished_state(conn: Any, run_id: str, phase: str) -> str:
    """A phase that started and did not finish: running in a process now, or interrupted (a
    Ctrl-C, a kill, a lost connection), and what it kept."""
    note = await control_note(conn, run_id)  # paused, held or cancelled
    note = f" — {note}" if note else ""
    if await ledger.run_is_locked(conn, run_id):
        return "running now" + note
    progress = await ledger.phase_progress(conn, run_id, phase)
    kept = f"interrupted ({progress} kept)" if progress else "interrupted (nothing kept yet)"
    return kept + note


@contextlib.asynccontextmanager
async def _closing(conn: Any) -> AsyncIterator[Any]:
    try:
        yield conn
    finally:
        await close_quietly(conn)


def _mini_plan(run_id: str, env: str) -> Path:
    return RunDir.of(run_id).root / env / health_phase.MINI_PLAN


async def run_pipeline(
    loaded: LoadedPlan,
    *,
    run_id: str | None,
    operator: str,
    progress: ProgressCallback | None,
    say: Callable[[str], None],
    auto_approver: str | None = None,
    soak_duration: float | None = None,
    soak_interval: float | None = None,
) -> int:
    """Run phases until a gate waits (exit 3), a gate says no (exit 4) or the rollout is done (0)."""
    plan = loaded.plan
    cmd = command_prefix()
    if run_id is not None:
        check_run_id(run_id, plan.name)
    async with Databases(plan) as dbs:
        while True:
            if run_id is None:
                say(f"phase 1: apply on {plan.pipeline.staging}")
                result = await apply_phase.apply(
                    loaded, dbs, env=plan.pipeline.staging, operator=operator, progress=progress
                )
                run_id = result.run_id
                say(f"  run {run_id}: summary {result.summary_path}")
                continue
            steps = await read_steps(loaded, dbs, run_id)
            step = next(
                (s for s in steps if not s.finished or (s.gate and not s.gate.is_open)), None
            )
            if step is None:
                say(
                    f"run {run_id}: the rollout is complete; `{cmd} status {run_id}` shows every phase"
                )
                return EXIT_DONE
            if step.finished and step.gate is not None:
                g = step.gate
                if g.status in STOPPED:
                    say(f"gate {g.gate} is {g.status}: {g.reason}")
                    return EXIT_NO_GO
                if auto_approver is not None:
                    await decide(
                        run_id,
                        g.gate,
                        "approve",
                        actor=auto_approver,
                        note="approved by the demo (--auto-approve)"
                        if g.criteria != "pass"
                        else "",
                        override=False,
                        plan_path=None,
                    )
                    say(f"  gate {g.gate}: approved by {auto_approver} (demo)")
                    continue
                report = _report_of(run_id, step)
                say(f"halted at gate {g.gate}: {g.reason}")
                say(
                    f"  review {report}, then: {cmd} approve {run_id} --gate {g.gate} --as <approver>"
                )
                return EXIT_GATE_WAITING
            say(f"phase: {step.phase} on {step.env}")
            ctx = PhaseRun(
                loaded, dbs, step.env, run_id, operator, progress, say, soak_duration, soak_interval
            )
            await RUNNERS[rollout.phase(step.phase).runs](ctx)


@dataclass(frozen=True)
class PhaseRun:
    """What the pipeline hands the phase it runs next."""

    loaded: LoadedPlan
    dbs: Databases
    env: str
    run_id: str
    operator: str
    progress: ProgressCallback | None
    say: Callable[[str], None]
    soak_duration: float | None
    soak_interval: float | None


async def _run_apply(r: PhaseRun) -> None:
    await apply_phase.apply(
        r.loaded, r.dbs, env=r.env, run_id=r.run_id, operator=r.operator, progress=r.progress
    )


async def _run_soak(r: PhaseRun) -> None:
    s = await soak_phase.soak(
        r.loaded,
        r.dbs,
        env=r.env,
        run_id=r.run_id,
        duration=r.soak_duration,
        interval=r.soak_interval,
        operator=r.operator,
    )
    r.say(f"  soak verdict {s.verdict}: {s.report_path}")


async def _run_health(r: PhaseRun) -> None:
    h = await health_phase.health(r.loaded, r.dbs, env=r.env, run_id=r.run_id, operator=r.operator)
    r.say(f"  health verdict {h.verdict}: {h.report_path}; mini plan {h.mini_plan_path}")


async def _run_mini_apply(r: PhaseRun) -> None:
    # the mini plan's environment is the parent plan's, so the same connections serve
    mini = load_plan(_mini_plan(r.run_id, r.env))
    a = await apply_phase.apply(
        mini, r.dbs, env=r.env, run_id=r.run_id, operator=r.operator, progress=r.progress
    )
    r.say(f"  {a.stage}: {a.totals.get('changed', 0):,} row(s) changed; summary {a.summary_path}")


# what runs each phase of the rollout (runner.rollout.PhaseSpec.runs)
RUNNERS: dict[str, Callable[[PhaseRun], Awaitable[None]]] = {
    "apply": _run_apply,
    "soak": _run_soak,
    "health": _run_health,
    "mini-apply": _run_mini_apply,
}


def _report_of(run_id: str, step: Step) -> Path:
    return RunDir.of(run_id).root / step.env / rollout.phase(step.phase).report


def list_run_rows() -> list[dict[str, Any]]:
    return [RunDir(p).read_manifest() for p in list_runs()]


async def describe_run(run_id: str, plan_path: Path | None) -> tuple[str, int]:
    loaded = plan_for(run_id, "plan_path", plan_path)
    cmd = command_prefix()
    lines = [f"run {run_id} — plan {loaded.plan.name} (digest {loaded.digest[:12]})"]
    if loaded.plain_values or loaded.secret_fingerprints(b""):
        shown = [f"{k}={v!r}" for k, v in loaded.plain_values.items()]
        shown += [f"{k}=(secret)" for k in loaded.secret_fingerprints(b"")]
        lines.append(f"  variables now: {', '.join(shown)}")
    async with Databases(loaded.plan) as dbs:
        steps = await read_steps(loaded, dbs, run_id, tolerant=True)
        for s in steps:
            gate = (
                "" if s.gate is None else f"  gate {s.gate.gate}: {s.gate.status} — {s.gate.reason}"
            )
            lines.append(f"  {s.phase:<7} on {s.env:<8} {s.state:<9}{gate}")
        lines += await _decision_lines(loaded, dbs, run_id, steps)
    lines.append(_next_line(loaded, run_id, steps, cmd))
    return "\n".join(lines), EXIT_DONE


async def _decision_lines(
    loaded: LoadedPlan, dbs: Databases, run_id: str, steps: list[Step]
) -> list[str]:
    """Every decision and rollback of the run, once per ledger (staging and prod may share a
    database), from the environments that can be reached."""
    lines: list[str] = []
    reachable = {s.env for s in steps if not s.state.startswith("unknown")}
    ledgers: dict[str, str] = {}
    for env in (loaded.plan.pipeline.staging, loaded.plan.pipeline.prod):
        raw = dbs.raw_dsn(env)
        if env in reachable:
            ledgers.setdefault(f"{raw}#{env}" if raw == EMBEDDED else raw, env)
    for env in ledgers.values():
        async with dbs.connection(env) as conn:
            for d in await ledger.decisions(conn, run_id):
                extra = " OVERRIDE" if d.override else ""
                login = f" (database login {d.db_user})" if d.db_user else ""
                lines.append(
                    f"  decision: {d.gate} {d.decision}{extra} by {d.actor}{login} at "
                    f"{d.decided_at:%Y-%m-%d %H:%M:%S}" + (f" — {d.note}" if d.note else "")
                )
            for ev in await ledger.run_events(conn, run_id):
                lines.append(
                    f"  ROLLED BACK in {ev.env} at {ev.at:%Y-%m-%d %H:%M:%S} by {ev.actor}"
                    + (f" (batches {ev.detail['batches']})" if ev.detail.get("batches") else "")
                    + (f" (since {ev.detail['since']})" if ev.detail.get("since") else "")
                )
    return lines


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
            f"next: review {_report_of(run_id, nxt)}, then "
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


async def rerender(run_id: str, plan_path: Path | None) -> list[Path]:
    """Every report, the mini plan and the rollback SQL, re-rendered from the ledgers."""
    loaded = plan_for(run_id, "plan_path", plan_path)
    written: list[Path] = []
    async with Databases(loaded.plan) as dbs:
        for env, specs in rollout.by_environment(loaded.plan.pipeline):
            async with dbs.connection(env) as conn:
                run = await ledger.get_run(conn, run_id)
                if run is None:
                    continue
                for stage in (spec.name for spec in specs):
                    row = await ledger.get_phase(conn, run_id, stage)
                    if row is None or row.finished_at is None:
                        continue
                    if stage == "soak":
                        path, digest = await soak_phase.render_soak(
                            conn, run, env, loaded.plan.soak.checks
                        )
                    elif stage == "health":
                        path, digest = await health_phase.render_health(conn, run_id, env)
                        written.append(RunDir.of(run_id).root / env / health_phase.MINI_PLAN)
                    else:
                        path, digest = await render_summary(
                            conn, run, env, stage, row.doc.dsn or dbs.display_dsn(env)
                        )
                        rollback = RunDir.of(run_id).env(env) / str(row.doc.rollback_file)
                        written.append(
                            await emit_rollback_file(
                                conn, run, rollback, display_dsn=dbs.display_dsn(env)
                            )
                        )
                    written.append(path)
                    if not await ledger.run_events(conn, run_id):  # a rollback adds a banner
                        _check_same(row.report_digest, digest, path)
    if not written:
        raise InvalidInput(f"run {run_id} has no finished phase to render")
    return written


def _check_same(recorded: str | None, now: str, path: Path) -> None:
    if recorded is not None and recorded != now:
        raise InvalidInput(
            f"{path} re-rendered differently from the report that was recorded (digest "
            f"{recorded[:12]} vs {now[:12]}): the ledger changed after the phase finished",
        )
