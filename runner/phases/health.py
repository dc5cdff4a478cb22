"""Phase 3: read-only prod health: what still needs the backfill, capacity, schema drift against
staging; writes an idempotent mini plan for prod and a report; then a gate."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from runner import ledger
from runner.artifacts import RunDir, check_run_id, write_json
from runner.db import Databases, fetch_one, qualified
from runner.engine import dbhealth
from runner.engine.impact import estimate_impact
from runner.engine.shapes import resolve_tables
from runner.engine.target import OWN_COLLATION, TABLE_SIZE_SQL, TargetInfo, resolve_target
from runner.engine.throttle import Throttle
from runner.engine.windows import count_windows, plan_windows
from runner.errors import InvalidInput, NoGo
from runner.phases.common import (
    PhaseFrame,
    command_prefix,
    ensure_run,
    gate_state,
    phase_frame,
    plan_binding,
    require_open,
    rollback_note,
)
from runner.phases.validate import refuse_unfit, validate_env
from runner.plan import Health as HealthSettings
from runner.plan import LoadedPlan, Plan, validate_raw
from runner.reports import overrides_note
from runner.reports.health import MINI_PLAN, REPORT, render_health
from runner.results import HealthDoc, HealthTable
from runner.rollout import gate_name

log = structlog.get_logger("backfill.health")
LAG_CONDITION_S = 30.0  # replication lag above this is a condition a reviewer accepts

# a column's type with its collation where it is not the type's own (`text COLLATE public.ci`):
# under another collation the plan's comparisons, sorts and unique keys mean something else
_SHAPE_SQL = f"""
SELECT a.attname AS name,
       format_type(a.atttypid, a.atttypmod) || coalesce(' COLLATE ' || {OWN_COLLATION}, '') AS type,
       a.attnotnull AS not_null
FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
"""
_TRIGGERS_SQL = """
SELECT t.tgname AS name, t.tgenabled <> 'D' AS enabled
FROM pg_trigger t WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal
"""
_KEY_SQL = """
SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = to_regclass($1) AND i.indisprimary
"""


@dataclass
class HealthResult:
    run_id: str
    env: str
    verdict: str  # go | go-with-conditions | no-go
    rows_needing: int
    blockers: list[str]
    conditions: list[str]
    report_path: Path
    mini_plan_path: Path
    gate: str
    next_command: str
    drift: list[dict[str, Any]] = field(default_factory=list)


async def table_shape(conn: asyncpg.Connection, table: str) -> dict[str, Any]:
    cols = {
        r["name"]: {"type": r["type"], "not_null": r["not_null"]}
        for r in await conn.fetch(_SHAPE_SQL, table)
    }
    triggers = {r["name"]: r["enabled"] for r in await conn.fetch(_TRIGGERS_SQL, table)}
    key = await conn.fetchval(_KEY_SQL, table)
    return {"columns": cols, "triggers": triggers, "primary_key": list(key or [])}


def schema_drift(
    staging: dict[str, Any], prod: dict[str, Any], declared: set[str]
) -> list[dict[str, Any]]:
    """Differences between the staging and prod target tables; drift on a declared column or the key
    is a blocker (the staging rehearsal does not prove the prod apply), the rest is a condition."""
    rows: list[dict[str, Any]] = []
    for name in sorted(set(staging["columns"]) | set(prod["columns"])):
        s, p = staging["columns"].get(name), prod["columns"].get(name)
        if s == p:
            continue
        what = (
            "missing in prod"
            if p is None
            else "missing in staging"
            if s is None
            else "type differs"
            if s["type"] != p["type"]
            else "nullability differs"
        )
        rows.append(
            {
                "object": f"column {name}",
                "staging": s and f"{s['type']}{' not null' if s['not_null'] else ''}",
                "prod": p and f"{p['type']}{' not null' if p['not_null'] else ''}",
                "what": what,
                "blocker": name in declared,
            }
        )
    if staging["primary_key"] != prod["primary_key"]:
        rows.append(
            {
                "object": "primary key",
                "staging": ", ".join(staging["primary_key"]) or "none",
                "prod": ", ".join(prod["primary_key"]) or "none",
                "what": "differs",
                "blocker": True,
            }
        )
    for name in sorted(set(staging["triggers"]) | set(prod["triggers"])):
        s, p = staging["triggers"].get(name), prod["triggers"].get(name)
        if s != p:
            rows.append(
                {
                    "object": f"trigger {name}",
                    "staging": "absent" if s is None else ("enabled" if s else "disabled"),
                    "prod": "absent" if p is None else ("enabled" if p else "disabled"),
                    "what": "differs",
                    "blocker": False,
                }
            )
    return rows


def tune_batch_size(plan_size: int, ms_per_row: float | None, target_seconds: float) -> int:
    """Largest batch that staging says commits within the target time, never above the plan's."""
    if not ms_per_row or ms_per_row <= 0:
        return plan_size
    fits = int(target_seconds * 1000 / ms_per_row)
    return max(min(plan_size, fits), min(plan_size, 100))


