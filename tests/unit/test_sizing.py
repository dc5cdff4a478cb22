"""The adaptive batch size (engine/sizing.py): pure, with synthetic batch timings."""

from __future__ import annotations

from runner.engine.sizing import BatchSizer


def _run(sizer: BatchSizer, cost_of_row: list[float]) -> list[int]:
    """Apply batches over rows whose costs are given (seconds each), in order; the sizes used."""
    sizes: list[int] = []
    i = 0
    while i < len(cost_of_row):
        n = min(sizer.size, len(cost_of_row) - i)
        sizes.append(n)
        sizer.observe(n, sum(cost_of_row[i : i + n]))
        i += n
    return sizes


def test_size_converges_near_the_target_from_below() -> None:
    sizer = BatchSizer(size=10, min_size=1, max_size=100_000, target_seconds=1.0)
    sizes = _run(sizer, [0.001] * 100_000)  # 1 ms a row: 1,000 rows make a 1 s batch
    assert sizes[0] == 10
    assert 900 <= sizes[-2] <= 1100
    assert 0.9 <= sizer.size * 0.001 <= 1.1


def test_size_converges_near_the_target_from_above_quickly() -> None:
    sizer = BatchSizer(size=50_000, min_size=1, max_size=100_000, target_seconds=1.0)
    _run(sizer, [0.001] * 200_000)
    assert 900 <= sizer.size <= 1100


def test_rows_that_get_slower_shrink_the_batches() -> None:
    sizer = BatchSizer(size=100, min_size=10, max_size=5000, target_seconds=0.5)
    costs = [0.0001 * (1 + i / 2000) for i in range(40_000)]  # 20x slower by the end
    sizes = _run(sizer, costs)
    peak = max(sizes)
    assert sizes[-2] < peak / 5
    end_cost = costs[-1]
    assert 0.5 * 0.8 <= sizes[-2] * end_cost <= 0.5 * 1.25


def test_size_never_leaves_its_bounds() -> None:
    sizer = BatchSizer(size=100, min_size=50, max_size=200, target_seconds=1.0)
    for seconds in (0.0, 1e-6, 1000.0, 0.0, 1000.0):
        size = sizer.observe(sizer.size, seconds)
        assert 50 <= size <= 200
    assert BatchSizer(size=500, min_size=1, max_size=200, target_seconds=1.0).size == 200


def test_one_slow_outlier_does_not_collapse_the_size() -> None:
    sizer = BatchSizer(size=1000, min_size=1, max_size=10_000, target_seconds=1.0)
    for _ in range(20):
        sizer.observe(1000, 1.0)
    sizer.observe(1000, 5.0)  # a lock wait, say
    assert sizer.size >= 500


def test_a_fixed_size_stays_fixed() -> None:
    sizer = BatchSizer(size=300, min_size=300, max_size=300, target_seconds=None)
    assert sizer.observe(300, 50.0) == 300
