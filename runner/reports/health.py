"""The prod health report (`prod_health_check.md`) and its mini plan, from the ledger alone."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

from runner import ledger, rollout
from runner.artifacts import RunDir, write_json, write_text
from runner.gates import text_digest
from runner.reports import render, rollbacks
from runner.results import HealthDoc
from runner.rollout import gate_name

REPORT = rollout.phase("health").report
MINI_PLAN = "prod_mini_backfill_plan.json"


async def render_health(conn: asyncpg.Connection, run: ledger.RunRow, env: str) -> tuple[Path, str]:
    """Write the report (and the mini plan it shows, as recorded); the report's path and digest."""
    row = await ledger.get_phase(conn, run.run_id, "health")
    assert row is not None
    doc = row.doc_as(HealthDoc)
    run_dir = RunDir.of(run.run_id)
    write_json(run_dir.env(env) / MINI_PLAN, doc.mini_plan)
    text = render(
        "prod_health_check.md.j2",
        {
            "run": run,
            "env": env,
            "r": doc,
            "gate": gate_name("health", env),
            "mini_plan_json": json.dumps(doc.mini_plan, indent=2),
            "rolled_back": await rollbacks(conn, run.run_id),
            "started_at": row.started_at,
            "finished_at": row.finished_at,
        },
    )
    path = write_text(run_dir.env(env) / REPORT, text)
    return path, text_digest(text)
