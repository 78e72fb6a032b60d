"""The optimization loop of one FineTune phase, shared by the LoRA (or full) fine-tuning of the
base model and by the from-scratch comparison.

Data parallel without a wrapper: every process holds the whole model, computes gradients on
its slice of the global batch, and the gradients are summed over processes before the step.
The loss of a step is normalized by the number of labelled tokens in the whole global batch
(all micro-batches of all processes), so the gradient does not depend on how the batch is split
into processes and accumulation steps, even with sentences of uneven length.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lathe_trainer.finetune import checkpoint, distributed
from lathe_trainer.finetune.data import IGNORE_INDEX, EncodedSentence, collate, step_indices
from lathe_trainer.finetune.metrics import entity_scores, predict
from lathe_trainer.training.precision import autocast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Encoded sentences with their words and gold word tags."""

    encoded: list[EncodedSentence]
    words: list[list[str]]
    gold: list[list[str]]


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs from `spec.training`, plus the tokenizer's padding id."""

    max_steps: int
    micro_batch_size: int
    accumulation_steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    seed: int
    checkpoint_interval: int
    keep_checkpoints: int
    eval_interval: int
    pad_token_id: int
    id2label: dict[int, str]
    # fp32, or bf16 autocast in the training steps. Evaluation runs in fp32, as the exported
    # model serves.
    precision: str = "fp32"

    @classmethod
    def from_spec(cls, training, pad_token_id: int, id2label: dict[int, str]) -> "LoopSettings":
        return cls(
            max_steps=training.max_steps,
            micro_batch_size=training.micro_batch_size,
            accumulation_steps=training.gradient_accumulation_steps,
            learning_rate=training.learning_rate,
            warmup_steps=training.warmup_steps,
            weight_decay=training.weight_decay,
            max_grad_norm=training.max_grad_norm,
            seed=training.seed,
            checkpoint_interval=training.checkpoint_interval,
            keep_checkpoints=training.keep_checkpoints,
            eval_interval=training.eval_interval,
            pad_token_id=pad_token_id,
            id2label=id2label,
            precision=training.precision,
        )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, settings: LoopSettings):
    # NB: no weight decay on biases and norm weights (1-D tensors), as is usual for transformers.
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.warmup_steps, settings.max_steps)
    )
    return optimizer, scheduler


def all_reduce_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum gradients over processes in one flat buffer; a missing gradient counts as zero."""
    if distributed.world_size() == 1:
        return
    grads = [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters
    ]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    distributed.all_reduce_sum(flat)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        size = grad.numel()
        parameter.grad = flat[offset:offset + size].view_as(grad).clone()
        offset += size


def local_micro_batches(
    train: list[EncodedSentence], step: int, settings: LoopSettings
) -> list[list[EncodedSentence]]:
    """Return this process's micro-batches of one optimizer step."""
    per_process = settings.micro_batch_size * settings.accumulation_steps
    world = distributed.world_size()
    indices = step_indices(len(train), step, per_process * world, settings.seed)
    mine = indices[distributed.rank() * per_process:(distributed.rank() + 1) * per_process]
    size = settings.micro_batch_size
    return [[train[i] for i in mine[start:start + size]] for start in range(0, len(mine), size)]


class NonFiniteStepError(RuntimeError):
    """The loss or the gradient norm of a step was NaN or infinite, so the step was not applied."""

    def __init__(self, quantity: str, value: float):
        super().__init__(f"the {quantity} is {value}")
        self.quantity = quantity
        self.value = value


def train_step(model, optimizer, scheduler, parameters, batches, settings) -> tuple[float, int]:
    """Run one optimizer step; return the global mean loss per labelled token and the tokens.

    Raises NonFiniteStepError before the optimizer changes any weight if the loss or the
    gradient norm is NaN or infinite. Both are the same on every process after the all-reduce,
    so all processes raise together.
    """
    device = parameters[0].device
    inputs = [
        {key: value.to(device) for key, value in collate(batch, settings.pad_token_id).items()}
        for batch in batches
    ]
    # On the model's device, because NCCL reduces GPU tensors only.
    counts = torch.tensor(
        [
            float(sum((item["labels"] != IGNORE_INDEX).sum() for item in inputs)),
            float(sum(item["attention_mask"].sum() for item in inputs)),
        ],
        device=device,
    )
    labelled, tokens = distributed.all_reduce_sum(counts).tolist()
    loss_sum = torch.zeros(1, device=device)
    for item in inputs:
        with autocast(device, settings.precision):
            logits = model(input_ids=item["input_ids"],
                           attention_mask=item["attention_mask"]).logits
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), item["labels"].reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        (loss / max(labelled, 1.0)).backward()
        loss_sum += loss.detach()
    mean_loss = distributed.all_reduce_sum(loss_sum).item() / max(labelled, 1.0)
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStepError("training loss", mean_loss)
    all_reduce_gradients(parameters)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStepError("gradient norm", grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, int(tokens)


@dataclass
class Resumed:
    """The state a phase continues from: the step, the last loss and the tokens trained on."""

    step: int = 0
    loss: float = float("nan")
    tokens: int = 0


def resume_or_sync(model, optimizer, scheduler, phase_dir: Path, resume: bool) -> Resumed:
    """Load the latest checkpoint if resuming, else give every process rank 0's weights."""
    state = checkpoint.load_agreed(phase_dir) if resume else None
    if state is None:
        distributed.broadcast_parameters(list(model.parameters()))
        return Resumed()
    checkpoint.restore_trainable(model, state["trainable"])
    # The checkpoint's tensors are on the CPU; load_state_dict moves the optimizer state to
    # the device of each parameter.
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state["rng"])
    return Resumed(int(state["step"]), float(state.get("loss", float("nan"))),
                   int(state.get("tokens", 0)))


