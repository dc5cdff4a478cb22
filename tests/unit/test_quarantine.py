"""The pure parts of #12: which errors are about the data, and the failure budget."""

from __future__ import annotations

import pytest

from runner.engine.executor import BatchOutcome
from runner.engine.quarantine import Budget, Policy, is_data_error


@pytest.mark.parametrize(
    ("sqlstate", "listed", "expected"),
    [
        ("22P02", (), True),  # invalid text representation ('abc'::int)
        ("22012", (), True),  # division by zero
        ("23503", (), True),  # foreign key violation
        ("23505", (), True),  # unique violation
        ("42501", (), False),  # insufficient privilege: not the data
        ("42P01", (), False),  # undefined table
        ("42601", (), False),  # syntax error
        ("40001", (), False),  # serialization failure: transient, retried before
        ("P0001", (), False),  # RAISE EXCEPTION, unless the plan lists it
        ("P0001", ("P0001",), True),
        ("P0002", ("P0",), True),  # a listed class
        (None, ("P0001",), False),  # not a database error (a scope violation)
    ],
)
def test_data_errors_are_classes_22_and_23_and_what_the_plan_lists(
    sqlstate: str | None, listed: tuple[str, ...], expected: bool
) -> None:
    assert is_data_error(sqlstate, listed) is expected


def _failed(sqlstate: str | None, category: str = "sql_error") -> BatchOutcome:
    return BatchOutcome(
        1, "apply", "failed", ["1"], ["9"], error_category=category, sqlstate=sqlstate
    )


def test_only_a_data_error_of_a_splitting_plan_is_split() -> None:
    assert Policy(split=True).splits(_failed("23505"))
    assert not Policy(split=False).splits(_failed("23505"))  # on_error = "stop"
    assert not Policy(split=True).splits(_failed("42501"))
    assert not Policy(split=True).splits(_failed(None, "scope_violation"))


def test_the_budget_judges_the_rate_only_after_the_minimum_sample() -> None:
    budget = Budget(0.01, 1000, attempted=500, quarantined=50)
    assert not budget.exceeded()  # 10 %, but only 500 rows attempted
    budget.attempted = 1000
    assert budget.exceeded()
    assert not Budget(0.01, 1000, attempted=1000, quarantined=10).exceeded()  # 1 % is within
    assert not Budget(None, 0, attempted=10, quarantined=10).exceeded()  # a retry: no budget


def test_the_budget_error_names_the_budget_the_rate_and_the_most_common_error() -> None:
    budget = Budget(0.01, 100, attempted=1000, quarantined=30)
    budget.by_sqlstate.update({"22P02": 25, "23503": 5})
    budget.example.update({"22P02": 'invalid input syntax for type integer: "abc"'})
    text = str(budget.error("backfill apply p.toml --env staging --run R"))
    assert "30 of 1,000 row(s) attempted were quarantined (3.00%)" in text
    assert "batching.max_failure_rate = 1.00%" in text
    assert "most common error: SQLSTATE 22P02 (25 key(s)): invalid input syntax" in text
    assert "--run R" in text
