"""The plan: pydantic models, loading TOML/JSON, `${VAR}` interpolation and the canonical digest."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.errors import PlanError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from `90`, `1.5`, `"500ms"`, `"30s"`, `"5m"`, `"6h"`, `"1d"`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 6h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 30s, 5m or 6h, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


ColumnList = Annotated[list[str], BeforeValidator(_as_list)]

_CONDITION = re.compile(
    r"^\s*(?:(?P<op>==|!=|>=|<=|>|<)\s*(?P<num>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    r"|between\s+(?P<lo>[-+]?\d+(?:\.\d+)?)\s+(?P<hi>[-+]?\d+(?:\.\d+)?)"
    r"|is\s+(?P<bool>true|false))\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Condition:
    """A parsed `pass_if`: `== 0`, `>= 0.85`, `between 0.9 1.1`, `is true`."""

    text: str
    op: str
    low: float
    high: float

    def holds(self, value: float) -> bool:
        match self.op:
            case "==":
                return value == self.low
            case "!=":
                return value != self.low
            case ">=":
                return value >= self.low
            case "<=":
                return value <= self.low
            case ">":
                return value > self.low
            case "<":
                return value < self.low
            case _:  # between, is true/false (booleans arrive as 1.0 / 0.0)
                return self.low <= value <= self.high


def parse_condition(text: str) -> Condition:
    m = _CONDITION.match(text)
    if not m:
        raise ValueError(
            f"cannot read condition {text!r}: write one of `== 0`, `>= 0.85`, `< 5`, "
            "`between 0.9 1.1`, `is true`"
        )
    if m.group("op"):
        n = float(m.group("num"))
        return Condition(text.strip(), m.group("op"), n, n)
    if m.group("bool"):
        b = 1.0 if m.group("bool").lower() == "true" else 0.0
        return Condition(text.strip(), "between", b, b)
    lo, hi = float(m.group("lo")), float(m.group("hi"))
    if lo > hi:
        raise ValueError(f"`between {lo} {hi}`: the lower bound is above the upper bound")
    return Condition(text.strip(), "between", lo, hi)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


NonEmpty = Annotated[str, Field(min_length=1)]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class PlanMeta(_Model):
    name: Annotated[str, Field(pattern=_NAME)]
    description: str = ""
    owner: str = ""


class Environment(_Model):
    dsn: NonEmpty
    """A libpq URL, or `embedded` for the runner's own PostgreSQL server."""


class Target(_Model):
    table: NonEmpty
    key: ColumnList = Field(min_length=1)
    columns: ColumnList = Field(min_length=1)

    @model_validator(mode="after")
    def _check_columns(self) -> Target:
        for field, names in (("key", self.key), ("columns", self.columns)):
            if any(not n.strip() for n in names):
                raise ValueError(f"target.{field}: a column name is empty")
            if len(set(names)) != len(names):
                raise ValueError(f"target.{field}: a column is listed twice: {names}")
        overlap = sorted(set(self.key) & set(self.columns))
        if overlap:
            raise ValueError(
                f"target.columns must not include key columns {overlap}: "
                "a backfill may not change the key it pages by"
            )
        return self


class Discovery(_Model):
    sql: NonEmpty

    @field_validator("sql")
    @classmethod
    def _no_offset(cls, sql: str) -> str:
        if re.search(r"\boffset\b", sql, re.IGNORECASE):
            raise ValueError("discovery must not use OFFSET: the runner pages by key (keyset)")
        if sql.rstrip().endswith(";"):
            raise ValueError("discovery is wrapped by the runner: remove the trailing `;`")
        return sql


class Apply(_Model):
    sql: NonEmpty

    @field_validator("sql")
    @classmethod
    def _uses_keys(cls, sql: str) -> str:
        if "$1" not in sql:
            raise ValueError(
                "the apply statement must use the batch's keys: `$1` is the array of key values "
                "(one array per key column: $1, $2, …), e.g. `WHERE id = ANY($1)`"
            )
        if sql.rstrip().endswith(";"):
            sql = sql.rstrip()[:-1]
        if ";" in sql.replace("';'", ""):
            raise ValueError("the apply must be one statement (found `;` inside it)")
        return sql


class Batching(_Model):
    size: Annotated[int, Field(gt=0, le=1_000_000)] = 1000
    batches_per_minute: Annotated[float, Field(gt=0)] | None = None
    rows_per_second: Annotated[float, Field(gt=0)] | None = None
    workers: Annotated[int, Field(ge=1, le=32)] = 1
    lock_timeout: Duration = 2.0
    statement_timeout: Duration = 60.0
    max_retries: Annotated[int, Field(ge=0, le=100)] = 5
    max_passes: Annotated[int, Field(ge=1, le=100)] = 5


