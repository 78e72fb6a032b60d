"""Attention kernel choice for mixed-precision training on the CPU.

Under bf16 or fp16 autocast, `scaled_dot_product_attention` runs PyTorch's CPU flash-attention
kernel in the reduced type. In torch 2.13 that kernel is slow on short sequences. On one core
of an Intel Xeon with AMX, forward and backward over 8 sequences of 128 tokens (4 heads of 64)
take 10.6 ms in bf16 and 5.4 ms in float32. From 192 to 240 tokens the two are within about
20% of each other, either way from run to run, and from 256 tokens on bf16 is faster. fp16 was
slower than float32 at every length measured (`benchmarks/attention.py`, results in
docs/benchmarks.md).

`use_cpu_attention(model)` therefore routes the model's attention through `sdpa_attention`,
which runs float32 attention on the CPU under autocast for queries shorter than the
FLOAT32_BELOW_TOKENS of the autocast type, and hands every other call to transformers' own
SDPA function unchanged. The attention mask is built as for SDPA. Float32 changes only the
rounding of attention, toward the more exact result. The setting lives only in the running
model: a saved config.json does not name it.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "lathe_sdpa"
# Per autocast type, the query length from which the reduced-type CPU kernel is faster than
# float32 (torch 2.13). fp16 was slower at every length measured (64 to 2,048 tokens), so it
# always runs in float32.
# NOTE: measured on one Intel Xeon with AMX only; benchmarks/attention.py times another CPU.
FLOAT32_BELOW_TOKENS = {torch.bfloat16: 256, torch.float16: math.inf}


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
    if device != "cpu" or not torch.is_autocast_enabled(device):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = torch.get_autocast_dtype(device)
    if query.shape[-2] >= FLOAT32_BELOW_TOKENS.get(dtype, 0):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast(device, enabled=False):
        output, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    # The output projection runs under autocast again and would cast a float32 input anyway.
    return output.to(dtype), weights


AttentionInterface.register(ATTENTION_NAME, sdpa_attention)
# transformers builds the attention mask per implementation name, and builds none for a name
# without a mask function, which would drop every padding mask.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


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
