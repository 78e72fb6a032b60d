"""Models of the FineTune stage: the pretrained base with a token-classification head, its LoRA
wrapping, and the same architecture from random initialization for the comparison.

The base is a decoder-only causal LM in Hugging Face format (a PretrainJob's `model/`).
`AutoModelForTokenClassification` loads its body and adds a new linear head: `score` for Llama,
`classifier` for GPT-2. The head is new, so under LoRA it must train in full: it is passed to
peft as `modules_to_save`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

log = logging.getLogger(__name__)

# Default LoRA targets per architecture (`model_type`): the attention projections and the token
# embeddings. NB: the embeddings matter for NER on small models. On a 64-wide, 2-layer Llama
# pretrained for 300 steps, 200 steps (rank 16, learning rate 1e-2) on 2,000 NCBI-disease
# sentences gave test F1 0.01 with attention-only adapters, 0.0 for a head-only linear probe,
# and 0.30 with `embed_tokens` added (peft 0.21, 2-core CPU, first 200 test sentences).
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"],
    "gpt2": ["c_attn", "c_proj", "wte"],
}


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


def lora_targets(model: torch.nn.Module, requested: list[str]) -> list[str]:
    """Return the module names to adapt: the request, or the architecture's attention layers."""
    if requested:
        return requested
    model_type = model.config.model_type
    if model_type not in DEFAULT_LORA_TARGETS:
        raise BaseModelError(
            f"there are no default LoRA targets for model type {model_type!r}; set "
            "spec.lora.targetModules"
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
