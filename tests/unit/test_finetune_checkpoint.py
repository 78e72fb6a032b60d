"""FineTune checkpoints: a save never leaves a phase without a complete checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from lathe_trainer.finetune import checkpoint


def test_same_step_save_replaces_the_old_checkpoint(tmp_path):
    checkpoint.save(tmp_path, 5, {"weights": torch.zeros(2)}, keep=2)
    checkpoint.save(tmp_path, 5, {"weights": torch.ones(2)}, keep=2)
    assert [step for step, _ in checkpoint.step_dirs(tmp_path)] == [5]
    assert torch.equal(checkpoint.load_latest(tmp_path)["weights"], torch.ones(2))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000005"]


def test_interrupted_same_step_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """A save stopped after moving the old checkpoint aside, before the new one took its
    place, leaves the old one readable. The next save cleans up."""
    checkpoint.save(tmp_path, 5, {"weights": torch.zeros(2)}, keep=2)
    real_replace = os.replace
    calls = []

    def interrupted(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt("SIGTERM")
        real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 5, {"weights": torch.ones(2)}, keep=2)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)

    assert not (tmp_path / "step-00000005").exists()
    assert [step for step, _ in checkpoint.step_dirs(tmp_path)] == [5]
    assert torch.equal(checkpoint.load_latest(tmp_path)["weights"], torch.zeros(2))

    checkpoint.save(tmp_path, 6, {"weights": torch.full((2,), 6.0)}, keep=1)
    assert [step for step, _ in checkpoint.step_dirs(tmp_path)] == [6]
    assert not (tmp_path / ".old-step-00000005").exists()
