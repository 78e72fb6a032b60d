"""The FineTune stage: adapt a pretrained decoder to token classification (NER) and report
what the domain pretraining bought.

Inputs: the base model (a PretrainJob's `model/`, or `spec.baseModel.uri`) with its tokenizer,
and CoNLL task data. Steps, each skipped on `--resume` when a previous attempt finished it:

1. Fine-tune the base model with LoRA adapters (or in full, `spec.method`), evaluate it on the
   test split, and write `model/` (adapters merged into the weights, tokenizer files,
   `id2label`), `adapter/` (LoRA only) and `test_predictions.jsonl`.
2. With `spec.compareFromScratch`, train the same architecture from random initialization, in
   full, with the same data and settings, and evaluate it the same way.
3. Write `report.json` with both evaluations and the manifest.

Runs as one process or under `torchrun` (see `finetune.distributed`); only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from lathe.api.finetune import FineTuneSpec
from lathe_trainer.corpus.sniff import conll_mismatch_message, format_mismatch
from lathe_trainer.finetune import checkpoint, distributed, sharding
from lathe_trainer.finetune.data import (
    TaskDataError,
    encode_sentences,
    label_list,
    read_sentences,
    words_split_at_serving,
)
from lathe_trainer.finetune.metrics import predict
from lathe_trainer.finetune.model import (
    BaseModelError,
    apply_lora,
    check_targets_match,
    from_scratch,
    label_maps,
    label_subtoken_for,
    load_pretrained,
    load_tokenizer,
    lora_targets,
    merge_lora,
    save_adapter,
)
from lathe_trainer.finetune.train import (
    LoopSettings,
    NonFiniteStepError,
    Split,
    evaluate,
    run_phase,
)
from lathe_trainer.serving.decoding import LABEL_SUBTOKEN_KEY
from lathe_trainer.serving.reference import position_limit
from lathe_trainer.training import activations, precision
from lathe_trainer.training import checkpoint as training_checkpoint
from lathe_trainer.stage import (
    ProgressReporter,
    StageConfig,
    StageError,
    local_path,
    resolve_data_path,
    write_manifest,
)

log = logging.getLogger(__name__)

SCRATCH = "scratch"
SCORE_KEYS = ("precision", "recall", "f1")


def run(config: StageConfig, resume: bool) -> dict:
    spec = FineTuneSpec.model_validate(config.spec)
    distributed.setup(spec.distributed.backend)
    try:
        return run_stage(config, spec, resume)
    finally:
        distributed.teardown()


def run_stage(config: StageConfig, spec: FineTuneSpec, resume: bool) -> dict:
    output = local_path(config.output_uri)
    model_dir = base_model_dir(config, spec)
    splits = read_splits(config, spec)
    split_at_serving = warn_on_serving_split(splits)
    labels = label_list(*splits.values())
    tokenizer = load_base(config, spec, lambda: load_tokenizer(model_dir))
    base_config = read_base_config(model_dir)
    check_max_length(config, spec, base_config)
    check_precision(config, spec)
    warn_on_world_size(spec)
    label_subtoken = label_subtoken_for(base_config.get("model_type"))
    log.info("The stage labels the %s sub-token of each word.", label_subtoken)
    # Checkpoints trained on the other sub-token (by an earlier release, which labelled the
    # first) must not be resumed, so the labelled sub-token is part of their key.
    resume = prepare_output(config, output, resume, f"{config.resume_key}/{label_subtoken}")

    settings = LoopSettings.from_spec(spec.training, tokenizer.pad_token_id, label_maps(labels)[0],
                                      spec.distributed.strategy)
    encoded = {name: encode_split(tokenizer, sentences, labels, spec, label_subtoken)
               for name, sentences in splits.items()}
    phases = 2 if spec.compare_from_scratch else 1
    reporter = ProgressReporter(config, total=phases * spec.training.max_steps) \
        if distributed.is_main() else None

    tuned = finetune_phase(config, spec, model_dir, tokenizer, labels, encoded, settings,
                           output, resume, reporter, label_subtoken)
    scratch = None
    if spec.compare_from_scratch:
        scratch = scratch_phase(config, spec, model_dir, labels, encoded, settings, output,
                                resume, reporter)
    report = build_report(spec, model_dir, labels, splits, encoded, tuned, scratch)
    report["labelSubtoken"] = label_subtoken
    report["wordsSplitAtServing"] = split_at_serving
    metrics = summary_metrics(spec, report)
    if distributed.is_main():
        (output / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        reporter.update(phases * spec.training.max_steps, "finished", f1=metrics["f1"])
        # report.json records training time, the resume step and the base model's local
        # path, which differ between runs that train the same weights.
        write_manifest(config, metrics, run_records=("report.json",))
        log.info("FineTune finished with test F1 %.4f.", metrics["f1"])
    return metrics


def base_model_dir(config: StageConfig, spec: FineTuneSpec) -> Path:
    """Return the Hugging Face model directory to start from, checking that it exists."""
    if "baseModel" in config.inputs:
        item = config.inputs["baseModel"]
        directory = local_path(item.uri) / "model"
        field = "spec.baseModel.pretrainJobRef"
        source = f"the input baseModel ({item.kind} {item.name!r} at {item.uri})"
    elif spec.base_model.uri:
        directory = resolve_data_path(config, spec.base_model.uri)
        field = "spec.baseModel.uri"
        source = f"spec.baseModel.uri {spec.base_model.uri!r}"
    else:
        raise StageError(
            config, "spec.baseModel", "no base model was resolved; set spec.baseModel.uri or "
            "reference a finished PretrainJob in spec.baseModel.pretrainJobRef."
        )
    if not (directory / "config.json").is_file():
        raise StageError(
            config, field, f"{source} has no Hugging Face model at {directory} (config.json is "
            "missing); finish the PretrainJob first or point at a model directory."
        )
    return directory


def read_splits(config: StageConfig, spec: FineTuneSpec) -> dict[str, list]:
    """Read the train, validation (if set) and test splits, capped by the spec's limits."""
    fields = {"train": spec.data.train, "validation": spec.data.validation,
              "test": spec.data.test}
    splits = {}
    for name, relative in fields.items():
        if relative is None:
            continue
        limit = spec.max_train_sentences if name == "train" else spec.max_eval_sentences
        path = resolve_data_path(config, relative)
        guess = format_mismatch(path, spec.data.format) if path.is_file() else None
        if guess is not None:
            raise StageError(config, f"spec.data.{name}", conll_mismatch_message(path, guess))
        try:
            splits[name] = read_sentences(path, limit)
        except TaskDataError as error:
            where = ("" if "://" in relative or relative.startswith("/") else
                     f" (relative paths resolve against the data directory {config.data_dir})")
            raise StageError(
                config, f"spec.data.{name}",
                f"{relative!r} cannot be used: {error}; fix the file or the path{where}.",
            ) from error
    check_entity_types(config, spec, splits)
    return splits


