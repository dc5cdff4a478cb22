"""`backfill validate --env`: check a plan against a live database without changing anything.

Everything runs in one READ ONLY transaction that is rolled back; statements are PREPAREd, never
executed, so SQL typos and type mismatches surface before a single row is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import asyncpg

from runner import redact
from runner.db import Databases
from runner.engine.checks import wrap_check
from runner.engine.executor import manifest_query
from runner.engine.impact import size_query
from runner.engine.shapes import shaped_run
from runner.engine.target import TargetInfo, resolve_target
from runner.engine.windows import plan_windows
from runner.errors import InvalidInput
from runner.phases.windows import HOOK, hook_prepare_sql
from runner.plan import LoadedPlan, Plan, sql_code

_UPDATED = re.compile(
    r"\bupdate\s+(?:only\s+)?((?:\"(?:[^\"]|\"\")+\"|[\w$]+)(?:\s*\.\s*(?:\"(?:[^\"]|\"\")+\"|[\w$]+))?)",
    re.IGNORECASE,
)
_CHECK_TYPES = frozenset({"int2", "int4", "int8", "float4", "float8", "numeric", "bool", "oid"})


@dataclass
class Finding:
    where: str
    ok: bool
    message: str


@dataclass
class EnvValidation:
    env: str
    dsn: str
    findings: list[Finding] = field(default_factory=list)
    target: TargetInfo | None = None

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)


_PREPARE = "PREPARE backfill_validate AS "


def _position(sql: str, exc: asyncpg.PostgresError) -> str:
    pos = getattr(exc, "position", None)
    if not pos:
        return ""
    offset = int(pos) - 1 - len(_PREPARE)
    if not 0 <= offset < len(sql):
        return ""
    line = sql.count("\n", 0, offset) + 1
    col = offset - (sql.rfind("\n", 0, offset) + 1) + 1
    text = sql.splitlines()[line - 1] if sql.splitlines() else ""
    return f" (line {line}, column {col}: `{text.strip()[:80]}`)"


async def _param_types(conn: asyncpg.Connection, sql: str) -> list[str]:
    """PREPARE (never execute) and read the parameter types PostgreSQL inferred."""
    await conn.execute(_PREPARE + sql)
    try:
        types = await conn.fetchval(
            "SELECT parameter_types::text[] FROM pg_prepared_statements WHERE name = 'backfill_validate'"
        )
    finally:
        await conn.execute("DEALLOCATE backfill_validate")
    return list(types or [])


async def _check_sql(
    conn: asyncpg.Connection, report: EnvValidation, where: str, sql: str
) -> list[str] | None:
    try:
        async with conn.transaction():  # a savepoint: one bad statement does not end the check
            types = await _param_types(conn, sql)
    except asyncpg.PostgresError as e:
        report.findings.append(
            Finding(
                where,
                False,
                redact.redact_text(
                    f"{e.__class__.__name__.removesuffix('Error')}: "
                    f"{' '.join(str(e).split())}{_position(sql, e)}"
                ),
            )
        )
        return None
    return types


async def _apply_problem(conn: asyncpg.Connection, sql: str, target: TargetInfo) -> str | None:
    """Why the apply is not one UPDATE of the target table, or None."""
    code = sql_code(sql).strip()
    first = code.split(None, 1)[0].lower() if code else ""
    if first not in ("update", "with"):
        return (
            f"the apply is a {first.upper() or 'blank'} statement: it must be one UPDATE of "
            f"{target.display}"
        )
    updated = [
        m.group(1)
        for m in _UPDATED.finditer(code)
        # a row-locking clause (FOR UPDATE, FOR NO KEY UPDATE) is not an UPDATE statement
        if not re.search(r"\bfor\s+(?:no\s+key\s+)?$", code[: m.start()], re.IGNORECASE)
    ]
    if not updated:
        return f"the apply does not UPDATE anything: it must be one UPDATE of {target.display}"
    for name in updated:
        same = await conn.fetchval(
            "SELECT to_regclass($1) IS NOT DISTINCT FROM to_regclass($2)", name, target.table
        )
        if not same:
            return (
                f"the apply updates {' '.join(name.split())}, not the target table "
                f"{target.display}: a backfill changes only its target"
            )
    return None


async def _check_value_type(conn: asyncpg.Connection, sql: str) -> str | None:
    """Why the check's value (first column) is not a number or boolean, or None."""
    stmt = await conn.prepare(wrap_check(sql))
    attrs = stmt.get_attributes()
    if not attrs:
        return "the check returns no column: it must return one number or boolean"
    kind = attrs[0].type.name
    if kind not in _CHECK_TYPES:
        return (
            f"the check's first column is of type {kind}: it must be a number or a boolean "
            "(e.g. `SELECT count(*) …`)"
        )
    return None


