"""`backfill quarantine RUN --env E [--retry]`: the keys a run left out because their data made
the apply fail (engine.quarantine), or re-try them after the data or the plan was fixed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner import events, ledger
from runner.artifacts import RunDir
from runner.commands.rollback import plan_for_env
from runner.db import Databases
from runner.errors import EXIT_DONE, EXIT_FAILED, InvalidInput
from runner.phases.common import command_prefix
from runner.phases.retry import retry_quarantined
from runner.reports.quarantine import quarantine_rows, write_quarantine_files

SHOWN = 50  # keys listed on the terminal; the files hold them all


@dataclass(frozen=True)
class QuarantineOutcome:
    exit_code: int
    lines: list[str]


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


async def show(run_id: str, env: str, plan_path: Path | None) -> QuarantineOutcome:
    """The run's quarantined keys in `env`, open ones first; the files beside the summary too."""
    loaded = plan_for_env(run_id, env, plan_path)
    events.add_secrets(loaded.secrets)
    async with Databases(loaded.plan) as dbs, dbs.connection(env) as conn:
        if await ledger.get_run(conn, run_id) is None:
            raise InvalidInput(
                f"run {run_id} has no ledger row in environment {env!r}",
                hint="check --env; each environment keeps its own ledger",
            )
        await ledger.ensure_ledger(conn)
        rows = await quarantine_rows(conn, run_id)
        files = await write_quarantine_files(conn, run_id, RunDir.of(run_id).env(env))
    open_rows = [r for r in rows if r["released_at"] is None]
    lines = [
        f"run {run_id} on {env}: {len(open_rows)} key(s) quarantined"
        + (
            f", {len(rows) - len(open_rows)} released by a retry"
            if len(rows) > len(open_rows)
            else ""
        )
    ]
    for r in open_rows[:SHOWN]:
        lines.append(
            f"  [{', '.join(r['key'])}]  {r['sqlstate']}  batch {r['batch_no']}  "
            f"{r['attempts']} attempt(s)  {_short(r['message'])}"
        )
    if len(open_rows) > SHOWN:
        lines.append(f"  … and {len(open_rows) - SHOWN} more")
    lines += [f"  file: {p}" for p in files]
    if open_rows:
        lines.append(
            f"  fix the data (or the plan), then: {command_prefix()} quarantine {run_id} "
            f"--env {env} --retry"
        )
    return QuarantineOutcome(EXIT_DONE, lines)


async def retry(run_id: str, env: str, plan_path: Path | None) -> QuarantineOutcome:
    """Re-try the run's quarantined keys as new batches; exit 1 if some still fail."""
    loaded = plan_for_env(run_id, env, plan_path)
    events.add_secrets(loaded.secrets)
    events.attach(RunDir.of(run_id).env(env) / "events.jsonl")
    async with Databases(loaded.plan) as dbs:
        result = await retry_quarantined(loaded, dbs, env, run_id)
    lines = [
        f"run {run_id} on {env}: re-tried {result.tried} quarantined key(s) in "
        f"{result.batches} batch(es); {result.released} committed, {result.still} still "
        "quarantined"
    ]
    lines += [f"  file: {p}" for p in result.files]
    if result.still:
        lines.append(
            f"  see them with `{command_prefix()} quarantine {run_id} --env {env}`; "
            "fix them and re-try again"
        )
    return QuarantineOutcome(EXIT_FAILED if result.still else EXIT_DONE, lines)
