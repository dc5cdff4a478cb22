"""The plan: pydantic models, loading TOML/JSON, `${VAR}` interpolation and the canonical digest."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from runner import redact
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
    if seconds > MAX_DURATION:
        raise ValueError("a duration must be at most 30d")
    return seconds


MAX_DURATION = 30 * 86400.0
MAX_TIMEOUT = 86400.0


def _timeout(value: object) -> float:
    seconds = parse_duration(value)
    if seconds > MAX_TIMEOUT:
        raise ValueError("a timeout must be at most 1d (PostgreSQL counts it in int milliseconds)")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
Timeout = Annotated[float, BeforeValidator(_timeout)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


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


_SQL_NOISE = re.compile(
    r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|(?P<dq>\$[A-Za-z_][A-Za-z0-9_]*\$|\$\$).*?(?P=dq)",
    re.DOTALL,
)


def sql_code(sql: str) -> str:
    """The SQL with comments and string literals blanked out: what PostgreSQL will execute."""
    return _SQL_NOISE.sub(" ", sql)


# Side effects a READ ONLY transaction does not block (signals, notifications, session settings,
# advisory locks, server administration, other connections): discovery and checks may not call them.
_SIDE_EFFECTS = re.compile(
    r"\b(pg_notify|pg_terminate_backend|pg_cancel_backend|set_config|pg_advisory_\w+|"
    r"pg_try_advisory_\w+|dblink\w*|pg_reload_conf|pg_rotate_logfile\w*|pg_switch_wal|"
    r"pg_create_restore_point|pg_promote|pg_stat_reset\w*|pg_log_backend_memory_contexts|"
    r"pg_logical_emit_message|lo_\w+|pg_file_\w+|pg_signal_backend|pg_replication_origin_\w+)"
    r"\s*\(",
    re.IGNORECASE,
)


_QUOTED_IDENTIFIER = re.compile(r'"(?:[^"]|"")*"')
_UNICODE_ESCAPED = re.compile(r'\bU&"', re.IGNORECASE)


def refuse_side_effects(sql: str, what: str) -> str:
    if _UNICODE_ESCAPED.search(sql_code(sql)):
        raise ValueError(
            f'{what} uses a Unicode-escaped identifier (U&"…"), which hides what it calls: write '
            "the name plainly"
        )
    code = sql_code(sql).replace('"', "")
    if m := _SIDE_EFFECTS.search(code):
        raise ValueError(
            f"{what} calls {m.group(1)}(), a side effect that a READ ONLY transaction does not "
            "block: discovery and soak checks may only read"
        )
    return sql


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
    read_role: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    """A role with only read privileges: discovery, checks and health run under it (SET ROLE)."""

    @field_validator("dsn")
    @classmethod
    def _libpq(cls, dsn: str) -> str:
        scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else None
        if dsn == "embedded" or scheme in ("postgres", "postgresql"):
            return dsn
        if scheme is None and re.match(r"^\s*\w+\s*=", dsn):
            return dsn  # libpq key=value form: host=… dbname=…
        what = f"a {scheme}:// URL" if scheme else "neither a URL nor key=value pairs"
        raise ValueError(
            f"this is {what}: write a PostgreSQL DSN (postgresql://user@host:5432/db or "
            "`host=… dbname=…`) or `embedded`"
        )


def _check_names(where: str, key: list[str], columns: list[str]) -> None:
    for field, names in (("key", key), ("columns", columns)):
        if any(not n.strip() for n in names):
            raise ValueError(f"{where}.{field}: a column name is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"{where}.{field}: a column is listed twice: {names}")
    overlap = sorted(set(key) & set(columns))
    if overlap:
        raise ValueError(
            f"{where}.columns must not include key columns {overlap}: "
            "a backfill may not change the key a row is found by"
        )


def _update_only() -> list[Literal["update", "delete"]]:
    return ["update"]


class Target(_Model):
    """The table the batches page through (the batch source), and what a batch may do to its
    rows: update `columns` (the default), delete the rows (archive-and-delete), or nothing
    (`operations = []`: it is only read, e.g. the source of an insert-only backfill)."""

    table: NonEmpty
    key: ColumnList = Field(min_length=1)
    columns: ColumnList = Field(default_factory=list)
    operations: list[Literal["update", "delete"]] = Field(default_factory=_update_only)

    @model_validator(mode="after")
    def _check_columns(self) -> Target:
        _check_names("target", self.key, self.columns)
        if len(set(self.operations)) != len(self.operations):
            raise ValueError("target.operations: list update and/or delete, each once")
        if not self.operations and self.columns:
            raise ValueError(
                "target.columns: the target is only read (operations = []), so no column of it "
                "may change: leave columns out"
            )
        if "update" in self.operations and not self.columns:
            raise ValueError(
                "target.columns: list the columns the apply changes (or set "
                'target.operations = ["delete"] for a backfill that only deletes)'
            )
        return self


WriteOperation = Literal["update", "insert", "delete", "upsert"]


class Write(_Model):
    """Another table a batch may write, declared: its key (how a row is found again to undo
    it), the operations allowed on it and the columns an update may change. Deleted and updated
    rows are recorded whole; rows inserted into an insert-only table by a 64-bit digest of the
    row as inserted (`images = "whole"`: whole, too)."""

    table: NonEmpty
    key: ColumnList = Field(min_length=1)
    operations: list[WriteOperation] = Field(min_length=1)
    columns: ColumnList = Field(default_factory=list)
    images: Literal["digest", "whole"] | None = None
    """How a row the batch inserted is recorded: a digest of it (the default for an insert-only
    table: what a rollback needs to delete it only while unchanged) or whole."""

    @model_validator(mode="after")
    def _check(self) -> Write:
        where = f"writes[{self.table}]"
        _check_names(where, self.key, self.columns)
        if len(set(self.operations)) != len(self.operations):
            raise ValueError(f"{where}.operations: an operation is listed twice")
        if {"update", "upsert"} & set(self.operations) and not self.columns:
            raise ValueError(f"{where}.columns: list the columns an update (or upsert) may change")
        if self.images == "digest" and self.allowed != {"insert"}:
            raise ValueError(
                f"{where}.images: a digest is kept only for a table the batches only insert into "
                f'(operations = ["insert"]); this one allows {sorted(self.allowed)}, whose '
                "rows are recorded whole: remove `images`"
            )
        return self

    @property
    def digested(self) -> bool:
        """Rows inserted here are recorded by their digest, not whole."""
        return self.allowed == {"insert"} and self.images != "whole"

    @property
    def allowed(self) -> frozenset[str]:
        """The row-level operations: an upsert inserts or updates."""
        ops = set(self.operations)
        if "upsert" in ops:
            ops |= {"insert", "update"}
        ops.discard("upsert")
        return frozenset(ops)


class Discovery(_Model):
    sql: NonEmpty
    time_column: NonEmpty | None = None
    """A column of the target whose oldest and newest values the dry run reports."""
    size_sql: NonEmpty | None = None
    """The bytes the backfill will touch, for the impact estimate: one read-only query over
    `discovered` (discovery's rows), e.g. `SELECT sum(f.size_bytes) FROM files f JOIN discovered d
    USING (id)`; without it, the table's average row size × the rows."""

    @field_validator("size_sql")
    @classmethod
    def _size_reads(cls, sql: str | None) -> str | None:
        if sql is not None and sql.rstrip().endswith(";"):
            raise ValueError("discovery.size_sql is wrapped by the runner: remove the trailing `;`")
        return None if sql is None else refuse_side_effects(sql, "discovery.size_sql")

    @field_validator("sql")
    @classmethod
    def _no_offset(cls, sql: str) -> str:
        # OFFSET 0 skips nothing: it only keeps a subquery from being flattened (README: a
        # NOT EXISTS probed row by row)
        if re.search(r"\boffset\b(?!\s+0(?:\s+rows?)?\s*(?:\)|$))", sql, re.IGNORECASE):
            raise ValueError(
                "discovery must not use OFFSET: the runner pages by key (keyset) "
                "(OFFSET 0 at the end of a subquery, which skips nothing, is allowed)"
            )
        if sql.rstrip().endswith(";"):
            raise ValueError("discovery is wrapped by the runner: remove the trailing `;`")
        return refuse_side_effects(sql, "discovery")


_TRANSACTION_CONTROL = re.compile(
    r"(?:^|;)\s*(begin|start\s+transaction|commit|end|rollback|abort|savepoint|release|"
    r"prepare\s+transaction)\b",
    re.IGNORECASE,
)


class Windows(_Model):
    """`[windows]`: the backfill runs window by window, each window a slice of discovery with its
    own progress, counts and status in the ledger, resumable where it stopped. Either time (or
    integer) ranges of a target column, `[since, until)` cut every `step`, or the target's
    partitions (`by_partition`), each its own window. Keyset batches run inside each window."""

    column: NonEmpty | None = None
    """A column of the target (date, timestamp, timestamptz or an integer type)."""
    since: NonEmpty | None = None
    """Where the first window starts (inclusive), e.g. `2024-01-01` or `${since}`."""
    until: NonEmpty | None = None
    """Where the last window ends (exclusive)."""
    step: NonEmpty | None = None
    """Each window's width: an interval (`1 day`, `1 month`) or, for an integer column, a number."""
    order: Literal["oldest_first", "newest_first"] = "oldest_first"
    by_partition: bool = False
    """Each leaf partition of a partitioned target is a window: no batch spans partitions."""
    before_each: str | None = None
    """SQL run before each window starts (e.g. pause a job), in the transaction that records the
    window started: once per window, however often the run is resumed. `$1`/`$2` are the
    window's lower and upper bound as text, `$3` its label."""
    after_each: str | None = None
    """SQL run once each window's batches are done, in the transaction that records it done."""

    @model_validator(mode="after")
    def _one_kind(self) -> Windows:
        fields = ("column", "since", "until", "step")
        ranged = [f for f in fields if getattr(self, f) is not None]
        if self.by_partition and ranged:
            raise ValueError(
                f"windows: by_partition = true makes each partition a window; remove {ranged} "
                "(or set by_partition = false to cut windows from a column)"
            )
        if not self.by_partition and len(ranged) != len(fields):
            missing = [f for f in fields if f not in ranged]
            raise ValueError(
                f"windows: missing {missing}: set column, since, until and step (e.g. column = "
                '"created_at", since = "2024-01-01", until = "2024-04-01", step = "1 month"), '
                "or by_partition = true"
            )
        for name in ("before_each", "after_each"):
            sql = getattr(self, name)
            if sql is not None and not sql.strip():
                raise ValueError(f"windows.{name} is empty: remove it or give it SQL")
            if sql is not None and (m := _TRANSACTION_CONTROL.search(sql_code(sql))):
                raise ValueError(
                    f"windows.{name} uses {m.group(1).upper()}: a hook runs inside the "
                    "transaction that records its window started or done (so it runs once per "
                    "window); it may not begin, commit or roll back transactions"
                )
        return self


class Manifest(_Model):
    """`[manifest]`: what each batch's line in manifest.jsonl records beyond its keys."""

    sql: NonEmpty
    """A read-only query over the batch's keys (`$1`… as in the apply), run in the batch's
    transaction after its statements; its rows (at most 100 per batch) are recorded with the
    batch, e.g. `SELECT kind, version, count(*) FROM t WHERE id = ANY($1) GROUP BY 1, 2`."""

    @field_validator("sql")
    @classmethod
    def _reads(cls, sql: str) -> str:
        if sql.rstrip().endswith(";"):
            raise ValueError("manifest.sql is wrapped by the runner: remove the trailing `;`")
        if not re.search(r"\$1(?!\d)", sql_code(sql)):
            raise ValueError(
                "manifest.sql must read the batch's keys: `$1` is the array of key values (one "
                "array per key column: $1, $2, …), e.g. `… WHERE id = ANY($1)`"
            )
        return refuse_side_effects(sql, "manifest.sql")


def _one_statement(sql: str, where: str) -> str:
    if not re.search(r"\$1(?!\d)", sql_code(sql)):
        raise ValueError(
            f"{where} must use the batch's keys: `$1` is the array of key values "
            "(one array per key column: $1, $2, …), e.g. `WHERE id = ANY($1)`; a `$1` in a "
            "comment or a string does not count"
        )
    if sql.rstrip().endswith(";"):
        sql = sql.rstrip()[:-1]
    if ";" in _QUOTED_IDENTIFIER.sub(" ", sql_code(sql)):
        raise ValueError(f"{where} must be one statement (found `;` inside it)")
    return sql


class Apply(_Model):
    """What one batch does: one statement (`sql`), or an ordered list (`statements`) run in the
    batch's transaction, each with the batch's key arrays as $1…$n."""

    sql: str | None = None
    statements: list[NonEmpty] = Field(default_factory=list)

    @field_validator("sql")
    @classmethod
    def _sql(cls, sql: str | None) -> str | None:
        return None if sql is None else _one_statement(sql, "the apply statement")

    @field_validator("statements")
    @classmethod
    def _statements(cls, statements: list[str]) -> list[str]:
        return [_one_statement(s, f"statement {i}") for i, s in enumerate(statements)]

    @model_validator(mode="after")
    def _one_form(self) -> Apply:
        if (self.sql is None) == (not self.statements):
            raise ValueError(
                "apply: give either `sql` (one statement) or `statements` (an ordered list)"
            )
        return self

    @property
    def all(self) -> list[str]:
        """The batch's statements, in order."""
        return [self.sql] if self.sql is not None else list(self.statements)


class Batching(_Model):
    size: Annotated[int, Field(gt=0, le=1_000_000)] = 1000
    batches_per_minute: Annotated[float, Field(gt=0, le=60_000, allow_inf_nan=False)] | None = None
    rows_per_second: Annotated[float, Field(gt=0, le=100_000_000, allow_inf_nan=False)] | None = (
        None
    )
    workers: Annotated[int, Field(ge=1, le=32)] = 1
    lock_timeout: Timeout = 2.0
    statement_timeout: Timeout = 60.0
    max_retries: Annotated[int, Field(ge=0, le=100)] = 5
    max_passes: Annotated[int, Field(ge=1, le=100)] = 5
    max_rows_per_run: Annotated[int, Field(ge=1)] | None = None
    """Stop a command cleanly after this many rows (keys handed to batches); --run continues."""
    lease_timeout: Annotated[Duration, Field(ge=1, le=3600)] = 30.0
    """Seconds without a heartbeat after which a process's claimed pages are taken over by
    another process of the run (processes beat every third of it, at most every 5 s)."""
    target_batch_seconds: Timeout | None = None
    """Adaptive size: move the batch size toward batches that take this long (None: fixed)."""
    min_size: Annotated[int, Field(gt=0, le=1_000_000)] | None = None
    max_size: Annotated[int, Field(gt=0, le=1_000_000)] | None = None
    on_error: Literal["split", "stop"] = "split"
    """A batch failing on its data (SQLSTATE classes 22, 23 and `quarantine_sqlstates`): halve it
    down to single keys and quarantine the keys that fail alone (split), or stop the phase."""
    max_failure_rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.01
    min_failure_sample: Annotated[int, Field(ge=0)] = 1000
    """Rows attempted before `max_failure_rate` can stop the phase."""
    quarantine_sqlstates: list[Annotated[str, Field(pattern=r"^[0-9A-Z]{2}([0-9A-Z]{3})?$")]] = (
        Field(default_factory=list)
    )
    """More SQLSTATEs (or two-character classes) that mean a row's data is bad, e.g. P0001."""

    @property
    def smallest(self) -> int:
        """The least adaptive size: `min_size`, else a tenth of `size`."""
        return self.min_size or min(self.size, max(1, self.size // 10))

    @property
    def largest(self) -> int:
        """The greatest adaptive size (never exceeded): `max_size`, else ten times `size`."""
        if self.max_size is not None:
            return self.max_size
        return self.size if self.target_batch_seconds is None else min(self.size * 10, 1_000_000)

    @model_validator(mode="after")
    def _sizes(self) -> Batching:
        if (self.min_size or self.max_size) and self.target_batch_seconds is None:
            raise ValueError(
                "batching.min_size/max_size bound the adaptive batch size: set "
                "batching.target_batch_seconds (e.g. 1.0) too, or remove them"
            )
        if not self.smallest <= self.size <= self.largest:
            raise ValueError(
                f"batching.size = {self.size} is the starting size and must lie within "
                f"min_size..max_size ({self.smallest}..{self.largest})"
            )
        return self

    @model_validator(mode="after")
    def _pace_can_finish(self) -> Batching:
        """A pace slower than one batch a day is a typo, not a plan: it would wait for ever."""
        day = 86400.0
        if self.batches_per_minute is not None and 60 / self.batches_per_minute > day:
            raise ValueError(
                f"batching.batches_per_minute = {self.batches_per_minute:g} waits "
                f"{60 / self.batches_per_minute / day:,.3g} days between batches; the slowest pace "
                f"allowed is one batch a day ({1 / 1440:.6f})"
            )
        if self.rows_per_second is not None and self.size / self.rows_per_second > day:
            floor = self.size / day
            raise ValueError(
                f"batching.rows_per_second = {self.rows_per_second:g} waits "
                f"{self.size / self.rows_per_second / day:,.3g} days for one batch of {self.size}; "
                f"the slowest pace allowed is one batch a day (rows_per_second >= {floor:.6g} "
                "for this batch size)"
            )
        return self


class Check(_Model):
    name: Annotated[str, Field(pattern=_NAME)]
    sql: NonEmpty
    description: str = ""
    pass_if: str | None = None
    baseline: Finite | None = None
    baseline_sql: str | None = None
    max_drop: Annotated[float, Field(ge=0, le=1)] | None = None
    tolerance: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    failure_limit: Annotated[int, Field(ge=0)] = 0
    inconclusive_limit: Annotated[int, Field(ge=0)] = 0
    consecutive_error_limit: Annotated[int, Field(ge=0)] = 3

    @field_validator("sql", "baseline_sql")
    @classmethod
    def _reads_only(cls, sql: str | None) -> str | None:
        return None if sql is None else refuse_side_effects(sql, "the check")

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
    statement_timeout: Timeout = 30.0
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
    target_batch_seconds: Timeout = 1.0
    max_long_transaction: Duration = 300.0


def _off(value: object) -> object:
    return None if value is False else value


Threshold = Annotated[
    Annotated[float, Field(ge=0, allow_inf_nan=False)] | None, BeforeValidator(_off)
]


class Limit(_Model):
    """A built-in guard's thresholds: at `hold` the run waits, at `critical` it stops
    (resumably). `false` turns either off."""

    hold: Threshold = None
    critical: Threshold = None

    @model_validator(mode="after")
    def _ordered(self) -> Limit:
        if self.hold is not None and self.critical is not None and self.critical < self.hold:
            raise ValueError(
                f"critical ({self.critical:g}) is below hold ({self.hold:g}): the run would stop "
                "before it ever held"
            )
        return self


GIB = 1024.0**3

# signal → (hold, critical) when the plan says nothing: safe for prod without configuration
GUARD_DEFAULTS: dict[str, tuple[float | None, float | None]] = {
    "connections": (0.8, 0.95),  # share of max_connections in use by client sessions
    "replication_lag_seconds": (30.0, 300.0),  # on the most lagging replica
    "replication_lag_bytes": (1 * GIB, None),
    "longest_transaction_seconds": (600.0, None),  # another session's open transaction
    "lock_waiters": (5.0, None),  # sessions waiting on a lock, holding one on the target
    "wraparound_vacuum": (1.0, None),  # anti-wraparound autovacuums on the target
    "autovacuum": (None, None),  # any autovacuum on the target (off: updates start them)
    "wal_bytes_per_second": (None, None),  # off: what is too much depends on the server
    # other sessions in a transaction (pt-online-schema-change's Threads_running): no
    # threshold by default, as what is busy depends on the server; yield_to_busy paces by it
    "busy_sessions": (None, None),
}


class YieldToBusy(_Model):
    """While the application's sessions are busy, the apply leaves the server to them for a
    while after each batch (gh-ost's nice ratio, scaled by the load): with `n` other sessions
    in a transaction, the wait after a batch is `min(per_session * n, max_factor)` times the
    batch's time, so each worker works at most 1 / (1 + that factor) of the time. Defaults
    are for a small server (2 cores keep ≥ 80 % of their transactions per second beside an
    unthrottled apply, bench/live_load.py); on a large one, lower them. `per_session = 0`
    never waits."""

    per_session: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 2.0
    max_factor: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 8.0

    def factor(self, busy: float) -> float:
        return min(self.per_session * max(busy, 0.0), self.max_factor)


class CustomGuard(_Model):
    name: Annotated[str, Field(pattern=_NAME)]
    sql: NonEmpty
    pass_if: NonEmpty
    critical_if: str | None = None
    description: str = ""

    @field_validator("sql")
    @classmethod
    def _reads_only(cls, sql: str) -> str:
        return refuse_side_effects(sql, "the guard")

    @field_validator("pass_if", "critical_if")
    @classmethod
    def _condition(cls, text: str | None) -> str | None:
        if text is not None:
            parse_condition(text)
        return text


class Guards(_Model):
    """What a running apply watches before each batch (README: guards)."""

    enabled: bool = True
    interval: Duration = 5.0
    """How often a held or paused run looks again."""
    max_hold: Duration = 1800.0
    """A hold longer than this stops the phase (resumably)."""
    statement_timeout: Timeout = 2.0
    connections: Limit = Limit()
    replication_lag_seconds: Limit = Limit()
    replication_lag_bytes: Limit = Limit()
    longest_transaction_seconds: Limit = Limit()
    lock_waiters: Limit = Limit()
    wraparound_vacuum: Limit = Limit()
    autovacuum: Limit = Limit()
    wal_bytes_per_second: Limit = Limit()
    busy_sessions: Limit = Limit()
    yield_to_busy: YieldToBusy = YieldToBusy()
    custom: list[CustomGuard] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """A signal the plan leaves out, or half-specifies, keeps its default thresholds."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for signal, (hold, critical) in GUARD_DEFAULTS.items():
            given = merged.get(signal, {})
            if isinstance(given, dict):
                merged[signal] = {"hold": hold, "critical": critical, **given}
        return merged

    @model_validator(mode="after")
    def _unique(self) -> Guards:
        names = [g.name for g in self.custom]
        dupes = sorted(
            {n for n in names if names.count(n) > 1} | (set(names) & set(GUARD_DEFAULTS))
        )
        if dupes:
            raise ValueError(
                f"guards.custom: names must be unique and not a built-in signal's, repeated: {dupes}"
            )
        return self

    def limit(self, signal: str) -> Limit:
        limit = getattr(self, signal)
        assert isinstance(limit, Limit)
        return limit


class Gates(_Model):
    approvers: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    allow_self_approval: bool = False
    identity: Literal["declared", "database"] = "declared"
    """`declared`: `--as NAME` names the approver. `database`: the approver is the database
    login that recorded the decision (BACKFILL_APPROVER_DSN), and the runner's login must be
    unable to write decisions (SECURITY.md)."""

    @model_validator(mode="after")
    def _named_approvers(self) -> Gates:
        if self.identity == "database" and not self.approvers:
            raise ValueError(
                "gates.identity = 'database' needs gates.approvers: the database logins "
                "that may decide"
            )
        return self


class Variables(_Model):
    secret: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=list
    )
    """Names of `${VAR}`s whose values are secrets (besides `SECRET_*` and those in DSNs)."""


ParamType = Literal["date", "timestamptz", "int", "numeric", "bool", "text"]


class Param(_Model):
    """A typed parameter: `${name}` in the plan's SQL, its value from `--param name=value`, the
    environment or `default`; checked against its type before anything runs; recorded with the
    run, shown in every report and bound by every approval (never a secret)."""

    type: ParamType
    default: str | None = None
    description: str = ""


def _check_param(name: str, p: Param, value: str) -> str | None:
    """Why `value` is not a `p.type`, or None. Values go into SQL as text: only forms that
    cannot close a literal pass."""
    try:
        match p.type:
            case "date":
                date.fromisoformat(value)
            case "timestamptz":
                datetime.fromisoformat(value)
            case "int":
                int(value)
            case "numeric":
                if not Decimal(value).is_finite():
                    return "not a finite number"
            case "bool":
                if value.lower() not in ("true", "false"):
                    return "not true or false"
            case "text":
                if any(c in value for c in "'\\\x00;"):
                    return "a text param may not contain a quote, a backslash, a NUL or `;`"
    except (ValueError, ArithmeticError):
        return f"not a {p.type} (e.g. {_PARAM_EXAMPLES[p.type]})"
    return None


_PARAM_EXAMPLES = {
    "date": "2024-01-31",
    "timestamptz": "2024-01-31T00:00:00+00:00",
    "int": "42",
    "numeric": "0.25",
    "bool": "true",
    "text": "eu-west",
}


def param_values(path: Path, raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Each declared param's value (from `env`, else its default), checked against its type."""
    section = raw.get("params")
    if not isinstance(section, dict):
        return {}
    values: dict[str, str] = {}
    for name, spec in section.items():
        try:
            p = Param.model_validate(spec)
        except ValidationError as e:
            raise PlanError(f"{path}: params.{name}: {e.errors()[0]['msg']}") from None
        value = env.get(name, p.default)
        if value is None:
            raise PlanError(
                f"{path}: params.{name} ({p.type}) has no value",
                hint=f"pass --param {name}=… (e.g. {_PARAM_EXAMPLES[p.type]}) or give it a default",
            )
        if (why := _check_param(name, p, value)) is not None:
            raise PlanError(f"{path}: params.{name} = {value!r}: {why}")
        values[name] = value
    return values


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
    writes: list[Write] = Field(default_factory=list)
    params: dict[str, Param] = Field(default_factory=dict)
    batching: Batching = Field(default_factory=Batching)
    soak: Soak = Field(default_factory=Soak)
    health: Health = Field(default_factory=Health)
    guards: Guards = Field(default_factory=lambda: Guards.model_validate({}))
    gates: Gates = Field(default_factory=Gates)
    pipeline: Pipeline = Field(default_factory=Pipeline)
    variables: Variables = Field(default_factory=Variables)
    canary: Canary | None = None
    parent: Parent | None = None
    verify: list[Check] = Field(default_factory=list)
    """Read-only checks run once an apply stage ends, shown in its summary (`[[verify]]`)."""
    windows: Windows | None = None
    manifest: Manifest | None = None

    @model_validator(mode="after")
    def _distinct_tables(self) -> Plan:
        names = [self.target.table, *(w.table for w in self.writes)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"writes: {twice} declared twice (the target is declared by [target]); "
                "declare each table once with every operation it needs"
            )
        return self

    @model_validator(mode="after")
    def _verify_unique(self) -> Plan:
        names = [c.name for c in self.verify]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"verify: names must be unique, repeated: {dupes}")
        for c in self.verify:
            if c.pass_if is None or c.baseline_sql is not None:
                raise ValueError(
                    f"verify.{c.name}: a check after the apply is judged by `pass_if` alone "
                    "(e.g. `== 0`); `baseline_sql` belongs to soak checks"
                )
        return self

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
    def shaped(self) -> bool:
        """Anything but one UPDATE of the target's columns: other tables written, inserts or
        deletes, several statements. Such a batch records whole-row images per table."""
        return (
            bool(self.writes) or bool(self.apply.statements) or self.target.operations != ["update"]
        )

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
class Variable:
    """One `${VAR}` of a plan: its value now, whether it is secret, and where it is used."""

    name: str
    value: str
    secret: bool
    from_default: bool
    fields: tuple[str, ...]

    @property
    def in_dsn_only(self) -> bool:
        return all(f.startswith("environments.") and f.endswith(".dsn") for f in self.fields)

    @property
    def bound(self) -> bool:
        """Whether approvals bind its value. A DSN says where the plan runs, not what runs there:
        the run and its decisions live in that database's ledger, so another DSN finds no run."""
        return not self.in_dsn_only


@dataclass(frozen=True)
class LoadedPlan:
    """A validated plan with where it came from, its raw (uninterpolated) data and its digest.

    `digest` binds the plan's text *and* the values of its plain variables; secret variables are
    bound by keyed hashes (`secret_fingerprints`) that each ledger's key makes unguessable."""

    path: Path
    plan: Plan
    raw: dict[str, Any]
    digest: str
    secrets: frozenset[str]
    text_digest: str = ""
    variables: tuple[Variable, ...] = ()

    @property
    def plain_values(self) -> dict[str, str]:
        """The bound non-secret variables and their values: shown in reports, bound by approvals."""
        return {v.name: v.value for v in self.variables if v.bound and not v.secret}

    def secret_fingerprints(self, key: bytes) -> dict[str, str]:
        """HMAC-SHA256 of each bound secret variable's value under a ledger's key: comparable,
        never reversible by whoever reads a report or a decision."""
        return {
            v.name: hmac.new(key, v.value.encode(), hashlib.sha256).hexdigest()
            for v in self.variables
            if v.bound and v.secret
        }


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_PLAN_BYTES = 1_000_000
_MAX_PROBLEMS = 20
_MAX_SHOWN = 120


@dataclass
class _Uses:
    """What interpolation found: each variable's value, whether it was a default, where used."""

    values: dict[str, tuple[str, bool]]
    fields: dict[str, list[str]]

    def add(self, name: str, value: str, from_default: bool, where: str) -> None:
        self.values[name] = (value, from_default)
        self.fields.setdefault(name, []).append(where)


def interpolate(
    value: str, env: Mapping[str, str], where: str, uses: _Uses | None = None, file: str = ""
) -> tuple[str, set[str]]:
    """Replace `${VAR}` and `${VAR:-default}`; returns the text and the values that came from vars."""
    used: set[str] = set()

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            used.add(env[name])
            if uses is not None:
                uses.add(name, env[name], False, where)
            return env[name]
        if default is not None:
            if uses is not None:
                uses.add(name, default, True, where)
            return default
        raise PlanError(
            f"{file}{where}: environment variable ${{{name}}} is not set",
            hint=f"export {name}=… or write ${{{name}:-default}} in the plan",
        )

    return _VAR.sub(sub, value), used


def _interpolate_tree(
    node: Any, env: Mapping[str, str], path: str, uses: _Uses, file: str = ""
) -> Any:
    if isinstance(node, str):
        return interpolate(node, env, path, uses, file)[0]
    if isinstance(node, dict):
        return {
            k: _interpolate_tree(v, env, f"{path}.{k}" if path else k, uses, file)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_interpolate_tree(v, env, f"{path}[{i}]", uses, file) for i, v in enumerate(node)]
    return node


def canonical_digest(raw: Mapping[str, Any]) -> str:
    """sha256 of the plan's canonical JSON form: key order and file format do not matter."""
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _shown(value: object) -> str:
    text = redact.redact_text(repr(value))
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + f"… ({len(text):,} characters)"


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: the plan is not valid ({err.error_count()} problem(s))"]
    for e in err.errors()[:_MAX_PROBLEMS]:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = redact.redact_text(e["msg"].removeprefix("Value error, "))
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; see plans/README.md for the fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        shown = (
            ""
            if e["type"] in ("missing",) or isinstance(got, dict | list)
            else f" (got {_shown(got)})"
        )
        lines.append(f"  - {loc[:_MAX_SHOWN]}: {msg}{shown}")
    if err.error_count() > _MAX_PROBLEMS:
        lines.append(f"  … and {err.error_count() - _MAX_PROBLEMS} more")
    return "\n".join(lines)


def read_raw(path: Path) -> dict[str, Any]:
    try:
        # read at most one byte past the limit: a device or a pipe reports no size
        with path.open("rb") as f:
            data = f.read(MAX_PLAN_BYTES + 1)
        if len(data) > MAX_PLAN_BYTES:
            raise PlanError(
                f"{path}: the plan file is larger than a plan may be (a plan may be at most "
                f"{MAX_PLAN_BYTES:,} bytes)",
                hint="check that this is the plan file; keep large data out of plans",
            )
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file", hint="check the path") from None
    except OSError as e:
        raise PlanError(f"{path}: cannot read the plan file: {e}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        raise PlanError(
            f"{path}: the file starts with a UTF-8 byte-order mark (BOM), which TOML and JSON "
            "do not allow",
            hint="save the file as UTF-8 without BOM",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(
            f"{path}: not UTF-8 text (byte {e.start}): {e.reason}", hint="save it as UTF-8"
        ) from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            data_ = json.loads(text)
            if not isinstance(data_, dict):
                raise PlanError(f"{path}: a JSON plan must be an object at the top level")
            return data_
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: TOML syntax error: {e}") from None
    except json.JSONDecodeError as e:
        raise PlanError(
            f"{path}: JSON syntax error at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    raise PlanError(f"{path}: a plan file must end in .toml or .json")


def _declared_secret(raw: Mapping[str, Any]) -> set[str]:
    section = raw.get("variables")
    names = section.get("secret") if isinstance(section, dict) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def validate_raw(
    path: Path, raw: dict[str, Any], env: Mapping[str, str] | None = None
) -> LoadedPlan:
    uses = _Uses({}, {})
    source = os.environ if env is None else env
    params = param_values(path, raw, source)
    data = _interpolate_tree(raw, {**source, **params}, "", uses, f"{path}: ")
    declared = _declared_secret(raw)
    variables = tuple(
        Variable(
            name,
            value,
            secret=name not in params
            and (
                name in declared
                or name.startswith("SECRET_")
                or any(f.startswith("environments.") for f in uses.fields[name])
            ),
            from_default=from_default,
            fields=tuple(uses.fields[name]),
        )
        for name, (value, from_default) in sorted(uses.values.items())
    )
    # a default is written in the plan for anyone to read: only values from outside are secret;
    # `embedded` names the runner's own server, not a credential (masking it hid the word
    # everywhere: "*** PostgreSQL under …")
    secrets = frozenset(
        v.value
        for v in variables
        if v.secret and v.value and not v.from_default and v.value != "embedded"
    )
    redact.register(secrets)  # before anything below can print a value
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        raise PlanError(_format_validation_error(path, e)) from None
    text = canonical_digest(raw)
    plain = {v.name: v.value for v in variables if v.bound and not v.secret}
    digest = canonical_digest({"plan": text, "variables": plain}) if plain else text
    return LoadedPlan(path, plan, raw, digest, secrets, text, variables)


def load_plan(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedPlan:
    """Read, interpolate and validate a plan; every problem is a PlanError naming file and field."""
    p = Path(path)
    return validate_raw(p, read_raw(p), env)
