"""The cosine learning-rate schedule with linear warmup."""

from __future__ import annotations

import pytest
import torch

from lathe_trainer.training.schedule import build_scheduler, cosine_with_warmup


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.2),  # warmup starts above zero so the first step moves the weights
        (3, 0.8),
        (4, 1.0),  # peak right after warmup
        (52, 0.55),  # halfway through the decay: midpoint of 1.0 and the 0.1 floor
        (100, 0.1),
        (500, 0.1),  # steps past the total stay at the floor
    ],
)
def test_schedule_values(step, expected):
    assert cosine_with_warmup(step, warmup_steps=4, total_steps=100) == pytest.approx(expected)


def test_schedule_rises_then_falls():
    values = [cosine_with_warmup(step, 10, 200) for step in range(201)]
    assert values[:11] == sorted(values[:11])
    assert values[10:] == sorted(values[10:], reverse=True)


def test_schedule_without_warmup_starts_at_peak():
    assert cosine_with_warmup(0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)


def test_scheduler_drives_optimizer_learning_rate():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.01)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=3)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.005, 0.01, 0.0055, 0.001])
