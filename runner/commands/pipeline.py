"""`backfill pipeline`: which phase is next (`status.read_steps`), run it (`RUNNERS`, keyed by
the rollout table's `runs`), stop at the first gate that waits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from runner import rollout
from runner.artifacts import RunDir, check_run_id
from runner.commands.decide import decide
from runner.commands.status import STOPPED, read_steps, report_of
from runner.db import Databases
from runner.errors import EXIT_DONE, EXIT_GATE_WAITING, EXIT_NO_GO
from runner.phases import apply as apply_phase
from runner.phases import health as health_phase
from runner.phases import soak as soak_phase
from runner.phases.common import ProgressCallback, command_prefix
from runner.plan import LoadedPlan, load_plan
from runner.reports.health import MINI_PLAN


def _mini_plan(run_id: str, env: str) -> Path:
    return RunDir.of(run_id).root / env / MINI_PLAN


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
                if result.status in ("capped", "joined"):
                    return _capped(result, say)
                say(f"  run {run_id}: summary {result.summary_path}")
                _say_quarantine(result, say)
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
                    # criteria that did not pass need a note (a person read the report and
                    # decided); the demo writes one and says so. Failed criteria stopped above:
                    # the demo never overrides.
                    note = (
                        ""
                        if g.criteria == "pass"
                        else f"approved by the demo (--auto-approve): criteria {g.criteria}; "
                        "in a real rollout a person reads the report and decides"
                    )
                    await decide(
                        run_id,
                        g.gate,
                        "approve",
                        actor=auto_approver,
                        note=note,
                        override=False,
                        plan_path=None,
                    )
                    if note:
                        say(
                            f"  gate {g.gate}: criteria {g.criteria}, so a person decides here "
                            f"after reading {report_of(run_id, step)}; approved by {auto_approver} "
                            f"(demo) with the note: {note}"
                        )
                    else:
                        say(f"  gate {g.gate}: approved by {auto_approver} (demo)")
                    continue
                report = report_of(run_id, step)
                say(f"halted at gate {g.gate}: {g.reason}")
                say(
                    f"  review {report}, then: {cmd} approve {run_id} --gate {g.gate} --as <approver>"
                )
                return EXIT_GATE_WAITING
            say(f"phase: {step.phase} on {step.env}")
            ctx = PhaseRun(
                loaded, dbs, step.env, run_id, operator, progress, say, soak_duration, soak_interval
            )
            if (stop := await RUNNERS[rollout.phase(step.phase).runs](ctx)) is not None:
                return stop


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


def _say_quarantine(result: apply_phase.ApplyResult, say: Callable[[str], None]) -> None:
    """Keys the run quarantined so far (they were not changed): how many, against the budget."""
    q = result.quarantine
    if not q.quarantined:
        return
    budget = "over" if q.over_budget else "within"
    say(
        f"  {result.stage}: the run has quarantined {q.quarantined:,} key(s) in {result.env} "
        f"({q.rate:.2%} of {q.attempted:,} row(s) attempted, {budget} the failure budget of "
        f"{q.max_rate or 0:.2%}): not changed; `{command_prefix()} quarantine {result.run_id} "
        f"--env {result.env}` lists them"
    )


def _capped(result: apply_phase.ApplyResult, say: Callable[[str], None]) -> int:
    """A row cap stops the pipeline too: the next command continues the stage. So does having
    joined a stage another process leads: that one finishes it."""
    t = result.totals
    if result.status == "joined":
        say(
            f"  joined the {result.stage} another process leads: {t.batches:,} batch(es) "
            f"committed here ({t.changed:,} changed); it finishes the stage: {result.next_command}"
        )
        return EXIT_DONE
    say(
        f"  {result.stage} capped after {t.keys:,} row(s) this command ({t.changed:,} changed, "
        f"{t.noop:,} already done, the rest quarantined); continue: {result.next_command}"
    )
    return EXIT_DONE


async def _run_apply(r: PhaseRun) -> int | None:
    a = await apply_phase.apply(
        r.loaded, r.dbs, env=r.env, run_id=r.run_id, operator=r.operator, progress=r.progress
    )
    if a.status in ("capped", "joined"):
        return _capped(a, r.say)
    _say_quarantine(a, r.say)
    return None


async def _run_soak(r: PhaseRun) -> int | None:
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
    return None


async def _run_health(r: PhaseRun) -> int | None:
    h = await health_phase.health(r.loaded, r.dbs, env=r.env, run_id=r.run_id, operator=r.operator)
    r.say(f"  health verdict {h.verdict}: {h.report_path}; mini plan {h.mini_plan_path}")
    return None


async def _run_mini_apply(r: PhaseRun) -> int | None:
    # the mini plan's environment is the parent plan's, so the same connections serve
    mini = load_plan(_mini_plan(r.run_id, r.env))
    a = await apply_phase.apply(
        mini, r.dbs, env=r.env, run_id=r.run_id, operator=r.operator, progress=r.progress
    )
    if a.status in ("capped", "joined"):
        return _capped(a, r.say)
    r.say(f"  {a.stage}: {a.totals.changed:,} row(s) changed; summary {a.summary_path}")
    _say_quarantine(a, r.say)
    return None


# what runs each phase of the rollout (runner.rollout.PhaseSpec.runs)
# each returns None to go on, or the exit code the pipeline stops with (a capped apply)
RUNNERS: dict[str, Callable[[PhaseRun], Awaitable[int | None]]] = {
    "apply": _run_apply,
    "soak": _run_soak,
    "health": _run_health,
    "mini-apply": _run_mini_apply,
}
