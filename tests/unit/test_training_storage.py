"""Checkpoints on fsspec stores: memory://, and s3:// on a real S3-compatible store (SeaweedFS,
started by the `s3_store` fixture)."""

from __future__ import annotations

import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from lathe_trainer.training import checkpoint, storage
from lathe_trainer.training.distributed import DistributedContext
from lathe_trainer.training.schedule import build_scheduler

SINGLE = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                            backend=None)


@pytest.fixture(params=["memory", "s3"])
def root(request):
    if request.param == "s3":
        request.getfixturevalue("s3_store")
        url = f"s3://lathe/ckpt-{uuid.uuid4().hex}/checkpoints"
    else:
        url = f"memory:///ckpt-{uuid.uuid4().hex}/checkpoints"
    yield url
    filesystem, path = storage.resolve(url)
    storage.remove_tree(filesystem, path)


def save(root, step, keep=2, model=None):
    torch.manual_seed(step)
    model = model or torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=10)
    return checkpoint.save(SINGLE, root, step, {"note": step}, model, optimizer, scheduler,
                           keep)


def test_store_round_trip(root, tmp_path, monkeypatch):
    """A stored checkpoint loads through a local download that is removed afterwards, and its
    memory-mapped tensors stay readable."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    path = save(root, 3, model=model)
    loaded = checkpoint.load(path)
    assert path == f"{root}/step-00000003"
    assert loaded.state["note"] == 3
    assert list(tmp_path.glob("lathe-checkpoint-*")) == []
    assert torch.equal(loaded.model["weight"], model.weight)


def test_store_keeps_newest(root):
    for step in (1, 2, 3, 4):
        save(root, step, keep=2)
    assert [step for step, _ in checkpoint.list_checkpoints(root)] == [3, 4]
    filesystem, path = storage.resolve(root)
    # Files, not directory listings: an S3 store may list an emptied prefix for a while.
    directories = {file[len(path):].strip("/").split("/")[0] for file in filesystem.find(path)}
    assert directories == {"step-00000003", "step-00000004"}


@pytest.mark.parametrize("leftover", [".tmp-step-00000009-1", "step-00000009"])
def test_store_incomplete_ignored_then_removed(root, leftover):
    """A save killed midway leaves a temporary or state-less directory; neither counts."""
    save(root, 5)
    filesystem, path = storage.resolve(root)
    filesystem.pipe_file(f"{path}/{leftover}/model.pt", b"truncated")
    assert checkpoint.latest_checkpoint(root) == f"{root}/step-00000005"
    save(root, 6)
    assert filesystem.find(f"{path}/{leftover}") == []


def test_nan_weights_never_saved(root):
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(checkpoint.NonFiniteWeightsError, match="step 7 contain NaN or inf"):
        save(root, 7, model=model)
    assert checkpoint.list_checkpoints(root) == []


def _flip_last_byte(filesystem, path):
    data = filesystem.cat_file(path)
    filesystem.pipe_file(path, data[:-1] + bytes([data[-1] ^ 0x01]))


def test_store_damaged_latest_falls_back(root, caplog):
    """A file changed on the store after the save fails its checksum, and the resume falls back
    to the checkpoint before it."""
    save(root, 1, keep=2)
    newest = save(root, 2, keep=2)
    filesystem, path = storage.resolve(newest)
    _flip_last_byte(filesystem, f"{path}/model.pt")
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        loaded = checkpoint.load_latest(root)
    assert loaded is not None
    assert loaded.step == 1
    assert f"model.pt in checkpoint {newest} does not match the checksum" in caplog.text


def test_full_scratch_disk_not_damage(root, tmp_path, monkeypatch):
    """A local disk too full for the download is not a damaged checkpoint. The load stops with
    an error that names the temporary directory, rather than falling back to an older
    checkpoint or to step 0, and the partial download is removed."""
    import errno
    import tempfile
    from pathlib import Path

    save(root, 1, keep=2)
    save(root, 2, keep=2)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_open = Path.open

    def full_disk(self, mode="r", *args, **kwargs):
        if "w" in mode and self.parent.name.startswith("lathe-checkpoint-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    with pytest.raises(checkpoint.ScratchSpaceError, match=f"free space in {tmp_path}"):
        checkpoint.load_latest(root)
    assert list(tmp_path.glob("lathe-checkpoint-*")) == []


def test_store_replaces_damaged_same_step(root, caplog):
    """A same-step checkpoint of the same run is hashed from the store before it is kept."""
    first = save(root, 3, keep=2)
    filesystem, path = storage.resolve(first)
    _flip_last_byte(filesystem, f"{path}/optimizer.pt")
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        save(root, 3, keep=2)
    assert f"The existing checkpoint {first} is damaged" in caplog.text
    assert checkpoint.load(first).step == 3


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("pvc://artifacts/runs/a", "/mnt/claims/artifacts/runs/a"),
        ("file:///tmp/x", "file:///tmp/x"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
    ],
)
def test_pvc_uri_maps_to_mount(monkeypatch, uri, expected):
    monkeypatch.setenv("LATHE_ARTIFACTS_MOUNT", "/mnt/claims")
    assert storage.to_fsspec_url(uri) == expected


def test_pvc_without_claim_rejected():
    with pytest.raises(ValueError, match="names no claim"):
        storage.to_fsspec_url("pvc:///path")


def test_unknown_protocol_rejected():
    with pytest.raises(ValueError, match="no filesystem for 'nosuch://b/x'"):
        storage.resolve("nosuch://b/x")


def test_local_paths_stay_paths(tmp_path):
    filesystem, path = storage.resolve(tmp_path)
    assert storage.is_local(filesystem)
    assert storage.display(filesystem, path) == tmp_path
    assert isinstance(fsspec.filesystem("memory"), fsspec.AbstractFileSystem)


class _FailingCopy(MemoryFileSystem):
    """The memory store, with a copy that fails after `copies` files, as a crash would."""

    copies = 2

    def copy(self, path1, path2, *args, **kwargs):
        if self.copies == 0:
            raise OSError("the copy was cut off")
        self.copies -= 1
        return super().copy(path1, path2, *args, **kwargs)


def test_move_tree_copies_named_file_last():
    """A model folder cut off while it is copied to an object store has no config.json, so no
    reader takes it for a whole model."""
    filesystem = _FailingCopy(skip_instance_cache=True)
    source = f"/move-{uuid.uuid4().hex}/tmp"
    for name in ("config.json", "a.safetensors", "tokenizer.json"):
        filesystem.pipe_file(f"{source}/{name}", b"x")
    with pytest.raises(OSError, match="cut off"):
        storage.move_tree(filesystem, source, f"{source}-final", last="config.json")
    assert sorted(filesystem.find(f"{source}-final")) == [
        f"{source}-final/a.safetensors", f"{source}-final/tokenizer.json"]

    filesystem.copies = 10
    storage.move_tree(filesystem, source, f"{source}-final", last="config.json")
    assert sorted(path.rpartition("/")[2] for path in filesystem.find(f"{source}-final")) == [
        "a.safetensors", "config.json", "tokenizer.json"]
    assert not filesystem.find(source)
    filesystem.rm(f"{source}-final", recursive=True)
