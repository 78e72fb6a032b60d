"""Throughput, ETA and final metrics of a training stage."""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

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