def _param_problems(types: list[str], target: TargetInfo) -> list[str]:
    """How a statement's parameters differ from the key arrays the runner passes."""
    expected = [f"{k.type}[]" for k in target.key]
    problems = []
    if len(types) != len(expected):
        problems.append(
            f"it takes {len(types)} parameter(s) but the runner passes {len(expected)} "
            f"(one array per key column: {', '.join(expected)})"
        )
    for i, (got, want) in enumerate(zip(types, expected, strict=False), start=1):
        if got != want:
            problems.append(f"${i} is {got}, but the runner passes {want}: write ${i}::{want}")
    return problems


async def _check_apply(
    conn: asyncpg.Connection, report: EnvValidation, plan: Plan, target: TargetInfo
) -> None:
    """The apply's statements prepare with the key arrays; a plain apply is one UPDATE of the
    target; a shaped one writes only declared tables, each with a declared operation."""
    statements = plan.apply.all
    wheres = (
        [f"apply.statements[{i}]" for i in range(len(statements))]
        if plan.apply.statements
        else ["apply.sql"]
    )
    prepared = True
    for where, sql in zip(wheres, statements, strict=True):
        types = await _check_sql(conn, report, where, sql)
        if types is None:
            prepared = False
            continue
        problems = _param_problems(types, target)
        if not plan.shaped and (kind := await _apply_problem(conn, sql, target)) is not None:
            problems.insert(0, kind)
        report.findings.append(
            Finding(
                where,
                not problems,
                "; ".join(problems) or f"prepares with parameters ({', '.join(types)})",
            )
        )
    if not plan.shaped or not prepared:
        return
    try:
        async with conn.transaction():  # a savepoint: a failed EXPLAIN must not end the check
            shape = await shaped_run(conn, plan, target)
    except InvalidInput as e:
        report.findings.append(Finding(e.message.split(":")[0], False, str(e)))
        return
    for step in shape.steps:
        report.findings.append(
            Finding(
                step.where,
                True,
                f"{step.op} of {step.table.display} (declared"
                + ("; inserted rows kept as digests)" if step.table.digest is not None else ")"),
            )
        )


async def validate_env(
    loaded: LoadedPlan, dbs: Databases, env: str, *, with_checks: bool = True
) -> EnvValidation:
    """Every finding about the plan in `env`; nothing is written (one READ ONLY transaction)."""
    plan = loaded.plan
    plan.env(env)
    report = EnvValidation(env, dbs.display_dsn(env))
    async with dbs.connection(env, read_only=True) as conn:
        tx = conn.transaction(readonly=True)
        await tx.start()
        try:
            try:
                target = await resolve_target(conn, plan.target)
            except InvalidInput as e:
                report.findings.append(Finding(e.message.split(":")[0], False, str(e)))
                return report
            report.target = target
            report.findings.append(
                Finding(
                    "target",
                    True,
                    f"{target.display}: key ({', '.join(k.name for k in target.key)}) is unique; "
                    f"columns {', '.join(f'{c.name} {c.type}' for c in target.columns)}",
                )
            )
            if await _check_sql(conn, report, "discovery.sql", plan.discovery.sql) is not None:
                wrapped = target.discovery_page_sql(plan.discovery.sql, after_cursor=True)
                if await _check_sql(conn, report, "discovery.sql", wrapped) is None:
                    report.findings[-1].message += (
                        f" — discovery must return the key column(s) "
                        f"{', '.join(k.name for k in target.key)} by name"
                    )
                else:
                    report.findings.append(Finding("discovery.sql", True, "prepares; pages by key"))
            await _check_apply(conn, report, plan, target)
            await _check_windows(conn, report, plan, target)
            await _check_apply_extras(conn, report, plan)
            checks: list[tuple[str, str | None]] = []
            for c in plan.soak.checks:
                checks += [
                    (f"soak.checks.{c.name}.sql", c.sql),
                    (f"soak.checks.{c.name}.baseline_sql", c.baseline_sql),
                ]
            checks += [(f"verify.{c.name}.sql", c.sql) for c in plan.verify]
            for where, sql in checks if with_checks else []:
                if sql and await _check_sql(conn, report, where, wrap_check(sql)) is not None:
                    async with conn.transaction():
                        wrong = await _check_value_type(conn, sql)
                    report.findings.append(
                        Finding(where, wrong is None, wrong or "prepares; returns a number")
                    )
        finally:
            await tx.rollback()
    return report


