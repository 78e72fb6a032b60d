"""Checks between resources that `lathe validate` and `lathe run` make before anything runs.

Each rule compares a resource with one it references, so neither the API models nor the CRD's
CEL rules, which see one object, can check it. Without these checks the stage that breaks the
rule fails after its upstream stages ran, which can be hours later:

- a PretrainJob with masked language modelling (bert) needs `<mask>` among its Tokenizer's
  special tokens;
- a FineTune with LoRA and no spec.lora.targetModules needs a base architecture that has default
  targets (lathe.api.finetune.DEFAULT_LORA_TARGETS);
- each name in a FineTune's spec.lora.targetModules must match a module of the base model, by
  peft's rule (lathe_trainer.finetune.model.unmatched_targets), and only modules that LoRA can
  wrap (unsupported_targets);
- a FineTune's spec.maxLength must fit its base model's maximum positions;
- a ModelDeployment's spec.export.checkSequenceLengths must fit the model's maximum positions,
  and its spec.export.windowStride must leave new text in a window (the FineTune's maxLength).

A reference to a resource that is not among those given is skipped here, because
lathe.graph.order reports it first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lathe.api import FineTune, ModelDeployment, PretrainJob, Resource, Tokenizer
from lathe.api.finetune import DEFAULT_LORA_TARGETS
from lathe.api.tokenizer import MASK_TOKEN
from lathe.errors import InvalidResourceError
from lathe.graph import upstream_key
from lathe.preflight import is_local, resolve
from lathe_trainer.serving.decoding import largest_stride
from lathe_trainer.serving.reference import POSITION_KEYS, config_max_positions, position_limit

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ResolvedBaseModel:
    """A FineTune's base model: its type and maximum positions, as the files given show them."""

    model_type: str | None
    max_positions: int
    # The source of the figures, for messages: "PretrainJob 'lm'" or the config.json path.
    origin: str
    pretrain_job: PretrainJob | None = None
    config_file: Path | None = None
    # False for a config that names no maximum positions (t5), whose max_positions is a default.
    position_limit: bool = True

    def classifier(self) -> torch.nn.Module | None:
        """Return the token classifier that the FineTune stage builds on this base, without
        weights, or None when the config cannot be built. Imports torch and transformers, so it
        costs seconds."""
        from lathe_trainer.finetune.model import meta_classifier

        if self.pretrain_job is not None:
            from lathe_trainer.pretrain.model import architecture_config

            # Any vocabulary size and token ids give the same layer names.
            special = {"vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0,
                       "pad_token_id": 1}
            return meta_classifier(architecture_config(self.pretrain_job.spec.model, special))
        from transformers import AutoConfig

        try:
            # ValueError also covers a model type with no token classifier.
            return meta_classifier(AutoConfig.from_pretrained(self.config_file.parent))
        except (OSError, ValueError, KeyError):
            return None

    def layers(self) -> list[str] | None:
        """Return the layer names that spec.lora.targetModules takes, or None when the config
        cannot be built."""
        from lathe_trainer.finetune.model import adaptable_layers

        model = self.classifier()
        return None if model is None else adaptable_layers(model)


def check_references(resources: list[Resource], data_dir: Path,
                     upstream: Iterable[Resource] = ()) -> None:
    """Raise InvalidResourceError for the first resource that does not fit what it references.

    `upstream` holds referenced resources that are not checked themselves.
    """
    by_key = {resource.key: resource for resource in [*upstream, *resources]}
    for resource in resources:
        match resource:
            case PretrainJob():
                _check_mask_token(resource, by_key)
            case FineTune():
                # Resolved once, because it reads the base model's config.json.
                base = base_model(resource, by_key, data_dir)
                if base is not None:
                    _check_lora_targets(resource, base)
                    _check_max_length(resource, base)
            case ModelDeployment():
                _check_export_lengths(resource, by_key, data_dir)


def _referenced(resource: Resource, by_key: dict[str, Resource], kind: str,
                name: str) -> Resource | None:
    return by_key.get(upstream_key(resource, kind, name))


def _check_mask_token(job: PretrainJob, by_key: dict[str, Resource]) -> None:
    if job.spec.model.training_objective() != "maskedLM":
        return
    tokenizer = _referenced(job, by_key, "Tokenizer", job.spec.tokenizer_ref.name)
    if not isinstance(tokenizer, Tokenizer) or MASK_TOKEN in tokenizer.spec.special_tokens:
        return
    architecture = job.spec.model.architecture
    raise InvalidResourceError(
        tokenizer.label, "spec.specialTokens",
        f"{tokenizer.spec.special_tokens!r} has no mask token {MASK_TOKEN!r}, which "
        f"PretrainJob {job.metadata.name!r} needs for masked language modelling (its "
        f"spec.model.architecture is {architecture}); add {MASK_TOKEN!r} to specialTokens, or "
        "give the PretrainJob architecture llama, gpt2 or t5.",
    )


