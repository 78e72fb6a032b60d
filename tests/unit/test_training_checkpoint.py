"""Checkpoints: atomic directories, pruning, round trip of model, optimizer, RNG and state."""

from __future__ import annotations

import random

import pytest
import torch

from lathe_trainer.training import checkpoint
from lathe_trainer.training.distributed import DistributedContext
from lathe_trainer.training.schedule import build_scheduler

SINGLE = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                            backend=None)


def training_objects():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=10)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def save(root, step, keep=2, state=None):
    model, optimizer, scheduler = training_objects()
    return checkpoint.save(SINGLE, root, step, state or {"note": step}, model, optimizer,
                           scheduler, keep)


def test_round_trip_restores_everything(tmp_path):
    model, optimizer, scheduler = training_objects()
    random.seed(3)
    torch.manual_seed(3)
    path = checkpoint.save(SINGLE, tmp_path, 7, {"position": [1, 2]}, model, optimizer,
                           scheduler, keep=2)
    expected_python, expected_torch = random.random(), torch.rand(1)

    loaded = checkpoint.load(path)
    checkpoint.restore_rng_state(loaded.rng[0])

    assert loaded.step == 7
    assert loaded.state["position"] == [1, 2]
    assert random.random() == expected_python
    assert torch.equal(torch.rand(1), expected_torch)
    fresh, fresh_optimizer, fresh_scheduler = training_objects()
    fresh.weight.data.zero_()
    fresh.load_state_dict(loaded.model)
    fresh_optimizer.load_state_dict(loaded.optimizer)
    fresh_scheduler.load_state_dict(loaded.scheduler)
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch
    state = fresh_optimizer.state_dict()["state"][0]
    assert torch.equal(state["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_step_directory_name(tmp_path):
    assert save(tmp_path, 42).name == "step-00000042"


def test_prune_keeps_newest(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step, keep=2)
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path)] == [20, 30]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000030"


@pytest.mark.parametrize("leftover", [".tmp-step-00000050-123", "step-00000050"])
def test_incomplete_directories_ignored(tmp_path, leftover):
    """A save killed midway leaves a temporary or state-less directory, and neither counts."""
    save(tmp_path, 40)
    partial = tmp_path / leftover
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"truncated")
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000040"


def test_next_save_removes_temporary_dirs(tmp_path):
    (tmp_path / ".tmp-step-00000050-123").mkdir(parents=True)
    save(tmp_path, 60)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000060"]


def test_save_replaces_same_step_of_other_run(tmp_path):
    save(tmp_path, 5, state={checkpoint.STATE_RESUME_KEY: "sha256:a", "attempt": 1})
    save(tmp_path, 5, state={checkpoint.STATE_RESUME_KEY: "sha256:b", "attempt": 2})
    assert checkpoint.load(tmp_path / "step-00000005").state["attempt"] == 2


@pytest.mark.parametrize("store", ["local", "memory"])
def test_interrupted_save_of_same_step_keeps_it(tmp_path, monkeypatch, store):
    """Saving a step that has a complete checkpoint of the same run, with keepCheckpoints 1,
    must not remove that only checkpoint, even if moving the new one into place fails."""
    root = tmp_path if store == "local" else "memory://same-step/checkpoints"
    key = checkpoint.STATE_RESUME_KEY
    save(root, 4, keep=1, state={key: "sha256:a", "attempt": 1})

    def interrupted(*args):
        raise OSError("interrupted while moving the checkpoint into place")

    monkeypatch.setattr(checkpoint.os, "rename", interrupted)
    monkeypatch.setattr(checkpoint.storage, "move_tree", interrupted)
    try:
        save(root, 4, keep=1, state={key: "sha256:a", "attempt": 2})
    finally:
        monkeypatch.undo()
    assert [step for step, _ in checkpoint.list_checkpoints(root)] == [4]
    assert checkpoint.load(checkpoint.latest_checkpoint(root)).state["attempt"] == 1
    if store == "memory":
        checkpoint.remove_all(root)


def test_no_checkpoint_in_missing_root(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path / "absent") is None


def test_written_for_reads_latest_state_key(tmp_path):
    """The latest checkpoint's key decides, and a checkpoint without one is another run's."""
    assert checkpoint.written_for(tmp_path / "none", "sha256:a")
    save(tmp_path, 2, state={checkpoint.STATE_RESUME_KEY: "sha256:a"})
    assert checkpoint.written_for(tmp_path, "sha256:a")
    assert not checkpoint.written_for(tmp_path, "sha256:b")
    assert checkpoint.written_for(tmp_path, "")
    save(tmp_path, 4, state={"note": "written before keys"})
    assert not checkpoint.written_for(tmp_path, "sha256:a")


def test_written_for_reads_key_file(tmp_path):
    """A FineTune records its key in a file; a non-empty root without one is another run's."""
    root = tmp_path / "checkpoints"
    checkpoint.record_resume_key(root, "sha256:a")
    assert (root / checkpoint.RESUME_KEY).read_text() == "sha256:a"
    assert checkpoint.written_for(root, "sha256:a")
    assert not checkpoint.written_for(root, "sha256:b")
    (root / checkpoint.RESUME_KEY).unlink()
    assert checkpoint.written_for(root, "sha256:a")
    (root / "lora").mkdir()
    assert not checkpoint.written_for(root, "sha256:a")


def test_written_for_on_memory_filesystem():
    root = "memory://written-for/checkpoints"
    checkpoint.record_resume_key(root, "sha256:a")
    assert checkpoint.written_for(root, "sha256:a")
    assert not checkpoint.written_for(root, "sha256:b")
    assert checkpoint.written_for("memory://written-for/missing", "sha256:b")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage", [
    lambda step: _truncate(step / "model.pt"),  # cut short, as on a full disk
    lambda step: (step / "optimizer.pt").unlink(),
    lambda step: (step / checkpoint.STATE).write_text(""),
    lambda step: _truncate(step / "rng.pt"),
], ids=["model cut short", "optimizer removed", "state emptied", "rng cut short"])
def test_damaged_latest_falls_back(tmp_path, caplog, damage):
    """A newest checkpoint damaged after it was written would fail every retry. So the stage
    resumes from the one before it, with a warning that names the damaged one."""
    key = {checkpoint.STATE_RESUME_KEY: "sha256:a"}
    save(tmp_path, 2, keep=3, state=key)
    newest = save(tmp_path, 4, keep=3, state=key)
    damage(newest)
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        saved = checkpoint.load_latest(tmp_path)
    assert saved is not None
    assert saved.step == 2
    warnings = [record.getMessage() for record in caplog.records]
    assert any(f"Checkpoint {newest} cannot be read" in text for text in warnings), warnings
    assert checkpoint.written_for(tmp_path, "sha256:a")


def test_no_readable_checkpoint_starts_over(tmp_path, caplog):
    only = save(tmp_path, 2)
    (only / "model.pt").unlink()
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        assert checkpoint.load_latest(tmp_path) is None
    assert "None of the 1 checkpoints" in caplog.text