def check_entity_types(config: StageConfig, spec: FineTuneSpec, splits: dict[str, list]) -> None:
    """Raise StageError when validation or test tags an entity type that train never tags.

    The model cannot learn such a type, so every one of its entities is a missed entity, and a
    mistyped tag (`B-Diseas`) would add a class and lower F1 without any other sign.
    """
    trained = {tag[2:] for _, tags in splits["train"] for tag in tags if tag != "O"}
    for name in ("validation", "test"):
        for number, (_, tags) in enumerate(splits.get(name, []), start=1):
            unseen = sorted({tag[2:] for tag in tags if tag != "O"} - trained)
            if not unseen:
                continue
            capped = (f", or raise maxTrainSentences ({spec.max_train_sentences}) if the "
                      "type occurs later in the train file" if spec.max_train_sentences else "")
            raise StageError(
                config, f"spec.data.{name}",
                f"sentence {number} of {getattr(spec.data, name)!r} has the entity type "
                f"{unseen[0]!r}, which no sentence of the train split "
                f"({spec.data.train!r}) has, so the model cannot learn it; fix the tag, or "
                f"add training sentences of that type{capped}.",
            )


def warn_on_serving_split(splits: dict[str, list]) -> dict[str, int]:
    """Log the words that serving would split, and return how many distinct ones each split has."""
    counts = {}
    for name, sentences in splits.items():
        words = words_split_at_serving(sentences)
        counts[name] = len(words)
        if words and distributed.is_main():
            log.warning(
                "%d distinct words of the %s split are not one word as serving splits text "
                "(a run of letters, digits and _, or one other character), for example %s. "
                "The served model sees each as several words, so its tags can differ from the "
                "test figures; split such words into separate CoNLL tokens.",
                len(words), name, words[:5],
            )
    return counts


