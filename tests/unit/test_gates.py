"""Gates bind to what was reviewed (invariant 6): pure evaluation, no database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from runner.errors import InvalidInput, NoGo
from runner.gates import check_decision, evaluate
from runner.ledger import Decision
from runner.plan import Gates

PLAN, REPORT = "p" * 64, "r" * 64


def decision(
    kind: str = "approve", plan: str = PLAN, report: str = REPORT, override: bool = False
) -> Decision:
    return Decision(
        "apply-staging", kind, "alice", "", override, plan, report, "pass", datetime.now(UTC)
    )


def test_gate_waits_without_a_decision_and_opens_on_approval() -> None:
    assert evaluate("apply-staging", "pass", [], PLAN, REPORT).status == "waiting"
    assert evaluate("apply-staging", "pass", [decision()], PLAN, REPORT).is_open


def test_gate_is_not_reached_before_its_phase_finished() -> None:
    assert evaluate("apply-staging", None, [decision()], PLAN, REPORT).status == "not-reached"


def test_changed_plan_closes_an_approved_gate() -> None:
    state = evaluate("apply-staging", "pass", [decision()], "q" * 64, REPORT)
    assert state.status == "closed"
    assert "plan changed" in state.reason


def test_changed_report_closes_an_approved_gate() -> None:
    state = evaluate("apply-staging", "pass", [decision()], PLAN, "s" * 64)
    assert state.status == "closed"
    assert "report changed" in state.reason


def test_a_reject_is_final_whatever_comes_before_or_after_it() -> None:
    for order in ([decision(), decision("reject")], [decision("reject"), decision()]):
        state = evaluate("apply-staging", "pass", order, PLAN, REPORT)
        assert state.status == "rejected"
        assert "final" in state.reason


def test_a_changed_variable_closes_the_gate_naming_it_but_not_a_secret_value() -> None:
    approved = Decision(
        "apply-staging",
        "approve",
        "alice",
        "",
        False,
        PLAN,
        REPORT,
        "pass",
        datetime.now(UTC),
        variables={"TAG": "v2"},
        secret_hashes={"SECRET_TOKEN": "a" * 64},
    )
    same = evaluate(
        "apply-staging",
        "pass",
        [approved],
        PLAN,
        REPORT,
        variables={"TAG": "v2"},
        secret_hashes={"SECRET_TOKEN": "a" * 64},
    )
    assert same.is_open
    tag = evaluate("apply-staging", "pass", [approved], PLAN, REPORT, variables={"TAG": "EVIL"})
    assert tag.status == "closed"
    assert "variable TAG is 'EVIL', but 'v2' was approved" in tag.reason
    secret = evaluate(
        "apply-staging",
        "pass",
        [approved],
        PLAN,
        REPORT,
        variables={"TAG": "v2"},
        secret_hashes={"SECRET_TOKEN": "b" * 64},
    )
    assert secret.status == "closed"
    assert "secret variable SECRET_TOKEN has a different value" in secret.reason
    assert "b" * 64 not in secret.reason


def test_failed_criteria_need_an_override() -> None:
    assert evaluate("apply-staging", "fail", [], PLAN, REPORT).status == "no-go"
    assert evaluate("apply-staging", "fail", [decision()], PLAN, REPORT).status == "no-go"
    assert evaluate("apply-staging", "fail", [decision(override=True)], PLAN, REPORT).is_open


def _check(**kw: object) -> None:
    args: dict[str, object] = {
        "gate": "apply-staging",
        "decision": "approve",
        "actor": "alice",
        "operator": "bob",
        "policy": Gates(approvers=["alice", "bob"]),
        "criteria": "pass",
        "note": "",
        "override": False,
    }
    args.update(kw)
    check_decision(**args)  # type: ignore[arg-type]


def test_decision_policy() -> None:
    _check()
    with pytest.raises(InvalidInput, match="not an approver"):
        _check(actor="mallory")
    with pytest.raises(InvalidInput, match="may not approve it"):
        _check(actor="bob")
    _check(actor="bob", policy=Gates(approvers=["bob"], allow_self_approval=True))
    with pytest.raises(InvalidInput, match="needs a --note"):
        _check(criteria="inconclusive")
    _check(criteria="inconclusive", note="reviewed the no-data samples")
    with pytest.raises(NoGo, match="approval alone cannot open it"):
        _check(criteria="fail")
    with pytest.raises(InvalidInput, match="--override needs a --note"):
        _check(criteria="fail", override=True)
    _check(criteria="fail", override=True, note="known flaky check, see INC-42")
    _check(decision="reject", criteria="fail")


def test_the_rollout_table_is_the_one_source_of_phases_gates_and_reports() -> None:
    from runner import rollout
    from runner.commands.decide import GATE_PHASES
    from runner.commands.pipeline import RUNNERS
    from runner.plan import Pipeline

    assert [p.name for p in rollout.ROLLOUT] == ["apply", "soak", "health", "canary", "rest"]
    assert all(p.runs in RUNNERS for p in rollout.ROLLOUT)
    assert list(GATE_PHASES) == list(rollout.GATED) == ["apply", "soak", "health", "canary"]
    assert len({p.report for p in rollout.ROLLOUT}) == len(rollout.ROLLOUT)
    grouped = rollout.by_environment(Pipeline(staging="stg", prod="prd"))
    assert [(env, [p.name for p in specs]) for env, specs in grouped] == [
        ("stg", ["apply", "soak"]),
        ("prd", ["health", "canary", "rest"]),
    ]


def test_a_phase_result_is_read_through_its_model_and_keeps_what_only_its_report_reads() -> None:
    from runner.results import PhaseResult

    doc = PhaseResult.model_validate(
        {
            "plan": {"name": "p", "digest": "d" * 64, "path": "p.toml", "variables": {"TAG": "v2"}},
            "operator": "alice",
            "report_file": "backfill_summary.md",
            "rollback_file": "rollback_2026-12-01.sql",
            "totals": {"changed": 80, "noop": 20, "batches": 1},
            "timing": {"elapsed_seconds": 1.5},
        }
    )
    assert doc.plan.variables == {"TAG": "v2"}
    assert doc.totals.changed == 80
    assert doc.totals.remaining == 0
    assert doc.mini_plan_digest is None
    assert doc.model_extra == {"timing": {"elapsed_seconds": 1.5}}


def test_health_findings_block_on_declared_drift_and_condition_on_a_busy_database() -> None:
    from runner.phases.health import findings
    from runner.plan import Health

    drift = [
        {
            "object": "column v",
            "what": "type differs",
            "staging": "text",
            "prod": "int",
            "blocker": True,
        },
        {
            "object": "column x",
            "what": "missing in prod",
            "staging": "int",
            "prod": None,
            "blocker": False,
        },
    ]
    capacity = {
        "db.connection_use": 0.95,
        "db.longest_transaction_s": 7200.0,
        "db.lock_waiters": 2.0,
        "db.replication_lag_s": 45.0,
    }
    blockers, conditions = findings(drift, capacity, Health())
    assert blockers == ["schema drift: column v type differs (staging text, prod int)"]
    assert conditions[0] == "schema drift: column x missing in prod"
    assert any("connections at 95%" in c for c in conditions)
    assert any("open 7200 s" in c for c in conditions)
    assert any("2 session(s) are waiting" in c for c in conditions)
    assert any("replication lag is 45 s" in c for c in conditions)
    quiet = dict.fromkeys(capacity, 0.0)
    assert findings([], quiet, Health()) == ([], [])


def test_health_recommends_a_canary_of_at_least_one_batch_and_an_estimate() -> None:
    from pathlib import Path

    from runner.phases.health import recommendation
    from runner.plan import validate_raw
    from tests.conftest import plan_dict

    plan = validate_raw(
        Path("p.json"), plan_dict(), {"STAGING_DSN": "embedded", "PROD_DSN": "embedded"}
    ).plan
    advice = recommendation(plan, 1000, ms_per_row=0.01)
    assert advice["canary_batches"] >= 1
    assert advice["batches"] * advice["batch_size"] >= 1000
    assert advice["estimated_seconds"] >= 0
    assert recommendation(plan, 0, None)["batches"] == 0