class Check(_Model):
    name: Annotated[str, Field(pattern=_NAME)]
    sql: NonEmpty
    description: str = ""
    pass_if: str | None = None
    baseline: float | None = None
    baseline_sql: str | None = None
    max_drop: Annotated[float, Field(ge=0, le=1)] | None = None
    tolerance: Annotated[float, Field(ge=0)] | None = None
    failure_limit: Annotated[int, Field(ge=0)] = 0
    inconclusive_limit: Annotated[int, Field(ge=0)] = 0
    consecutive_error_limit: Annotated[int, Field(ge=0)] = 3

    @field_validator("pass_if")
    @classmethod
    def _condition(cls, text: str | None) -> str | None:
        if text is not None:
            parse_condition(text)
        return text

    @model_validator(mode="after")
    def _baseline(self) -> Check:
        has_baseline = self.baseline is not None or self.baseline_sql is not None
        if self.baseline is not None and self.baseline_sql is not None:
            raise ValueError("give either `baseline` or `baseline_sql`, not both")
        if has_baseline and self.max_drop is None and self.tolerance is None:
            raise ValueError("a baseline needs `max_drop` (e.g. 0.15) or `tolerance` (e.g. 0.05)")
        if not has_baseline and (self.max_drop is not None or self.tolerance is not None):
            raise ValueError("`max_drop`/`tolerance` compare against a baseline: add `baseline`")
        if self.pass_if is None and not has_baseline:
            raise ValueError("a check needs `pass_if` (e.g. `== 0`) or a baseline to compare with")
        return self

    @property
    def condition(self) -> Condition | None:
        return parse_condition(self.pass_if) if self.pass_if else None


class Soak(_Model):
    duration: Duration = 6 * 3600.0
    interval: Duration = 300.0
    statement_timeout: Duration = 30.0
    checks: list[Check] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Soak:
        names = [c.name for c in self.checks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"soak.checks: names must be unique, repeated: {dupes}")
        if self.interval > self.duration:
            raise ValueError("soak.interval is longer than soak.duration")
        return self


class Health(_Model):
    canary_percent: Annotated[float, Field(gt=0, le=100)] = 5.0
    max_connection_use: Annotated[float, Field(gt=0, le=1)] = 0.8
    target_batch_seconds: Duration = 1.0
    max_long_transaction: Duration = 300.0


class Gates(_Model):
    approvers: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    allow_self_approval: bool = False


class Pipeline(_Model):
    staging: NonEmpty = "staging"
    prod: NonEmpty = "prod"


class Canary(_Model):
    batches: Annotated[int, Field(ge=1)]


class Parent(_Model):
    name: NonEmpty
    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    run: str | None = None


class Plan(_Model):
    plan: PlanMeta
    environments: dict[str, Environment] = Field(min_length=1)
    target: Target
    discovery: Discovery
    apply: Apply
    batching: Batching = Field(default_factory=Batching)
    soak: Soak = Field(default_factory=Soak)
    health: Health = Field(default_factory=Health)
    gates: Gates = Field(default_factory=Gates)
    pipeline: Pipeline = Field(default_factory=Pipeline)
    canary: Canary | None = None
    parent: Parent | None = None

    @model_validator(mode="after")
    def _pipeline_envs(self) -> Plan:
        if self.parent is None:  # a full plan names both stages; a mini plan only its own env
            for role in ("staging", "prod"):
                env = getattr(self.pipeline, role)
                if env not in self.environments:
                    raise ValueError(
                        f"pipeline.{role} names environment {env!r}, which is not in "
                        f"[environments] (have: {sorted(self.environments)})"
                    )
        return self

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def is_mini(self) -> bool:
        return self.parent is not None

    def env(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            raise PlanError(
                f"environment {name!r} is not defined in this plan",
                hint=f"use one of: {', '.join(sorted(self.environments))}",
            ) from None


@dataclass(frozen=True)
class LoadedPlan:
    """A validated plan with where it came from, its raw (uninterpolated) data and its digest."""

    path: Path
    plan: Plan
    raw: dict[str, Any]
    digest: str
    secrets: frozenset[str]


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str], where: str) -> tuple[str, set[str]]:
    """Replace `${VAR}` and `${VAR:-default}`; returns the text and the values that came from vars."""
    used: set[str] = set()

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            used.add(env[name])
            return env[name]
        if default is not None:
            return default
        raise PlanError(
            f"{where}: environment variable ${{{name}}} is not set",
            hint=f"export {name}=… or write ${{{name}:-default}} in the plan",
        )

    return _VAR.sub(sub, value), used


def _interpolate_tree(node: Any, env: Mapping[str, str], path: str, found: set[str]) -> Any:
    if isinstance(node, str):
        text, used = interpolate(node, env, path)
        found.update(u for u in used if u)
        return text
    if isinstance(node, dict):
        return {
            k: _interpolate_tree(v, env, f"{path}.{k}" if path else k, found)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_interpolate_tree(v, env, f"{path}[{i}]", found) for i, v in enumerate(node)]
    return node


def canonical_digest(raw: Mapping[str, Any]) -> str:
    """sha256 of the plan's canonical JSON form: key order and file format do not matter."""
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: the plan is not valid ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; see plans/README.md for the fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {loc}: {msg}{shown}")
    return "\n".join(lines)


def read_raw(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file", hint="check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read the plan file: {e}") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise PlanError(f"{path}: a JSON plan must be an object at the top level")
            return data
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: TOML syntax error: {e}") from None
    except json.JSONDecodeError as e:
        raise PlanError(
            f"{path}: JSON syntax error at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    raise PlanError(f"{path}: a plan file must end in .toml or .json")


def validate_raw(
    path: Path, raw: dict[str, Any], env: Mapping[str, str] | None = None
) -> LoadedPlan:
    secrets: set[str] = set()
    data = _interpolate_tree(raw, os.environ if env is None else env, "", secrets)
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        raise PlanError(_format_validation_error(path, e)) from None
    return LoadedPlan(path, plan, raw, canonical_digest(raw), frozenset(secrets))


def load_plan(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedPlan:
    """Read, interpolate and validate a plan; every problem is a PlanError naming file and field."""
    p = Path(path)
    return validate_raw(p, read_raw(p), env)