def mini_plan(
    loaded: LoadedPlan, env: str, run_id: str, size: int, canary_batches: int
) -> dict[str, Any]:
    """The prod plan: same discovery and apply (so it only finds what still needs it: idempotent),
    prod's environment only, the tuned batch size, a canary and its parent's digest."""
    raw = copy.deepcopy(loaded.raw)
    raw["environments"] = {env: raw["environments"][env]}
    raw.setdefault("batching", {})["size"] = size
    raw.pop("soak", None)
    raw["canary"] = {"batches": canary_batches}
    raw["parent"] = {"name": loaded.plan.name, "digest": loaded.digest, "run": run_id}
    raw.setdefault("plan", {})["description"] = (
        f"Prod mini plan for run {run_id}, written by `backfill health` from {loaded.path.name}"
    )
    return raw


def findings(
    drift: list[dict[str, Any]], capacity: dict[str, float | None], h: HealthSettings
) -> tuple[list[str], list[str]]:
    """(blockers, conditions) of the prod health check: drift on a declared column or the key
    blocks; other drift and a busy database are conditions a reviewer accepts with a note."""
    blockers = [
        f"schema drift: {d['object']} {d['what']} (staging {d['staging']}, prod {d['prod']})"
        for d in drift
        if d["blocker"]
    ]
    conditions = [f"schema drift: {d['object']} {d['what']}" for d in drift if not d["blocker"]]
    use = capacity["db.connection_use"] or 0.0
    if use > h.max_connection_use:
        conditions.append(
            f"connections at {use:.0%} of max_connections (limit {h.max_connection_use:.0%}): "
            "lower workers or wait for a quieter window"
        )
    longest = capacity["db.longest_transaction_s"] or 0.0
    if longest > h.max_long_transaction:
        conditions.append(
            f"a transaction has been open {longest:.0f} s: it may hold locks the backfill will wait on"
        )
    if capacity["db.lock_waiters"]:
        conditions.append(f"{capacity['db.lock_waiters']:.0f} session(s) are waiting on locks")
    lag = capacity["db.replication_lag_s"]
    if lag and lag > LAG_CONDITION_S:
        conditions.append(f"replication lag is {lag:.0f} s")
    return blockers, conditions


def recommendation(plan: Plan, rows_needing: int, ms_per_row: float | None) -> dict[str, Any]:
    """Batch size tuned from staging's timings, the canary's size and the expected duration."""
    h, b = plan.health, plan.batching
    tuned = tune_batch_size(b.size, ms_per_row, h.target_batch_seconds)
    batches = math.ceil(rows_needing / tuned) if rows_needing else 0
    canary = max(1, math.ceil(rows_needing * h.canary_percent / 100 / tuned)) if rows_needing else 1
    throttle = Throttle(b.batches_per_minute, b.rows_per_second, tuned)
    work = (batches * tuned * ms_per_row / 1000 / b.workers) if ms_per_row else None
    return {
        "batch_size": tuned,
        "plan_batch_size": b.size,
        "canary_batches": canary,
        "canary_percent": h.canary_percent,
        "batches": batches,
        "workers": b.workers,
        "batches_per_minute": b.batches_per_minute,
        "rows_per_second": b.rows_per_second,
        "estimated_seconds": max(throttle.seconds_for(batches, rows_needing), work or 0.0),
    }


@dataclass(frozen=True)
class _Staging:
    """What prod health needs from staging: the batches' timing, the target's shape and the
    decisions there (their overrides are carried over)."""

    per_batch: asyncpg.Record
    shapes: dict[str, dict[str, Any]]  # every table the run writes there, by schema.name
    decisions: list[ledger.Decision]


