"""Token-normalized losses: gradient accumulation must not change the loss or the gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lathe_trainer.training.loss import (
    IGNORE_INDEX,
    count_tokens,
    gradient_scale,
    token_loss_sum,
)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=32, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def uneven_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences padded to 12 tokens: one with 12 labelled tokens, one with 3."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 50, (2, 12), generator=generator)
    labels = input_ids.clone()
    input_ids[1, 4:] = 0
    labels[1, 4:] = IGNORE_INDEX
    return input_ids, labels


def accumulated_gradients(micro_batch: int) -> tuple[float, list[torch.Tensor]]:
    """Run the uneven batch as micro-batches of `micro_batch` and return loss and gradients."""
    model = tiny_model()
    input_ids, labels = uneven_batch()
    chunks = list(zip(input_ids.split(micro_batch), labels.split(micro_batch)))
    total_tokens = sum(count_tokens(chunk_labels, shift=True) for _, chunk_labels in chunks)
    scale = gradient_scale(total_tokens, world_size=1)
    loss = 0.0
    for chunk_inputs, chunk_labels in chunks:
        loss_sum = token_loss_sum(model(input_ids=chunk_inputs).logits, chunk_labels, shift=True)
        (loss_sum * scale).backward()
        loss += loss_sum.item() * scale
    return loss, [p.grad.clone() for p in model.parameters()]


def test_accumulation_matches_full_batch():
    """Micro-batch 2 x accumulation 1 equals micro-batch 1 x accumulation 2 on uneven data."""
    full_loss, full_grads = accumulated_gradients(micro_batch=2)
    split_loss, split_grads = accumulated_gradients(micro_batch=1)
    assert split_loss == pytest.approx(full_loss, rel=1e-6)
    for full, split in zip(full_grads, split_grads, strict=True):
        torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-7)


def test_mean_of_micro_batch_means_differs():
    """The naive average of per-micro-batch means weighs the short sequence too much."""
    model = tiny_model()
    input_ids, labels = uneven_batch()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    token_mean = token_loss_sum(logits, labels, shift=True) / count_tokens(labels, shift=True)
    means = [token_loss_sum(logits[i:i + 1], labels[i:i + 1], shift=True)
             / count_tokens(labels[i:i + 1], shift=True) for i in range(2)]
    assert abs(float(sum(means) / 2 - token_mean)) > 1e-4


def test_token_loss_sum_matches_model_loss():
    """With shift=True the sum divided by the count is the model's own causal LM loss."""
    model = tiny_model()
    input_ids, labels = uneven_batch()
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=labels)
    mean = token_loss_sum(output.logits, labels, shift=True) / count_tokens(labels, shift=True)
    assert float(mean) == pytest.approx(float(output.loss), rel=1e-5)


@pytest.mark.parametrize(
    ("labels", "shift", "expected"),
    [
        ([[5, 6, 7, IGNORE_INDEX]], True, 2),
        ([[5, 6, 7, IGNORE_INDEX]], False, 3),
        ([[IGNORE_INDEX, 6], [7, 8]], True, 2),
    ],
)
def test_count_tokens(labels, shift, expected):
    assert count_tokens(torch.tensor(labels), shift=shift) == expected


def test_gradient_scale_undoes_ddp_average():
    assert gradient_scale(1000, world_size=4) == pytest.approx(4 / 1000)
    with pytest.raises(ValueError, match="no labelled tokens"):
        gradient_scale(0, world_size=2)