def load_base(config: StageConfig, spec: FineTuneSpec, loader):
    """Call a loader of the base model, turning BaseModelError into a StageError."""
    try:
        return loader()
    except BaseModelError as error:
        field = "spec.baseModel.pretrainJobRef" if "baseModel" in config.inputs \
            else "spec.baseModel.uri"
        raise StageError(config, field, f"{error}.") from error


def read_base_config(model_dir: Path) -> dict:
    """Return the contents of the base model's config.json, or {} when it cannot be read,
    because loading the model then reports the missing or broken file."""
    try:
        base = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return base if isinstance(base, dict) else {}


def check_max_length(config: StageConfig, spec: FineTuneSpec, base: dict) -> None:
    """Raise StageError when spec.maxLength is above the base model's maximum positions.

    `lathe validate` makes the same check, but in a cluster the stage is the first to read the
    base model. A config without a position limit (t5) passes.
    """
    limit = position_limit(base)
    if limit is not None and spec.max_length > limit:
        raise StageError(
            config, "spec.maxLength",
            f"{spec.max_length} is above the maximum positions {limit} of the base model, so "
            f"longer sentences would run past the positions it was built for; set maxLength "
            f"to at most {limit}.",
        )


def warn_on_world_size(spec: FineTuneSpec) -> None:
    # On GPU nodes, one process runs per GPU, in a cluster and under lathe run alike
    # (lathe.plans.base.WorkloadPlan.processes_per_node).
    per_node = spec.resources.gpus or spec.distributed.procs_per_node
    expected = spec.distributed.nodes * per_node
    if distributed.world_size() != expected:
        # The global batch scales with the number of processes, so the run differs from the spec.
        log.warning(
            "The spec asks for %d processes but %d are running; the global batch is %d "
            "sentences per step.", expected, distributed.world_size(),
            distributed.world_size() * spec.training.micro_batch_size
            * spec.training.gradient_accumulation_steps,
        )


def prepare_output(config: StageConfig, output: Path, resume: bool, resume_key: str) -> bool:
    """Create the output directory and return whether the run resumes.

    A run resumes only with --resume and from checkpoints written under `resume_key`.
    Otherwise the checkpoints of earlier runs are removed, so no finished phase of another spec
    or other inputs is reused.
    """
    checkpoints = output / "checkpoints"
    if distributed.is_main():
        same_run = training_checkpoint.written_for(checkpoints, resume_key)
        if resume and not same_run:
            log.info("The checkpoints under %s were written for another spec or other inputs, "
                     "so the stage starts over.", checkpoints)
        resume = resume and same_run
        output.mkdir(parents=True, exist_ok=True)
        if not resume:
            shutil.rmtree(checkpoints, ignore_errors=True)
        training_checkpoint.record_resume_key(checkpoints, resume_key)
    resume = distributed.broadcast_object(resume)
    distributed.barrier()
    return resume


def encode_split(tokenizer, sentences, labels, spec: FineTuneSpec, label_subtoken: str) -> Split:
    label2id = label_maps(labels)[1]
    encoded = encode_sentences(tokenizer, sentences, label2id, spec.max_length, label_subtoken)
    return Split(encoded, [words for words, _ in sentences], [tags for _, tags in sentences])


def progress_callback(reporter, offset: int, phase: str = ""):
    """Return the `report` function of one phase. `phase` ("1 of 2") is added to the message,
    because the progress share counts the steps of every phase."""
    def report(step: int, message: str, **metrics) -> None:
        if reporter is not None:
            text = f"{message} (phase {phase})" if phase else message
            reporter.update(offset + step, text, **metrics)
    return report


