"""Token-level loss sums, so that gradient accumulation weighs every token the same.

A mean loss per micro-batch weighs a token in a short micro-batch more than one in a long
micro-batch. The training loops therefore sum the loss over tokens, count the tokens of the
whole accumulated batch on all ranks first, and divide every micro-batch's sum by that one
count. Micro-batch 2 x accumulation 1 and micro-batch 1 x accumulation 2 then give the same
loss and gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_tokens(labels: torch.Tensor, shift: bool) -> int:
    """Count the labels that take part in the loss (shift=True for causal LM labels)."""
    if shift:
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Return the cross-entropy summed over all labelled tokens.

    With shift=True the logits at position t predict the label at t + 1, as in causal language
    modelling. The sum is taken in float32 even under autocast.
    """
    if shift:
        logits = logits[..., :-1, :]
        labels = labels[..., 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


LossFunction = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def loss_function(compile: bool) -> LossFunction:
    """Return token_loss_sum, compiled when the model is.

    Compiled, the float32 upcast of the logits, the log-softmax and the gather run in one
    generated graph forward and one backward, instead of a pass over the tokens x vocabulary
    logits each. torchtitan's `build_cross_entropy_loss` (torchtitan/components/loss.py)
    also compiles the loss when compilation is on.
    """
    return torch.compile(token_loss_sum) if compile else token_loss_sum


def gradient_scale(global_tokens: float, world_size: int) -> float:
    """Return the factor that turns one rank's loss sum into its share of the batch mean.

    DDP averages gradients over ranks, which divides by world_size. Multiplying each rank's
    loss sum by world_size / global_tokens therefore yields the gradient of (sum of all token
    losses on all ranks) / global_tokens.
    """
    if global_tokens <= 0:
        raise ValueError("The accumulated batch has no labelled tokens, so its loss is undefined.")
    return world_size / global_tokens
