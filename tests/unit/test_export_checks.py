"""How the export stage picks the worst of its ONNX Runtime checks against PyTorch."""

from __future__ import annotations

import math

from lathe_trainer.export.stage import max_diff_by_length, worst_check


def check(length: int, batch_size: int, difference: float) -> dict:
    return {"sequenceLength": length, "batchSize": batch_size, "maxAbsDiff": difference}


def test_worst_check_largest_difference():
    checks = [check(20, 1, 1e-6), check(20, 8, 3e-6), check(200, 1, 2e-6)]
    assert worst_check(checks) == check(20, 8, 3e-6)


def test_worst_check_nan_after_first():
    """A NaN at a later shape is the worst check, so the tolerance test fails on it."""
    checks = [check(20, 1, 1e-3), check(200, 8, math.nan), check(200, 1, 2e-3)]
    worst = worst_check(checks)
    assert worst["sequenceLength"] == 200
    assert worst["batchSize"] == 8
    assert math.isnan(worst["maxAbsDiff"])


def test_max_diff_by_length_keeps_nan():
    checks = [check(20, 1, 1e-6), check(20, 8, math.nan), check(200, 1, 2e-6),
              check(200, 8, 4e-6)]
    result = max_diff_by_length(checks)
    assert sorted(result) == ["20", "200"]
    assert math.isnan(result["20"])
    assert result["200"] == 4e-6
