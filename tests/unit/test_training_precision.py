"""Mixed precision: autocast dtypes and the fp16 loss scaler on CPU."""

from __future__ import annotations

import pytest
import torch

from lathe_trainer.training.precision import autocast, check_supported, grad_scaler

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)],
)
def test_autocast_matmul_dtype(precision, dtype):
    with autocast(CPU, precision):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == dtype


@pytest.mark.parametrize(("precision", "enabled"), [("fp32", False), ("bf16", False),
                                                    ("fp16", True)])
def test_scaler_enabled_only_for_fp16(precision, enabled):
    assert grad_scaler(CPU, precision).is_enabled() is enabled


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_runs_on_cpu(precision):
    assert check_supported(CPU, precision) is None


def test_scaler_skips_overflow_and_halves_scale():
    """An inf gradient makes the scaler skip the update and lower the scale."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = grad_scaler(CPU, "fp16")
    start = scaler.get_scale()
    scaler.scale((weight * float("inf")).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(2))
    assert scaler.get_scale() == start / 2


def test_scaler_unscales_before_step():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = grad_scaler(CPU, "fp16")
    scaler.scale(weight.sum()).backward()
    scaler.unscale_(optimizer)
    assert torch.equal(weight.grad, torch.ones(2))
