"""The soak's report (`staging_observability.md`): per check its values, limits and a chart,
the database's health over the window, from the ledger alone."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from runner import ledger, rollout
from runner.artifacts import RunDir, write_text
from runner.engine import dbhealth
from runner.engine.checks import judge
from runner.gates import text_digest
from runner.plan import Check
from runner.reports import CHART_IN_MINUTES_FROM_S, overrides_note, render, rollbacks
from runner.results import SoakDoc
from runner.rollout import gate_name

REPORT = rollout.phase("soak").report


def _chart(points: list[tuple[str, float | None]], threshold: float | None) -> dict[str, Any]:
    values = [v for _, v in points]
    return {
        "labels": [p for p, _ in points],
        "values": ["null" if v is None else f"{v:.6g}" for v in values],
        "threshold": None if threshold is None else f"{threshold:.6g}",
        "any": any(v is not None for v in values),
    }


def _check_rows(
    checks: list[Check], doc: SoakDoc, by_check: dict[str, list[asyncpg.Record]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Per check: its line in the table and its chart; and the charts' time unit."""
    start = datetime.fromisoformat(doc.window_start)
    unit, scale = (
        ("minutes", 60.0) if doc.duration_seconds >= CHART_IN_MINUTES_FROM_S else ("seconds", 1.0)
    )
    table, charts = [], []
    for c in checks:
        ss = by_check.get(c.name, [])
        vals = [s["value"] for s in ss if s["value"] is not None]
        baseline = doc.baselines.get(c.name)
        threshold = c.condition.low if c.condition and c.condition.op != "between" else None
        if threshold is None and baseline is not None and c.max_drop is not None:
            threshold = baseline * (1 - c.max_drop)
        counts = {
            k: sum(1 for s in ss if s["outcome"] == k) for k in ("pass", "fail", "no-data", "error")
        }
        last = ss[-1] if ss else None
        table.append(
            {
                "name": c.name,
                "description": c.description,
                "last": last["value"] if last else None,
                "min": min(vals) if vals else None,
                "max": max(vals) if vals else None,
                "threshold": judge(c, 0.0, baseline)[1],
                "baseline": baseline,
                "counts": counts,
                "last_detail": last["detail"] if last else "",
            }
        )
        points = [
            (f"{(s['sampled_at'] - start).total_seconds() / scale:.1f}", s["value"]) for s in ss
        ][-40:]
        charts.append({"name": c.name, **_chart(points, threshold)})
    return table, charts, unit


def _health_rows(by_check: dict[str, list[asyncpg.Record]]) -> list[dict[str, Any]]:
    """The database's health over the window: last and worst value of each built-in metric."""
    rows = []
    for name, (label, kind) in dbhealth.METRICS.items():
        vals = [s["value"] for s in by_check.get(name, []) if s["value"] is not None]
        rows.append(
            {
                "name": label,
                "kind": kind,
                "last": vals[-1] if vals else None,
                "max": max(vals) if vals else None,
            }
        )
    return rows


async def render_soak(
    conn: asyncpg.Connection, run: ledger.RunRow, env: str, checks: list[Check]
) -> tuple[Path, str]:
    """Write the soak report from the ledger; its path and digest."""
    row = await ledger.get_phase(conn, run.run_id, "soak")
    assert row is not None
    doc = row.doc_as(SoakDoc)
    by_check: dict[str, list[asyncpg.Record]] = {}
    for s in await ledger.samples(conn, run.run_id):
        by_check.setdefault(s["check_name"], []).append(s)
    table, charts, unit = _check_rows(checks, doc, by_check)
    text = render(
        "staging_observability.md.j2",
        {
            "run": run,
            "env": env,
            "r": doc,
            "checks": table,
            "charts": charts,
            "chart_unit": unit,
            "health": _health_rows(by_check),
            "gate": gate_name("soak", env),
            "overrides": overrides_note(await ledger.decisions(conn, run.run_id)),
            "rolled_back": await rollbacks(conn, run.run_id),
            "started_at": row.started_at,
            "finished_at": row.finished_at,
        },
    )
    path = write_text(RunDir.of(run.run_id).env(env) / REPORT, text)
    return path, text_digest(text)
