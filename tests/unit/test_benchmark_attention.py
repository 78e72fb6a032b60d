"""The attention benchmark's report and the thresholds the trainer uses."""

from __future__ import annotations

from pathlib import Path

import torch

from lathe_trainer.training import attention
from script_modules import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"


def _benchmark():
    return load_script(SCRIPT)


def test_report_lists_slower_lengths():
    """A reduced type counts as slower only from SLOWER_RATIO on, so a tie is not listed."""
    bench = _benchmark()
    rows = [
        {"length": 128, "batch": 8, "bf16": 11.6, "bf16-fp32": 6.5,
         "fp16": 14.0, "fp16-fp32": 6.7},
        {"length": 192, "batch": 5, "bf16": 6.9, "bf16-fp32": 6.7,
         "fp16": 10.7, "fp16-fp32": 6.8},
    ]
    text = bench.report(rows, repeats=3)
    assert "| 128 | 8 | 11.6 | 6.5 | 1.78 | 14.0 | 6.7 | 2.09 |" in text
    assert "bf16 took 1.05 times float32's time or more at 128 tokens." in text
    assert "fp16 took 1.05 times float32's time or more at 128, 192 tokens." in text
    assert "runs attention in float32 below 256 tokens" in text
    assert "runs attention in float32 at every length" in text


def test_benchmark_covers_the_thresholds():
    """Every reduced type the trainer upcasts is timed, at lengths on both sides of bf16's
    threshold."""
    bench = _benchmark()
    assert set(bench.REDUCED_TYPES.values()) == set(attention.FLOAT32_BELOW_TOKENS)
    threshold = attention.FLOAT32_BELOW_TOKENS[torch.bfloat16]
    assert any(length < threshold for length in bench.LENGTHS)
    assert threshold in bench.LENGTHS
