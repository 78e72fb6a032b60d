"""Mixed precision for the training loops: autocast and the fp16 loss scaler.

bf16 has the exponent range of fp32, so it needs only autocast. fp16 has a 5-bit exponent:
gradients below about 6e-8 flush to zero and values above 65504 overflow. Dynamic loss scaling
(`torch.amp.GradScaler`) multiplies the loss by a large factor S before backward, so small
gradients stay representable, and divides the gradients by S before clipping and the optimizer
step. If any gradient came out inf or NaN, the scaler skips that optimizer step and halves S;
after 2000 clean steps it doubles S again. Both run on CPU in torch 2.13 as well as on CUDA.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Return the autocast context for `precision`, a no-op for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Return a loss scaler, enabled only for fp16 (a disabled one passes values through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def check_supported(device: torch.device, precision: str) -> str | None:
    """Return why `precision` cannot run on `device`, or None when it can. The caller adds the
    fix, because the precisions a stage accepts differ."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        return f"the GPU {name!r} has no bf16 support"
    return None
