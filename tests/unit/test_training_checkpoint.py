"""Checkpoints: atomic directories, pruning, round trip of model, optimizer, RNG and state."""

from __future__ import annotations

import hashlib
import json
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


def _flip_weight_byte(step):
    """Change one byte inside the stored weight tensor of model.pt, and check that torch.load
    alone still reads the file, so that only the checksum can catch the change."""
    path = step / "model.pt"
    data = bytearray(path.read_bytes())
    weight = torch.load(path, weights_only=True)["weight"]
    # torch.save (2.x) stores tensor data uncompressed, so the weight's bytes appear as they are.
    offset = data.find(weight.numpy().tobytes())
    assert offset > 0
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    damaged = torch.load(path, weights_only=True)["weight"]
    assert damaged.shape == weight.shape
    assert not torch.equal(damaged, weight)


def _append_byte(path):
    path.write_bytes(path.read_bytes() + b"\0")


@pytest.mark.parametrize(("damage", "mismatched"), [
    pytest.param(lambda step: _truncate(step / "model.pt"), "model.pt",
                 id="model cut short"),  # as on a full disk
    pytest.param(lambda step: (step / "optimizer.pt").unlink(), None, id="optimizer removed"),
    pytest.param(lambda step: (step / checkpoint.STATE).write_text(""), None,
                 id="state emptied"),
    pytest.param(lambda step: _truncate(step / "rng.pt"), "rng.pt", id="rng cut short"),
    pytest.param(_flip_weight_byte, "model.pt", id="model byte flipped"),
    pytest.param(lambda step: _append_byte(step / "model.pt"), "model.pt",
                 id="model one byte longer"),
])
def test_damaged_latest_falls_back(tmp_path, caplog, damage, mismatched):
    """A newest checkpoint damaged after it was written would fail every retry. So the stage
    resumes from the one before it, with a warning that names the damaged one and, where the
    checksum caught the damage, the file."""
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
    if mismatched:
        detail = f"{mismatched} in checkpoint {newest} does not match the checksum"
        assert any(detail in text for text in warnings), warnings
    assert checkpoint.written_for(tmp_path, "sha256:a")


def test_prune_keeps_checkpoint_just_saved(tmp_path):
    """A run that resumed past an unreadable step 4 saves step 3, which keep=1 must keep."""
    save(tmp_path, 2, keep=3)
    unreadable = save(tmp_path, 4, keep=3)
    (unreadable / "model.pt").write_bytes(b"damaged")
    assert checkpoint.load_latest(tmp_path).step == 2

    save(tmp_path, 3, keep=1)

    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path)] == [3]
    saved = checkpoint.load_latest(tmp_path)
    assert saved is not None
    assert saved.step == 3


def test_state_records_file_checksums(tmp_path):
    """state.json records each tensor file's size and SHA-256 next to the stage's own keys."""
    path = save(tmp_path, 3, state={"note": "kept", checkpoint.STATE_RESUME_KEY: "sha256:a"})
    stored = json.loads((path / checkpoint.STATE).read_text())
    assert stored["note"] == "kept"
    assert stored[checkpoint.STATE_RESUME_KEY] == "sha256:a"
    assert stored["step"] == 3
    assert sorted(stored["files"]) == sorted(checkpoint.TENSOR_FILES)
    for name in checkpoint.TENSOR_FILES:
        data = (path / name).read_bytes()
        assert stored["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(),
                                         "bytes": len(data)}, name


def test_load_reports_wrong_size(tmp_path):
    """The error names the checkpoint, the file, both sizes and both digests, and the fix."""
    path = save(tmp_path, 3)
    expected = json.loads((path / checkpoint.STATE).read_text())["files"]["model.pt"]
    _append_byte(path / "model.pt")
    data = (path / "model.pt").read_bytes()
    actual_digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(checkpoint.ChecksumMismatchError) as raised:
        checkpoint.load(path)
    message = str(raised.value)
    assert isinstance(raised.value, checkpoint.UNREADABLE)
    assert raised.value.name == "model.pt"
    assert f"model.pt in checkpoint {path}" in message
    assert f"{expected['bytes']} bytes with SHA-256 {expected['sha256']}" in message
    assert f"{len(data)} bytes with SHA-256 {actual_digest}" in message
    assert f"Delete the damaged checkpoint {path}." in message


def test_checkpoint_without_checksums_loads(tmp_path):
    """A checkpoint written before checksums were recorded loads unverified, as before."""
    path = save(tmp_path, 3)
    stored = json.loads((path / checkpoint.STATE).read_text())
    del stored["files"]
    (path / checkpoint.STATE).write_text(json.dumps(stored))
    _flip_weight_byte(path)
    loaded = checkpoint.load(path)
    assert loaded.step == 3
    assert loaded.state["note"] == 3