def train_phase(config: StageConfig, spec: FineTuneSpec, *args) -> dict:
    """Run `run_phase(*args)`, turning a NaN or infinite step that the loop did not recover
    from into a permanent StageError.

    The step that raised was not applied, so no checkpoint and no model contains its weights.
    """
    training = spec.training
    try:
        return run_phase(*args)
    except NonFiniteStepError as error:
        if error.cause == "limit":
            raise StageError(
                config, "spec.training.maxNonFiniteSteps",
                f"training stopped: {error}, and {training.max_non_finite_steps} earlier steps "
                f"were already non-finite (the limit is {training.max_non_finite_steps}). Lower "
                f"learningRate (now {training.learning_rate}) or check the data, then run "
                "again; raise maxNonFiniteSteps only if such steps are expected.",
            ) from error
        if error.cause == "no-checkpoint":
            raise StageError(
                config, "spec.training.nonFinite",
                f"training stopped: {error}, and there is no checkpoint to roll back to. Lower "
                f"spec.training.checkpointInterval (now {training.checkpoint_interval}) so that "
                "one exists, or set spec.training.nonFinite to skip.",
            ) from error
        raise StageError(
            config, "spec.training.learningRate",
            f"training stopped: {error}, so the step was not applied and no weights were "
            f"saved from it. Lower learningRate (now {training.learning_rate}) or raise "
            f"warmupSteps (now {training.warmup_steps}), then run again; or set "
            "spec.training.nonFinite to skip or rollback.",
        ) from error


def finetune_phase(config, spec, model_dir, tokenizer, labels, encoded, settings, output,
                   resume, reporter, label_subtoken) -> dict:
    """Fine-tune the base model, evaluate it and write model/ (and adapter/ for LoRA)."""
    phase_dir = output / "checkpoints" / spec.method
    finished = checkpoint.read_result(phase_dir) if resume else None
    if finished is not None and (output / "model" / "config.json").is_file():
        log.info("The %s phase finished in an earlier attempt; reusing its result.", spec.method)
        return finished

    def build(for_training: bool) -> torch.nn.Module:
        model = load_base(config, spec, lambda: load_pretrained(model_dir, labels))
        model.config.pad_token_id = tokenizer.pad_token_id
        # Serving reads the labelled sub-token from config.json (lathe_trainer.serving.reference).
        setattr(model.config, LABEL_SUBTOKEN_KEY, label_subtoken)
        if for_training:
            enable_gradient_checkpointing(model, spec)
        if spec.method == "lora":
            model = wrap_lora(config, spec, model)
        return model.to(distributed.device())

    torch.manual_seed(spec.training.seed)
    model = build(for_training=True)
    stats = train_phase(config, spec, spec.method, model, encoded["train"],
                        encoded.get("validation"), settings, phase_dir, resume,
                        progress_callback(reporter, 0,
                                          "1 of 2" if spec.compare_from_scratch else ""))
    # Merging LoRA weights and saving need whole tensors.
    model = sharding.unsharded(model, lambda: build(for_training=False))
    scores, predicted = evaluate(model, encoded["test"], settings)
    result = {**scores, **stats}
    result.update(save_model(model, spec, tokenizer, encoded["test"], predicted, settings, output))
    if distributed.is_main():
        write_predictions(output / "test_predictions.jsonl", encoded["test"], predicted)
        checkpoint.write_result(phase_dir, result)
    distributed.barrier()
    return result


def check_precision(config: StageConfig, spec: FineTuneSpec) -> None:
    """Reject bf16 on a GPU without it before the base model and the data load."""
    problem = precision.check_supported(distributed.device(), spec.training.precision)
    if problem:
        raise StageError(config, "spec.training.precision",
                         f"{spec.training.precision!r} cannot run here: {problem}; set fp32.")


def enable_gradient_checkpointing(model, spec: FineTuneSpec) -> None:
    """Apply spec.training.gradientCheckpointing; call it before any LoRA wrapping."""
    if spec.training.gradient_checkpointing:
        activations.enable_activation_checkpointing(model)
        # A tagger keeps no key-value cache. Left on, transformers warns on each forward pass
        # under checkpointing, which breaks a compiled graph on every step.
        model.config.use_cache = False


def wrap_lora(config, spec, model):
    lora = spec.lora
    try:
        targets = lora_targets(model, lora.target_modules)
        check_targets_match(model, targets)
    except BaseModelError as error:
        raise StageError(config, "spec.lora.targetModules", f"{error}.") from error
    try:
        model = apply_lora(model, lora.r, lora.alpha, lora.dropout, targets)
    except ValueError as error:
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear)})
        raise StageError(
            config, "spec.lora.targetModules", f"{targets} cannot be adapted ({error}). Linear "
            f"layers of this model: {names}."
        ) from error
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA trains %d of %d parameters (adapters and the task head).", trainable, total)
    return model