def rng_state() -> dict[str, torch.Tensor]:
    """Return this process's random state: the CPU generator's and, with CUDA, the GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: torch.Tensor | dict[str, torch.Tensor]) -> None:
    # Checkpoints written before GPU support hold the CPU generator's state alone.
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_process(seed: int) -> None:
    """Seed this process's random stream for training, after the weights are the same on all.

    The classifier head and LoRA have dropout, so the processes need streams of their own:
    with one seed they would drop the same units of their different sentences. Rank 0 keeps
    the stream of `seed`, so a single process trains as it would without this.
    """
    torch.manual_seed(seed + distributed.rank())


def _restore_rng(saved: torch.Tensor | list) -> None:
    """Continue each process's random stream where it stopped.

    A checkpoint contains one state per process (seed_process gave each its own stream), and
    one written before that contains rank 0's state only.
    """
    if isinstance(saved, torch.Tensor):
        _set_rng_state(saved)
    elif len(saved) == distributed.world_size():
        _set_rng_state(saved[distributed.rank()])
    else:
        log.warning("The checkpoint contains RNG states of %d processes but this run has %d, "
                    "so every process continues from rank 0's state.", len(saved),
                    distributed.world_size())
        _set_rng_state(saved[0])


def evaluate(model, split: Split, settings: LoopSettings) -> tuple[dict, list[list[str]]]:
    predicted = predict(
        model, split.encoded, settings.micro_batch_size * 4, settings.pad_token_id,
        settings.id2label,
    )
    return entity_scores(split.gold, predicted), predicted


def run_phase(
    name: str, model, train: Split, validation: Split | None, settings: LoopSettings,
    phase_dir: Path, resume: bool, report,
) -> dict:
    """Train one phase to `max_steps`, checkpointing on the way; return its training figures.

    `report(step, message, **metrics)` is called on rank 0 after every step.
    """
    torch.manual_seed(settings.seed)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(model, settings)
    resumed = resume_or_sync(model, optimizer, scheduler, phase_dir, resume)
    if resumed.step == 0:
        seed_process(settings.seed)
    start, loss, tokens_total = resumed.step, resumed.loss, resumed.tokens
    tokens_this_attempt, started = 0, time.monotonic()
    # Time in training steps only, so that saves and evaluations do not lower the token rate.
    step_seconds = 0.0
    for step in range(start, settings.max_steps):
        step_started = time.monotonic()
        batches = local_micro_batches(train.encoded, step, settings)
        try:
            loss, tokens = train_step(model, optimizer, scheduler, parameters, batches, settings)
        except NonFiniteStepError as error:
            raise NonFiniteStepError(f"{error.quantity} of {name} step {step + 1}",
                                     error.value) from error
        step_seconds += time.monotonic() - step_started
        tokens_total += tokens
        tokens_this_attempt += tokens
        done = step + 1
        if distributed.is_main():
            report(done, f"{name}: step {done}/{settings.max_steps}", loss=round(loss, 4),
                   tokensPerSecond=round(tokens_this_attempt / max(step_seconds, 1e-9), 1))
        if done % settings.checkpoint_interval == 0 or done == settings.max_steps:
            save_checkpoint(model, optimizer, scheduler, phase_dir, done, settings,
                            loss=loss, tokens=tokens_total)
        if validation and done % settings.eval_interval == 0 and done < settings.max_steps:
            scores, _ = evaluate(model, validation, settings)
            log.info("%s: validation F1 %.4f after step %d.", name, scores["f1"], done)
    return {
        "steps": settings.max_steps,
        "resumedFromStep": start,
        # None when no step ran and the checkpoint predates stored losses: JSON has no NaN.
        "finalLoss": loss if math.isfinite(loss) else None,
        "trainSeconds": round(time.monotonic() - started, 3),
        "tokensSeen": tokens_total,
    }


def save_checkpoint(model, optimizer, scheduler, phase_dir, step, settings, *, loss: float,
                    tokens: int) -> None:
    """Save the phase's state at `step`. Collective call: rank 0 writes the RNG states of all."""
    rng_states = distributed.all_gather_object(rng_state())
    if distributed.is_main():
        state = {
            "step": step,
            "trainable": checkpoint.trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_states,
            "loss": loss,
            "tokens": tokens,
        }
        checkpoint.save(phase_dir, step, state, settings.keep_checkpoints)
    # Other processes wait, so none races ahead and reads a half-written checkpoint on resume.
    distributed.barrier()
