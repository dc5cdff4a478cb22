"""The pure parts of the phases, without a database: soak verdicts, schema drift, batch-size
tuning, the resume point."""

from __future__ import annotations

from typing import Any

import pytest

from runner.engine.checks import judge, number, tally, verdict
from runner.phases.health import schema_drift, tune_batch_size
from runner.phases.windows import resume_point
from runner.plan import Check


def check(**over: Any) -> Check:
    return Check.model_validate({"name": "c", "sql": "SELECT 1", "pass_if": "== 0", **over})


# -- soak: one value judged, and the verdict over the samples so far ------------------------------


def test_a_value_is_judged_against_its_condition_and_its_baseline_together() -> None:
    c = check(pass_if=">= 0.5", baseline=100, max_drop=0.1)
    assert judge(c, 95, 100) == ("pass", ">= 0.5 and >= 90 (baseline 100 − 10%)")
    assert judge(c, 89, 100)[0] == "fail"  # within the condition, below the baseline's floor
    assert judge(check(pass_if="== 0"), 1, None) == ("fail", "== 0")
    within = check(baseline=10, tolerance=0.1, pass_if=None)
    assert [judge(within, v, 10)[0] for v in (9, 11, 8.9, 11.1)] == ["pass", "pass", "fail", "fail"]


@pytest.mark.parametrize(
    ("raw", "expected"), [(True, 1.0), (False, 0.0), (3, 3.0), (2.5, 2.5), (-0.0, -0.0)]
)
def test_a_check_value_is_one_number_or_boolean(raw: Any, expected: float) -> None:
    assert number(raw) == expected


@pytest.mark.parametrize("raw", ["3", [1], None, float("nan")])
def test_anything_else_is_an_error_of_the_check(raw: Any) -> None:
    with pytest.raises(ValueError, match=r"NaN|one number or boolean"):
        number(raw)


def _counts(**per_check: dict[str, int]) -> dict[str, dict[str, int]]:
    empty = {"pass": 0, "fail": 0, "no-data": 0, "error": 0}
    return {name: {**empty, **n} for name, n in per_check.items()}


def test_the_verdict_fails_at_once_past_a_limit_and_is_inconclusive_on_gaps() -> None:
    a, b = check(name="a", failure_limit=1), check(name="b", inconclusive_limit=1)
    calm = {"a": 0, "b": 0}
    assert verdict([a, b], _counts(a={"pass": 5}, b={"pass": 5}), calm)[0] == "pass"
    assert verdict([a, b], _counts(a={"fail": 1}, b={}), calm)[0] == "pass"  # within its limit
    failed = verdict([a, b], _counts(a={"fail": 2}, b={}), calm)
    assert failed == ("fail", "check a failed 2 time(s) (limit 1)")
    assert verdict([a, b], _counts(a={}, b={"no-data": 2}), calm)[0] == "inconclusive"
    assert verdict([a, b], _counts(a={"error": 1}, b={}), calm)[0] == "inconclusive"
    # errors in a row past the limit fail; the same errors spread out stay inconclusive
    assert verdict([a, b], _counts(a={"error": 4}, b={}), {"a": 4, "b": 0})[0] == "fail"
    assert verdict([a, b], _counts(a={"error": 4}, b={}), {"a": 1, "b": 0})[0] == "inconclusive"


def test_a_resumed_soak_counts_the_samples_already_recorded_and_the_current_error_streak() -> None:
    recorded = [
        {"check_name": "a", "outcome": o} for o in ("error", "pass", "error", "error", "fail")
    ] + [{"check_name": "a", "outcome": "error"}, {"check_name": "gone", "outcome": "fail"}]
    counts, streaks = tally([check(name="a")], recorded)  # type: ignore[arg-type]
    assert counts == {"a": {"pass": 1, "fail": 1, "no-data": 0, "error": 4}}
    assert streaks == {"a": 1}  # the fail ended the streak of two; one error since


# -- health: drift between the staging and prod tables, and the tuned batch size -----------------


def _shape(columns: dict[str, tuple[str, bool]], key: list[str], triggers: dict[str, bool]) -> Any:
    return {
        "columns": {n: {"type": t, "not_null": nn} for n, (t, nn) in columns.items()},
        "primary_key": key,
        "triggers": triggers,
    }


