"""Attention kernel choice for mixed-precision training on the CPU.

Under bf16 or fp16 autocast, `scaled_dot_product_attention` runs PyTorch's CPU flash-attention
kernel in the reduced type. In torch 2.13 its reduced-type backward pass is slow on short
sequences: forward and backward over 8 sequences of 128 tokens (4 heads of 64) take 11.6 ms in
bf16 and 6.5 ms in float32 on one core of an Intel Xeon with AMX. The bf16 time drops by
nearly half at 192 tokens, and from there on bf16 is as fast as float32 or faster
(`benchmarks/attention.py`, results in docs/benchmarks.md).

`use_cpu_attention(model)` therefore routes the model's attention through `sdpa_attention`,
which runs float32 attention for queries shorter than FLOAT32_BELOW_TOKENS on the CPU under
autocast and hands every other call to transformers' own SDPA function unchanged. Float32 is
the more exact of the two, so the choice changes speed, not what the model learns. The
setting lives only in the running model: a saved config.json does not name it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "lathe_sdpa"
# The query length from which the reduced-type CPU kernel is as fast as float32 (torch 2.13).
# NOTE: measured on one Intel Xeon with AMX only; benchmarks/attention.py remeasures elsewhere.
FLOAT32_BELOW_TOKENS = 192


def sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compute attention as transformers' SDPA function does, in float32 where that is faster.

    Under autocast the query may arrive in float32 (rotary embeddings upcast it) and autocast
    would cast it down again, so the autocast state, not the query's dtype, decides.
    """
    device = query.device.type
    short = query.shape[-2] < FLOAT32_BELOW_TOKENS
    if device != "cpu" or not short or not torch.is_autocast_enabled(device):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        output, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    # The output projection runs under autocast again and would cast a float32 input anyway.
    return output.to(dtype), weights


AttentionInterface.register(ATTENTION_NAME, sdpa_attention)


def use_cpu_attention(model: PreTrainedModel) -> bool:
    """Route `model`'s SDPA attention through `sdpa_attention`; return whether it changed.

    Models that compute attention themselves (T5 in transformers 5.25) or use another
    implementation (eager, flash_attention_2) are left alone.
    """
    if not getattr(model, "_supports_attention_backend", False):
        return False
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(ATTENTION_NAME)
    return True
