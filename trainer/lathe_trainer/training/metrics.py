"""Throughput, MFU, peak memory, the Prometheus endpoint and final metrics of a training stage."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

METRICS = "metrics.json"


class ThroughputMeter:
    """Tokens per second and ETA over a sliding window of recent optimizer steps.

    A window rather than the whole run keeps the rate current after evaluation pauses and
    checkpoint writes. Call `start_step` before a step and `end_step` after it.
    """

    def __init__(self, window: int = 20):
        self.steps: deque[tuple[float, int]] = deque(maxlen=window)
        self.started: float | None = None

    def start_step(self) -> None:
        self.started = time.perf_counter()

    def end_step(self, tokens: int) -> None:
        if self.started is None:
            raise RuntimeError("end_step() was called without start_step().")
        self.steps.append((time.perf_counter() - self.started, tokens))
        self.started = None

    @property
    def seconds_per_step(self) -> float | None:
        if not self.steps:
            return None
        return sum(seconds for seconds, _ in self.steps) / len(self.steps)

    @property
    def tokens_per_second(self) -> float | None:
        seconds = sum(seconds for seconds, _ in self.steps)
        if seconds <= 0:
            return None
        return sum(tokens for _, tokens in self.steps) / seconds

    def eta_seconds(self, remaining_steps: int) -> float | None:
        per_step = self.seconds_per_step
        return None if per_step is None else per_step * max(0, remaining_steps)


def perplexity(mean_loss: float) -> float:
    """exp(mean token loss), capped to stay a finite JSON number for a diverged model."""
    return math.exp(min(mean_loss, 700.0))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# Dense (no 2:4 sparsity) peak tensor-core FLOP/s per GPU, from the vendor data sheets: NVIDIA
# H100 SXM, H200 and GH200 (989.4 TFLOP/s bf16/fp16, 67 fp32 non-tensor). H100 PCIe (756).
# H100 NVL and H200 NVL (835.5, 60 fp32). A100 (312 bf16/fp16, 19.5 fp32), L4 (121), L40S
# (362), L40 (181, 90.5 fp32), A10 (125), V100 (125 fp16, no bf16), T4 (65 fp16). NOTE: the
# NVL and L40 figures were taken from the data sheets as remembered, not rechecked against
# them. Each key is a run of whole words
# of torch.cuda.get_device_name(), split at spaces and hyphens, so "L4" does not match
# "NVIDIA L40" and "A10" does not match "NVIDIA A10G". Keys are tried in this order, so the
# longer names come first. NOTE: the fp32 column is the plain FP32 rate; TF32 matmuls (off by
# default in torch) can run faster, so an fp32 MFU can exceed 1 where TF32 is enabled.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("GH200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 67e12}),
    ("H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 60e12}),
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 60e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
)
_NAME_SEPARATORS = re.compile(r"[\s-]+")


def peak_flops(device_name: str, precision: str) -> float | None:
    """Return the peak FLOP/s of one device for `precision`, or None for an unknown device."""
    words = _NAME_SEPARATORS.split(device_name.strip())
    for key, rates in PEAK_FLOPS:
        key_words = key.split()
        if any(words[start:start + len(key_words)] == key_words
               for start in range(len(words))):
            return rates.get(precision)
    return None


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Return the peak FLOP/s of `device`; None on CPUs, where MFU is not reported."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision)


def model_flops_utilization(
    tokens_per_second: float | None, flops_per_token: float, peak: float | None, devices: int
) -> float | None:
    """Return achieved model FLOP/s over the peak of all devices (None without a peak)."""
    if not tokens_per_second or not peak:
        return None
    return tokens_per_second * flops_per_token / (peak * devices)


def peak_memory_bytes(device: torch.device) -> int:
    """Return the peak allocated GPU memory, or the peak resident set size on CPUs."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PrometheusExporter:
    """Serves the training gauges of rank 0 over HTTP for Prometheus.

    Started only when LATHE_TRAINER_METRICS_PORT is set; the address defaults to all interfaces so the
    PodMonitor can scrape the pod (LATHE_TRAINER_METRICS_ADDRESS overrides it). A private registry keeps
    repeated runs in one process from colliding.
    """

    GAUGES = {
        "loss": ("lathe_training_loss", "Mean token loss of the latest optimizer step."),
        "tokens_per_second": ("lathe_training_tokens_per_second",
                              "Input tokens per second over all processes."),
        "mfu": ("lathe_training_mfu_ratio", "Model FLOPs utilization, 0 to 1."),
        "step": ("lathe_training_step", "Optimizer steps completed."),
        "total_steps": ("lathe_training_total_steps", "Optimizer steps the run trains for."),
        "eta_seconds": ("lathe_training_eta_seconds",
                        "Estimated seconds until training finishes."),
        "tokens_seen": ("lathe_training_tokens_seen",
                        "Input tokens trained on so far, steps before a resume included."),
        "peak_memory": ("lathe_training_peak_memory_bytes",
                        "Peak device memory of rank 0 (resident set size on CPUs)."),
        "non_finite_steps": ("lathe_training_non_finite_steps",
                             "Steps with a non-finite loss or gradient norm, skipped or rolled "
                             "back."),
    }
    # Created at their first update, so that a run without a curriculum has no stage series
    # rather than one that reads stage 0.
    OPTIONAL_GAUGES = {
        "curriculum_stage": ("lathe_training_curriculum_stage",
                             "Index, from 0, of the curriculum stage in training."),
    }

    def __init__(self, port: int, labels: dict[str, str], address: str = "0.0.0.0"):
        import prometheus_client

        self.registry = prometheus_client.CollectorRegistry()
        self.labels = labels
        self.gauges = {key: self._gauge(name, text) for key, (name, text) in self.GAUGES.items()}
        self.server, self.thread = prometheus_client.start_http_server(
            port, addr=address, registry=self.registry
        )
        log.info("Serving training metrics for Prometheus on %s:%d.", address, port)

    @classmethod
    def from_environment(cls, labels: dict[str, str]) -> PrometheusExporter | None:
        port = os.environ.get("LATHE_TRAINER_METRICS_PORT")
        if not port:
            return None
        address = os.environ.get("LATHE_TRAINER_METRICS_ADDRESS", "0.0.0.0")
        return cls(int(port), labels, address)

    def _gauge(self, name: str, text: str):
        import prometheus_client

        return prometheus_client.Gauge(name, text, sorted(self.labels),
                                       registry=self.registry).labels(**self.labels)

    def update(self, **values: float | None) -> None:
        for key, value in values.items():
            if value is None:
                continue
            if key not in self.gauges:
                self.gauges[key] = self._gauge(*self.OPTIONAL_GAUGES[key])
            self.gauges[key].set(value)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
