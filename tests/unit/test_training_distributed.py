"""Process-group setup from the torchrun environment."""

from __future__ import annotations

import pytest
import torch

from lathe_trainer.training.distributed import all_reduce_sum, pick_backend, setup


@pytest.mark.parametrize(
    ("requested", "device", "expected"),
    [("auto", "cpu", "gloo"), ("auto", "cuda", "nccl"), ("gloo", "cuda", "gloo")],
)
def test_pick_backend(requested, device, expected):
    assert pick_backend(requested, torch.device(device)) == expected


def test_setup_without_torchrun_is_single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = setup()
    assert (context.rank, context.world_size, context.is_main) == (0, 1, True)
    assert not context.is_distributed


def test_single_process_reductions_are_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert all_reduce_sum(setup(), [1.5, 2.0]) == [1.5, 2.0]
