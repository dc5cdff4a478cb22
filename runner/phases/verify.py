"""Checks after the apply (`[[verify]]`, #12): read-only queries with `pass_if`, run once when an
apply stage ends, on a read-only connection under the plan's read_role (invariant 5)."""

from __future__ import annotations

from datetime import datetime

from runner.db import Databases, close_quietly
from runner.engine.checks import check_once
from runner.plan import Check
from runner.results import VerifyResult


async def run_verify(
    dbs: Databases, env: str, checks: list[Check], run_start: datetime, timeout_s: float
) -> list[VerifyResult]:
    """Each check's value and verdict: pass, fail, no-data (no row or NULL) or error (redacted).
    `$1` and `$2` are both the run's start (soak checks' parameters, so one query serves both)."""
    if not checks:
        return []
    out: list[VerifyResult] = []
    ro = await dbs.connect(env, read_only=True)
    try:
        for check in checks:
            baselines = {check.name: check.baseline}
            value, verdict, detail, ro = await check_once(
                ro, dbs, env, check, [run_start, run_start], baselines, timeout_s
            )
            out.append(
                VerifyResult(
                    name=check.name,
                    description=check.description,
                    sql=check.sql,
                    value=value,
                    threshold=detail if verdict in ("pass", "fail") else (check.pass_if or ""),
                    verdict=verdict,
                    detail="" if verdict in ("pass", "fail") else detail,
                )
            )
    finally:
        await close_quietly(ro)
    return out
