"""`backfill validate`: a plan checked on its own, and with an environment against its database
(read-only, changing nothing: `phases.validate.validate_env`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.db import Databases
from runner.ledger import ensure_ledger
from runner.phases.validate import validate_env
from runner.plan import LoadedPlan, Plan


@dataclass
class Validation:
    ok: bool
    doc: dict[str, Any]  # what --json prints
    lines: list[str] = field(default_factory=list)  # what a person reads


def _summary(path: Path, loaded: LoadedPlan) -> dict[str, Any]:
    p = loaded.plan
    return {
        "plan": p.name,
        "file": str(path),
        "digest": loaded.digest,
        "environments": {
            n: ("embedded" if e.dsn == "embedded" else "dsn") for n, e in p.environments.items()
        },
        "target": p.target.table,
        "key": p.target.key,
        "columns": p.target.columns,
        "batch_size": p.batching.size,
        "workers": p.batching.workers,
        "rate": {
            "batches_per_minute": p.batching.batches_per_minute,
            "rows_per_second": p.batching.rows_per_second,
        },
        "soak_checks": [c.name for c in p.soak.checks],
        "approvers": p.gates.approvers,
        "params": {
            name: {"type": spec.type, "value": loaded.plain_values.get(name, spec.default)}
            for name, spec in p.params.items()
        },
        "writes": [w.table for w in p.writes],
    }


def _plan_lines(path: Path, loaded: LoadedPlan) -> list[str]:
    p: Plan = loaded.plan
    b = p.batching
    rate = (
        (b.batches_per_minute and f"{b.batches_per_minute} batches/min")
        or (b.rows_per_second and f"{b.rows_per_second} rows/s")
        or "unthrottled"
    )
    params = [
        f"  param {name} ({spec.type}) = {loaded.plain_values.get(name, spec.default)}"
        + (f" — {spec.description}" if spec.description else "")
        for name, spec in p.params.items()
    ]
    writes = [f"  also writes {w.table} ({', '.join(w.operations)})" for w in p.writes]
    return [
        f"{path}: plan {p.name!r} is valid (digest {loaded.digest[:12]})",
        f"  target {p.target.table} key ({', '.join(p.target.key)}) "
        f"columns {', '.join(p.target.columns)}",
        f"  batches of {b.size}, {b.workers} worker(s), {rate}; "
        f"{len(p.soak.checks)} soak check(s); environments {', '.join(p.environments)}",
        *writes,
        *params,
    ]


async def validate(path: Path, loaded: LoadedPlan, env: str | None) -> Validation:
    """The plan's summary; with `env`, every statement of the plan checked against that
    environment's database, each finding ok or FAIL with where it is."""
    result = Validation(True, {"ok": True, "plan": _summary(path, loaded)})
    result.lines = _plan_lines(path, loaded)
    if env is None:
        return result
    async with Databases(loaded.plan) as dbs:
        report = await validate_env(loaded, dbs, env)
    result.ok = report.ok
    result.doc["ok"] = report.ok
    result.doc["env"] = {
        "name": env,
        "dsn": report.dsn,
        "findings": [f.__dict__ for f in report.findings],
    }
    result.lines.append(f"  against {env} ({report.dsn}), read-only:")
    result.lines += [
        f"    {'ok  ' if f.ok else 'FAIL'} {f.where}: {f.message}" for f in report.findings
    ]
    return result


async def init(loaded: LoadedPlan, env: str) -> str:
    """Create or migrate the ledger schema in `env`'s database; what was done, in a line."""
    async with Databases(loaded.plan) as dbs, dbs.connection(env) as conn:
        version = await ensure_ledger(conn)
        return f"ledger schema `backfill` is at version {version} in {env} ({dbs.display_dsn(env)})"
