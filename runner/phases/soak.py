"""Phase 2: read-only checks sampled over time against thresholds and baselines; then a gate.

Semantics follow Argo Rollouts' analysis runs: each sample is pass / fail / no-data / error per
check; a check over its failure limit fails the soak at once (it does not wait out the hours);
no-data and errors within limits leave the verdict inconclusive, for a person to judge.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import structlog

from runner import events, ledger, redact, rollout
from runner.artifacts import RunDir, check_run_id, write_text
from runner.db import Databases, close_quietly
from runner.engine import dbhealth
from runner.errors import InvalidInput, NoGo
from runner.gates import text_digest
from runner.phases.apply_summary import rollbacks
from runner.phases.common import (
    ProgressCallback,
    bound_values,
    command_prefix,
    gate_state,
    overrides_note,
    require_open,
    run_lock,
)
from runner.plan import Check, LoadedPlan
from runner.reports import render
from runner.rollout import gate_name

log = structlog.get_logger("backfill.soak")
REPORT = rollout.phase("soak").report


@dataclass
class SoakResult:
    run_id: str
    env: str
    verdict: str  # pass | fail | inconclusive
    reason: str
    observed_seconds: float
    samples: int
    report_path: Path
    gate: str
    next_command: str


def _number(value: Any) -> float:
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


async def _read_only_value(
    conn: asyncpg.Connection, sql: str, params: list[Any], timeout_s: float
) -> Any:
    async with conn.transaction(readonly=True):
        # a query before the check: from here on the transaction cannot be switched to read-write
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}")
        return await conn.fetchval(wrap_check(sql), *params)


async def _baselines(
    conn: asyncpg.Connection, checks: list[Check], params: list[Any], timeout_s: float
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c in checks:
        if c.baseline is not None:
            out[c.name] = c.baseline
        elif c.baseline_sql:
            try:
                v = await _read_only_value(conn, c.baseline_sql, params, timeout_s)
                out[c.name] = None if v is None else _number(v)
            except (asyncpg.PostgresError, ValueError) as e:
                raise InvalidInput(
                    f"soak.checks.{c.name}.baseline_sql failed before the soak: {e}"
                ) from None
    return out


def _verdict(
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


def _tally(
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


async def _check_once(
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
        raw = await _read_only_value(ro, check.sql, params, statement_timeout)
        if raw is None:
            outcome, detail = "no-data", "no value (no row or NULL)"
        else:
            value = _number(raw)
            outcome, detail = judge(check, value, baselines.get(check.name))
    except (asyncpg.PostgresError, ValueError) as e:
        outcome, detail = "error", f"{type(e).__name__}: {str(e).strip()}"
    except (OSError, asyncpg.InterfaceError) as e:
        outcome, detail = "error", f"connection: {e}"
        await close_quietly(ro)
        ro = await dbs.connect(env, read_only=True)
    return value, outcome, redact.redact_text(detail), ro


def _append_samples(path: Path, rows: list[tuple[Any, ...]]) -> None:
    """soak_samples.jsonl: one line per check and metric of a sample."""
    with path.open("a", encoding="utf-8") as f:
        for line in rows:
            record = {
                "sample": line[1],
                "check": line[2],
                "at": line[3].isoformat(),
                "value": line[4],
                "outcome": line[5],
                "detail": line[6],
            }
            f.write(json.dumps(record) + "\n")


@dataclass
class _Window:
    """The soak's sampling loop: every `interval`, each check and the database health, recorded
    in the ledger and soak_samples.jsonl, until the duration is observed or a check fails."""

    conn: asyncpg.Connection
    ro: asyncpg.Connection
    dbs: Databases
    env: str
    run: ledger.RunRow
    checks: list[Check]
    params: list[Any]
    baselines: dict[str, Any]
    statement_timeout: float
    base: dict[str, Any]
    jsonl: Path
    counts: dict[str, dict[str, int]]
    streaks: dict[str, int]
    progress: ProgressCallback | None

    async def sample(self, sample_no: int) -> tuple[dict[str, str], list[tuple[Any, ...]]]:
        """One sample of every check and of the database's health: the outcomes, and the rows
        to record."""
        taken = datetime.now(UTC)
        run_id = self.run.run_id
        outcomes: dict[str, str] = {}
        rows: list[tuple[Any, ...]] = []
        for c in self.checks:
            value, outcome, detail, self.ro = await _check_once(
                self.ro, self.dbs, self.env, c, self.params, self.baselines, self.statement_timeout
            )
            self.counts[c.name][outcome] += 1
            self.streaks[c.name] = self.streaks[c.name] + 1 if outcome == "error" else 0
            outcomes[c.name] = outcome if value is None else f"{outcome}({value:g})"
            rows.append((run_id, sample_no, c.name, taken, value, outcome, detail))
        async with self.ro.transaction(readonly=True):
            health = await dbhealth.sample(self.ro, self.run.quoted_table)
        for name in dbhealth.METRICS:
            rows.append((run_id, sample_no, name, taken, health[name], "info", ""))
        return outcomes, rows

    async def sample_until_done(
        self, sample_no: int, observed: float, duration: float, interval: float
    ) -> tuple[str, str, float, int]:
        """(verdict, reason, seconds observed, last sample number)."""
        verdict, reason = "inconclusive", "not sampled yet"
        resumed_at = time.monotonic() - observed
        while True:
            sample_no += 1
            outcomes, rows = await self.sample(sample_no)
            observed = time.monotonic() - resumed_at
            verdict, reason = _verdict(self.checks, self.counts, self.streaks)
            async with self.conn.transaction():
                await ledger.insert_samples(self.conn, rows)
                await ledger.save_phase(
                    self.conn,
                    self.run.run_id,
                    "soak",
                    status="running",
                    result={**self.base, "observed_seconds": observed},
                )
            _append_samples(self.jsonl, rows)
            log.info(
                "soak.sample", sample=sample_no, outcomes=outcomes, observed=round(observed, 1)
            )
            if self.progress:
                self.progress(
                    "sample", {"sample_no": sample_no, "elapsed": observed, "outcomes": outcomes}
                )
            if verdict == "fail" or observed >= duration:
                break
            await anyio.sleep(min(interval, max(duration - observed, 0)))
            observed = time.monotonic() - resumed_at
            if observed >= duration + interval:  # paused far beyond the window (e.g. suspended)
                break
        return verdict, reason, observed, sample_no


async def _refuse_if_stopped(
    conn: asyncpg.Connection, loaded: LoadedPlan, run_id: str, env: str, gate: str, cmd: str
) -> None:
    """A finished soak whose gate was rejected (or the run rolled back, or tampered with) is
    not shown as waiting for a decision again: a reject is final for the run."""
    own = await gate_state(conn, run_id, "soak", gate, loaded.digest, loaded)
    if own.status in ("rejected", "tampered", "rolled-back"):
        raise NoGo(
            f"the soak of run {run_id} is done and its gate {gate} is {own.status}: {own.reason}",
            hint=f"a reject is final for the run: start a new run with "
            f"`{cmd} apply {loaded.path} --env {env}`",
        )


async def soak(
    loaded: LoadedPlan,
    dbs: Databases,
    *,
    env: str,
    run_id: str,
    duration: float | None,
    interval: float | None,
    operator: str,
    progress: ProgressCallback | None = None,
) -> SoakResult:
    plan = loaded.plan
    cmd = command_prefix()
    duration = duration or plan.soak.duration
    interval = min(interval or plan.soak.interval, duration)
    if not plan.soak.checks:
        raise InvalidInput(
            "the plan has no soak checks: add [[soak.checks]] entries", hint="see plans/README.md"
        )
    gate = gate_name("soak", env)
    check_run_id(run_id, plan.name)
    conn = await dbs.connect(env)
    ro = await dbs.connect(env, read_only=True)
    try:
        run = await ledger.get_run(conn, run_id)
        if run is None:
            raise InvalidInput(
                f"run {run_id} has no apply in environment {env!r}",
                hint="soak the environment the run was applied to",
            )
        await ledger.ensure_ledger(conn)
        state = await gate_state(
            conn, run_id, "apply", gate_name("apply", env), loaded.digest, loaded
        )
        require_open(state, run_id=run_id, before="the soak", cmd=cmd)
        run_dir = RunDir.of(run_id)
        events.attach(run_dir.env(env) / "events.jsonl")
        async with run_lock(conn, run_id):
            row = await ledger.get_phase(conn, run_id, "soak")
            if row is not None and row.finished_at is not None:
                await _refuse_if_stopped(conn, loaded, run_id, env, gate, cmd)
                return _result_from(row, run_id, env, gate, cmd, loaded)
            prior: dict[str, Any] = row.result if row else {}
            window_start = (
                datetime.fromisoformat(prior["window_start"]) if prior else datetime.now(UTC)
            )
            params = [window_start, run.created_at]
            baselines = prior.get("baselines") or await _baselines(
                ro, plan.soak.checks, params, plan.soak.statement_timeout
            )
            observed = float(prior.get("observed_seconds", 0.0))
            sample_no = await ledger.last_sample_no(conn, run_id)
            counts, streaks = _tally(plan.soak.checks, await ledger.sample_outcomes(conn, run_id))
            base = {
                "plan": {
                    "name": plan.name,
                    "digest": loaded.digest,
                    **await bound_values(conn, loaded),
                },
                "operator": operator,
                "window_start": window_start.isoformat(),
                "baselines": baselines,
                "duration_seconds": duration,
                "interval_seconds": interval,
                "env": env,
                "dsn": dbs.display_dsn(env),
                "report_file": REPORT,
                "cmd": cmd,
                "target": run.target_table,
            }
            window = _Window(
                *(conn, ro, dbs, env, run, plan.soak.checks, params, baselines),
                *(plan.soak.statement_timeout, base, run_dir.env(env) / "soak_samples.jsonl"),
                *(counts, streaks, progress),
            )
            verdict, reason, observed, sample_no = await window.sample_until_done(
                sample_no, observed, duration, interval
            )
            ro = window.ro
            if verdict != "fail" and observed < duration:
                verdict, reason = "inconclusive", "the soak ended before its duration"
            result = {
                **base,
                "observed_seconds": observed,
                "verdict": verdict,
                "reason": reason,
                "samples": sample_no,
                "counts": counts,
            }
            await ledger.save_phase(
                conn,
                run_id,
                "soak",
                status="finished",
                result=result,
                criteria=verdict,
                finished=True,
            )
            _, digest = await render_soak(conn, run, env, plan.soak.checks)
            await ledger.set_report_digest(conn, run_id, "soak", digest)
            log.info("soak.finished", verdict=verdict, reason=reason)
            row = await ledger.get_phase(conn, run_id, "soak")
            assert row is not None
            return _result_from(row, run_id, env, gate, cmd, loaded)
    finally:
        events.detach()
        await close_quietly(ro)
        await close_quietly(conn)


def _result_from(
    row: ledger.PhaseRow, run_id: str, env: str, gate: str, cmd: str, loaded: LoadedPlan
) -> SoakResult:
    r = row.result
    verdict = r.get("verdict", "inconclusive")
    nxt = (
        f"{cmd} rollback {run_id} --env {env} --dry-run"
        if verdict == "fail"
        else f"{cmd} approve {run_id} --gate {gate} --as <approver>"
        + (' --note "why it is safe"' if verdict == "inconclusive" else "")
    )
    return SoakResult(
        run_id,
        env,
        verdict,
        r.get("reason", ""),
        float(r.get("observed_seconds", 0)),
        int(r.get("samples", 0)),
        RunDir.of(run_id).root / env / REPORT,
        gate,
        nxt,
    )


def _chart(points: list[tuple[str, float | None]], threshold: float | None) -> dict[str, Any]:
    values = [v for _, v in points]
    return {
        "labels": [p for p, _ in points],
        "values": ["null" if v is None else f"{v:.6g}" for v in values],
        "threshold": None if threshold is None else f"{threshold:.6g}",
        "any": any(v is not None for v in values),
    }


async def render_soak(
    conn: asyncpg.Connection, run: ledger.RunRow, env: str, checks: list[Check]
) -> tuple[Path, str]:
    row = await ledger.get_phase(conn, run.run_id, "soak")
    assert row is not None
    r = row.result
    samples = await ledger.samples(conn, run.run_id)
    start = datetime.fromisoformat(r["window_start"])
    by_check: dict[str, list[asyncpg.Record]] = {}
    for s in samples:
        by_check.setdefault(s["check_name"], []).append(s)
    table = []
    charts = []
    unit, scale = ("minutes", 60.0) if float(r["duration_seconds"]) >= 600 else ("seconds", 1.0)
    for c in checks:
        ss = by_check.get(c.name, [])
        vals = [s["value"] for s in ss if s["value"] is not None]
        baseline = r["baselines"].get(c.name)
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
    health = []
    for name, (label, kind) in dbhealth.METRICS.items():
        vals = [s["value"] for s in by_check.get(name, []) if s["value"] is not None]
        health.append(
            {
                "name": label,
                "kind": kind,
                "last": vals[-1] if vals else None,
                "max": max(vals) if vals else None,
            }
        )
    decisions = await ledger.decisions(conn, run.run_id)
    text = render(
        "staging_observability.md.j2",
        {
            "run": run,
            "env": env,
            "r": r,
            "checks": table,
            "charts": charts,
            "chart_unit": unit,
            "health": health,
            "gate": gate_name("soak", env),
            "overrides": overrides_note(decisions),
            "rolled_back": await rollbacks(conn, run.run_id),
            "started_at": row.started_at,
            "finished_at": row.finished_at,
        },
    )
    path = write_text(RunDir.of(run.run_id).env(env) / REPORT, text)
    return path, text_digest(text)