async def _from_staging(
    s_conn: asyncpg.Connection, loaded: LoadedPlan, run_id: str, staging: str, cmd: str
) -> _Staging:
    """Staging's facts, once the soak gate there is open."""
    state = await gate_state(
        s_conn, run_id, "soak", gate_name("soak", staging), loaded.digest, loaded
    )
    require_open(state, run_id=run_id, before="the prod health check", cmd=cmd)
    staging_run = await ledger.get_run(s_conn, run_id)
    assert staging_run is not None
    per_batch = await ledger.batch_timing(s_conn, run_id)
    assert per_batch is not None  # an aggregate: always one row
    shapes = {staging_run.target_table: await table_shape(s_conn, staging_run.quoted_table)}
    for t in staging_run.tables or []:
        name = qualified(t["schema"], t["name"])
        shapes[f"{t['schema']}.{t['name']}"] = await table_shape(s_conn, name)
    return _Staging(per_batch, shapes, await ledger.decisions(s_conn, run_id))


_CRITERIA = {"go": "pass", "go-with-conditions": "inconclusive", "no-go": "fail"}


def _staging_timing(per_batch: asyncpg.Record) -> dict[str, Any]:
    """How staging's batches went, for the batch-size tuning and the report."""
    rows = per_batch["rows"] and float(per_batch["rows"])
    ms = per_batch["ms"] and float(per_batch["ms"])
    return {
        "batches": per_batch["n"],
        "avg_batch_ms": ms,
        "avg_batch_rows": rows,
        "ms_per_row": ms / rows if per_batch["n"] and rows and ms is not None else None,
    }


@dataclass(frozen=True)
class _ProdFacts:
    target: TargetInfo
    needing: asyncpg.Record
    size: asyncpg.Record
    capacity: dict[str, float | None]
    shapes: dict[str, dict[str, Any]]  # by schema.name
    declared: dict[str, set[str]]  # per table: its key and the columns an update may change
    tables: list[dict[str, Any]] | None  # a shaped run's tables, as the run's row records them
    windows: list[dict[str, Any]]  # a windowed plan's first windows, with discovery's count
    impact: dict[str, Any]  # engine.impact: the bytes and time span of what still needs it


async def _prod_facts(ro: asyncpg.Connection, plan: Plan) -> _ProdFacts:
    """Read-only, in one snapshot: the target, what still needs the backfill, the table's size,
    the database's capacity now and the target's shape (for drift against staging)."""
    async with ro.transaction(readonly=True):
        target = await resolve_target(ro, plan.target)
        discovery = plan.discovery.sql
        windows: list[dict[str, Any]] = []
        if plan.windows is not None:  # what the prod run will do: discovery within its windows
            walk = await plan_windows(ro, target, plan.windows, discovery)
            discovery = walk.span
            windows = await count_windows(ro, walk)
        needing = await fetch_one(ro, target.discovery_count_sql(discovery))
        impact = await estimate_impact(ro, target, plan.discovery, discovery, int(needing["n"]))
        size = await fetch_one(ro, TABLE_SIZE_SQL, target.oid)
        capacity = await dbhealth.sample(ro, target.table)
        shapes = {target.display: await table_shape(ro, target.table)}
        declared = {target.display: {c.name for c in target.columns} | {k.name for k in target.key}}
        tables = await resolve_tables(ro, plan) if plan.shaped else None
        for t in tables or []:
            shapes[t.display] = await table_shape(ro, t.table)
            declared[t.display] = set(t.declared) | {k.name for k in t.key}
    docs = None if tables is None else [t.doc() for t in tables]
    return _ProdFacts(target, needing, size, capacity, shapes, declared, docs, windows, impact)


def _write_mini_plan(
    run_dir: RunDir, loaded: LoadedPlan, env: str, raw_mini: dict[str, Any], dbs: Databases
) -> tuple[Path, LoadedPlan]:
    """The prod plan, checked to load as `backfill validate` would, written and recorded."""
    path = run_dir.env(env) / MINI_PLAN
    mini_loaded = validate_raw(path, raw_mini)
    write_json(path, raw_mini)
    run_dir.record(
        mini_plan_path=str(path.resolve()),
        plan_path=str(loaded.path.resolve()),
        envs={env: dbs.display_dsn(env)},
    )
    return path, mini_loaded