async def _check_windows(
    conn: asyncpg.Connection, report: EnvValidation, plan: Plan, target: TargetInfo
) -> None:
    """The plan's windows computed here (before a run is created), and its size query prepared."""
    if plan.windows is not None:
        try:
            async with conn.transaction():
                walk = await plan_windows(conn, target, plan.windows, plan.discovery.sql)
        except InvalidInput as e:
            report.findings.append(Finding("windows", False, e.message))
        except asyncpg.PostgresError as e:
            report.findings.append(Finding("windows", False, " ".join(str(e).split())))
        else:
            first, last = walk.windows[0], walk.windows[-1]
            count = f"SELECT count(*) FROM ({first.sql}) AS d"
            if await _check_sql(conn, report, "windows", count) is None:
                return
            report.findings.append(
                Finding(
                    "windows",
                    True,
                    f"{len(walk.windows)} window(s): {first.label}"
                    + (f" … {last.label}" if len(walk.windows) > 1 else ""),
                )
            )
    if plan.discovery.size_sql is not None:
        wrapped = size_query(plan.discovery.sql, plan.discovery.size_sql)
        if await _check_sql(conn, report, "discovery.size_sql", wrapped) is not None:
            report.findings.append(Finding("discovery.size_sql", True, "prepares over discovery"))


async def _check_apply_extras(conn: asyncpg.Connection, report: EnvValidation, plan: Plan) -> None:
    """What runs with the apply besides its statements: `[manifest] sql` in every batch, the
    windows' `before_each` / `after_each` when a window starts and ends. Prepared, never run: a
    mistake found by a batch would stop the phase inside a window (its jobs paused, say)."""
    if plan.manifest is not None:
        sql = manifest_query(plan.manifest.sql)
        if await _check_sql(conn, report, "manifest.sql", sql) is not None:
            report.findings.append(Finding("manifest.sql", True, "prepares"))
    for name in ("before_each", "after_each"):
        hook: str | None = getattr(plan.windows, name) if plan.windows is not None else None
        if hook is None:
            continue
        where = f"windows.{name}"
        prepare = hook_prepare_sql(hook)
        if prepare is not None:  # $1, $2, $3 declared as text, as the run prepares it
            try:
                async with conn.transaction():
                    await conn.execute(prepare)
                    await conn.execute(f"DEALLOCATE {HOOK}")  # session-wide, not rolled back
            except asyncpg.PostgresError as e:
                report.findings.append(Finding(where, False, " ".join(str(e).split())))
            else:
                report.findings.append(Finding(where, True, "prepares ($1, $2, $3 as text)"))
        elif ";" in sql_code(hook).strip().rstrip(";"):
            # several statements, run as written (without parameters): not one to prepare
            report.findings.append(Finding(where, True, "several statements: not prepared"))
        elif await _check_sql(conn, report, where, hook) is not None:
            report.findings.append(Finding(where, True, "prepares"))


def refuse_unfit(report: EnvValidation, path: str) -> None:
    """Before a phase writes anything: the plan's statements must fit the database."""
    bad = [f for f in report.findings if not f.ok]
    if bad:
        raise InvalidInput(
            f"{path}: the plan does not fit environment {report.env!r}; nothing was written:\n"
            + "\n".join(f"  - {f.where}: {f.message}" for f in bad),
            hint=f"`backfill validate {path} --env {report.env}` checks it without running",
        )