def save_model(model, spec, tokenizer, test: Split, predicted, settings, output) -> dict:
    """Write adapter/ (LoRA) and model/ (merged); check that merging kept the predictions.

    Returns figures for the report: how many test words the merged model tags differently.
    """
    if spec.method == "lora":
        if distributed.is_main():
            save_adapter(model, output / "adapter")
        model = merge_lora(model)
    merged_predicted = predict(model, test.encoded, settings.micro_batch_size * 4,
                               settings.pad_token_id, settings.id2label)
    changed = sum(a != b for before, after in zip(predicted, merged_predicted)
                  for a, b in zip(before, after))
    if changed:
        log.warning("The merged model tags %d test words differently from the adapter model.",
                    changed)
    if distributed.is_main():
        model.save_pretrained(output / "model")
        # Hugging Face's record of the longest input the model was trained for; serving tags
        # longer texts in windows of this length.
        tokenizer.model_max_length = spec.max_length
        tokenizer.save_pretrained(output / "model")
    return {"mergedWordsChanged": changed}


def write_predictions(path: Path, test: Split, predicted: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for words, gold, tags in zip(test.words, test.gold, predicted):
            record = {"words": words, "gold": gold, "predicted": tags}
            handle.write(json.dumps(record) + "\n")


def scratch_phase(config, spec, model_dir, labels, encoded, settings, output, resume,
                  reporter) -> dict:
    """Train the same architecture from random initialization, in full, and evaluate it."""
    phase_dir = output / "checkpoints" / SCRATCH
    finished = checkpoint.read_result(phase_dir) if resume else None
    if finished is not None:
        log.info("The from-scratch phase finished in an earlier attempt; reusing its result.")
        return finished
    torch.manual_seed(spec.training.seed)
    model = from_scratch(model_dir, labels)
    enable_gradient_checkpointing(model, spec)
    model.to(distributed.device())
    stats = train_phase(config, spec, SCRATCH, model, encoded["train"],
                        encoded.get("validation"), settings, phase_dir, resume,
                        progress_callback(reporter, spec.training.max_steps, "2 of 2"))
    scores, _ = evaluate(model, encoded["test"], settings)
    result = {**scores, **stats}
    if distributed.is_main():
        checkpoint.write_result(phase_dir, result)
    distributed.barrier()
    return result


def build_report(spec, model_dir, labels, splits, encoded, tuned, scratch) -> dict:
    report = {
        "task": spec.task,
        "method": spec.method,
        "baseModel": str(model_dir),
        "labels": labels,
        "processes": distributed.world_size(),
        "sentences": {name: len(sentences) for name, sentences in splits.items()},
        "truncatedSentences": {
            name: sum(item.truncated for item in split.encoded) for name, split in encoded.items()
        },
        "maxLength": spec.max_length,
        # The precision of the training steps. Evaluation and the test figures run in fp32.
        "trainingPrecision": spec.training.precision,
        "strategy": spec.distributed.strategy,
        "test": tuned,
        # An all-`O` tagger finds no entity, so its entity-level F1 is 0.
        "allOutsideBaselineF1": 0.0,
    }
    if scratch is not None:
        report["fromScratch"] = scratch
        report["f1GainFromPretraining"] = tuned["f1"] - scratch["f1"]
    return report


def summary_metrics(spec, report: dict) -> dict:
    tuned = report["test"]
    metrics = {key: tuned[key] for key in SCORE_KEYS}
    metrics.update(method=spec.method, steps=tuned["steps"], trainSentences=report["sentences"]
                   ["train"], testSentences=report["sentences"]["test"],
                   trainingPrecision=report["trainingPrecision"], strategy=report["strategy"])
    if "fromScratch" in report:
        metrics["fromScratch"] = {key: report["fromScratch"][key] for key in SCORE_KEYS}
        metrics["f1GainFromPretraining"] = report["f1GainFromPretraining"]
    # Steps that nonFinite skip or rollback recovered from, over both phases. A phase result
    # written before the policies has no count.
    phases = [tuned, report.get("fromScratch") or {}]
    metrics["nonFiniteSteps"] = sum(phase.get("nonFiniteSteps", 0) for phase in phases)
    return metrics
