"""The apply summary (`backfill_summary.md`, `canary_summary.md`, `rest_summary.md`), built from
the ledger alone so that `backfill report` re-renders it byte for byte."""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from runner import ledger, rollout
from runner.artifacts import RunDir, write_text
from runner.gates import text_digest
from runner.reports import CHART_IN_MINUTES_FROM_S, overrides_note, render, rollbacks
from runner.reports.guards import watch_context
from runner.results import ApplyDoc, Override
from runner.rollout import gate_name


async def _overrides_so_far(
    conn: asyncpg.Connection, run_id: str, stage: str, decisions: list[ledger.Decision]
) -> list[Override]:
    """Overrides of every earlier gate: a prod summary also shows those recorded on staging,
    which the health check carried over into the prod ledger."""
    carried: list[Override] = []
    if stage in ("canary", "rest"):
        health = await ledger.get_phase(conn, run_id, "health")
        carried = list(health.doc.overrides) if health else []
    return carried + overrides_note(decisions)


WINDOWS_SHOWN = 100  # windows the summary lists (execution_results.json: all)
QUARANTINE_SHOWN = 20  # the first quarantined keys the summary lists (quarantine.json: all)


def summary_name(stage: str) -> str:
    return rollout.phase(stage).report


def _throughput(outcomes: list[dict[str, Any]], buckets: int = 24) -> dict[str, Any]:
    """Rows per second over time for the summary's Mermaid chart.

    Whole batches are grouped in commit order, so a bucket's rate is its rows over its own span
    (time buckets would alternate between one and two batches and draw a saw-tooth).
    """
    done = [o for o in outcomes if o["status"] == "done"]
    if not done:
        return {"labels": [], "values": [], "unit": "s"}
    start = min(datetime.fromisoformat(o["started_at"]) for o in done)
    ends = sorted(
        (
            (datetime.fromisoformat(o["started_at"]) - start).total_seconds()
            + o["duration_ms"] / 1000,
            o["changed"] + o["noop"],
        )
        for o in done
    )
    per_bucket = math.ceil(len(ends) / buckets)
    span = ends[-1][0]
    unit, scale = ("min", 60.0) if span > CHART_IN_MINUTES_FROM_S else ("s", 1.0)
    labels: list[str] = []
    values: list[float] = []
    previous = 0.0
    for i in range(0, len(ends), per_bucket):
        group = ends[i : i + per_bucket]
        end = group[-1][0]
        rows = sum(n for _, n in group)
        values.append(round(rows / max(end - previous, 1e-3), 1))
        labels.append(f"{end / scale:.1f}")
        previous = end
    return {"labels": labels, "values": values, "unit": unit}


async def apply_context(
    conn: asyncpg.Connection, run: ledger.RunRow, env: str, stage: str, display_dsn: str
) -> dict[str, Any]:
    """Everything the summary shows, read from the ledger (so `backfill report` re-renders it)."""
    row = await ledger.get_phase(conn, run.run_id, stage)
    assert row is not None
    result = row.doc_as(ApplyDoc)
    batches = await ledger.stage_batches(conn, run.run_id, stage)
    outcomes = [
        {
            "batch_no": b["batch_no"],
            "status": b["status"],
            "changed": b["changed"],
            "noop": b["noop"],
            "selected": b["selected"],
            "attempts": b["attempts"],
            "duration_ms": b["duration_ms"],
            "started_at": b["started_at"].isoformat(),
            "first_key": b["first_key"],
            "last_key": b["last_key"],
            "errors": json.loads(b["errors"]),
        }
        for b in batches
    ]
    categories: Counter[str] = Counter()
    for o in outcomes:
        for e in o["errors"]:
            categories[e["category"]] += 1
    done = [o for o in outcomes if o["status"] == "done"]
    quarantined = [
        {
            "batch_no": o["batch_no"],
            "key": o["first_key"],
            "sqlstate": o["errors"][-1].get("sqlstate", "") if o["errors"] else "",
            "error": o["errors"][-1]["error"] if o["errors"] else "",
        }
        for o in outcomes
        if o["status"] == "quarantined"
    ]
    by_sqlstate = Counter(q["sqlstate"] for q in quarantined)
    decisions = await ledger.decisions(conn, run.run_id)
    gate = gate_name(stage if stage != "rest" else "rest", env) if stage != "rest" else None
    return {
        "run": run,
        "env": env,
        "stage": stage,
        "dsn": display_dsn,
        "result": result,
        "batches": outcomes,
        "done": len(done),
        "failed": [o for o in outcomes if o["status"] == "failed"],
        "split": sum(1 for o in outcomes if o["status"] == "split"),
        "quarantined": quarantined[:QUARANTINE_SHOWN],
        "quarantined_count": len(quarantined),
        "quarantine_by_sqlstate": sorted(by_sqlstate.items(), key=lambda kv: (-kv[1], kv[0])),
        "slowest": sorted(done, key=lambda o: o["duration_ms"], reverse=True)[:5],
        "categories": sorted(categories.items(), key=lambda kv: -kv[1]),
        "chart": _throughput(outcomes),
        "gate": gate,
        "overrides": await _overrides_so_far(conn, run.run_id, stage, decisions),
        "rolled_back": await rollbacks(conn, run.run_id),
        "criteria": row.criteria,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        **await watch_context(conn, run.run_id, stage, outcomes),
        "tables": await _tables(conn, run, stage),
        "processes": [dict(p) for p in await ledger.stage_processes(conn, run.run_id, stage)],
        "windows_shown": WINDOWS_SHOWN,
    }


async def _tables(conn: asyncpg.Connection, run: ledger.RunRow, stage: str) -> list[dict[str, Any]]:
    """A shaped run's tables with what this stage did to each (empty for a plain run)."""
    if run.tables is None:
        return []
    counts = await ledger.table_counts(conn, run.run_id, stage)
    zero = {"inserted": 0, "updated": 0, "deleted": 0, "unchanged": 0}
    return [
        {
            "table": f"{t['schema']}.{t['name']}",
            "allowed": ", ".join(t["allowed"]) or "read only",
            "declared": ", ".join(t["declared"]),
            **counts.get(int(t["rel"]), zero),
        }
        for t in run.tables
    ]


async def render_summary(
    conn: asyncpg.Connection, run: ledger.RunRow, env: str, stage: str, display_dsn: str
) -> tuple[Path, str]:
    ctx = await apply_context(conn, run, env, stage, display_dsn)
    text = render("backfill_summary.md.j2", ctx)
    path = write_text(RunDir.of(run.run_id).env(env) / summary_name(stage), text)
    return path, text_digest(text)
