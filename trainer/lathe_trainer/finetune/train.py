"""The optimization loop of one FineTune phase, shared by the LoRA (or full) fine-tuning of the
base model and by the from-scratch comparison.

Data parallel without a wrapper (strategy ddp): every process holds the whole model, computes
gradients on its slice of the global batch, and the gradients are summed over processes
before the step. With strategy fsdp the model is sharded (finetune.sharding), and its backward
pass reduces the gradients instead. The loss of a step is normalized by the number of labelled
tokens in the whole global batch (all micro-batches of all processes), so the gradient does not
depend on how the batch is split into processes and accumulation steps, even with sentences of
uneven length.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from lathe_trainer.finetune import checkpoint, distributed, sharding
from lathe_trainer.finetune.data import IGNORE_INDEX, EncodedSentence, collate, step_indices
from lathe_trainer.finetune.metrics import entity_scores, predict
from lathe_trainer.training import faults, parallel, precision
from lathe_trainer.training.precision import autocast, overflow_skipped

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
    # fp32, or bf16 or fp16 autocast in the training steps (fp16 with dynamic loss scaling).
    # Evaluation runs in fp32, as the exported model serves.
    precision: str = "fp32"
    # What a step with a NaN or infinite loss or gradient norm does: fail, skip or rollback.
    non_finite: str = "fail"
    max_non_finite_steps: int = 10
    # torch.compile the training forward and backward; evaluation runs the eager model.
    compile: bool = False
    # ddp keeps the whole model on every process, fsdp shards it (finetune.sharding).
    strategy: str = "ddp"

    @classmethod
    def from_spec(cls, training, pad_token_id: int, id2label: dict[int, str],
                  strategy: str = "ddp") -> "LoopSettings":
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
            non_finite=training.non_finite,
            max_non_finite_steps=training.max_non_finite_steps,
            compile=training.compile,
            strategy=strategy,
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
    train: list[EncodedSentence], data_step: int, settings: LoopSettings
) -> list[list[EncodedSentence]]:
    """Return this process's micro-batches of the `data_step`-th global batch.

    The data step is the optimizer step unless steps were skipped or rolled back: each of
    those moves on to the next batch, as PretrainJob does, rather than retrying the same one.
    """
    per_process = settings.micro_batch_size * settings.accumulation_steps
    world = distributed.world_size()
    indices = step_indices(len(train), data_step, per_process * world, settings.seed)
    mine = indices[distributed.rank() * per_process:(distributed.rank() + 1) * per_process]
    size = settings.micro_batch_size
    return [[train[i] for i in mine[start:start + size]] for start in range(0, len(mine), size)]


class NonFiniteStepError(RuntimeError):
    """The loss or the gradient norm of a step was NaN or infinite, so the step was not applied.

    `cause` is why the loop stopped instead of applying spec.training.nonFinite: `policy`
    (nonFinite is fail), `limit` (maxNonFiniteSteps reached) or `no-checkpoint` (rollback
    before the first checkpoint).
    """

    def __init__(self, quantity: str, value: float, cause: str = "policy"):
        super().__init__(f"the {quantity} is {value}")
        self.quantity = quantity
        self.value = value
        self.cause = cause


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the global mean loss per labelled token, the input tokens, and the
    gradient norm before clipping."""

    loss: float
    tokens: int
    grad_norm: float
    # True when fp16 loss scaling found inf or NaN gradients and skipped the update; the scaler
    # then lowers its scale. This is loss scaling at work, not a diverged model.
    scaler_skipped: bool = False


def train_step(model, optimizer, scheduler, parameters, batches, settings,
               scaler: torch.amp.GradScaler | None = None, poison: bool = False) -> StepResult:
    """Run one optimizer step.

    Raises NonFiniteStepError before the optimizer changes any weight if the loss or the
    gradient norm is NaN or infinite. Both are the same on every process after the all-reduce,
    so all processes raise together. With an enabled fp16 `scaler`, a non-finite gradient norm
    is an overflow of the loss scale instead (training.precision.overflow_skipped): the update
    and the scheduler step are skipped and the result has `scaler_skipped` set. `poison`
    multiplies the loss by NaN (training.faults).
    """
    device = parameters[0].device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    # Under FSDP the backward pass reduces the gradients, as their mean over processes, which
    # the loss makes a sum again.
    sharded = isinstance(parameters[0], DTensor)
    sum_factor = distributed.world_size() if sharded else 1
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
    # The sharded module itself, also when `model` is its torch.compile wrapper.
    module = getattr(model, "_orig_mod", model)
    for index, item in enumerate(inputs):
        with parallel.gradient_sync(module, enabled=index == len(inputs) - 1):
            with autocast(device, settings.precision):
                logits = model(input_ids=item["input_ids"],
                               attention_mask=item["attention_mask"]).logits
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), item["labels"].reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            if poison:
                loss = loss * float("nan")
            scaler.scale(loss * sum_factor / max(labelled, 1.0)).backward()
        loss_sum += loss.detach()
    mean_loss = distributed.all_reduce_sum(loss_sum).item() / max(labelled, 1.0)
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStepError("training loss", mean_loss)
    if not sharded:
        all_reduce_gradients(parameters)
    # The summed gradients are unscaled before clipping, so maxGradNorm applies to the true
    # gradients, and every process finds the same overflow.
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
    grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    scaler_skipped = False
    if not math.isfinite(grad_norm):
        scaler_skipped = overflow_skipped(scaler)
        if not scaler_skipped:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStepError("gradient norm", grad_norm)
    scaler.step(optimizer)
    scaler.update()
    if not scaler_skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(mean_loss, int(tokens), grad_norm, scaler_skipped)


