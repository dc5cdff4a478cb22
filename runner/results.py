"""What a finished phase recorded, as the rest of the rollout reads it.

Each phase writes one of the documents below to `backfill.phases.result` (`ledger.save_phase`
takes the model) and everything downstream reads it back typed (`ledger.PhaseRow.doc_as`):
gates, approvals, the pipeline, later phases and the reports, never a dict by string key.

Documents are tolerant readers (`extra="allow"`): a ledger written by an older backfill still
loads. Writers are checked by mypy's pydantic plugin (`init_forbid_extra`): a misspelled field
does not type-check.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class PlanBinding(_Doc):
    """The plan a phase ran: what an approval of its gate binds (with the report's digest)."""

    name: str = ""
    digest: str = ""
    path: str = ""
    description: str = ""
    owner: str = ""
    variables: dict[str, Any] = Field(default_factory=dict)
    secret_variables: list[str] = Field(default_factory=list)
    secret_fingerprints: dict[str, Any] = Field(default_factory=dict)


class Override(_Doc):
    """An approval that overrode failing criteria: every later report shows it."""

    gate: str
    actor: str
    note: str
    at: str


class ApplyTotals(_Doc):
    rows_needing_at_start: int = 0
    batches: int = 0
    batches_this_command: int = 0
    changed: int = 0
    noop: int = 0
    retried_batches: int = 0
    remaining: int = 0
    passes: int = 0
    keys: int = 0  # keys handed to batches by the command (what a row cap counts)


class PhaseResult(_Doc):
    """The fields every phase records, and those other modules read whatever the phase."""

    plan: PlanBinding = Field(default_factory=PlanBinding)
    env: str = ""
    dsn: str = ""
    operator: str = ""
    report_file: str = ""
    cmd: str = ""
    # apply stages (apply, canary, rest)
    rollback_file: str | None = None
    totals: ApplyTotals = Field(default_factory=ApplyTotals)
    # health: the mini plan it wrote, and the overrides of the gates before it
    mini_plan_digest: str | None = None
    overrides: list[Override] = Field(default_factory=list)


class TargetDoc(_Doc):
    table: str
    key: list[str]
    columns: list[str]


class BatchMode(_Doc):
    mode: str | None = None  # one-statement | capture
    reason: str | None = None


class ApplyTiming(_Doc):
    started_at: str
    elapsed_seconds: float
    counting_seconds: float
    rows_per_second: float | None = None
    batches_per_minute: float | None = None


class QuarantineTotals(_Doc):
    """Keys quarantined in the run so far (engine.quarantine), against its failure budget."""

    quarantined: int = 0
    attempted: int = 0
    rate: float = 0.0
    max_rate: float | None = None
    over_budget: bool = False


class VerifyResult(_Doc):
    """One `[[verify]]` check, run once the apply stage ended."""

    name: str
    description: str = ""
    sql: str
    value: float | None = None
    threshold: str = ""
    verdict: str  # pass | fail | no-data | error
    detail: str = ""


class WindowResult(_Doc):
    """One window of a windowed run (`[windows]`), as the ledger has it when the stage ends.
    `matches`: discovery's count when the window started equals the keys its batches did plus
    the keys it quarantined (None until the window is done)."""

    no: int
    label: str
    status: str  # pending | running | done
    discovered: int | None = None
    keys: int | None = None
    changed: int | None = None
    noop: int | None = None
    quarantined: int | None = None
    matches: bool | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None  # from its start to its end (done windows)


class ApplyDoc(PhaseResult):
    """An apply stage (staging apply, prod canary, prod rest)."""

    target: TargetDoc
    settings: dict[str, Any]
    batch_mode: BatchMode
    canary_batches: int | None = None
    timing: ApplyTiming
    warnings: list[str] = Field(default_factory=list)
    next_command: str = ""
    quarantine: QuarantineTotals = Field(default_factory=QuarantineTotals)
    verify: list[VerifyResult] = Field(default_factory=list)
    windows: list[WindowResult] = Field(default_factory=list)
    windows_setup: dict[str, Any] | None = None  # the plan's [windows], resolved


class SoakDoc(PhaseResult):
    """The soak: written while it samples (so a re-run continues its window) and when it ends."""

    window_start: str
    baselines: dict[str, float | None] = Field(default_factory=dict)
    duration_seconds: float
    interval_seconds: float
    target: str = ""
    observed_seconds: float = 0.0
    verdict: str = "inconclusive"  # pass | fail | inconclusive
    reason: str = ""
    samples: int = 0
    counts: dict[str, dict[str, int]] = Field(default_factory=dict)


class HealthTable(_Doc):
    name: str
    bytes: int | None = None
    rows_estimate: int | None = None


class HealthDoc(PhaseResult):
    """Prod health: the verdict, the facts behind it, and the mini plan it wrote."""

    staging_env: str
    verdict: str  # go | go-with-conditions | no-go
    blockers: list[str]
    conditions: list[str]
    rows_needing: int
    key_range: list[list[str] | None]
    table: HealthTable
    capacity: dict[str, float | None]
    drift: list[dict[str, Any]]
    staging: dict[str, Any]
    recommendation: dict[str, Any]
    mini_plan_file: str
    mini_plan: dict[str, Any]
    windows: list[dict[str, Any]] = Field(default_factory=list)  # a windowed plan's, counted
    impact: dict[str, Any] = Field(default_factory=dict)  # bytes and time span (engine.impact)
