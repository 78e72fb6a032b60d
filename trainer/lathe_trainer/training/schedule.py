"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(
    step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> float:
    """Return the multiplier of the peak learning rate for the optimizer step `step`.

    The multiplier rises linearly from 1 / (warmup_steps + 1) to 1 during warmup, then follows a
    half cosine from 1 down to `min_ratio` at `total_steps`, and stays there after.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> LambdaLR:
    # NB: the schedule depends on total_steps, so a run resumed with a larger maxSteps
    # continues on the stretched curve from its step count rather than on the old one.
    return LambdaLR(
        optimizer,
        lambda step: cosine_with_warmup(step, warmup_steps, total_steps, min_ratio),
    )


# The optimizer settings that come from the spec. A checkpoint stores them too, and loading it
# would bring back the values of the run that wrote it.
CONFIGURED_KEYS = ("initial_lr", "weight_decay", "betas", "eps")


def configured_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Return each parameter group's settings from the spec, before a checkpoint is loaded."""
    return [{key: group[key] for key in CONFIGURED_KEYS if key in group}
            for group in optimizer.param_groups]


def restore_configured(optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                       configured: list[dict]) -> None:
    """Put the spec's settings back after loading a checkpoint's optimizer and scheduler.

    A run that continues with a lower `learningRate` or another `weightDecay` must train with
    them, and the learning rate of the restored step follows this run's schedule (its
    `maxSteps` and `warmupSteps`), not the schedule that the checkpoint was written under.
    """
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs,
                                      scheduler.lr_lambdas, strict=True):
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
