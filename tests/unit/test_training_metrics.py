"""Throughput, ETA and perplexity of training stages."""

from __future__ import annotations

import json
import math

import pytest

from lathe_trainer.training.metrics import ThroughputMeter, perplexity, write_json


def test_meter_rates_over_window(monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 14.0])
    monkeypatch.setattr("lathe_trainer.training.metrics.time.perf_counter", lambda: next(clock))
    meter = ThroughputMeter()
    for tokens in (100, 300):
        meter.start_step()
        meter.end_step(tokens)
    assert meter.tokens_per_second == pytest.approx(400 / 6)
    assert meter.eta_seconds(remaining_steps=5) == pytest.approx(15.0)


def test_meter_empty_reports_none():
    meter = ThroughputMeter()
    assert meter.tokens_per_second is None
    assert meter.eta_seconds(3) is None


def test_end_without_start_raises():
    with pytest.raises(RuntimeError, match="without start_step"):
        ThroughputMeter().end_step(1)


@pytest.mark.parametrize(("loss", "expected"), [(0.0, 1.0), (math.log(50), 50.0)])
def test_perplexity(loss, expected):
    assert perplexity(loss) == pytest.approx(expected)


def test_perplexity_of_diverged_model_stays_finite():
    assert math.isfinite(perplexity(1e6))


def test_write_json_leaves_no_temporary(tmp_path):
    write_json(tmp_path / "metrics.json", {"steps": 3})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"steps": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
