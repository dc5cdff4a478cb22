"""The rollback report (`rollback_report.md`, or `rollback_dry_run.md`): what was restored, left
alone as a conflict, and whether the table verified against the run's before-images."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from runner import ledger
from runner.artifacts import RunDir, write_text
from runner.reports import render
from runner.rollback import RollbackResult


def render_rollback(
    run: ledger.RunRow,
    env: str,
    display_dsn: str,
    result: RollbackResult,
    scope: dict[str, object],
    command_prefix: str,
) -> Path:
    since = scope.get("since")
    text = render(
        "rollback_report.md.j2",
        {
            "run": run,
            "env": env,
            "dsn": display_dsn,
            "r": result,
            "cmd": command_prefix,
            "scope": {
                "batches": scope.get("batches"),
                "since": since.isoformat() if isinstance(since, datetime) else None,
            },
            "when": datetime.now(UTC),
        },
    )
    name = "rollback_dry_run.md" if result.dry_run else "rollback_report.md"
    return write_text(RunDir.of(run.run_id).env(env) / name, text)
