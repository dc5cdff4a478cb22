"""Gates between phases: pure evaluation of criteria and recorded decisions (invariant 6)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from runner.errors import InvalidInput, NoGo
from runner.ledger import Decision
from runner.plan import Gates

Criteria = Literal["pass", "fail", "inconclusive"]
GateStatus = Literal["open", "waiting", "rejected", "no-go", "closed", "not-reached"]

# The gate after each phase, in pipeline order: (phase key in the ledger, gate name).
PIPELINE_GATES = ("apply", "soak", "health", "canary")


def gate_name(phase: str, env: str) -> str:
    return f"{phase}-{env}"


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class GateState:
    gate: str
    status: GateStatus
    reason: str
    criteria: str | None
    decision: Decision | None = None

    @property
    def is_open(self) -> bool:
        return self.status == "open"


def evaluate(
    gate: str,
    criteria: str | None,
    decisions: Sequence[Decision],
    plan_digest: str,
    report_digest: str | None,
) -> GateState:
    """The gate's state from the phase's criteria, its latest decision and what is current now."""
    if criteria is None:
        return GateState(gate, "not-reached", "the phase before this gate has not finished", None)
    mine = [d for d in decisions if d.gate == gate]
    if not mine:
        if criteria == "fail":
            return GateState(gate, "no-go", "the phase's criteria failed", criteria)
        return GateState(gate, "waiting", "waiting for a decision (approve or reject)", criteria)
    last = mine[-1]
    if last.decision == "reject":
        why = f"rejected by {last.actor}" + (f": {last.note}" if last.note else "")
        return GateState(gate, "rejected", why, criteria, last)
    if last.plan_digest != plan_digest:
        return GateState(
            gate,
            "closed",
            f"the plan changed after {last.actor} approved it (approved digest "
            f"{last.plan_digest[:12]}, now {plan_digest[:12]}): review and approve again",
            criteria,
            last,
        )
    if report_digest is not None and last.report_digest != report_digest:
        return GateState(
            gate,
            "closed",
            "the report changed after it was approved: review it and approve again",
            criteria,
            last,
        )
    if criteria == "fail" and not last.override:
        return GateState(
            gate, "no-go", "criteria failed and the approval has no override", criteria, last
        )
    return GateState(gate, "open", f"approved by {last.actor}", criteria, last)


def check_decision(
    *,
    gate: str,
    decision: Literal["approve", "reject"],
    actor: str,
    operator: str,
    policy: Gates,
    criteria: str | None,
    note: str,
    override: bool,
) -> None:
    """Refuse a decision the plan's gate policy does not allow; says what would be allowed."""
    if not actor.strip():
        raise InvalidInput("--as: name who decides (e.g. --as alice)")
    if criteria is None:
        raise InvalidInput(
            f"gate {gate}: the phase before it has not finished, so there is nothing to decide yet"
        )
    if policy.approvers and actor not in policy.approvers:
        raise InvalidInput(
            f"gate {gate}: {actor!r} is not an approver of this plan",
            hint=f"gates.approvers lists: {', '.join(policy.approvers)}",
        )
    if actor == operator and not policy.allow_self_approval:
        raise InvalidInput(
            f"gate {gate}: {actor!r} ran this phase and may not approve it",
            hint="ask another approver, or set gates.allow_self_approval = true in the plan",
        )
    if decision == "reject":
        return
    if criteria == "fail" and not override:
        raise NoGo(
            f"gate {gate}: the phase's criteria failed; approval alone cannot open it",
            hint="if you must go on anyway, approve with --override and --note giving the reason; "
            "the override is shown in every later report",
        )
    if override and not note.strip():
        raise InvalidInput(f"gate {gate}: --override needs a --note giving the reason")
    if criteria == "inconclusive" and not note.strip():
        raise InvalidInput(
            f"gate {gate}: the criteria are inconclusive; approving needs a --note saying why it is safe"
        )


def new_decision(
    gate: str,
    decision: str,
    actor: str,
    note: str,
    override: bool,
    plan_digest: str,
    report_digest: str,
    criteria: str,
) -> Decision:
    return Decision(
        gate=gate,
        decision=decision,
        actor=actor,
        note=note,
        override=override,
        plan_digest=plan_digest,
        report_digest=report_digest,
        criteria=criteria,
        decided_at=datetime.now(UTC),
    )
