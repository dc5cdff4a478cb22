"""Read-only checks, sampled: one value per check, judged against its threshold and baseline,
and the verdict over the samples so far.

Semantics follow Argo Rollouts' analysis runs: each sample is pass / fail / no-data / error per
check; a check over its failure limit fails at once (it does not wait out the hours); no-data and
errors within limits leave the verdict inconclusive, for a person to judge.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import asyncpg

from runner import redact
from runner.db import Databases, close_quietly
from runner.errors import InvalidInput
from runner.plan import Check

Counts = dict[str, dict[str, int]]


def number(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float | Decimal):
        f = float(value)
        if math.isnan(f):
            raise ValueError("the check returned NaN")
        return f
    raise ValueError(
        f"the check must return one number or boolean, got {type(value).__name__} {value!r}"
    )


def judge(check: Check, value: float, baseline: float | None) -> tuple[str, str]:
    """pass/fail of one value, and the threshold in words."""
    parts: list[str] = []
    ok = True
    if (cond := check.condition) is not None:
        ok = ok and cond.holds(value)
        parts.append(cond.text)
    if baseline is not None:
        if check.max_drop is not None:
            floor = baseline * (1 - check.max_drop)
            ok = ok and value >= floor
            parts.append(f">= {floor:.4g} (baseline {baseline:.4g} − {check.max_drop:.0%})")
        if check.tolerance is not None:
            band = abs(baseline) * check.tolerance
            ok = ok and abs(value - baseline) <= band
            parts.append(f"within ±{check.tolerance:.0%} of baseline {baseline:.4g}")
    return ("pass" if ok else "fail"), " and ".join(parts)


def wrap_check(sql: str) -> str:
    """Declare both parameters ($1 the soak window's start, $2 the run's start) whether or not the
    check uses them, and take the first column of the first row as its value."""
    return (
        "WITH backfill_params AS MATERIALIZED "
        "(SELECT $1::timestamptz AS window_start, $2::timestamptz AS run_start) "
        f"SELECT check_value.* FROM ({sql}) AS check_value CROSS JOIN backfill_params LIMIT 1"
    )


async def read_only_value(
    conn: asyncpg.Connection, sql: str, params: list[Any], timeout_s: float
) -> Any:
    async with conn.transaction(readonly=True):
        # a query before the check: from here on the transaction cannot be switched to read-write
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}")
        return await conn.fetchval(wrap_check(sql), *params)


async def read_baselines(
    conn: asyncpg.Connection, checks: list[Check], params: list[Any], timeout_s: float
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c in checks:
        if c.baseline is not None:
            out[c.name] = c.baseline
        elif c.baseline_sql:
            try:
                v = await read_only_value(conn, c.baseline_sql, params, timeout_s)
                out[c.name] = None if v is None else number(v)
            except (asyncpg.PostgresError, ValueError) as e:
                raise InvalidInput(
                    f"soak.checks.{c.name}.baseline_sql failed before the soak: {e}"
                ) from None
    return out


def verdict(
    checks: list[Check], counts: dict[str, dict[str, int]], streaks: dict[str, int]
) -> tuple[str, str]:
    for c in checks:
        n = counts[c.name]
        if n["fail"] > c.failure_limit:
            return "fail", f"check {c.name} failed {n['fail']} time(s) (limit {c.failure_limit})"
        if streaks[c.name] > c.consecutive_error_limit:
            return (
                "fail",
                f"check {c.name} errored {streaks[c.name]} times in a row (limit {c.consecutive_error_limit})",
            )
    for c in checks:
        n = counts[c.name]
        if n["no-data"] > c.inconclusive_limit:
            return "inconclusive", f"check {c.name} had no data {n['no-data']} time(s)"
        if n["error"]:
            return "inconclusive", f"check {c.name} errored {n['error']} time(s)"
    return "pass", "every check stayed within its limits"


def tally(
    checks: list[Check], recorded: list[asyncpg.Record]
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Outcome counts per check, and each check's current run of consecutive errors, from the
    samples already recorded (a resumed soak goes on counting)."""
    counts = {c.name: {"pass": 0, "fail": 0, "no-data": 0, "error": 0} for c in checks}
    streaks = dict.fromkeys(counts, 0)
    for r in recorded:
        if r["check_name"] in counts:
            counts[r["check_name"]][r["outcome"]] += 1
            streaks[r["check_name"]] = (
                streaks[r["check_name"]] + 1 if r["outcome"] == "error" else 0
            )
    return counts, streaks


async def check_once(
    ro: asyncpg.Connection,
    dbs: Databases,
    env: str,
    check: Check,
    params: list[Any],
    baselines: dict[str, Any],
    statement_timeout: float,
) -> tuple[float | None, str, str, asyncpg.Connection]:
    """One check's value, outcome and detail (redacted: errors quote values), and the read-only
    connection to go on with (a new one if this one was lost)."""
    value: float | None = None
    try:
        raw = await read_only_value(ro, check.sql, params, statement_timeout)
        if raw is None:
            outcome, detail = "no-data", "no value (no row or NULL)"
        else:
            value = number(raw)
            outcome, detail = judge(check, value, baselines.get(check.name))
    except (asyncpg.PostgresError, ValueError) as e:
        outcome, detail = "error", f"{type(e).__name__}: {str(e).strip()}"
    except (OSError, asyncpg.InterfaceError) as e:
        outcome, detail = "error", f"connection: {e}"
        await close_quietly(ro)
        ro = await dbs.connect(env, read_only=True)
    return value, outcome, redact.redact_text(detail), ro
