"""PretrainJob stage workload: `torchrun ... -m lathe_trainer pretrain --config FILE`.

Runs once per process. Every rank tokenizes and packs the Corpus output the same way, builds
the same model from the seeded RNG, and trains its share of each batch under DDP or FSDP
(spec.distributed.strategy, world size > 1) or alone (a plain `python -m`). Rank 0 alone
reports progress, serves the Prometheus gauges and writes checkpoints, the final Hugging Face
model, metrics.json and, last, the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from lathe.api.pretrain import PretrainJobSpec
from lathe_trainer import remote
from lathe_trainer.pretrain import curriculum, inputs
from lathe_trainer.pretrain.curriculum import CurriculumStage
from lathe_trainer.pretrain.data import (
    DataPosition,
    MalformedCorpusError,
    PackedSplit,
    SequenceSampler,
    TokenizedSplit,
    pack,
    tokenize_split,
    validation_batches,
)
from lathe_trainer.pretrain.loop import (
    NonFiniteLossError,
    StepResult,
    TrainState,
    evaluate,
    optimizer_groups,
    train_step,
)
from lathe_trainer.pretrain.model import (
    FlopsEstimate,
    build_model,
    model_config,
    parameter_count,
)
from lathe_trainer.pretrain.objectives import MaskedLM, Objective
from lathe_trainer.stage import (
    MANIFEST,
    ProgressReporter,
    StageConfig,
    StageError,
    local_path,
    write_manifest,
)
from lathe_trainer.training import (
    activations,
    attention,
    checkpoint,
    distributed,
    faults,
    flops,
    parallel,
    precision,
    schedule,
    storage,
)
from lathe_trainer.training.distributed import DistributedContext
from lathe_trainer.training.loss import loss_function
from lathe_trainer.training.metrics import METRICS, perplexity, write_json
from lathe_trainer.training.schedule import build_scheduler
from lathe_trainer.training.telemetry import Telemetry

log = logging.getLogger(__name__)

MODEL_DIR = "model"
# The file of a Hugging Face model folder that from_pretrained reads first.
MODEL_CONFIG = "config.json"
# The folder of the token files in the node's scratch directory (lathe_trainer.remote).
TOKEN_CACHE = "tokens"
# How long the processes of faster nodes wait for the slowest node to tokenize the corpus.
TOKENIZE_WAIT = timedelta(hours=2)
# beta2 = 0.95, a common choice for language-model pretraining, adapts to loss spikes faster
# than the 0.999 default.
ADAM_BETAS = (0.9, 0.95)
LOG_EVERY_STEPS = 10


def run(config: StageConfig, resume: bool) -> dict[str, Any]:
    spec = inputs.parse_spec(config)
    context = distributed.setup(spec.distributed.backend)
    try:
        return _run(config, spec, context, resume)
    finally:
        distributed.teardown(context)


def _run(
    config: StageConfig, spec: PretrainJobSpec, context: DistributedContext, resume: bool
) -> dict[str, Any]:
    output = local_path(config.output_uri)
    output.mkdir(parents=True, exist_ok=True)
    if context.is_main:
        # The manifest marks a finished output. One left by an earlier run must not vouch for
        # the model and metrics that this run is about to replace.
        (output / MANIFEST).unlink(missing_ok=True)
    tokenizer, tokenizer_dir = inputs.load_tokenizer(config)
    architecture = model_config(spec.model, tokenizer)
    objective = inputs.build_objective(config, spec, tokenizer, architecture.vocab_size)
    stages, validation, corpus_tokens = _load_splits(config, spec, tokenizer, context)

    training = spec.training
    # The same seed on every rank gives every rank the same initial weights.
    torch.manual_seed(training.seed)
    random.seed(training.seed + context.rank)
    model = build_model(architecture).to(context.device)
    # The objectives draw their masks and spans from torch's global generator, which must
    # differ per rank, or every rank would corrupt the same positions of its sequences. The
    # offset of one keeps rank 0 from replaying the draws that initialized the weights. A
    # checkpoint stores each rank's generator state, so a resumed run draws as before.
    torch.manual_seed(training.seed + 1 + context.rank)
    flops_estimate = FlopsEstimate.of(model)
    _check_precision(config, spec, context)
    if context.device.type == "cpu" and training.precision != "fp32":
        attention.use_cpu_attention(model)
    if training.gradient_checkpointing:
        activations.enable_activation_checkpointing(model)
    # FSDP shards the parameters in place, so the optimizer must be built after the wrapping.
    train_module = parallel.wrap(model, context, spec.distributed.strategy,
                                 compile=training.compile)
    # The fused kernel updates all parameters in one pass. On the CPU the default loops over one
    # tensor at a time: 3.4% of a step in a py-spy profile of benchmarks/trainer.py, 1.5% fused.
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, training.weight_decay), lr=training.learning_rate,
        betas=ADAM_BETAS, fused=True,
    )
    scheduler = build_scheduler(optimizer, training.warmup_steps, training.max_steps)

    checkpoints = _checkpoint_root(config, spec, output)
    compatibility = _compatibility(spec, architecture)
    state = TrainState()
    if resume and not _same_run(config, context, checkpoints):
        if context.is_main:
            log.info("The checkpoints under %s were written for another spec or other inputs, "
                     "so training starts from step 0.", checkpoints)
        resume = False
    if resume:
        state = _restore(config, spec, context, checkpoints, compatibility, model, optimizer,
                         scheduler)
    elif context.is_main and checkpoint.list_checkpoints(checkpoints):
        log.info("Removing the checkpoints of an earlier run from %s: training starts from "
                 "step 0.", checkpoints)
        checkpoint.remove_all(checkpoints)
    distributed.barrier(context)

    trainer = _Trainer(config, spec, context, model, optimizer, scheduler, stages, validation,
                       checkpoints, compatibility, state, objective, train_module=train_module,
                       flops_estimate=flops_estimate)
    resumed_from = state.step
    try:
        validation_loss = trainer.train()
    finally:
        trainer.telemetry.close()
    metrics = _metrics(spec, trainer.stage, validation, state, resumed_from, validation_loss,
                       model)
    metrics.update(_compute_metrics(model, flops_estimate, trainer.stage, corpus_tokens))
    metrics["objective"] = spec.model.training_objective()
    if spec.curriculum is not None:
        metrics["curriculumStage"] = trainer.stage.index
        metrics["curriculumStages"] = [
            {**stage.describe(), "flopsPerToken": flops_estimate.per_token(stage.sequence_length)}
            for stage in stages
        ]
    metrics.update(trainer.telemetry.summary())
    metrics["nonFiniteSteps"] = state.non_finite_steps
    metrics["scalerSkippedSteps"] = state.scaler_skipped_steps
    metrics["precision"] = training.precision
    metrics["strategy"] = spec.distributed.strategy
    metrics["compiled"] = training.compile
    metrics["attentionImplementation"] = model.config._attn_implementation
    metrics["gradientCheckpointing"] = training.gradient_checkpointing
    # Gathering the FSDP shards is a collective, so every rank takes part.
    model_state = parallel.full_model_state_dict(model)
    if context.is_main:
        _write_model(output, model, tokenizer_dir, model_state, _mask_token(tokenizer, objective))
        if training.artifact_uri:
            _publish_model(output / MODEL_DIR, training.artifact_uri)
        write_json(output / METRICS, metrics)
    distributed.barrier(context)
    if context.local_rank == 0:
        # Every process of the node is past the barrier and reads no token file any more.
        shutil.rmtree(token_cache(config), ignore_errors=True)
        try:
            token_cache(config).parent.rmdir()  # the scratch directory, unless staging uses it
        except OSError:
            pass
    if context.is_main:
        # metrics.json records speed, memory and the resume step as well as the model's
        # figures, and so differs between runs that train the same weights.
        write_manifest(config, metrics, run_records=(METRICS,))
    log.info("Rank %d finished after step %d with final loss %s.", context.rank, state.step,
             metrics["finalLoss"])
    return metrics


def _load_splits(
    config: StageConfig,
    spec: PretrainJobSpec,
    tokenizer: PreTrainedTokenizerFast,
    context: DistributedContext,
) -> tuple[list[CurriculumStage], PackedSplit | None, int]:
    """Pack the train split per curriculum stage and the validation split at sequenceLength.

    Returns the stages, the validation split and the train split's token count.
    """
    corpus = inputs.corpus_uri(config)
    name = config.inputs["corpus"].name
    cache = token_cache(config)
    try:
        tokenized = tokenize_split(tokenizer, corpus, "train", cache)
        validation = pack(tokenize_split(tokenizer, corpus, "validation", cache),
                          spec.sequence_length)
    except MalformedCorpusError as error:
        raise StageError(
            config, "spec.corpusRef",
            f"the output of Corpus {name!r} is malformed: {error}. Run the Corpus again.",
        ) from error
    # Every node tokenizes on its own, and a slower node may finish long after the others,
    # later than the next collective would wait.
    distributed.wait_for_all(context, TOKENIZE_WAIT)
    stages = curriculum.build_stages(spec, tokenized)
    for stage in stages:
        _check_stage_fills_batch(config, spec, context, stage, tokenized)
    if not len(validation):
        log.warning("The validation split of Corpus %r fills no sequence of %d tokens, so no "
                    "validation loss is reported.", name, spec.sequence_length)
        validation = None
    if context.is_main:
        for stage in stages:
            log.info("Curriculum stage %d (to step %d): packed %d train documents (%d tokens) "
                     "into %d sequences of %d tokens.", stage.index, stage.until_step,
                     stage.train.documents, stage.train.tokens, len(stage.train),
                     stage.sequence_length)
    return stages, validation, tokenized.tokens


def token_cache(config: StageConfig) -> Path:
    """Return the node-local directory of the corpus's token files (pretrain.data)."""
    return remote.scratch_dir(config) / TOKEN_CACHE


