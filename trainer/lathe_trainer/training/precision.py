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


# The fp16 loss scale at which an inf or NaN gradient counts as a non-finite step rather than
# an overflow. Gradients still inf or NaN at scale 1 come from the model or the data, and
# halving the scale on would skip every step while the scale falls to 0. DeepSpeed stops a run
# in this case too ("Current loss scale already at minimum"), at its min_loss_scale setting.
MIN_LOSS_SCALE = 1.0


def overflow_skipped(scaler: torch.amp.GradScaler) -> bool:
    """Return whether a step whose unscaled gradient norm is not finite is an fp16 overflow.

    True: the loss scale was too high, and `scaler.step` skips the update and `scaler.update`
    lowers the scale, so the caller goes on with both as usual. False: the gradients are
    inf or NaN without loss scaling, or at MIN_LOSS_SCALE. The step is then non-finite, so the
    caller applies its nonFinite policy, and the scale is kept.
    """
    if not scaler.is_enabled():
        return False
    if scaler.get_scale() > MIN_LOSS_SCALE:
        return True
    # Keeps the scale and clears the scaler's record of this step's unscale_.
    scaler.update(new_scale=scaler.get_scale())
    return False