@dataclass
class PhaseState:
    """The counters a phase checkpoint carries besides the tensors."""

    step: int = 0
    # Global batches consumed: the steps, plus the steps skipped and the batches left behind
    # by a rollback (see local_micro_batches).
    data_step: int = 0
    loss: float = float("nan")
    tokens: int = 0
    # Steps skipped or rolled back because of a NaN or infinite loss or gradient norm.
    non_finite_steps: int = 0
    # fp16 steps whose update the loss scaler skipped after the scaled gradients overflowed.
    scaler_skipped_steps: int = 0

    @classmethod
    def from_checkpoint(cls, state: dict) -> PhaseState:
        # Checkpoints written before the nonFinite policies lack the newer counters.
        step = int(state["step"])
        return cls(step, int(state.get("dataStep", step)), float(state.get("loss", float("nan"))),
                   int(state.get("tokens", 0)), int(state.get("nonFiniteSteps", 0)),
                   int(state.get("scalerSkippedSteps", 0)))


def prepare(model, settings: LoopSettings, phase_dir: Path, resume: bool):
    """Return the optimizer, scheduler, loss scaler and state that a phase starts from.

    Loads the latest checkpoint if resuming, or else gives every process rank 0's weights.
    Under FSDP the model is sharded here (finetune.sharding), after the weights are the same
    on every process and before the optimizer is built on the shards.
    """
    saved = checkpoint.load_agreed(phase_dir) if resume else None
    if saved is None:
        distributed.broadcast_parameters(list(model.parameters()))
    sharding.shard(model, settings.strategy)
    optimizer, scheduler = build_optimizer(model, settings)
    device = next(model.parameters()).device
    scaler = precision.grad_scaler(device, settings.precision)
    if saved is None:
        return optimizer, scheduler, scaler, PhaseState()
    _restore_training_state(model, optimizer, scheduler, scaler, saved)
    _restore_rng(saved["rng"])
    return optimizer, scheduler, scaler, PhaseState.from_checkpoint(saved)


