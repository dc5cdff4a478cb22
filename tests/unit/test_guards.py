"""Guard verdicts (engine/guards.py) and the [guards] defaults, without a database."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runner.engine.guards import Yielding, judge, judge_custom, verdict
from runner.plan import CustomGuard, Guards, Limit


def test_without_configuration_the_defaults_are_safe_for_prod() -> None:
    g = Guards.model_validate({})
    assert (g.connections.hold, g.connections.critical) == (0.8, 0.95)
    assert g.replication_lag_seconds.hold == 30.0
    assert g.longest_transaction_seconds.hold is not None
    assert g.max_hold > 0
    assert g.enabled


def test_a_half_specified_signal_keeps_its_other_default_and_false_turns_one_off() -> None:
    g = Guards.model_validate({"connections": {"hold": 0.5}, "lock_waiters": {"hold": False}})
    assert (g.connections.hold, g.connections.critical) == (0.5, 0.95)
    assert g.lock_waiters.hold is None


def test_a_signal_over_hold_holds_and_at_critical_stops_naming_value_and_threshold() -> None:
    limit = Limit(hold=0.8, critical=0.95)
    assert judge("connections", 0.5, limit).state == "normal"
    held = judge("connections", 0.85, limit)
    assert held.state == "hold"
    assert held.reason == "connections in use 85% > 80%"
    stopped = judge("connections", 0.96, limit)
    assert stopped.state == "stop"
    assert "96%" in stopped.reason
    assert "critical" in stopped.reason
    lag = judge("replication_lag_seconds", 45.0, Limit(hold=30.0))
    assert lag.reason == "replication lag 45 s > 30 s"
    assert judge("replication_lag_seconds", None, Limit(hold=30.0)).state == "normal"


def test_a_custom_guard_holds_when_it_fails_and_stops_at_its_critical_condition() -> None:
    guard = CustomGuard(name="queue", sql="SELECT 1", pass_if="< 10", critical_if=">= 100")
    assert judge_custom(guard, 3).state == "normal"
    assert judge_custom(guard, 12).state == "hold"
    assert judge_custom(guard, 100).state == "stop"
    assert judge_custom(guard, None).state == "hold"  # no value is never a pass


def test_the_verdict_is_the_worst_reading() -> None:
    limit = Limit(hold=0.8, critical=0.95)
    readings = [judge("connections", 0.85, limit), judge("connections", 0.1, limit)]
    v = verdict(readings)
    assert v.state == "hold"
    assert v.worst is readings[0]
    assert verdict([judge("connections", 0.1, limit)]).worst is None
    assert verdict([*readings, judge("connections", 0.99, limit)]).state == "stop"


def test_the_yield_to_busy_sessions_is_on_by_default_and_refuses_a_negative_factor() -> None:
    g = Guards.model_validate({})
    assert (g.yield_to_busy.per_session, g.yield_to_busy.max_factor) == (2.0, 8.0)
    assert (g.busy_sessions.hold, g.busy_sessions.critical) == (None, None)
    with pytest.raises(ValidationError, match="per_session"):
        Guards.model_validate({"yield_to_busy": {"per_session": -1}})
    off = Guards.model_validate({"yield_to_busy": {"per_session": 0}})
    assert off.yield_to_busy.factor(40) == 0


def test_the_wait_after_a_batch_is_its_time_times_the_busy_sessions_capped() -> None:
    y = Yielding(per_session=2.0, max_factor=8.0, workers=1)
    y.batch(0.1)
    y.started(100.0)
    assert y.due(100.1) == 0, "nothing busy: no wait"
    y.seen(3)
    assert y.factor == 6.0
    # the batch started at 100.0 took 0.1 s: the next starts 6 batch times after it ended
    assert y.due(100.1) == pytest.approx(0.6)
    assert y.due(100.8) == 0
    y.seen(None)  # a reading that failed changes nothing
    assert y.factor == 6.0
    y.seen(100)  # one snapshot of many sessions moves the smoothed count part of the way
    assert 3 < y.busy < 100  # type: ignore[operator]
    assert y.factor == 8.0, "capped at max_factor"
    two = Yielding(per_session=2.0, max_factor=8.0, workers=2)
    two.batch(0.1)
    two.seen(3)
    two.started(100.0)
    # two workers: batches start at most every 0.1 * 7 / 2 s, each worker works 1/7 of the time
    assert two.due(100.0) == pytest.approx(0.35)
    off = Yielding(per_session=0.0, max_factor=8.0, workers=1)
    off.batch(0.1)
    off.seen(50)
    off.started(100.0)
    assert off.due(100.0) == 0


def test_the_wait_ends_once_the_sessions_are_no_longer_busy() -> None:
    y = Yielding(per_session=2.0, max_factor=8.0, workers=1)
    y.batch(0.1)
    y.seen(3)
    assert y.factor == 6.0
    for _ in range(10):  # the sessions closed: the smoothed count falls under half a session
        y.seen(0)
    assert y.factor == 0
    y.started(100.0)
    assert y.due(100.0) == 0
