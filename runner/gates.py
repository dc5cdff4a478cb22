"""Gates between phases: pure evaluation of criteria and recorded decisions (invariant 6)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from runner.errors import InvalidInput, NoGo
from runner.ledger import Decision
from runner.plan import Gates
from runner.rollout import GATED

Criteria = Literal["pass", "fail", "inconclusive"]
GateStatus = Literal[
    "open", "waiting", "rejected", "no-go", "closed", "not-reached", "rolled-back", "tampered"
]

PIPELINE_GATES = GATED  # the gate after each gated phase, in rollout order (runner.rollout)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class GateState:
    gate: str
    status: GateStatus
    reason: str
    criteria: str | None
    decision: Decision | None = None
    variables_changed: bool = False  # closed because a variable's value is not the approved one

    @property
    def is_open(self) -> bool:
        return self.status == "open"


def variable_changes(
    approved: Mapping[str, str],
    now: Mapping[str, str],
    approved_secrets: Mapping[str, str],
    now_secrets: Mapping[str, str],
) -> list[str]:
    """Each variable whose value differs from the one approved, in words (never a secret's value).
    Only names both sides use count: a variable the current plan does not use changes nothing."""
    changes = [
        f"variable {name} is {now[name]!r}, but {approved[name]!r} was approved"
        for name in sorted(set(approved) & set(now))
        if approved[name] != now[name]
    ]
    changes += [
        f"secret variable {name} has a different value than the one approved"
        for name in sorted(set(approved_secrets) & set(now_secrets))
        if approved_secrets[name] != now_secrets[name]
    ]
    return changes


def counts(d: Decision, policy: Gates | None, operator: str | None) -> bool:
    """Whether a recorded decision is one the plan's gate policy allows. A row `backfill approve`
    would have refused (an outsider, self-approval, another login's name) is not a decision."""
    if policy is None:
        return True
    if policy.approvers and d.actor not in policy.approvers:
        return False
    if operator is not None and d.actor == operator and not policy.allow_self_approval:
        return False
    return policy.identity != "database" or d.db_user == d.actor


def evaluate(
    gate: str,
    criteria: str | None,
    decisions: Sequence[Decision],
    plan_digest: str,
    report_digest: str | None,
    *,
    variables: Mapping[str, str] | None = None,
    secret_hashes: Mapping[str, str] | None = None,
    phase_seal: str | None = None,
    tampered: str | None = None,
    rolled_back: str | None = None,
    policy: Gates | None = None,
    operator: str | None = None,
) -> GateState:
    """The gate's state from the phase's criteria, its decisions and what is current now.

    A reject is final whatever came before or after it; an approval counts only while the plan,
    its variables, the report and the phase's sealed result are the ones it approved."""
    if tampered is not None:
        return GateState(gate, "tampered", tampered, criteria)
    if rolled_back is not None:
        return GateState(gate, "rolled-back", rolled_back, criteria)
    if criteria is None:
        return GateState(gate, "not-reached", "the phase before this gate has not finished", None)
    mine = [d for d in decisions if d.gate == gate and counts(d, policy, operator)]
    reject = next((d for d in mine if d.decision == "reject"), None)
    if reject is not None:
        why = f"rejected by {reject.actor}" + (f": {reject.note}" if reject.note else "")
        return GateState(
            gate, "rejected", why + " (a reject is final for this run)", criteria, reject
        )
    if not mine:
        if criteria == "fail":
            return GateState(gate, "no-go", "the phase's criteria failed", criteria)
        return GateState(gate, "waiting", "waiting for a decision (approve or reject)", criteria)
    last = mine[-1]
    changes = variable_changes(
        last.variables, variables or {}, last.secret_hashes, secret_hashes or {}
    )
    if changes:
        return GateState(
            gate,
            "closed",
            f"{'; '.join(changes)} (approved by {last.actor}): what would run is not what was "
            "approved; run with the approved values, or start a new run and have it reviewed",
            criteria,
            last,
            variables_changed=True,
        )
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
    if phase_seal is not None and last.phase_seal != phase_seal:
        return GateState(
            gate,
            "closed",
            f"the phase's recorded result is not the one {last.actor} approved",
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
    *,
    variables: Mapping[str, str] | None = None,
    secret_hashes: Mapping[str, str] | None = None,
    phase_seal: str = "",
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
        variables=dict(variables or {}),
        secret_hashes=dict(secret_hashes or {}),
        phase_seal=phase_seal,
    )
