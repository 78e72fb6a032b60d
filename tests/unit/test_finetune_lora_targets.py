"""Tests of the LoRA target check against peft itself: it rejects exactly the names peft rejects."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForTokenClassification, GPT2Config, LlamaConfig

from lathe_trainer.finetune.model import head_names, unmatched_targets, unsupported_targets

CONFIGS = {
    "llama": LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, num_labels=3),
    "gpt2": GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                       num_labels=3),
}


def last_names(model: torch.nn.Module) -> list[str]:
    heads = set(head_names(model))
    return sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                   if name and name.split(".")[0] not in heads})


def peft_accepts(model: torch.nn.Module, target: str) -> bool:
    config = LoraConfig(task_type="TOKEN_CLS", target_modules=[target],
                        modules_to_save=head_names(model))
    try:
        get_peft_model(model, config)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_targets_rejected_as_peft_rejects(architecture):
    """Each module name of the model, alone as the target list, fails the check exactly when
    peft 0.21 raises for it."""
    torch.manual_seed(0)
    names = last_names(AutoModelForTokenClassification.from_config(CONFIGS[architecture]))
    assert len(names) > 5, names
    verdicts = {}
    for name in names:
        model = AutoModelForTokenClassification.from_config(CONFIGS[architecture])
        rejected = bool(unmatched_targets(model, [name]) or unsupported_targets(model, [name]))
        verdicts[name] = (rejected, not peft_accepts(model, name))
    disagreements = {name: pair for name, pair in verdicts.items() if pair[0] != pair[1]}
    assert not disagreements, f"(check rejects, peft rejects) differ for {disagreements}"
    assert any(rejected for rejected, _ in verdicts.values())
    assert not all(rejected for rejected, _ in verdicts.values())
