"""Throughput, ETA, perplexity, MFU, peak memory and the Prometheus gauges of training."""

from __future__ import annotations

import json
import math
import socket
import urllib.request

import pytest
import torch

from lathe_trainer.training.metrics import (
    PrometheusExporter,
    ThroughputMeter,
    device_peak_flops,
    model_flops_utilization,
    peak_flops,
    peak_memory_bytes,
    perplexity,
    write_json,
)


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


@pytest.mark.parametrize(
    ("device_name", "precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
        ("NVIDIA H200", "bf16", 989.4e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA L4", "fp16", 121e12),
        ("NVIDIA L40S", "bf16", 362e12),
        # Whole words only: L4 is not the L40, A10 is not the A10G, H100 not the H100 NVL.
        ("NVIDIA L40", "bf16", 181e12),
        ("NVIDIA H100 NVL", "bf16", 835.5e12),
        ("NVIDIA A10", "bf16", 125e12),
        ("NVIDIA A10G", "bf16", None),
        ("NVIDIA GH200 480GB", "bf16", 989.4e12),
        ("NVIDIA H200 NVL", "bf16", 835.5e12),
        ("Tesla V100-SXM2-16GB", "bf16", None),
        ("Some Future GPU", "bf16", None),
    ],
)
def test_peak_flops_lookup(device_name, precision, expected):
    assert peak_flops(device_name, precision) == expected


def test_no_mfu_on_cpu():
    assert device_peak_flops(torch.device("cpu"), "fp32") is None


def test_mfu_ratio():
    # 1000 tokens/s * 1e9 FLOPs per token on 2 devices of 1e12 FLOP/s: 0.5.
    assert model_flops_utilization(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)
    assert model_flops_utilization(None, 1e9, 1e12, 2) is None


def test_peak_memory_on_cpu_is_rss():
    assert peak_memory_bytes(torch.device("cpu")) > 10 * 2**20


def test_prometheus_exporter_serves_gauges():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    labels = {"namespace": "ns", "kind": "PretrainJob", "name": "lm"}
    exporter = PrometheusExporter(port, labels, address="127.0.0.1")
    try:
        exporter.update(loss=2.5, tokens_per_second=1234.0, mfu=None, step=7, peak_memory=42)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        exporter.close()
    series = '{kind="PretrainJob",name="lm",namespace="ns"}'
    assert f"lathe_training_loss{series} 2.5" in text
    assert f"lathe_training_step{series} 7.0" in text
    assert f"lathe_training_tokens_per_second{series} 1234.0" in text
    assert f"lathe_training_peak_memory_bytes{series} 42.0" in text
    assert f"lathe_training_mfu_ratio{series} 0.0" in text
