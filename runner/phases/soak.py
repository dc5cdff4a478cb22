"""Phase 2: read-only checks sampled over time against thresholds and baselines; then a gate.

The checks and their verdict are `engine.checks`; this phase keeps the window (sampling until the
duration is observed or a check fails, resumable from the ledger) and the rollout around it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import structlog

from runner import ledger
from runner.artifacts import RunDir, check_run_id
from runner.db import Databases, close_quietly
from runner.engine import checks, dbhealth
from runner.errors import InvalidInput, NoGo
from runner.phases.common import (
    PhaseFrame,
    ProgressCallback,
    ReportWriter,
    command_prefix,
    gate_state,
    phase_frame,
    plan_binding,
    require_open,
)
from runner.plan import Check, LoadedPlan
from runner.reports.soak import REPORT, render_soak
from runner.results import SoakDoc
from runner.rollout import gate_name

log = structlog.get_logger("backfill.soak")


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
    baselines: dict[str, float | None]
    statement_timeout: float
    base: SoakDoc
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
            value, outcome, detail, self.ro = await checks.check_once(
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
            verdict, reason = checks.verdict(self.checks, self.counts, self.streaks)
            async with self.conn.transaction():
                await ledger.insert_samples(self.conn, rows)
                await ledger.save_phase(
                    self.conn,
                    self.run.run_id,
                    "soak",
                    status="running",
                    result=self.base.model_copy(update={"observed_seconds": observed}),
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


def _check_plan(loaded: LoadedPlan, run_id: str) -> None:
    if not loaded.plan.soak.checks:
        raise InvalidInput(
            "the plan has no soak checks: add [[soak.checks]] entries", hint="see plans/README.md"
        )
    check_run_id(run_id, loaded.plan.name)


async def _applied_run(
    conn: asyncpg.Connection, loaded: LoadedPlan, run_id: str, env: str, cmd: str
) -> ledger.RunRow:
    """The run this soak watches: applied here, its apply gate open."""
    run = await ledger.get_run(conn, run_id)
    if run is None:
        raise InvalidInput(
            f"run {run_id} has no apply in environment {env!r}",
            hint="soak the environment the run was applied to",
        )
    await ledger.ensure_ledger(conn)
    state = await gate_state(conn, run_id, "apply", gate_name("apply", env), loaded.digest, loaded)
    require_open(state, run_id=run_id, before="the soak", cmd=cmd)
    return run


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
    """Sample the plan's checks on `env` (continuing a soak that was stopped) until its duration
    is observed or a check fails; record the verdict, render the report, halt at the gate."""
    plan = loaded.plan
    cmd = command_prefix()
    duration = duration or plan.soak.duration
    interval = min(interval or plan.soak.interval, duration)
    _check_plan(loaded, run_id)
    gate = gate_name("soak", env)
    async with dbs.connection(env) as conn:
        run = await _applied_run(conn, loaded, run_id, env, cmd)
        async with phase_frame(conn, run, env, "soak", connect=lambda: dbs.connect(env)) as frame:
            row = await ledger.get_phase(conn, run_id, "soak")
            if row is not None and row.finished_at is not None:
                await _refuse_if_stopped(conn, loaded, run_id, env, gate, cmd)
                return _result_from(row, run_id, env, gate, cmd)
            prior = row.doc_as(SoakDoc) if row and row.result else None
            base = await _window_doc(frame, loaded, dbs, prior, duration, interval, operator)
            doc = await _observe(
                frame, dbs, plan.soak.checks, base, plan.soak.statement_timeout, progress
            )
            await frame.finish(doc, criteria=doc.verdict, report=_report(plan.soak.checks))
            log.info("soak.finished", verdict=doc.verdict, reason=doc.reason)
            row = await ledger.get_phase(conn, run_id, "soak")
            assert row is not None
            return _result_from(row, run_id, env, gate, cmd)


def _report(checks_: list[Check]) -> ReportWriter:
    async def write(conn: asyncpg.Connection, run: ledger.RunRow, env: str) -> tuple[Path, str]:
        return await render_soak(conn, run, env, checks_)

    return write


async def _window_doc(
    frame: PhaseFrame,
    loaded: LoadedPlan,
    dbs: Databases,
    prior: SoakDoc | None,
    duration: float,
    interval: float,
    operator: str,
) -> SoakDoc:
    """The soak's document before its first sample: the window (continued from `prior`, a soak
    that was stopped) and the baselines, read once at its start."""
    window_start = datetime.fromisoformat(prior.window_start) if prior else datetime.now(UTC)
    if prior is not None and prior.baselines:
        baselines = prior.baselines
    else:
        async with dbs.connection(frame.env, read_only=True) as ro:
            baselines = await checks.read_baselines(
                ro,
                loaded.plan.soak.checks,
                [window_start, frame.run.created_at],
                loaded.plan.soak.statement_timeout,
            )
    return SoakDoc(
        plan=await plan_binding(frame.conn, loaded),
        operator=operator,
        env=frame.env,
        dsn=dbs.display_dsn(frame.env),
        report_file=REPORT,
        cmd=command_prefix(),
        window_start=window_start.isoformat(),
        baselines=baselines,
        duration_seconds=duration,
        interval_seconds=interval,
        target=frame.run.target_table,
        observed_seconds=prior.observed_seconds if prior else 0.0,
    )


async def _observe(
    frame: PhaseFrame,
    dbs: Databases,
    checks_: list[Check],
    base: SoakDoc,
    statement_timeout: float,
    progress: ProgressCallback | None,
) -> SoakDoc:
    """Sample until the window is observed or a check fails; the finished document."""
    conn, run_id = frame.conn, frame.run_id
    counts, streaks = checks.tally(checks_, await ledger.sample_outcomes(conn, run_id))
    window = _Window(
        conn=conn,
        ro=await dbs.connect(frame.env, read_only=True),
        dbs=dbs,
        env=frame.env,
        run=frame.run,
        checks=checks_,
        params=[datetime.fromisoformat(base.window_start), frame.run.created_at],
        baselines=base.baselines,
        statement_timeout=statement_timeout,
        base=base,
        jsonl=frame.dir / "soak_samples.jsonl",
        counts=counts,
        streaks=streaks,
        progress=progress,
    )
    try:
        verdict, reason, observed, samples = await window.sample_until_done(
            await ledger.last_sample_no(conn, run_id),
            base.observed_seconds,
            base.duration_seconds,
            base.interval_seconds,
        )
    finally:
        await close_quietly(window.ro)
    if verdict != "fail" and observed < base.duration_seconds:
        verdict, reason = "inconclusive", "the soak ended before its duration"
    return base.model_copy(
        update={
            "observed_seconds": observed,
            "verdict": verdict,
            "reason": reason,
            "samples": samples,
            "counts": counts,
        }
    )


def _result_from(row: ledger.PhaseRow, run_id: str, env: str, gate: str, cmd: str) -> SoakResult:
    r = row.doc_as(SoakDoc)
    nxt = (
        f"{cmd} rollback {run_id} --env {env} --dry-run"
        if r.verdict == "fail"
        else f"{cmd} approve {run_id} --gate {gate} --as <approver>"
        + (' --note "why it is safe"' if r.verdict == "inconclusive" else "")
    )
    return SoakResult(
        run_id,
        env,
        r.verdict,
        r.reason,
        r.observed_seconds,
        r.samples,
        RunDir.of(run_id).root / env / REPORT,
        gate,
        nxt,
    )