def _restore_training_state(model, optimizer, scheduler, scaler, state: dict) -> None:
    # The checkpoint's tensors are on the CPU; loading moves them to each parameter's device.
    sharding.restore(model, optimizer, state["trainable"], state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state.get("gradScaler"):
        scaler.load_state_dict(state["gradScaler"])


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

    `report(step, message, **metrics)` is called on rank 0 after every step. A step with a NaN
    or infinite loss or gradient norm is handled as `settings.non_finite` says, and either
    kind of failed step moves on to the next batch. Neither a skipped step nor an fp16 overflow
    counts towards `max_steps`, so the step count stays the number of optimizer updates.
    """
    torch.manual_seed(settings.seed)
    model.train()
    optimizer, scheduler, scaler, state = prepare(model, settings, phase_dir, resume)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if state.step == 0:
        seed_process(settings.seed)
    start = state.step
    # The compiled wrapper shares the model's parameters. Evaluation, checkpoints and rollback
    # use the model itself, so that predictions over sentences of every length do not
    # compile graphs of their own and state-dict keys stay without the `_orig_mod.` prefix.
    train_model = torch.compile(model) if settings.compile else model
    fault_steps = set(faults.fault_nan_steps())
    tokens_this_attempt, started = 0, time.monotonic()
    # Time in training steps only, so that saves and evaluations do not lower the token rate.
    step_seconds = 0.0
    while state.step < settings.max_steps:
        step = state.step + 1
        step_started = time.monotonic()
        batches = local_micro_batches(train.encoded, state.data_step, settings)
        poison = step in fault_steps
        fault_steps.discard(step)
        state.data_step += 1
        try:
            result = train_step(train_model, optimizer, scheduler, parameters, batches,
                                settings, scaler, poison)
        except NonFiniteStepError as error:
            message = recover(error, name, step, model, optimizer, scheduler, scaler,
                              phase_dir, state, settings)
            if distributed.is_main():
                report(state.step, message, nonFiniteSteps=state.non_finite_steps)
            continue
        if result.scaler_skipped:
            state.scaler_skipped_steps += 1
            message = (f"{name}: fp16 loss scale overflow in step {step}: the optimizer skipped "
                       f"the update and the loss scale fell to {scaler.get_scale():g}.")
            if distributed.is_main():
                log.info(message)
                report(state.step, message)
            continue
        # Only applied steps count, as their tokens do.
        step_seconds += time.monotonic() - step_started
        state.step, state.loss = step, result.loss
        state.tokens += result.tokens
        tokens_this_attempt += result.tokens
        if distributed.is_main():
            report(step, f"{name}: step {step}/{settings.max_steps}", loss=round(result.loss, 4),
                   tokensPerSecond=round(tokens_this_attempt / max(step_seconds, 1e-9), 1),
                   nonFiniteSteps=state.non_finite_steps)
        if step % settings.checkpoint_interval == 0 or step == settings.max_steps:
            save_checkpoint(model, optimizer, scheduler, scaler, phase_dir, state, settings)
        if validation and step % settings.eval_interval == 0 and step < settings.max_steps:
            scores, _ = evaluate(model, validation, settings)
            log.info("%s: validation F1 %.4f after step %d.", name, scores["f1"], step)
    return {
        "steps": settings.max_steps,
        "resumedFromStep": start,
        # None when no step ran and the checkpoint predates stored losses: JSON has no NaN.
        "finalLoss": state.loss if math.isfinite(state.loss) else None,
        "trainSeconds": round(time.monotonic() - started, 3),
        "tokensSeen": state.tokens,
        "nonFiniteSteps": state.non_finite_steps,
        "scalerSkippedSteps": state.scaler_skipped_steps,
    }


def recover(error: NonFiniteStepError, name: str, step: int, model, optimizer, scheduler,
            scaler, phase_dir: Path, state: PhaseState, settings: LoopSettings) -> str:
    """Apply `settings.non_finite` to a step that raised; return the progress message.

    Raises NonFiniteStepError, naming the phase and the step, when the policy is fail, when
    max_non_finite_steps earlier steps were already non-finite, or when a rollback finds no
    checkpoint. A rollback keeps the data position past the offending batch, so the batches
    between the checkpoint and the failed step are skipped rather than replayed into the
    same divergence, as in a PretrainJob.
    """
    quantity = f"{error.quantity} of {name} step {step}"
    if settings.non_finite == "fail":
        raise NonFiniteStepError(quantity, error.value) from error
    if state.non_finite_steps >= settings.max_non_finite_steps:
        raise NonFiniteStepError(quantity, error.value, cause="limit") from error
    state.non_finite_steps += 1
    if settings.non_finite == "skip":
        if distributed.is_main():
            log.warning("%s: skipped step %d: %s. The optimizer did not update the weights (%d "
                        "non-finite steps so far).", name, step, error, state.non_finite_steps)
        return f"{name}: non-finite step {step} (skip): {error}."
    saved = checkpoint.load_agreed(phase_dir)
    if saved is None:
        raise NonFiniteStepError(quantity, error.value, cause="no-checkpoint") from error
    _restore_training_state(model, optimizer, scheduler, scaler, saved)
    restored = PhaseState.from_checkpoint(saved)
    state.step, state.loss, state.tokens = restored.step, restored.loss, restored.tokens
    if distributed.is_main():
        log.warning("%s: rolled back to the checkpoint of step %d after %s; training continues "
                    "with the data after the offending batch (%d non-finite steps so far).",
                    name, restored.step, error, state.non_finite_steps)
    return (f"{name}: non-finite step {step} (rollback): {error}. Rolled back to the "
            f"checkpoint of step {restored.step}.")


def save_checkpoint(model, optimizer, scheduler, scaler: torch.amp.GradScaler, phase_dir: Path,
                    state: PhaseState, settings: LoopSettings) -> None:
    """Save the phase's state. Collective call: rank 0 writes the RNG states of all."""
    rng_states = distributed.all_gather_object(rng_state())
    # Collective under FSDP, where rank 0 alone receives the gathered values.
    trainable = sharding.trainable_state(model)
    optimizer_state = sharding.optimizer_state(model, optimizer)
    if distributed.is_main():
        saved = {
            "step": state.step,
            "dataStep": state.data_step,
            "trainable": trainable,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_states,
            "loss": state.loss,
            "tokens": state.tokens,
            "nonFiniteSteps": state.non_finite_steps,
            "scalerSkippedSteps": state.scaler_skipped_steps,
            # An fp16 run's loss scale, so that a resume does not start the search over.
            "gradScaler": scaler.state_dict() if scaler.is_enabled() else None,
        }
        checkpoint.save(phase_dir, state.step, saved, settings.keep_checkpoints)
    # Other processes wait, so none races ahead and reads a half-written checkpoint on resume.
    distributed.barrier()