def _check_stage_fills_batch(
    config: StageConfig,
    spec: PretrainJobSpec,
    context: DistributedContext,
    stage: CurriculumStage,
    tokenized: TokenizedSplit,
) -> None:
    global_batch = spec.training.micro_batch_size * context.world_size
    train = stage.train
    if len(train) >= global_batch:
        return
    name = config.inputs["corpus"].name
    field, fix = "spec.corpusRef", "add data or lower spec.sequenceLength"
    if spec.curriculum is not None:
        field = f"spec.curriculum.stages[{stage.index}]"
        fix = "add data, lower the stage's sequenceLength or minQuality"
    raise StageError(
        config, field,
        f"the train split of Corpus {name!r} packs into {len(train)} sequences of "
        f"{stage.sequence_length} tokens ({train.tokens} tokens in {train.documents} of "
        f"{tokenized.documents} documents, minimum quality {stage.min_quality}), fewer "
        f"than one micro-batch of {spec.training.micro_batch_size} on each of "
        f"{context.world_size} processes; {fix} or spec.training.microBatchSize.",
    )


def _compatibility(spec: PretrainJobSpec, architecture: PretrainedConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the spec to be resumed."""
    model = {
        "architecture": spec.model.architecture,
        "objective": spec.model.training_objective(),
        **asdict(spec.model.dimensions()),
    }
    compatibility = {
        "model": model,
        "sequenceLength": spec.sequence_length,
        "vocabSize": architecture.vocab_size,
        "strategy": spec.distributed.strategy,
    }
    if spec.curriculum is not None:
        compatibility["curriculum"] = spec.curriculum.model_dump(mode="json", by_alias=True)
    return compatibility


# The spec field behind each compatibility key whose name is not spec.<key>, and the value a
# checkpoint written before the key existed implies.
_COMPATIBILITY_FIELDS = {"vocabSize": "spec.tokenizerRef",
                         "strategy": "spec.distributed.strategy"}
_COMPATIBILITY_DEFAULTS = {"strategy": "ddp"}


def _check_precision(config: StageConfig, spec: PretrainJobSpec,
                     context: DistributedContext) -> None:
    problem = precision.check_supported(context.device, spec.training.precision)
    if problem:
        raise StageError(config, "spec.training.precision",
                         f"{spec.training.precision!r} cannot run here: {problem}; use fp16 or "
                         "fp32.")


def _checkpoint_root(config: StageConfig, spec: PretrainJobSpec, output: Path) -> Path | str:
    """Return where checkpoints go: under spec.training.artifactUri, else under the output.

    An output on an object store is written to a local copy (lathe_trainer.remote), but its
    checkpoints go to the object store itself. So every node of a run resumes or rolls back from
    the same checkpoint, not from the copy it downloaded at the start.
    """
    uri = spec.training.artifact_uri
    if uri:
        try:
            storage.resolve(uri)
        except ValueError as error:
            raise StageError(config, "spec.training.artifactUri", str(error)) from error
    else:
        # The remote output, which lathe_trainer.remote already opened to stage it.
        uri = config.staged_from.get(config.output_uri)
    if not uri:
        return output / checkpoint.CHECKPOINTS
    return f"{uri.rstrip('/')}/{checkpoint.CHECKPOINTS}"


def _same_run(config: StageConfig, context: DistributedContext,
              checkpoints: Path | str) -> bool:
    """Return whether the checkpoints were written under this run's resume key, on every rank.

    The all-reduce makes every rank read the key before rank 0 may remove the checkpoints.
    """
    same = checkpoint.written_for(checkpoints, config.resume_key)
    (others,) = distributed.all_reduce_sum(context, [0.0 if same else 1.0])
    return others == 0


def _compute_metrics(
    model: PreTrainedModel, flops_estimate: FlopsEstimate, stage: CurriculumStage,
    corpus_tokens: int,
) -> dict[str, int]:
    """Return the model's size and compute figures next to the corpus size.

    With a curriculum, the FLOPs per token are those of the last stage's sequence length.
    """
    parameters = model.num_parameters()
    return {
        "parameterCount": parameters,
        "flopsPerToken": flops_estimate.per_token(stage.sequence_length),
        "computeOptimalTokens": flops.compute_optimal_tokens(parameters),
        "corpusTokens": corpus_tokens,
    }


def _restore(
    config: StageConfig,
    spec: PretrainJobSpec,
    context: DistributedContext,
    checkpoints: Path,
    compatibility: dict[str, Any],
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> TrainState:
    saved = checkpoint.load_agreed(checkpoints, context)
    if saved is None:
        log.info("No readable checkpoint under %s, so training starts from step 0.",
                 checkpoints)
        return TrainState()
    latest = saved.path
    _check_compatible(config, saved, compatibility, checkpoints)
    if saved.step > spec.training.max_steps:
        # The operator passes --resume to every attempt, so the fix must not need a flag.
        raise StageError(
            config, "spec.training.maxSteps",
            f"{spec.training.max_steps} is below the step of the latest checkpoint "
            f"({saved.step}, {latest}); raise maxSteps to at least {saved.step}, or delete "
            f"the checkpoints after step {spec.training.max_steps} under {checkpoints} to "
            "continue from an earlier one.",
        )
    configured = schedule.configured_hyperparameters(optimizer)
    parallel.load_full_state_dicts(model, optimizer, saved.model, saved.optimizer)
    scheduler.load_state_dict(saved.scheduler)
    schedule.restore_configured(optimizer, scheduler, configured)
    if len(saved.rng) == context.world_size:
        checkpoint.restore_rng_state(saved.rng[context.rank])
    else:
        log.warning("The checkpoint contains RNG states of %d processes but this run has %d, "
                    "so the RNG streams restart from the seed.", len(saved.rng),
                    context.world_size)
    if context.is_main:
        log.info("Resuming from %s at step %d of %d.", latest, saved.step,
                 spec.training.max_steps)
    return TrainState.from_dict(saved.state["train"])


def _check_compatible(
    config: StageConfig, saved: checkpoint.Checkpoint, compatibility: dict[str, Any],
    checkpoints: Path | str,
) -> None:
    stored = saved.state.get("compatibility", {})
    for key, value in compatibility.items():
        before = stored.get(key, _COMPATIBILITY_DEFAULTS.get(key))
        if before != value:
            raise StageError(
                config, _COMPATIBILITY_FIELDS.get(key, f"spec.{key}"),
                f"the checkpoint {saved.path} was trained with {key}={before!r}, the "
                f"spec now gives {value!r}; restore the earlier value, or delete the "
                f"checkpoints under {checkpoints} to start over.",
            )


def _check_fsdp_validation(
    config: StageConfig, spec: PretrainJobSpec, available: int, world_size: int
) -> None:
    """Reject an FSDP run in which some process would have no validation sequence.

    A sharded forward pass is a collective, so a process without a batch could not join the
    evaluation, and the others would wait for it until the collective timeout.
    """
    used = min(spec.eval_sequences, available)
    if used >= world_size:
        return
    if spec.eval_sequences < world_size:
        raise StageError(
            config, "spec.evalSequences",
            f"{spec.eval_sequences} validation sequences leave some of the {world_size} FSDP "
            f"processes without one; raise evalSequences to at least {world_size}.",
        )
    raise StageError(
        config, "spec.corpusRef",
        f"the validation split fills {available} sequences of {spec.sequence_length} tokens, "
        f"fewer than the {world_size} FSDP processes, each of which needs one; give the Corpus "
        "a larger validation split, or lower spec.sequenceLength.",
    )


class _Trainer:
    """The step loop with its periodic evaluation, checkpointing and progress reports."""

    def __init__(self, config, spec, context, model, optimizer, scheduler, stages, validation,
                 checkpoints, compatibility, state, objective: Objective, *,
                 train_module: torch.nn.Module, flops_estimate: FlopsEstimate):
        self.config = config
        self.spec = spec
        self.training = spec.training
        self.context = context
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        # This run's settings from the spec, which a rollback must keep: the checkpoint it
        # loads may come from a run with another learningRate or weightDecay.
        self.configured = schedule.configured_hyperparameters(optimizer)
        self.stages = stages
        self.stage = curriculum.stage_for_step(stages, state.step)
        self.objective = objective
        self.checkpoints = checkpoints
        self.compatibility = compatibility
        self.state = state
        self.saved_step = state.step if state.step else None
        self.validation_batches = []
        if validation is not None and parallel.is_sharded(model):
            _check_fsdp_validation(config, spec, len(validation), context.world_size)
        if validation is not None:
            # A fixed generator gives every evaluation the same masks and spans, so the
            # validation losses of a run compare, and evaluating leaves the training RNG alone.
            generator = torch.Generator().manual_seed(self.training.seed)
            self.validation_batches = [
                objective.prepare(batch, generator)
                for batch in validation_batches(
                    validation, self.training.micro_batch_size, context.rank,
                    context.world_size, spec.eval_sequences,
                )
            ]
        self.reporter = ProgressReporter(config, total=self.training.max_steps)
        self.train_module = train_module
        self.scaler = precision.grad_scaler(context.device, self.training.precision)
        if state.grad_scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(state.grad_scaler)
        self.fault_steps = set(faults.fault_nan_steps())
        self.loss_function = loss_function(self.training.compile)
        self.flops_estimate = flops_estimate
        self.telemetry = Telemetry(
            context, self.training.precision,
            flops_estimate.per_token(self.stage.sequence_length),
            {"namespace": config.namespace, "kind": config.kind, "name": config.name},
        )
        self.meter = self.telemetry.meter

    def train(self) -> float | None:
        """Run the remaining steps and return the final validation loss."""
        model = self.train_module
        model.train()
        sampler = self._sampler()
        self._report(message=f"Starting at step {self.state.step}.")
        while self.state.step < self.training.max_steps:
            completed = self.state.step
            sampler = self._step(model, sampler)
            # A skipped step leaves the count as it was and a rollback lowers it. Neither
            # finished a new step, so neither evaluates, saves or enters a stage again.
            if completed < self.state.step < self.training.max_steps:
                sampler = self._after_step(sampler)
        if self.saved_step != self.state.step:
            self._save()
        return self._evaluate()

    def _after_step(self, sampler: SequenceSampler) -> SequenceSampler:
        """Enter the next stage, evaluate and save as the new step count calls for.

        Returns the sampler for the next step.
        """
        step = self.state.step
        if step == self.stage.until_step:
            sampler = self._next_stage()
        if step % self.training.eval_interval == 0:
            self._evaluate()
        if step % self.training.checkpoint_interval == 0:
            self._save()
        return sampler

    def _sampler(self) -> SequenceSampler:
        return SequenceSampler(
            len(self.stage.train), self.training.micro_batch_size, self.context.rank,
            self.context.world_size, self.stage.seed(self.training.seed), self.state.position,
        )

    def _enter_stage(self, stage: CurriculumStage) -> None:
        self.stage = stage
        # The attention FLOPs grow with the sequence length, which each stage may change.
        # NOTE: until the throughput window (training.metrics.ThroughputMeter) holds only steps
        # of the new stage, MFU applies these FLOPs to the tokens per second of both stages.
        self.telemetry.flops_per_token = self.flops_estimate.per_token(stage.sequence_length)

    def _next_stage(self) -> SequenceSampler:
        """Enter the next curriculum stage at the start of its data, before any checkpoint."""
        self._enter_stage(curriculum.stage_for_step(self.stages, self.state.step))
        self.state.position = DataPosition()
        message = (f"Curriculum stage {self.stage.index} starts after step {self.state.step}: "
                   f"sequences of {self.stage.sequence_length} tokens from documents of "
                   f"quality at least {self.stage.min_quality}.")
        if self.context.is_main:
            log.info(message)
        self._report(message=message)
        return self._sampler()

    def _step(self, model: torch.nn.Module, sampler: SequenceSampler) -> SequenceSampler:
        """Run one step, or recover from a non-finite one, and return the sampler to go on with.

        The sampler is a new one when a rollback returned to an earlier curriculum stage.
        """
        state = self.state
        self.meter.start_step()
        try:
            result = train_step(
                self.context, model, self.optimizer, self.scheduler, sampler,
                self.stage.train.sequences, self.training.gradient_accumulation_steps,
                self.training.max_grad_norm, self.training.precision, state.step + 1,
                objective=self.objective, scaler=self.scaler,
                poison=self._take_fault(state.step + 1), loss_function=self.loss_function,
            )
        except NonFiniteLossError as error:
            return self._recover(error, sampler)
        if result.scaler_skipped:
            self._skip_overflow(result, sampler)
        else:
            self._record(result, sampler)
        return sampler

    def _take_fault(self, step: int) -> bool:
        # Each injected fault fires once, so a skipped or rolled-back step can succeed on retry.
        if step not in self.fault_steps:
            return False
        self.fault_steps.discard(step)
        return True

    def _recover(self, error: NonFiniteLossError, sampler: SequenceSampler) -> SequenceSampler:
        """Apply spec.training.nonFinite to a step whose loss or gradient norm is not finite.

        A skipped step does not count towards maxSteps: the same step number is tried again
        with the next batch, so the step count stays the number of optimizer updates.
        Returns the sampler to go on with.
        """
        state = self.state
        policy = self.training.non_finite
        latest = f"step {self.saved_step}" if self.saved_step else "none yet"
        if policy != "fail" and state.non_finite_steps >= self.training.max_non_finite_steps:
            raise StageError(
                self.config, "spec.training.maxNonFiniteSteps",
                f"training stopped: {error}, and {state.non_finite_steps} earlier steps were "
                f"already non-finite (the limit is {self.training.max_non_finite_steps}). "
                f"Latest checkpoint: {latest}. Lower learningRate (now "
                f"{self.training.learning_rate}) or check the data, then run again; raise "
                "maxNonFiniteSteps only if such steps are expected.",
            ) from error
        if policy == "fail":
            raise StageError(
                self.config, "spec.training.learningRate",
                f"training stopped: {error}, so the step was not applied and no weights were "
                f"saved from it (latest checkpoint: {latest}). Lower "
                f"learningRate (now {self.training.learning_rate}) or raise warmupSteps (now "
                f"{self.training.warmup_steps}), then run again; or set "
                "spec.training.nonFinite to skip or rollback.",
            ) from error
        state.non_finite_steps += 1
        message = f"Non-finite step {error.step} ({policy}): {error}."
        if policy == "rollback":
            sampler = self._rollback(error, sampler)
            message += f" Rolled back to the checkpoint of step {state.step}."
        elif self.context.is_main:
            log.warning("Skipped step %d: %s. The optimizer did not update the weights "
                        "(%d non-finite steps so far).", error.step, error,
                        state.non_finite_steps)
        state.position = sampler.position
        self.meter.started = None
        self._report(message=message)
        return sampler

    def _skip_overflow(self, result: StepResult, sampler: SequenceSampler) -> None:
        """Account for an fp16 step whose scaled gradients overflowed.

        The loss scaler skipped the optimizer update and lowered the scale, and the learning-rate
        schedule did not advance. As with a skipped non-finite step, the same step number is
        tried again with the next batch, so the step count stays the number of optimizer updates
        that the schedule follows. Early overflows are normal while the scale settles, so they
        count towards neither maxSteps nor maxNonFiniteSteps.
        """
        state = self.state
        state.scaler_skipped_steps += 1
        state.position = sampler.position
        self.meter.started = None
        message = (f"fp16 loss scale overflow in step {state.step + 1}: the optimizer skipped "
                   f"the update and the loss scale fell to {self.scaler.get_scale():g}.")
        if self.context.is_main:
            log.info("%s Loss %.4f, gradient norm %s.", message, result.loss, result.grad_norm)
        self._report(message=message)

    def _rollback(self, error: NonFiniteLossError, sampler: SequenceSampler) -> SequenceSampler:
        """Reload the latest checkpoint's weights and counters, and return the sampler to use.

        Within one curriculum stage the sampler stays past the offending batch, so the batches
        between the checkpoint and the failed step are skipped rather than replayed into the
        same divergence. A checkpoint of an earlier stage brings that stage back with the
        checkpoint's data position, because the current position belongs to the later stage.
        """
        saved = checkpoint.load_agreed(self.checkpoints, self.context)
        if saved is None:
            raise StageError(
                self.config, "spec.training.nonFinite",
                f"training stopped: {error}, and there is no checkpoint to roll back to. Lower "
                "spec.training.checkpointInterval so that one exists, or set "
                "spec.training.nonFinite to skip.",
            ) from error
        latest = saved.path
        parallel.load_full_state_dicts(self.model, self.optimizer, saved.model, saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        schedule.restore_configured(self.optimizer, self.scheduler, self.configured)
        restored = TrainState.from_dict(saved.state["train"])
        if restored.grad_scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(restored.grad_scaler)
        state = self.state
        state.step = restored.step
        state.tokens_seen = restored.tokens_seen
        state.last_loss = restored.last_loss
        stage = curriculum.stage_for_step(self.stages, restored.step)
        if stage.index == self.stage.index:
            if self.context.is_main:
                log.warning("Rolled back to %s (step %d) after %s; training continues with "
                            "the data after the offending batch.", latest, restored.step, error)
            return sampler
        self._enter_stage(stage)
        state.position = restored.position
        if self.context.is_main:
            log.warning("Rolled back to %s (step %d) after %s; curriculum stage %d continues "
                        "from the checkpoint's data position.", latest, restored.step, error,
                        stage.index)
        return self._sampler()

    def _record(self, result: StepResult, sampler: SequenceSampler) -> None:
        state = self.state
        self.meter.end_step(result.tokens)
        state.step += 1
        state.tokens_seen += result.tokens
        state.last_loss = result.loss
        if state.first_loss is None:
            state.first_loss = result.loss
        state.position = sampler.position
        self.telemetry.step_done(state.step, result.loss)
        self._report(learningRate=result.learning_rate, gradNorm=result.grad_norm)
        if self.context.is_main and (state.step % LOG_EVERY_STEPS == 0 or state.step == 1):
            log.info("Step %d/%d: loss %.4f, %.0f tokens/s, learning rate %.2e.", state.step,
                     self.training.max_steps, result.loss, self.meter.tokens_per_second or 0.0,
                     result.learning_rate)

    def _evaluate(self) -> float | None:
        loss = evaluate(self.context, self.model, self.validation_batches,
                        self.training.precision)
        if loss is not None and not math.isfinite(loss):
            # JSON, and so the progress file, metrics.json and status, has no NaN or infinity.
            if self.context.is_main:
                log.warning("Step %d: the validation loss is %s, so no validation figures are "
                            "reported; lower learningRate if the training loss grows too.",
                            self.state.step, loss)
            return None
        if loss is not None:
            self._report(validationLoss=loss, validationPerplexity=perplexity(loss))
            if self.context.is_main:
                log.info("Step %d: validation loss %.4f, perplexity %.2f.", self.state.step,
                         loss, perplexity(loss))
        return loss

    def _save(self) -> None:
        if self.scaler.is_enabled():
            self.state.grad_scaler = self.scaler.state_dict()
        state = {"train": self.state.to_dict(), "compatibility": self.compatibility,
                 checkpoint.STATE_RESUME_KEY: self.config.resume_key}
        try:
            checkpoint.save(self.context, self.checkpoints, self.state.step, state, self.model,
                            self.optimizer, self.scheduler, self.training.keep_checkpoints)
        except checkpoint.NonFiniteWeightsError as error:
            raise StageError(
                self.config, "spec.training.learningRate",
                f"training stopped: {error}. Lower learningRate (now "
                f"{self.training.learning_rate}), then run again.",
            ) from error
        self.saved_step = self.state.step

    def _report(self, message: str = "", **extra: Any) -> None:
        if not self.context.is_main:
            return
        remaining = self.training.max_steps - self.state.step
        if self.spec.curriculum is not None:
            extra["curriculumStage"] = self.stage.index
        eta_seconds = self.meter.eta_seconds(remaining)
        # The operator reads these from rank 0's metrics port when it cannot read the progress
        # file in the artifact store (lathe.k8s.progress).
        self.telemetry.export(total_steps=self.training.max_steps, eta_seconds=eta_seconds,
                              tokens_seen=self.state.tokens_seen,
                              non_finite_steps=self.state.non_finite_steps,
                              curriculum_stage=extra.get("curriculumStage"))
        self.reporter.update(
            self.state.step,
            message=message,
            loss=self.state.last_loss,
            tokensPerSecond=self.meter.tokens_per_second,
            etaSeconds=eta_seconds,
            tokensSeen=self.state.tokens_seen,
            epoch=self.state.position.epoch,
            nonFiniteSteps=self.state.non_finite_steps,
            mfu=self.telemetry.mfu,
            **extra,
        )


def _metrics(
    spec: PretrainJobSpec,
    stage: CurriculumStage,
    validation: PackedSplit | None,
    state: TrainState,
    resumed_from: int,
    validation_loss: float | None,
    model: PreTrainedModel,
) -> dict[str, Any]:
    return {
        "steps": state.step,
        "newSteps": state.step - resumed_from,
        "resumedFromStep": resumed_from or None,
        "firstLoss": state.first_loss,
        "finalLoss": state.last_loss,
        "validationLoss": validation_loss,
        "validationPerplexity": None if validation_loss is None else perplexity(validation_loss),
        "tokensSeen": state.tokens_seen,
        "parameterCount": parameter_count(model),
        # With a curriculum, the epochs and train figures are those of the last stage.
        "epochs": state.position.epoch + state.position.cursor / len(stage.train),
        "trainSequences": len(stage.train),
        "trainDocuments": stage.train.documents,
        "validationSequences": 0 if validation is None else len(validation),
        "skippedDocuments": {"train": stage.train.skipped,
                             "validation": {} if validation is None else validation.skipped},
        "sequenceLength": spec.sequence_length,
    }


def _mask_token(tokenizer: PreTrainedTokenizerFast, objective: Objective) -> str | None:
    """Return the mask token that masked LM trained with, or None for the other objectives."""
    if not isinstance(objective, MaskedLM):
        return None
    return tokenizer.convert_ids_to_tokens(objective.mask_id)


def _write_model(
    output: Path, model: PreTrainedModel, tokenizer_dir: Path, state_dict: dict[str, Any],
    mask_token: str | None = None,
) -> None:
    """Write model/ in Hugging Face format with the tokenizer files, replacing it whole.

    `state_dict` is the full (gathered) one, so a sharded FSDP model saves whole weights.
    `mask_token` is written into tokenizer_config.json, because the Tokenizer output may list
    it only as a special token, and the fill-mask pipeline needs `tokenizer.mask_token`.
    """
    final = output / MODEL_DIR
    tmp = output / (MODEL_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # transformers 5 saves the weights as model.safetensors by default.
    model.save_pretrained(tmp, state_dict=state_dict)
    for path in inputs.tokenizer_files(tokenizer_dir):
        shutil.copy2(path, tmp / path.name)
    if mask_token is not None:
        config_path = tmp / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        tokenizer_config["mask_token"] = mask_token
        config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    log.info("Wrote the final model and tokenizer to %s.", final)


def _publish_model(local_model: Path, artifact_uri: str) -> None:
    """Copy model/ to `<artifactUri>/model` under a temporary name, then move it into place."""
    filesystem, base = storage.resolve(artifact_uri)
    final = f"{base}/{MODEL_DIR}"
    tmp = f"{base}/.tmp-{MODEL_DIR}-{os.getpid()}"
    if filesystem.exists(tmp):
        storage.remove_tree(filesystem, tmp)
    filesystem.makedirs(tmp, exist_ok=True)
    for path in sorted(local_model.iterdir()):
        filesystem.put_file(str(path), f"{tmp}/{path.name}")
    if filesystem.exists(final):
        # On an object store the model is copied file by file. config.json goes first and
        # comes back last, so a folder that a crash left half copied has none, and
        # from_pretrained rejects it instead of loading part of a model.
        if filesystem.exists(f"{final}/{MODEL_CONFIG}"):
            filesystem.rm(f"{final}/{MODEL_CONFIG}")
        storage.remove_tree(filesystem, final)
    storage.move_tree(filesystem, tmp, final, last=MODEL_CONFIG)
    log.info("Published the final model to %s.", storage.display(filesystem, final))
