"""The optimizer step and the evaluation pass of the PretrainJob stage.

One optimizer step takes `gradientAccumulationSteps` micro-batches on every rank. The token
count of that whole accumulated batch, over all ranks, is summed first so that every token
weighs the same in the loss (see lathe_trainer.training.loss). Gradients are synchronized once
per step: the DDP all-reduce (or FSDP reduce-scatter) runs only on the last micro-batch.
Precision, loss scaling and the parallel wrappers live in lathe_trainer.training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lathe_trainer.pretrain.data import DataPosition, SequenceSampler
from lathe_trainer.pretrain.objectives import Batch, CausalLM, Objective
from lathe_trainer.training import distributed, parallel
from lathe_trainer.training.distributed import DistributedContext
from lathe_trainer.training.loss import (
    LossFunction,
    count_tokens,
    gradient_scale,
    token_loss_sum,
)
from lathe_trainer.training.precision import autocast, overflow_skipped


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
    # Steps dropped or rolled back because of a NaN or inf loss or gradient norm.
    non_finite_steps: int = 0
    # torch.amp.GradScaler.state_dict() of an fp16 run, so a resume keeps the loss scale.
    grad_scaler: dict | None = None
    # fp16 steps whose update the loss scaler skipped after the scaled gradients overflowed.
    scaler_skipped_steps: int = 0

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "tokensSeen": self.tokens_seen,
            "firstLoss": self.first_loss,
            "lastLoss": self.last_loss,
            "dataPosition": self.position.to_dict(),
            "nonFiniteSteps": self.non_finite_steps,
            "gradScaler": self.grad_scaler,
            "scalerSkippedSteps": self.scaler_skipped_steps,
        }

    @classmethod
    def from_dict(cls, value: dict) -> TrainState:
        return cls(
            step=int(value["step"]),
            tokens_seen=int(value["tokensSeen"]),
            first_loss=value.get("firstLoss"),
            last_loss=value.get("lastLoss"),
            position=DataPosition.from_dict(value["dataPosition"]),
            non_finite_steps=int(value.get("nonFiniteSteps", 0)),
            grad_scaler=value.get("gradScaler"),
            scaler_skipped_steps=int(value.get("scalerSkippedSteps", 0)),
        )


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    learning_rate: float
    # True when fp16 loss scaling found inf/NaN gradients and skipped the optimizer update;
    # the scaler then lowers its scale. This is loss scaling at work, not a diverged model.
    scaler_skipped: bool = False


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
    scaler: torch.amp.GradScaler | None = None,
    poison: bool = False,
    loss_function: LossFunction = token_loss_sum,
) -> StepResult:
    """Run one optimizer step and return its loss, averaged over every token of all ranks.

    Raises NonFiniteLossError before the optimizer updates any weight if the loss or the
    gradient norm is not finite. The check uses values reduced over all ranks, so all ranks
    raise together. The sampler has moved past the step's batches either way, so a caller that
    skips the step continues with the next data. With an enabled fp16 `scaler`, a non-finite
    gradient norm is an overflow of the loss scale instead: the scaler skips the update, the
    scheduler does not step, and the result has `scaler_skipped` set, unless the scale is
    already at the minimum (training.precision.overflow_skipped), where the step raises
    NonFiniteLossError as without a scaler.
    `poison` multiplies the loss by NaN (the fault-injection hook). `loss_function` computes
    the token loss sum (training.loss.loss_function gives the compiled one).
    """
    scaler = scaler or torch.amp.GradScaler(context.device.type, enabled=False)
    # The objective (pretrain.objectives) turns sequences into inputs and labels: causal LM
    # unless the stage passes masked LM or span corruption.
    objective = objective or CausalLM()
    batches = [objective.prepare(sequences[sampler.next_indices()].long()).to(context.device)
               for _ in range(accumulation)]
    local_tokens = sum(count_tokens(batch.labels, shift=batch.shift) for batch in batches)
    (global_tokens,) = distributed.all_reduce_sum(context, [local_tokens])
    scale = gradient_scale(global_tokens, context.world_size)

    # The loss is summed as a tensor and read once per step: one host sync instead of one per
    # micro-batch, which matters on GPUs where .item() waits for the queued kernels.
    local_loss_sum = torch.zeros((), device=context.device)
    for index, batch in enumerate(batches):
        with parallel.gradient_sync(model, enabled=index == len(batches) - 1):
            with autocast(context.device, precision):
                logits = model(**batch.inputs).logits
            loss_sum = loss_function(logits, batch.labels, batch.shift)
            if poison:
                loss_sum = loss_sum * float("nan")
            scaler.scale(loss_sum * scale).backward()
        local_loss_sum += loss_sum.detach()

    (loss_sum_all,) = distributed.all_reduce_sum(context, [float(local_loss_sum)])
    loss = loss_sum_all / global_tokens
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError("training loss", loss, step)
    # Gradients are unscaled before clipping, so max_grad_norm applies to the true gradients.
    scaler.unscale_(optimizer)
    grad_norm = float(parallel.clip_grad_norm(model, max_grad_norm))
    learning_rate = scheduler.get_last_lr()[0]
    scaler_skipped = False
    if not math.isfinite(grad_norm):
        scaler_skipped = overflow_skipped(scaler)
        if not scaler_skipped:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError("gradient norm", grad_norm, step)
    scaler.step(optimizer)
    scaler.update()
    if not scaler_skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # Every rank consumed the same number of full-length sequences, so no reduction is needed.
    input_tokens = accumulation * sampler.global_batch * sequences.size(1)
    return StepResult(loss, grad_norm, input_tokens, learning_rate, scaler_skipped)


@torch.no_grad()
def evaluate(
    context: DistributedContext,
    model: torch.nn.Module,
    batches: list[Batch],
    precision: str,
) -> float | None:
    """Return the mean token loss over every rank's validation batches (None without any).

    `model` is the unwrapped module (evaluation needs no gradient synchronization), or the
    FSDP-sharded one. A sharded forward pass is a collective, so under FSDP a rank with fewer
    batches repeats its first batch, without scoring it, until every rank has run as many.
    """
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    tokens = 0
    rounds = len(batches)
    if parallel.is_sharded(model):
        rounds = int(distributed.all_reduce_max(context, [len(batches)])[0])
    for index in range(rounds):
        scored = index < len(batches)
        if not scored and not batches:
            raise RuntimeError(
                f"rank {context.rank} has no validation batch to join the FSDP forward pass; "
                "raise spec.evalSequences to at least the number of processes."
            )
        batch = (batches[index] if scored else batches[0]).to(context.device)
        with autocast(context.device, precision):
            logits = model(**batch.inputs).logits
        if scored:
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
