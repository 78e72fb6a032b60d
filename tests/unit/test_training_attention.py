"""The float32 attention of short sequences under CPU autocast, and the compiled token loss."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    LlamaConfig,
    T5Config,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lathe_trainer.training import attention
from lathe_trainer.training.loss import loss_function, token_loss_sum

HEADS = 4
HEAD_DIM = 16


class Attention(torch.nn.Module):
    """The attributes that transformers' SDPA function reads from an attention module."""

    is_causal = True
    num_key_value_groups = 1


def qkv(length: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    return [torch.randn(2, HEADS, length, HEAD_DIM, generator=generator, dtype=dtype)
            for _ in range(3)]


def sdpa(query, key, value) -> torch.Tensor:
    return sdpa_attention_forward(Attention(), query, key, value, None)[0]


def lathe(query, key, value) -> torch.Tensor:
    return attention.sdpa_attention(Attention(), query, key, value, None)[0]


def tiny_llama(key_value_heads: int = HEADS) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                         num_key_value_heads=key_value_heads, intermediate_size=128,
                         vocab_size=256, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config)


def test_short_sequence_runs_in_float32():
    """Below the threshold, the result under bf16 autocast is float32 attention cast to bf16."""
    length = attention.FLOAT32_BELOW_TOKENS[torch.bfloat16] - 1
    query, key, value = qkv(length)
    expected = sdpa(query, key, value).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reduced = sdpa(query, key, value)
        output = lathe(query, key, value)
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, expected)
    # The bf16 kernel rounds differently, so an equal result above is no accident.
    assert not torch.equal(reduced, expected)


def test_fp16_runs_in_float32_when_long():
    query, key, value = qkv(attention.FLOAT32_BELOW_TOKENS[torch.bfloat16] + 64)
    expected = sdpa(query, key, value).to(torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        output = lathe(query, key, value)
    assert output.dtype == torch.float16
    assert torch.equal(output, expected)


def test_long_sequence_keeps_reduced_kernel():
    query, key, value = qkv(attention.FLOAT32_BELOW_TOKENS[torch.bfloat16])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sdpa(query, key, value)
        output = lathe(query, key, value)
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, expected)


def test_no_autocast_passes_through():
    """Without autocast nothing is cast: float32 stays float32 and bf16 stays bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        query, key, value = qkv(64, dtype)
        output = lathe(query, key, value)
        assert output.dtype == dtype
        assert torch.equal(output, sdpa(query, key, value))


def test_gradients_match_float32_attention():
    length = 32
    inputs = [tensor.requires_grad_() for tensor in qkv(length)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lathe(*inputs).float().sum().backward()
    gradients = [tensor.grad.clone() for tensor in inputs]
    reference = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    sdpa(*reference).to(torch.bfloat16).float().sum().backward()
    for gradient, expected in zip(gradients, reference):
        assert torch.equal(gradient, expected.grad)


def test_llama_uses_lathe_attention(tmp_path):
    model = tiny_llama()
    input_ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=input_ids).logits.float()
    assert attention.use_cpu_attention(model)
    assert model.config._attn_implementation == attention.ATTENTION_NAME
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=input_ids).logits.float()
    # The same model, with only the attention's rounding changed.
    assert torch.allclose(after, before, atol=0.05)
    assert not torch.equal(after, before)
    model.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert attention.ATTENTION_NAME not in saved
    assert "attn_implementation" not in json.loads(saved)


@pytest.mark.parametrize("autocast", [False, True])
def test_padding_mask_applies(autocast):
    """A padded batch gives the logits of plain SDPA, with grouped-query attention too.

    transformers builds no mask for an attention name without a mask function, so this fails
    if the padding of the second sequence is ignored.
    """
    model = tiny_llama(key_value_heads=2).eval()
    input_ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :10] = 0
    dtype = torch.bfloat16 if autocast else torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        attention.use_cpu_attention(model)
        output = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    # Rows of padding tokens attend to nothing and differ between kernels, so only real tokens
    # are compared.
    real = attention_mask.bool()
    tolerance = 0.05 if autocast else 1e-5
    assert torch.allclose(output[real], expected[real], atol=tolerance)


def test_t5_keeps_its_attention():
    config = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=HEADS,
                      vocab_size=256, decoder_start_token_id=0)
    model = AutoModelForSeq2SeqLM.from_config(config)
    assert not attention.use_cpu_attention(model)
    assert model.config._attn_implementation != attention.ATTENTION_NAME


def test_eager_attention_left_alone():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not attention.use_cpu_attention(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_compiled_loss_matches_eager():
    """The compiled token loss sum and its gradient equal the eager ones, for bf16 logits too."""
    compiled = loss_function(compile=True)
    assert compiled is not token_loss_sum
    assert loss_function(compile=False) is token_loss_sum
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 300, (4, 40), generator=generator)
    labels[0, :7] = -100
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(4, 40, 300, generator=generator).to(dtype)
        eager_logits = logits.clone().requires_grad_()
        compiled_logits = logits.clone().requires_grad_()
        expected = token_loss_sum(eager_logits, labels, True)
        result = compiled(compiled_logits, labels, True)
        expected.backward()
        result.backward()
        assert result.dtype == torch.float32
        assert torch.allclose(result, expected, rtol=1e-5)
        assert torch.allclose(compiled_logits.grad.float(), eager_logits.grad.float(),
                              atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
