"""What a finished phase recorded, as the rest of the rollout reads it.

Each phase stores its result document in `backfill.phases.result`; gates, approvals, the
pipeline and later phases read the fields below through `PhaseResult`, never by string key.
Fields a phase's own report alone reads stay in the document (`extra="allow"`).
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
    variables: dict[str, Any] = Field(default_factory=dict)
    secret_fingerprints: dict[str, Any] = Field(default_factory=dict)


class ApplyTotals(_Doc):
    rows_needing_at_start: int = 0
    batches: int = 0
    batches_this_command: int = 0
    changed: int = 0
    noop: int = 0
    retried_batches: int = 0
    remaining: int = 0
    passes: int = 0


class PhaseResult(_Doc):
    """The fields other modules read; every phase records the first five."""

    plan: PlanBinding = Field(default_factory=PlanBinding)
    env: str = ""
    dsn: str = ""
    operator: str = ""
    report_file: str = ""
    # apply stages (apply, canary, rest)
    rollback_file: str | None = None
    totals: ApplyTotals = Field(default_factory=ApplyTotals)
    # health: the mini plan it wrote, and the overrides of the gates before it
    mini_plan_digest: str | None = None
    overrides: list[dict[str, Any]] = Field(default_factory=list)