def test_drift_on_a_declared_column_or_the_key_blocks_and_other_drift_is_a_condition() -> None:
    staging = _shape(
        {"id": ("bigint", True), "val": ("text", False), "extra": ("int", False)},
        ["id"],
        {"audit": True},
    )
    prod = _shape(
        {"id": ("bigint", True), "val": ("varchar(10)", False), "other": ("int", False)},
        ["id", "val"],
        {"audit": False},
    )
    drift = {d["object"]: d for d in schema_drift(staging, prod, declared={"id", "val"})}
    assert drift["column val"]["what"] == "type differs"
    assert drift["column val"]["blocker"] is True
    assert drift["column extra"] == {
        "object": "column extra",
        "staging": "int",
        "prod": None,
        "what": "missing in prod",
        "blocker": False,
    }
    assert drift["column other"]["what"] == "missing in staging"
    assert drift["primary key"]["blocker"] is True
    assert drift["trigger audit"]["staging"] == "enabled"
    assert drift["trigger audit"]["prod"] == "disabled"
    assert not drift["trigger audit"]["blocker"]
    assert schema_drift(staging, staging, {"id", "val"}) == []


@pytest.mark.parametrize(
    ("plan_size", "ms_per_row", "target_s", "tuned"),
    [
        (1000, None, 1.0, 1000),  # nothing measured: the plan's size
        (1000, 0.5, 1.0, 1000),  # staging fits 2,000 in a second: never above the plan's
        (1000, 2.0, 1.0, 500),  # slower rows: smaller batches
        (1000, 1000.0, 1.0, 100),  # very slow rows: not below 100 (or the plan's, if smaller)
        (50, 1000.0, 1.0, 50),
    ],
)
def test_the_prod_batch_size_is_what_staging_says_commits_in_time(
    plan_size: int, ms_per_row: float | None, target_s: float, tuned: int
) -> None:
    assert tune_batch_size(plan_size, ms_per_row, target_s) == tuned


# -- apply: where a run continues ----------------------------------------------------------------


def _batch(no: int, status: str = "done") -> dict[str, Any]:
    return {"batch_no": no, "status": status, "last_key": [str(no * 10)]}


def test_a_run_continues_after_its_longest_run_of_committed_batches() -> None:
    assert resume_point([]) == (None, 1, 0)
    assert resume_point([_batch(1), _batch(2)]) == (["20"], 3, 0)
    # batch 3 was interrupted (no row), 4 committed: continue after 2; discovery no longer
    # returns 4's rows, so nothing is applied twice; 3 is counted as interrupted
    assert resume_point([_batch(1), _batch(2), _batch(4)]) == (["20"], 5, 1)
    # a failed batch is not committed: its rows are found again from the cursor before it (it
    # was recorded as failed, not interrupted)
    assert resume_point([_batch(1), _batch(2, "failed"), _batch(3)]) == (["10"], 4, 0)


def test_split_and_quarantined_batches_count_as_settled_for_the_resume_point() -> None:
    # batch 1 was split into 2 and 3; 3 was split again into 4 (done) and 5 (quarantined)
    settled = [
        _batch(1, "split"),
        _batch(2),
        _batch(3, "split"),
        _batch(4),
        _batch(5, "quarantined"),
    ]
    assert resume_point(settled) == (["50"], 6, 0)
    # killed mid-split: batch 1's row is not written yet, so its keys are rediscovered (its
    # committed parts no longer need the backfill); its and 3's missing rows count as interrupted
    assert resume_point([_batch(2), _batch(4), _batch(5, "quarantined")]) == (None, 6, 2)
    # a split the failure budget stopped is not settled either
    assert resume_point([_batch(1, "stopped"), _batch(2)]) == (None, 3, 0)


def test_a_window_label_leaves_out_midnight_only_when_both_bounds_are_at_it() -> None:
    from runner.engine.windows import _label

    assert _label("2024-01-01 00:00:00+00", "2024-02-01 00:00:00+00") == "[2024-01-01, 2024-02-01)"
    assert _label("2024-01-01 00:00:00", "2024-01-01 06:00:00") == (
        "[2024-01-01 00:00:00, 2024-01-01 06:00:00)"
    )
    assert _label("2024-01-01", "2024-02-01") == "[2024-01-01, 2024-02-01)"
    assert _label("100", "200") == "[100, 200)"


def test_a_quarantine_retry_batch_neither_moves_the_cursor_nor_breaks_the_run_of_batches() -> None:
    retry = {"batch_no": 3, "status": "done", "last_key": ["7"], "stage": "retry"}
    rows = [_batch(1), _batch(2), retry, _batch(4)]
    assert resume_point(rows) == (["40"], 5, 0)
    assert resume_point([_batch(1), retry]) == (["10"], 4, 1)  # 2 was interrupted
    assert resume_point([retry, _batch(4)], first=3) == (["40"], 5, 0)  # a window's rows
