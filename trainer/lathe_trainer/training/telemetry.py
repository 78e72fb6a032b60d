"""Live training figures of rank 0: throughput, MFU, peak memory and the Prometheus gauges.

The stage calls `step_done` after every optimizer step and `summary` at the end; the summary
goes into metrics.json, the manifest and the pod's termination message, so it holds scalars
only (the termination message keeps at most 4096 bytes).
"""

from __future__ import annotations

import torch

from lathe_trainer.training.distributed import DistributedContext
from lathe_trainer.training.metrics import (
    PrometheusExporter,
    ThroughputMeter,
    device_peak_flops,
    model_flops_utilization,
    peak_memory_bytes,
)


class Telemetry:
    """Throughput meter, MFU and the optional Prometheus exporter of one training run."""

    def __init__(
        self,
        context: DistributedContext,
        precision: str,
        flops_per_token: float,
        labels: dict[str, str],
    ):
        self.context = context
        self.flops_per_token = flops_per_token
        self.peak_flops = device_peak_flops(context.device, precision)
        self.meter = ThroughputMeter()
        self.exporter = PrometheusExporter.from_environment(labels) if context.is_main else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.meter.tokens_per_second

    @property
    def mfu(self) -> float | None:
        return model_flops_utilization(self.tokens_per_second, self.flops_per_token,
                                       self.peak_flops, self.context.world_size)

    def step_done(self, step: int, loss: float | None) -> None:
        if self.exporter is not None:
            self.exporter.update(loss=loss, tokens_per_second=self.tokens_per_second,
                                 mfu=self.mfu, step=step,
                                 peak_memory=peak_memory_bytes(self.context.device))

    def export(self, **values: float | None) -> None:
        """Set Prometheus gauges of PrometheusExporter.GAUGES by key, when rank 0 serves them."""
        if self.exporter is not None:
            self.exporter.update(**values)

    def summary(self) -> dict[str, float | int | None]:
        rate = self.tokens_per_second
        return {
            "tokensPerSecond": rate,
            "tokensPerSecondPerDevice": None if rate is None else rate / self.context.world_size,
            "mfu": self.mfu,
            "peakFlopsPerDevice": self.peak_flops,
            "peakMemoryBytes": peak_memory_bytes(self.context.device),
            "device": _device_name(self.context.device),
        }

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
