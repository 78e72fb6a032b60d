"""The optimizer step and the evaluation pass of the PretrainJob stage.

One optimizer step takes `gradientAccumulationSteps` micro-batches on every rank. The token
count of that whole accumulated batch, over all ranks, is summed first so that every token
weighs the same in the loss (see lathe_trainer.training.loss). Gradients are synchronized once
per step: DDP's all-reduce runs only on the last micro-batch, the others run under no_sync().
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

from lathe_trainer.pretrain.data import DataPosition, SequenceSampler
from lathe_trainer.pretrain.objectives import Batch, CausalLM, Objective
from lathe_trainer.training import distributed
from lathe_trainer.training.distributed import DistributedContext
from lathe_trainer.training.loss import count_tokens, gradient_scale, token_loss_sum


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of a step was NaN or infinite."""

    def __init__(self, quantity: str, value: float, step: int):
        super().__init__(f"the {quantity} of step {step} is {value}")
        self.quantity = quantity
        self.value = value
        self.step = step


@dataclass
class TrainState:
    """The counters a checkpoint carries besides the tensors."""

    step: int = 0
    tokens_seen: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    position: DataPosition = field(default_factory=DataPosition)

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "tokensSeen": self.tokens_seen,
            "firstLoss": self.first_loss,
            "lastLoss": self.last_loss,
            "dataPosition": self.position.to_dict(),
        }

    @classmethod
    def from_dict(cls, value: dict) -> TrainState:
        return cls(
            step=int(value["step"]),
            tokens_seen=int(value["tokensSeen"]),
            first_loss=value.get("firstLoss"),
            last_loss=value.get("lastLoss"),
            position=DataPosition.from_dict(value["dataPosition"]),
        )


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    learning_rate: float


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    context: DistributedContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: SequenceSampler,
    sequences: torch.Tensor,
    accumulation: int,
    max_grad_norm: float,
    precision: str,
    step: int,
    objective: Objective | None = None,
) -> StepResult:
    """Run one optimizer step and return its loss, averaged over every token of all ranks.

    Raises NonFiniteLossError before the optimizer updates any weight if the loss or the
    gradient norm is not finite. The check uses values reduced over all ranks, so all ranks
    raise together.
    """
    # The objective (pretrain.objectives) turns sequences into inputs and labels: causal LM
    # unless the stage passes masked LM or span corruption.
    objective = objective or CausalLM()
    batches = [objective.prepare(sequences[sampler.next_indices()]).to(context.device)
               for _ in range(accumulation)]
    local_tokens = sum(count_tokens(batch.labels, shift=batch.shift) for batch in batches)
    (global_tokens,) = distributed.all_reduce_sum(context, [local_tokens])
    scale = gradient_scale(global_tokens, context.world_size)

    local_loss_sum = 0.0
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        sync = contextlib.nullcontext()
        if isinstance(model, DistributedDataParallel) and not last:
            sync = model.no_sync()
        with sync:
            with autocast(context.device, precision):
                logits = model(**batch.inputs).logits
            loss_sum = token_loss_sum(logits, batch.labels, shift=batch.shift)
            (loss_sum * scale).backward()
        local_loss_sum += loss_sum.item()

    (loss_sum_all,) = distributed.all_reduce_sum(context, [local_loss_sum])
    loss = loss_sum_all / global_tokens
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError("training loss", loss, step)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError("gradient norm", grad_norm, step)
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # Every rank consumed the same number of full-length sequences, so no reduction is needed.
    input_tokens = accumulation * sampler.global_batch * sequences.size(1)
    return StepResult(loss, grad_norm, input_tokens, learning_rate)


@torch.no_grad()
def evaluate(
    context: DistributedContext,
    model: torch.nn.Module,
    batches: list[Batch],
    precision: str,
) -> float | None:
    """Return the mean token loss over every rank's validation batches (None without any).

    `model` is the unwrapped module: evaluation needs no gradient synchronization.
    """
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    tokens = 0
    for batch in batches:
        batch = batch.to(context.device)
        with autocast(context.device, precision):
            logits = model(**batch.inputs).logits
        loss_sum += token_loss_sum(logits, batch.labels, shift=batch.shift).item()
        tokens += count_tokens(batch.labels, shift=batch.shift)
    model.train(was_training)
    total_loss, total_tokens = distributed.all_reduce_sum(context, [loss_sum, tokens])
    return total_loss / total_tokens if total_tokens else None


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters for AdamW: matrices decay, biases and norm weights (1-D) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