def base_model(finetune: FineTune, by_key: dict[str, Resource],
               data_dir: Path) -> ResolvedBaseModel | None:
    """Return the FineTune's base model from its PretrainJob or its local config.json, or None
    when neither is available."""
    reference = finetune.spec.base_model.pretrain_job_ref
    if reference is not None:
        job = _referenced(finetune, by_key, "PretrainJob", reference.name)
        if not isinstance(job, PretrainJob):
            return None
        model = job.spec.model
        key = POSITION_KEYS[model.architecture]
        config = {key: model.dimensions().max_position_embeddings} if key else {}
        return ResolvedBaseModel(model.architecture, config_max_positions(config),
                         f"PretrainJob {job.metadata.name!r}", pretrain_job=job,
                         position_limit=bool(key))
    uri = finetune.spec.base_model.uri
    if not uri or not is_local(uri):
        return None
    config_file = resolve(uri, data_dir) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # check_files reports a missing config.json, the FineTune a broken one
    if not isinstance(config, dict):
        return None
    model_type = config.get("model_type")
    return ResolvedBaseModel(model_type if isinstance(model_type, str) else None,
                     config_max_positions(config), f"'{config_file}'", config_file=config_file,
                     position_limit=position_limit(config) is not None)


def _check_lora_targets(finetune: FineTune, base: ResolvedBaseModel) -> None:
    if finetune.spec.method != "lora":
        return
    if finetune.spec.lora.target_modules:
        _check_targets_match(finetune, base)
        return
    if base.model_type is None or base.model_type in DEFAULT_LORA_TARGETS:
        return
    layers = base.layers()
    fix = (f"set it to some of the model's layers: {layers}" if layers
           else "set it to names of the model's linear or embedding layers")
    raise InvalidResourceError(
        finetune.label, "spec.lora.targetModules",
        f"is empty, and there are no default LoRA targets for model type {base.model_type!r} "
        f"(the base model, from {base.origin}); {fix}.",
    )


def _check_targets_match(finetune: FineTune, base: ResolvedBaseModel) -> None:
    """Raise InvalidResourceError for target names that match no module of the base, as the
    FineTune stage would."""
    from lathe_trainer.finetune.model import BaseModelError, check_targets_match

    model = base.classifier()
    if model is None:
        return
    try:
        check_targets_match(model, finetune.spec.lora.target_modules,
                            f"the base model (from {base.origin})")
    except BaseModelError as error:
        raise InvalidResourceError(finetune.label, "spec.lora.targetModules",
                                   f"{error}.") from None


def _check_max_length(finetune: FineTune, base: ResolvedBaseModel) -> None:
    if not base.position_limit or finetune.spec.max_length <= base.max_positions:
        return
    fix = f"set maxLength to at most {base.max_positions}"
    if base.pretrain_job is not None:
        fix += f", or raise spec.model.maxPositionEmbeddings of {base.origin}"
    raise InvalidResourceError(
        finetune.label, "spec.maxLength",
        f"{finetune.spec.max_length} is above the maximum positions {base.max_positions} of the "
        f"base model (from {base.origin}), so longer sentences would run past the positions it "
        f"was built for; {fix}.",
    )


def _check_window_stride(deployment: ModelDeployment, finetune: FineTune,
                         base: ResolvedBaseModel) -> None:
    stride = deployment.spec.export.window_stride
    window = min(finetune.spec.max_length, base.max_positions)
    # Each window starts with the bos token, which a PretrainJob's tokenizer always has. Other
    # base models may have none, so only a stride that is too long either way is rejected here.
    largest = largest_stride(window, bos=base.pretrain_job is not None)
    if stride is None or stride <= largest:
        return
    raise InvalidResourceError(
        deployment.label, "spec.export.windowStride",
        f"{stride} leaves no new text in a window of {window} tokens (spec.maxLength of "
        f"FineTune {finetune.metadata.name!r}); set it to at most {largest}, or leave it "
        "unset for a quarter of the window.",
    )


def _check_export_lengths(deployment: ModelDeployment, by_key: dict[str, Resource],
                          data_dir: Path) -> None:
    finetune = _referenced(deployment, by_key, "FineTune",
                           deployment.spec.model.fine_tune_ref.name)
    if not isinstance(finetune, FineTune):
        return
    base = base_model(finetune, by_key, data_dir)
    if base is None:
        return
    _check_window_stride(deployment, finetune, base)
    lengths = deployment.spec.export.check_sequence_lengths
    too_long = [length for length in lengths if length > base.max_positions]
    if not too_long:
        return
    origin = base.origin
    fix = f"use lengths of at most {base.max_positions}"
    if base.pretrain_job is not None and POSITION_KEYS[base.model_type]:
        fix += f", or raise spec.model.maxPositionEmbeddings of {base.origin}"
    elif base.pretrain_job is not None:
        origin += (f"; a {base.model_type} config names no maximum positions, so the export "
                   f"uses {base.max_positions}")
    raise InvalidResourceError(
        deployment.label, "spec.export.checkSequenceLengths",
        f"{lengths} includes {', '.join(map(str, too_long))}, above the maximum positions "
        f"{base.max_positions} of the model of FineTune {finetune.metadata.name!r} (from "
        f"{origin}), so the export would fail; {fix}.",
    )
