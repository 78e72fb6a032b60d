"""The cosine learning-rate schedule with linear warmup."""

from __future__ import annotations

import pytest
import torch

from lathe_trainer.training.schedule import (
    build_scheduler,
    configured_hyperparameters,
    cosine_with_warmup,
    restore_configured,
)


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


def _trained(learning_rate: float, total_steps: int, weight_decay: float = 0.01):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                  weight_decay=weight_decay)
    return optimizer, build_scheduler(optimizer, 0, total_steps)


def test_continued_run_takes_spec_settings():
    """A run that continues from a checkpoint with a lower learning rate, another weight decay
    and a longer schedule trains with them, not with the checkpoint's."""
    optimizer, scheduler = _trained(1e-3, 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()

    optimizer, scheduler = _trained(1e-5, 20, weight_decay=0.1)
    configured = configured_hyperparameters(optimizer)
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    restore_configured(optimizer, scheduler, configured)

    group = optimizer.param_groups[0]
    assert group["initial_lr"] == 1e-5
    assert group["weight_decay"] == 0.1
    assert group["lr"] == pytest.approx(1e-5 * cosine_with_warmup(4, 0, 20))
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * cosine_with_warmup(5, 0, 20))


def test_unchanged_spec_resumes_exactly():
    """With the spec unchanged, the restored learning rate is the checkpoint's, bit for bit."""
    optimizer, scheduler = _trained(3e-3, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    expected = optimizer.param_groups[0]["lr"]
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()

    optimizer, scheduler = _trained(3e-3, 10)
    configured = configured_hyperparameters(optimizer)
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    restore_configured(optimizer, scheduler, configured)
    assert optimizer.param_groups[0]["lr"] == expected
