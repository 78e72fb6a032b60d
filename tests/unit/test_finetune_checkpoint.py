"""FineTune checkpoints: a save never leaves a phase without a complete checkpoint, and a
resume skips one whose state.pt does not match its checksum."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from lathe_trainer.finetune import checkpoint
from lathe_trainer.training import checkpoint as training_checkpoint


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


def test_prune_keeps_checkpoint_just_saved(tmp_path):
    """A phase that resumed past an unreadable step 4 saves step 3, which keep=1 must keep."""
    checkpoint.save(tmp_path, 2, {"weights": torch.zeros(2)}, keep=3)
    unreadable = checkpoint.save(tmp_path, 4, {"weights": torch.ones(2)}, keep=3)
    (unreadable / checkpoint.STATE_FILE).write_bytes(b"damaged")
    assert torch.equal(checkpoint.load_latest(tmp_path)["weights"], torch.zeros(2))

    checkpoint.save(tmp_path, 3, {"weights": torch.full((2,), 3.0)}, keep=1)

    assert [step for step, _ in checkpoint.step_dirs(tmp_path)] == [3]
    saved = checkpoint.load_latest(tmp_path)
    assert saved is not None
    assert torch.equal(saved["weights"], torch.full((2,), 3.0))


WEIGHTS = torch.tensor([1.25, 2.5, 3.75, 5.0])


def _flip_weight_byte(step_dir):
    """Change one byte inside the stored weights of state.pt, and check that torch.load alone
    still reads the file, so that only the checksum can catch the change."""
    path = step_dir / checkpoint.STATE_FILE
    data = bytearray(path.read_bytes())
    # torch.save (2.x) stores tensor data uncompressed, so the weights' bytes appear as they are.
    offset = data.find(WEIGHTS.numpy().tobytes())
    assert offset > 0
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    damaged = torch.load(path, weights_only=True)["weights"]
    assert damaged.shape == WEIGHTS.shape
    assert not torch.equal(damaged, WEIGHTS)


def test_state_json_records_checksum(tmp_path):
    path = checkpoint.save(tmp_path, 5, {"weights": WEIGHTS}, keep=2)
    recorded = json.loads((path / checkpoint.CHECKSUM_FILE).read_text())
    data = (path / checkpoint.STATE_FILE).read_bytes()
    assert recorded == {"step": 5, "files": {checkpoint.STATE_FILE: {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}}


@pytest.mark.parametrize("damage", [
    _flip_weight_byte,
    lambda step_dir: (step_dir / checkpoint.STATE_FILE).write_bytes(b"cut short"),
    lambda step_dir: (step_dir / checkpoint.CHECKSUM_FILE).write_text("{"),
], ids=["weights byte flipped", "state cut short", "checksum file cut short"])
def test_damaged_latest_falls_back(tmp_path, caplog, damage):
    """A damaged newest checkpoint would fail every retry, so the phase resumes from the one
    before it, with a warning that names the damaged one."""
    checkpoint.save(tmp_path, 2, {"weights": torch.zeros(4)}, keep=3)
    newest = checkpoint.save(tmp_path, 4, {"weights": WEIGHTS}, keep=3)
    damage(newest)
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        state = checkpoint.load_latest(tmp_path)
    assert state is not None
    assert torch.equal(state["weights"], torch.zeros(4))
    assert f"Checkpoint {newest} cannot be read" in caplog.text


def test_flipped_byte_names_file_and_digests(tmp_path):
    path = checkpoint.save(tmp_path, 4, {"weights": WEIGHTS}, keep=3)
    expected = json.loads((path / checkpoint.CHECKSUM_FILE).read_text())["files"]["state.pt"]
    _flip_weight_byte(path)
    actual = hashlib.sha256((path / checkpoint.STATE_FILE).read_bytes()).hexdigest()
    with pytest.raises(training_checkpoint.ChecksumMismatchError) as raised:
        checkpoint.load(path)
    message = str(raised.value)
    assert f"state.pt in checkpoint {path} does not match" in message
    assert expected["sha256"] in message
    assert actual in message
    assert f"Delete the damaged checkpoint {path}." in message


def test_no_readable_checkpoint_starts_over(tmp_path, caplog):
    only = checkpoint.save(tmp_path, 2, {"weights": WEIGHTS}, keep=3)
    _flip_weight_byte(only)
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        assert checkpoint.load_latest(tmp_path) is None
    assert "None of the 1 checkpoints" in caplog.text


def test_checkpoint_without_checksum_loads(tmp_path):
    """A checkpoint written before checksums were recorded has no state.json and loads
    unverified, as before."""
    path = checkpoint.save(tmp_path, 4, {"weights": WEIGHTS}, keep=3)
    (path / checkpoint.CHECKSUM_FILE).unlink()
    _flip_weight_byte(path)
    assert [step for step, _ in checkpoint.step_dirs(tmp_path)] == [4]
    assert checkpoint.load_latest(tmp_path)["weights"].shape == WEIGHTS.shape


def _load_agreed_worker(rank: int, init_file: str, phase_dirs: list[str], results: str) -> None:
    import pathlib

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        state = checkpoint.load_agreed(pathlib.Path(phase_dirs[rank]))
        step = None if state is None else int(state["step"])
        with open(f"{results}.{rank}", "w", encoding="utf-8") as handle:
            json.dump(step, handle)
    finally:
        dist.destroy_process_group()


def test_processes_agree_on_checkpoint(tmp_path):
    """A process that cannot read the newest checkpoint falls back to an earlier one, and the
    other process follows it."""
    readable, damaged = tmp_path / "rank0", tmp_path / "rank1"
    for phase_dir in (readable, damaged):
        checkpoint.save(phase_dir, 2, {"step": 2, "weights": torch.zeros(2)}, keep=3)
        newest = checkpoint.save(phase_dir, 4, {"step": 4, "weights": torch.ones(2)}, keep=3)
    (newest / checkpoint.STATE_FILE).write_bytes(b"cut short")
    assert checkpoint.load_latest(readable)["step"] == 4

    torch.multiprocessing.spawn(
        _load_agreed_worker,
        args=(str(tmp_path / "init"), [str(readable), str(damaged)], str(tmp_path / "step")),
        nprocs=2,
    )

    assert [json.loads((tmp_path / f"step.{rank}").read_text()) for rank in range(2)] == [2, 2]
