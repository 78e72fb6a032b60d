"""Models of the FineTune stage: the pretrained base with a token-classification head, its LoRA
wrapping, and the same architecture from random initialization for the comparison.

The base is a decoder-only causal LM in Hugging Face format (a PretrainJob's `model/`).
`AutoModelForTokenClassification` loads its body and adds a new linear head: `score` for Llama,
`classifier` for GPT-2. The head is new, so under LoRA it must train in full: it is passed to
peft as `modules_to_save`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.pytorch_utils import Conv1D

from lathe.api.finetune import DEFAULT_LORA_TARGETS

log = logging.getLogger(__name__)



class BaseModelError(ValueError):
    """A base model that cannot be used; the stage turns it into a StageError naming the input."""


def label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    return dict(enumerate(labels)), {label: index for index, label in enumerate(labels)}


def load_tokenizer(model_dir: Path):
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise BaseModelError(f"the tokenizer in {model_dir} cannot be loaded ({error})") from error
    if tokenizer.pad_token_id is None:
        # Padded positions are masked out and carry the ignored label, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def head_names(model: torch.nn.Module) -> list[str]:
    """Return the top-level modules with parameters outside the pretrained body: the task head."""
    body = getattr(model, model.base_model_prefix)
    return [
        name
        for name, child in model.named_children()
        if child is not body and any(True for _ in child.parameters())
    ]


def load_pretrained(model_dir: Path, labels: list[str]) -> torch.nn.Module:
    """Load the base model's body under a new token-classification head.

    Raises BaseModelError when any body weight is missing from the checkpoint, because the
    stage would then fine-tune a partly random model and report it as pretrained.
    """
    id2label, label2id = label_maps(labels)
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=id2label, label2id=label2id,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as error:
        raise BaseModelError(
            f"{model_dir} cannot be loaded as a token classifier ({error})"
        ) from error
    heads = head_names(model)
    missing = sorted(
        key for key in info["missing_keys"] if key.split(".")[0] not in heads
    )
    if missing or info["mismatched_keys"]:
        raise BaseModelError(
            f"the checkpoint in {model_dir} lacks body weights {missing[:5]} or has mismatched "
            f"shapes {sorted(info['mismatched_keys'])[:5]}; point at a complete model"
        )
    return model


def from_scratch(model_dir: Path, labels: list[str]) -> torch.nn.Module:
    """Build the base model's architecture, with its head, from random initialization."""
    id2label, label2id = label_maps(labels)
    config = AutoConfig.from_pretrained(
        model_dir, num_labels=len(labels), id2label=id2label, label2id=label2id
    )
    return AutoModelForTokenClassification.from_config(config)


def adaptable_layers(model: torch.nn.Module) -> list[str]:
    """Return the distinct last names of the layers that LoRA can adapt, outside the task head.

    These are the linear, GPT-2 `Conv1D` and embedding layers, the module types peft adapts,
    and the names that spec.lora.targetModules takes.
    """
    heads = set(head_names(model))
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name.split(".")[0] not in heads
        and isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding))
    })


def config_layers(config: PretrainedConfig) -> list[str]:
    """Return adaptable_layers of the token classifier built from config, without weights.

    The model is built on the meta device, so no memory is allocated for the weights and any
    size costs about the same.
    """
    config = copy.deepcopy(config)
    config.num_labels = 3  # O, B- and I- of one entity type; the head's size does not matter
    with torch.device("meta"):
        model = AutoModelForTokenClassification.from_config(config)
    return adaptable_layers(model)


def lora_targets(model: torch.nn.Module, requested: list[str]) -> list[str]:
    """Return the module names to adapt: the request, or the architecture's attention layers."""
    if requested:
        return requested
    model_type = model.config.model_type
    if model_type not in DEFAULT_LORA_TARGETS:
        raise BaseModelError(
            f"there are no default LoRA targets for model type {model_type!r}; set "
            f"spec.lora.targetModules to some of its layers: {adaptable_layers(model)}"
        )
    return DEFAULT_LORA_TARGETS[model_type]


def apply_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: list[str]):
    """Wrap the model with LoRA adapters; the task head trains in full (`modules_to_save`)."""
    config = LoraConfig(
        task_type="TOKEN_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=targets, modules_to_save=head_names(model),
    )
    return get_peft_model(model, config)


def merge_lora(model: PeftModel) -> torch.nn.Module:
    """Fold the adapters into the weights and return the plain transformers model."""
    return model.merge_and_unload()
