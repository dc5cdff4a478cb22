"""`backfill report`: every report, the mini plan and the rollback SQL, re-rendered from the
ledgers (invariant 9); a report that renders differently from the one recorded is refused."""

from __future__ import annotations

from pathlib import Path

from runner import ledger, rollout
from runner.artifacts import RunDir
from runner.commands.decide import plan_for
from runner.db import Databases
from runner.errors import InvalidInput
from runner.phases.apply import write_manifest
from runner.reports.apply import render_summary
from runner.reports.health import MINI_PLAN, render_health
from runner.reports.soak import render_soak
from runner.rollback import emit_rollback_file


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
                        path, digest = await render_soak(conn, run, env, loaded.plan.soak.checks)
                    elif stage == "health":
                        path, digest = await render_health(conn, run, env)
                        written.append(RunDir.of(run_id).root / env / MINI_PLAN)
                    else:
                        path, digest = await render_summary(
                            conn, run, env, stage, row.doc.dsn or dbs.display_dsn(env)
                        )
                        rollback = RunDir.of(run_id).env(env) / str(row.doc.rollback_file)
                        written.append(await write_manifest(conn, run, env, stage))
                        written.append(
                            await emit_rollback_file(
                                conn, run, rollback, display_dsn=dbs.display_dsn(env)
                            )
                        )
                    written.append(path)
                    if not await ledger.run_events(conn, run_id):  # a rollback adds a banner
                        _check_same(row.report_digest, digest, path)
                if await ledger.manifest_rows(conn, run_id, "retry", 0):  # quarantine --retry
                    written.append(await write_manifest(conn, run, env, "retry"))
    if not written:
        raise InvalidInput(f"run {run_id} has no finished phase to render")
    return written


def _check_same(recorded: str | None, now: str, path: Path) -> None:
    if recorded is not None and recorded != now:
        raise InvalidInput(
            f"{path} re-rendered differently from the report that was recorded (digest "
            f"{recorded[:12]} vs {now[:12]}): the ledger changed after the phase finished",
        )