def test_garbage_without_checksums_falls_back(tmp_path):
    """A checkpoint without checksums whose model.pt is a few bytes of garbage, on which the
    weights-only unpickler raises IndexError, is skipped for the one before it."""
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    stored = json.loads((newest / checkpoint.STATE).read_text())
    del stored["files"]
    (newest / checkpoint.STATE).write_text(json.dumps(stored))
    (newest / "model.pt").write_bytes(b"trunc")
    saved = checkpoint.load_latest(tmp_path)
    assert saved is not None
    assert saved.step == 2


def test_reserved_state_key_rejected(tmp_path):
    with pytest.raises(ValueError, match="contains the key 'files'"):
        save(tmp_path, 3, state={"files": []})
    assert checkpoint.list_checkpoints(tmp_path) == []


def test_damaged_latest_on_memory_store_falls_back(caplog):
    """A file changed on an object store after the save is caught as on a local disk."""
    root = "memory://damaged-latest/checkpoints"
    save(root, 2, keep=3)
    newest = save(root, 4, keep=3)
    filesystem, path = checkpoint.storage.resolve(newest)
    data = bytearray(filesystem.cat_file(f"{path}/optimizer.pt"))
    data[-1] ^= 0x01
    filesystem.pipe_file(f"{path}/optimizer.pt", bytes(data))
    try:
        with caplog.at_level("WARNING", logger=checkpoint.__name__):
            saved = checkpoint.load_latest(root)
        assert saved is not None
        assert saved.step == 2
        assert f"optimizer.pt in checkpoint {newest} does not match" in caplog.text
    finally:
        checkpoint.remove_all(root)


def _flip_last_byte(data):
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _cut_in_half(data):
    return data[: len(data) // 2]


@pytest.mark.parametrize("store", ["local", "memory"])
@pytest.mark.parametrize(("name", "damage"), [
    ("model.pt", _flip_last_byte),
    (checkpoint.STATE, _cut_in_half),
], ids=["model byte flipped", "state cut short"])
def test_save_replaces_damaged_same_step(tmp_path, caplog, store, name, damage):
    """A run resumed from the checkpoint before a damaged one reaches the damaged one's step
    again, and must replace it, not keep it."""
    root = tmp_path if store == "local" else "memory://damaged-same-step/checkpoints"
    key = checkpoint.STATE_RESUME_KEY
    first = save(root, 4, keep=2, state={key: "sha256:a", "attempt": 1})
    filesystem, path = checkpoint.storage.resolve(first)
    filesystem.pipe_file(f"{path}/{name}", damage(filesystem.cat_file(f"{path}/{name}")))
    try:
        with caplog.at_level("WARNING", logger=checkpoint.__name__):
            save(root, 4, keep=2, state={key: "sha256:a", "attempt": 2})
        assert "so it is replaced" in caplog.text
        assert checkpoint.load(checkpoint.latest_checkpoint(root)).state["attempt"] == 2
    finally:
        if store == "memory":
            checkpoint.remove_all(root)


def test_no_readable_checkpoint_starts_over(tmp_path, caplog):
    only = save(tmp_path, 2)
    (only / "model.pt").unlink()
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        assert checkpoint.load_latest(tmp_path) is None
    assert "None of the 1 checkpoints" in caplog.text


def _load_agreed_worker(rank: int, init_file: str, roots: list[str], results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        context = DistributedContext(rank=rank, world_size=2, local_rank=rank,
                                     device=torch.device("cpu"), backend="gloo")
        saved = checkpoint.load_agreed(roots[rank], context)
        step = None if saved is None else saved.step
        with open(f"{results}.{rank}", "w", encoding="utf-8") as handle:
            json.dump(step, handle)
    finally:
        dist.destroy_process_group()


def _steps_agreed(tmp_path, roots) -> list[int | None]:
    results = tmp_path / "step"
    torch.multiprocessing.spawn(
        _load_agreed_worker, args=(str(tmp_path / "init"), [str(r) for r in roots], str(results)),
        nprocs=2,
    )
    return [json.loads((tmp_path / f"step.{rank}").read_text()) for rank in range(2)]


def test_ranks_agree_on_checkpoint(tmp_path):
    """A rank that cannot read the newest checkpoint falls back to an earlier one, and the other
    ranks follow it, so that every rank continues from the same weights and step."""
    readable, damaged = tmp_path / "rank0", tmp_path / "rank1"
    for root in (readable, damaged):
        save(root, 2, keep=3)
        newest = save(root, 4, keep=3)
    _truncate(newest / "model.pt")
    assert checkpoint.load_latest(readable).step == 4

    assert _steps_agreed(tmp_path, [readable, damaged]) == [2, 2]


def test_ranks_start_over_together(tmp_path):
    """When one rank can read no checkpoint at all, every rank starts from step 0."""
    readable, empty = tmp_path / "rank0", tmp_path / "rank1"
    save(readable, 2)

    assert _steps_agreed(tmp_path, [readable, empty]) == [None, None]
