"""Models of the FineTune stage: the pretrained base with a token-classification head, its LoRA
wrapping, and the same architecture from random initialization for the comparison.

The base is a decoder-only causal LM in Hugging Face format (a PretrainJob's `model/`).
`AutoModelForTokenClassification` loads its body and adds a new linear head: `score` for Llama,
`classifier` for GPT-2. The head is new, so under LoRA it must train in full: it is passed to
peft as `modules_to_save`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from lathe.api.finetune import DEFAULT_LORA_TARGETS
from lathe.api.pretrain import OBJECTIVES
from lathe_trainer.serving.decoding import FIRST_SUBTOKEN, LAST_SUBTOKEN

if TYPE_CHECKING:
    from peft import PeftModel

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
    # transformers logs a table of the LM head left out and the task head added, with terminal
    # colour codes, from every process. The missing keys are checked below instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=id2label, label2id=label2id,
            output_loading_info=True,
            # Training keeps fp32 weights and autocasts to bf16 or fp16, whatever the dtype the
            # base was stored in: the fp16 loss scaler cannot unscale fp16 gradients.
            dtype=torch.float32,
        )
    except (OSError, ValueError, KeyError) as error:
        raise BaseModelError(
            f"{model_dir} cannot be loaded as a token classifier ({error})"
        ) from error
    finally:
        hf_logging.set_verbosity(verbosity)
    heads = head_names(model)
    missing = sorted(
        key for key in info["missing_keys"] if key.split(".")[0] not in heads
    )
    if missing or info["mismatched_keys"]:
        raise BaseModelError(
            f"the checkpoint in {model_dir} lacks body weights {missing[:5]} or has mismatched "
            f"shapes {sorted(info['mismatched_keys'])[:5]}; point at a complete model"
        )
    log.info("Loaded the pretrained body from %s; the new head %s starts from random weights.",
             model_dir, ", ".join(heads))
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


def label_subtoken_for(model_type: str | None) -> str:
    """Return the sub-token of a word that carries its label for a base of `model_type`.

    A causal model labels the last, because only the last has seen the whole word. A model
    type counts as causal when it is a PretrainJob decoder (llama, gpt2) or when transformers
    builds causal LMs but no masked LMs of it (mistral, qwen2, and so on). Types with both,
    such as bert or roberta, are encoders, and T5 has neither. Every other model labels the
    first. `lathe_trainer.finetune.data` gives the figures.
    """
    causal = OBJECTIVES.get(model_type) == "causalLM" or (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    return LAST_SUBTOKEN if causal else FIRST_SUBTOKEN


def meta_classifier(config: PretrainedConfig) -> torch.nn.Module:
    """Build the token classifier that the stage loads for config, without weights.

    The model is built on the meta device, so no memory is allocated for the weights and any
    size costs about the same. Raises ValueError for a model type with no token classifier.
    """
    config = copy.deepcopy(config)
    config.num_labels = 3  # O, B- and I- of one entity type; the head's size does not matter
    with torch.device("meta"):
        return AutoModelForTokenClassification.from_config(config)


def config_layers(config: PretrainedConfig) -> list[str]:
    """Return adaptable_layers of the token classifier built from config, without weights."""
    return adaptable_layers(meta_classifier(config))


def unmatched_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Return the targets that match no module of the model, in the order given.

    A module matches a target when its full name equals the target or ends with `.<target>`.
    This is peft's rule for a list of targets (check_target_module_exists in
    peft.tuners.tuners_utils, peft 0.21), and peft raises only when no target matches at
    all, so a misspelt name among valid ones would be ignored without this check.
    """
    names = [name for name, _ in model.named_modules() if name]
    return [target for target in targets
            if not any(name == target or name.endswith(f".{target}") for name in names)]


# The module types that peft 0.21's LoRA wraps (LoraModel._create_new_module). For a module of
# any other type it raises "Target module ... is not supported".
LORA_MODULE_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
                     torch.nn.Conv3d, Conv1D, torch.nn.MultiheadAttention)


def unsupported_targets(model: torch.nn.Module, targets: list[str]) -> dict[str, str]:
    """Map each target that matches a module LoRA cannot wrap to that module's type name.

    A target such as `layers` or `self_attn` names a container of linear layers, and peft
    raises for it when the FineTune starts.
    """
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, LORA_MODULE_TYPES):
            continue
        for target in targets:
            if target not in found and (name == target or name.endswith(f".{target}")):
                found[target] = type(module).__name__
    return {target: found[target] for target in targets if target in found}


def check_targets_match(model: torch.nn.Module, targets: list[str],
                        base: str = "the base model") -> None:
    """Raise BaseModelError naming the targets that match no module of the model, or a module
    that LoRA cannot wrap.

    `base` names the model in the message. The FineTune stage and `lathe validate` both call
    it, so they reject the same names with the same message.
    """
    unmatched = unmatched_targets(model, targets)
    if unmatched:
        raise BaseModelError(
            f"{unmatched} match no module of {base}; use names of its linear or embedding "
            f"layers: {adaptable_layers(model)}"
        )
    unsupported = unsupported_targets(model, targets)
    if unsupported:
        named = ", ".join(f"{target!r} ({kind})" for target, kind in unsupported.items())
        raise BaseModelError(
            f"LoRA cannot adapt what {named} match in {base}, because those modules are not "
            f"linear or embedding layers; use names of its linear or embedding layers: "
            f"{adaptable_layers(model)}"
        )


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
    # Imported here because `lathe validate` imports this module for layer names only, and
    # importing peft 0.21 took about 3 s more on a 2-core CPU.
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="TOKEN_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=targets, modules_to_save=head_names(model),
    )
    return get_peft_model(model, config)


def save_adapter(model: PeftModel, directory: Path) -> None:
    """Write the adapters and the task head with peft, without what differs between runs.

    peft 0.21 writes three things that change between runs of the same inputs:
    - `base_model_name_or_path` in adapter_config.json, the base's local path. It is set to
      null, because manifest.json records the base model (inputs.baseModel) and
      `PeftModel.from_pretrained(base, directory)` loads the adapter without it.
    - `target_modules` in set order, which varies with PYTHONHASHSEED. It is sorted.
    - README.md, an empty model card template that names the local path. It is removed.
    """
    # The vocabulary is unchanged, so the adapter needs no copy of the base embeddings.
    model.save_pretrained(directory, save_embedding_layers=False)
    (directory / "README.md").unlink(missing_ok=True)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = None
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    # peft writes the file with these settings.
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def merge_lora(model: PeftModel) -> torch.nn.Module:
    """Fold the adapters into the weights and return the plain transformers model."""
    return model.merge_and_unload()