async def health(
    loaded: LoadedPlan, dbs: Databases, *, env: str, run_id: str, operator: str
) -> HealthResult:
    """Read prod (read-only) against what staging showed; write the mini plan and the report;
    halt at the gate."""
    plan = loaded.plan
    cmd = command_prefix()
    if env != plan.pipeline.prod:
        raise InvalidInput(
            f"health checks the prod stage ({plan.pipeline.prod!r}), not {env!r}",
            hint=f"use --env {plan.pipeline.prod}",
        )
    check_run_id(run_id, plan.name)
    async with dbs.connection(plan.pipeline.staging, read_only=True) as s_conn:
        staging = await _from_staging(s_conn, loaded, run_id, plan.pipeline.staging, cmd)
    refuse_unfit(await validate_env(loaded, dbs, env, with_checks=False), str(loaded.path))
    async with dbs.connection(env) as conn:
        if (rolled_back := await rollback_note(conn, run_id)) is not None:
            raise NoGo(
                f"the prod health check of run {run_id} cannot run: {rolled_back}",
                hint="start a new run",
            )
        await ledger.ensure_ledger(conn)
        async with dbs.connection(env, read_only=True) as ro:
            facts = await _prod_facts(ro, plan)
        run = await ensure_run(
            conn, loaded, env, run_id, facts.target, operator, create=True, tables=facts.tables
        )
        await ledger.refresh_run_tables(conn, run_id, facts.tables)
        async with phase_frame(conn, run, env, "health", connect=lambda: dbs.connect(env)) as frame:
            doc = await _judge(frame, loaded, dbs, staging, facts, operator)
            path = await frame.finish(doc, criteria=_CRITERIA[doc.verdict], report=render_health)
            log.info("health.finished", verdict=doc.verdict, rows_needing=doc.rows_needing)
    gate = gate_name("health", env)
    nxt = f"{cmd} approve {run_id} --gate {gate} --as <approver>" + (
        ' --note "why the conditions are acceptable"' if doc.verdict == "go-with-conditions" else ""
    )
    return HealthResult(
        run_id,
        env,
        doc.verdict,
        doc.rows_needing,
        doc.blockers,
        doc.conditions,
        path,
        frame.dir / MINI_PLAN,
        gate,
        nxt,
        doc.drift,
    )


def _drift_of_every_table(staging: _Staging, facts: _ProdFacts) -> list[dict[str, Any]]:
    """Schema drift between staging and prod for every table the run writes; with several
    tables each finding names its table."""
    several = len(facts.shapes) > 1
    drift: list[dict[str, Any]] = []
    for name, prod_shape in facts.shapes.items():
        staging_shape = staging.shapes.get(name)
        if staging_shape is None:
            drift.append(
                {
                    "object": f"table {name}",
                    "staging": "not written there",
                    "prod": "declared",
                    "what": "not rehearsed on staging",
                    "blocker": True,
                }
            )
            continue
        for d in schema_drift(staging_shape, prod_shape, facts.declared[name]):
            drift.append({**d, "object": f"{name}: {d['object']}"} if several else d)
    return drift


async def _judge(
    frame: PhaseFrame,
    loaded: LoadedPlan,
    dbs: Databases,
    staging: _Staging,
    facts: _ProdFacts,
    operator: str,
) -> HealthDoc:
    """The verdict from drift and capacity, the tuned mini plan (written), as one document."""
    plan, env, target = loaded.plan, frame.env, facts.target
    drift = _drift_of_every_table(staging, facts)
    blockers, conditions = findings(drift, facts.capacity, plan.health)
    rows_needing = int(facts.needing["n"])
    timing = _staging_timing(staging.per_batch)
    advice = recommendation(plan, rows_needing, timing["ms_per_row"])
    verdict = "no-go" if blockers else ("go-with-conditions" if conditions else "go")
    raw_mini = mini_plan(loaded, env, frame.run_id, advice["batch_size"], advice["canary_batches"])
    _, mini_loaded = _write_mini_plan(RunDir.of(frame.run_id), loaded, env, raw_mini, dbs)
    return HealthDoc(
        plan=await plan_binding(frame.conn, loaded),
        operator=operator,
        env=env,
        staging_env=plan.pipeline.staging,
        dsn=dbs.display_dsn(env),
        cmd=command_prefix(),
        report_file=REPORT,
        verdict=verdict,
        blockers=blockers,
        conditions=conditions,
        rows_needing=rows_needing,
        key_range=[facts.needing["first_key"], facts.needing["last_key"]],
        table=HealthTable(
            name=target.display, bytes=facts.size["bytes"], rows_estimate=facts.size["rows"]
        ),
        capacity=facts.capacity,
        drift=drift,
        staging=timing,
        recommendation=advice,
        mini_plan_file=MINI_PLAN,
        mini_plan_digest=mini_loaded.digest,
        mini_plan=raw_mini,
        overrides=overrides_note(staging.decisions),
        windows=facts.windows,
        impact=facts.impact,
    )
