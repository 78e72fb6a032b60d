"""Checkpoints of the whole training state, written atomically under `checkpoints/`.

Layout: `checkpoints/step-NNNNNNNN/` holding `model.pt`, `optimizer.pt`, `scheduler.pt`,
`rng.pt` (one entry per rank) and `state.json` (step, data position, counters, whatever the
stage stores to check that a resume is compatible, and under `files` the size and SHA-256 of
each of the four other files, which `load` verifies). The root is a local path or any fsspec URL
(see lathe_trainer.training.storage). Rank 0 writes the directory under a temporary name and
moves it into place, so a reader finds either a complete checkpoint or none. On a local disk
the move is one atomic rename and state.json is written first. On object stores a move copies
file by file, so there state.json is written after the move: list_checkpoints treats a
directory without state.json as incomplete. A process killed while saving leaves only a
`.tmp-*` directory (or a directory without state.json), which the next save removes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import fsspec
import torch

from lathe_trainer.training import distributed, parallel, storage
from lathe_trainer.training.distributed import DistributedContext

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE = "state.json"
# The resume key (StageConfig.resume_key) of the run that wrote a set of checkpoints, so that a
# run of another spec or other inputs does not resume from them. A PretrainJob stores it in each
# checkpoint's state.json, a FineTune in a file beside its phase directories.
RESUME_KEY = "resume-key"
STATE_RESUME_KEY = "resumeKey"
STEP_DIR = re.compile(r"^step-(\d{8})$")
# The key of state.json that maps each tensor file's name to its size and SHA-256.
FILES = "files"
TENSOR_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "rng.pt")
# The size of the reads that hash a stored file without holding all of it in memory.
HASH_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass
class Checkpoint:
    """A checkpoint read back from disk, with tensors on the CPU."""

    path: Path | str
    step: int
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path | str) -> list[tuple[int, Path | str]]:
    """Return the complete checkpoints under root as (step, path or URL), oldest first."""
    filesystem, base = storage.resolve(root)
    found = []
    for step, path in _step_dirs(filesystem, base):
        if filesystem.isfile(f"{path}/{STATE}"):
            found.append((step, storage.display(filesystem, path)))
    return sorted(found)


def _step_dirs(filesystem: fsspec.AbstractFileSystem, base: str) -> list[tuple[int, str]]:
    if not filesystem.isdir(base):
        return []
    found = []
    for path in filesystem.ls(base, detail=False):
        match = STEP_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
        if match:
            found.append((int(match.group(1)), path.rstrip("/")))
    return found


def latest_checkpoint(root: Path | str) -> Path | str | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# The errors of reading a checkpoint file that was cut short, emptied, removed or otherwise
# changed after the checkpoint was complete. torch.load raises RuntimeError for a broken zip
# archive, and a file that differs from its checksum raises ChecksumMismatchError, a ValueError.
# The weights-only unpickler raises IndexError on some garbage, such as a file of a few bytes.
UNREADABLE = (OSError, ValueError, KeyError, IndexError, EOFError, RuntimeError,
              pickle.UnpicklingError)


def load_latest(root: Path | str) -> Checkpoint | None:
    """Read the newest checkpoint under root that can be read, or None when none can.

    NB: a checkpoint damaged after it was written would fail every retry of the stage if it were
    read alone, so the one before it is used. Such damage includes a file cut short on a full
    disk and a file whose bytes no longer match its checksum.
    """
    found = list_checkpoints(root)
    for _, path in reversed(found):
        try:
            return load(path)
        except UNREADABLE as error:
            log.warning("Checkpoint %s cannot be read (%s: %s), so the checkpoint before it is "
                        "tried; delete the damaged one to keep this from repeating.", path,
                        type(error).__name__, error)
    if found:
        log.warning("None of the %d checkpoints under %s can be read, so training starts from "
                    "step 0.", len(found), root)
    return None


def load_agreed(root: Path | str, context: DistributedContext) -> Checkpoint | None:
    """Read the newest checkpoint under root that every rank can read (collective).

    Each rank reads on its own, and one that cannot read the newest checkpoint (a transient
    storage error, a file damaged on one node's copy) falls back to an earlier one. Ranks that
    went on from different steps would train different weights under DDP, which broadcasts
    them only when it wraps the model, and would hang at the first collective that the others
    have passed. So all ranks continue from the lowest step any of them read.
    """
    saved = load_latest(root)
    step = saved.step if saved is not None else -1
    (negated,) = distributed.all_reduce_max(context, [-step])
    agreed = int(-negated)
    if agreed == step:
        return saved
    if agreed < 0:
        log.warning("Rank %d read the checkpoint of step %d under %s, but another rank could "
                    "read none, so every rank starts from step 0.", context.rank, step, root)
        return None
    path = dict(list_checkpoints(root)).get(agreed)
    log.warning("Rank %d read the checkpoint of step %d under %s, but another rank could read "
                "only up to step %d, so every rank continues from step %d.", context.rank, step,
                root, agreed, agreed)
    if path is None:
        raise FileNotFoundError(f"the checkpoint of step {agreed} under {root}, which another "
                                "rank read, is gone on this one")
    return load(path)


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_python_state(value: Any) -> tuple:
    # random.setstate needs tuples; a round trip through torch.save keeps them, but be lenient
    # about lists in case a checkpoint was rewritten by other tools.
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def save(
    context: DistributedContext,
    root: Path | str,
    step: int,
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
) -> Path | str:
    """Save a checkpoint for `step` and prune all but the newest `keep`. Collective call.

    Every rank must call it, because the RNG states of all ranks are gathered to rank 0, and
    FSDP gathers the sharded state dicts there too; rank 0 alone writes. `model` is the
    unwrapped module (not the DDP wrapper), or the FSDP-sharded one.
    A complete checkpoint for `step` with the same resume key (`state[STATE_RESUME_KEY]`) is
    kept as it is, because removing it before the new one is in place could leave no checkpoint
    at all if the save were interrupted. One whose files do not match their checksums is
    replaced, because no run can resume from it.
    Raises NonFiniteWeightsError on every rank, before writing, if any weight is NaN or inf.
    """
    if FILES in state:
        raise ValueError(f"the checkpoint state of step {step} contains the key {FILES!r}, "
                         "which save reserves for the checksums of the tensor files. Store "
                         "that value under another key.")
    (bad_ranks,) = distributed.all_reduce_sum(context, [0.0 if parallel.all_finite(model) else 1.0])
    if bad_ranks:
        raise NonFiniteWeightsError(step)
    rng_states = distributed.all_gather_objects(context, capture_rng_state())
    model_state, optimizer_state = parallel.full_state_dicts(model, optimizer)
    filesystem, base = storage.resolve(root)
    final = f"{base}/{step_dir_name(step)}"
    if context.is_main and _same_checkpoint_exists(filesystem, final, state):
        log.info("Kept the existing checkpoint for step %d at %s.", step,
                 storage.display(filesystem, final))
    elif context.is_main:
        filesystem.makedirs(base, exist_ok=True)
        _remove_incomplete_dirs(filesystem, base)
        tmp = f"{base}/.tmp-{step_dir_name(step)}-{os.getpid()}"
        filesystem.makedirs(tmp, exist_ok=True)
        values = (model_state, optimizer_state, scheduler.state_dict(), rng_states)
        files = {}
        for name, value in zip(TENSOR_FILES, values, strict=True):
            files[name] = _write_tensors(filesystem, f"{tmp}/{name}", value)
        stored = {**state, "step": step, FILES: files}
        state_json = json.dumps(stored, indent=2, sort_keys=True).encode()
        if filesystem.exists(final):
            # A checkpoint for the same step of another run, or a damaged one of this run, is
            # replaced.
            # NOTE: a save interrupted between this removal and the move loses that checkpoint,
            # which is not one this run could resume from.
            _remove_checkpoint(filesystem, final)
        if storage.is_local(filesystem):
            Path(tmp, STATE).write_bytes(state_json)
            _fsync_tree(Path(tmp))
            os.rename(tmp, final)
            _fsync_dir(Path(base))
        else:
            storage.move_tree(filesystem, tmp, final)
            filesystem.pipe_file(f"{final}/{STATE}", state_json)
        prune(root, keep, saved_step=step)
        log.info("Saved the checkpoint for step %d to %s.", step,
                 storage.display(filesystem, final))
    distributed.barrier(context)
    return storage.display(filesystem, final)


def _same_checkpoint_exists(
    filesystem: fsspec.AbstractFileSystem, path: str, state: dict[str, Any]
) -> bool:
    """Return whether `path` is a complete, undamaged checkpoint written under the resume key
    of `state`.

    Its files are hashed again, which reads the whole checkpoint. A run resumed from the
    checkpoint before a damaged one reaches the damaged one's step, and would otherwise keep it.
    """
    display = storage.display(filesystem, path)
    try:
        stored = json.loads(filesystem.cat_file(f"{path}/{STATE}"))
    except FileNotFoundError:
        return False
    except UNREADABLE as error:
        log.warning("The existing checkpoint %s has an unreadable %s (%s: %s), so it is "
                    "replaced.", display, STATE, type(error).__name__, error)
        return False
    if not isinstance(stored, dict):
        return False
    if stored.get(STATE_RESUME_KEY) != state.get(STATE_RESUME_KEY):
        return False
    # NOTE: a checkpoint written before checksums were recorded has no `files`, so it is kept
    # unverified, as it was before.
    if FILES not in stored:
        return True
    try:
        for name in TENSOR_FILES:
            actual = stored_record(filesystem, f"{path}/{name}")
            check_file(display, name, stored[FILES], actual)
    except UNREADABLE as error:
        log.warning("The existing checkpoint %s is damaged (%s: %s), so it is replaced.",
                    display, type(error).__name__, error)
        return False
    return True


class ChecksumMismatchError(ValueError):
    """A checkpoint file whose size or SHA-256 differs from what its state.json records."""

    def __init__(
        self, checkpoint: Path | str, name: str, expected: Any, actual: dict[str, Any]
    ):
        found = f"the file has {actual['bytes']} bytes with SHA-256 {actual['sha256']}"
        if _is_record(expected):
            recorded = (f"Its state.json records {expected['bytes']} bytes with SHA-256 "
                        f"{expected['sha256']}, but {found}.")
        else:
            recorded = f"Its state.json records no valid checksum ({expected!r}), and {found}."
        super().__init__(f"{name} in checkpoint {checkpoint} does not match the checksum in "
                         "its state.json, so one of the two changed after the checkpoint was "
                         f"written. {recorded} Delete the damaged checkpoint {checkpoint}.")
        self.checkpoint = checkpoint
        self.name = name
        self.expected = expected
        self.actual = actual


def file_record(data: bytes) -> dict[str, Any]:
    """Return the size and SHA-256 of a checkpoint file's bytes, as state.json records them."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def check_file(
    checkpoint: Path | str, name: str, files: Any, actual: dict[str, Any]
) -> None:
    """Raise ChecksumMismatchError unless `actual` matches the record for `name` in `files`.

    `files` is the `files` value of the checkpoint's state.json, and `actual` is the
    `file_record` of the bytes read from the file `name`.
    """
    expected = files.get(name) if isinstance(files, dict) else None
    if not (_is_record(expected) and expected["bytes"] == actual["bytes"]
            and expected["sha256"] == actual["sha256"]):
        raise ChecksumMismatchError(checkpoint, name, expected, actual)


def _is_record(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("sha256"), str)
            and isinstance(value.get("bytes"), int))


def stored_record(filesystem: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """Return the `file_record` of a stored file, read in chunks of HASH_CHUNK_BYTES."""
    with filesystem.open(path, "rb") as handle:
        return _streamed_record(handle)


def _streamed_record(source, write: Callable[[bytes], Any] | None = None) -> dict[str, Any]:
    """Return the `file_record` of what `source` reads, in chunks of HASH_CHUNK_BYTES, and pass
    each chunk to `write` as well."""
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(HASH_CHUNK_BYTES):
        digest.update(chunk)
        if write is not None:
            write(chunk)
        size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


class NonFiniteWeightsError(RuntimeError):
    """A checkpoint was about to store NaN or infinite weights."""

    def __init__(self, step: int):
        super().__init__(f"the weights at step {step} contain NaN or inf values, so no "
                         "checkpoint was written")
        self.step = step


def load(path: Path | str) -> Checkpoint:
    """Read a checkpoint. Tensors land on the CPU; the caller moves what it needs.

    Raises ChecksumMismatchError when a file differs from the size and SHA-256 that state.json
    records. A checkpoint written before checksums were recorded has no `files` in its
    state.json, and its files are loaded unverified, as they were before.
    """
    filesystem, base = storage.resolve(path)
    display = storage.display(filesystem, base)
    state = json.loads(filesystem.cat_file(f"{base}/{STATE}"))
    # The files of an object store are downloaded into a local temporary directory and loaded
    # from there like local ones, so that no process keeps their bytes in memory beside the
    # tensors. The mapped weights stay valid after the directory is removed.
    scratch = None if storage.is_local(filesystem) else tempfile.TemporaryDirectory(
        prefix="lathe-checkpoint-")

    def read(name: str) -> Any:
        location = f"{base}/{name}"
        if scratch is None:
            record = stored_record(filesystem, location) if FILES in state else None
        else:
            location, record = _download(filesystem, location, Path(scratch.name) / name)
        # Hashed in chunks and loaded from the file rather than from its bytes in memory:
        # every process of a node loads the full checkpoint, and the bytes next to the tensors
        # would need twice its size per process.
        if record is not None:
            check_file(display, name, state[FILES], record)
        # The weights are memory-mapped, so the processes of a node share their pages until
        # load_state_dict copies them. The optimizer state is read into memory instead: on a
        # CPU the optimizer keeps the loaded tensors, and mapped ones would keep a removed
        # checkpoint's disk space allocated.
        # NB: weights_only=True keeps torch.load from running arbitrary pickled code.
        return torch.load(location, map_location="cpu", weights_only=True,
                          mmap=name == "model.pt")

    try:
        return Checkpoint(
            path=display,
            step=int(state["step"]),
            state=state,
            model=read("model.pt"),
            optimizer=read("optimizer.pt"),
            scheduler=read("scheduler.pt"),
            rng=read("rng.pt"),
        )
    finally:
        if scratch is not None:
            scratch.cleanup()


def _download(
    filesystem: fsspec.AbstractFileSystem, path: str, target: Path
) -> tuple[str, dict[str, Any]]:
    """Copy a stored file to `target` in chunks of HASH_CHUNK_BYTES; return the local path and
    the file's `file_record`.

    NB: in one measurement on SeaweedFS, fsspec's get_file of s3fs raised the peak resident set
    size by about twice the file's size, so the copy reads ranges of its own.
    """
    with filesystem.open(path, "rb", block_size=HASH_CHUNK_BYTES) as source:
        try:
            sink = target.open("wb")
        except OSError as error:
            raise ScratchSpaceError(path, target, error) from error
        with sink:

            def write(chunk: bytes) -> None:
                try:
                    sink.write(chunk)
                except OSError as error:
                    raise ScratchSpaceError(path, target, error) from error

            return str(target), _streamed_record(source, write)


class ScratchSpaceError(Exception):
    """A checkpoint file could not be written to the local temporary directory it loads from.

    Not one of UNREADABLE, because the checkpoint itself is fine: falling back to an older
    checkpoint, or to step 0, would throw away training for a full local disk.
    """

    def __init__(self, path: str, target: Path, error: OSError):
        super().__init__(
            f"copying checkpoint file {path} to {target} failed ({error.strerror or error}); "
            f"free space in {target.parent.parent} or set TMPDIR to a larger local disk, then "
            "run again. The checkpoint itself was not changed.")


def prune(root: Path | str, keep: int, saved_step: int | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints.

    The checkpoint of `saved_step`, the one just written, counts as the newest whatever its
    step (see `prune_order`).
    """
    filesystem, _ = storage.resolve(root)
    found = prune_order(list_checkpoints(root), saved_step)
    for step, path in found[: max(0, len(found) - keep)]:
        _remove_checkpoint(filesystem, storage.resolve(path)[1])
        log.info("Removed the checkpoint for step %d, keeping the newest %d.", step, keep)


def prune_order(found: list[tuple[int, Any]], saved_step: int | None) -> list[tuple[int, Any]]:
    """Return (step, path) pairs in the order that pruning deletes them: by step, oldest
    first, with the checkpoint of `saved_step` last.

    A run that resumed or rolled back past an unreadable checkpoint saves steps below that
    checkpoint's step. Pruning by step alone would then delete the checkpoint just written
    and keep the unreadable one, which leaves nothing to resume from when `keep` is 1.
    """
    ordered = sorted(found, key=lambda item: item[0])
    return ([item for item in ordered if item[0] != saved_step]
            + [item for item in ordered if item[0] == saved_step])


def written_for(root: Path | str, key: str) -> bool:
    """Return whether a run with resume key `key` may resume from the checkpoints under root.

    The key is read from the latest checkpoint's state.json, else from a `resume-key` file
    under root. Checkpoints that record no key, written before keys were recorded, belong to
    another run. Also True when root contains nothing to resume, and when `key` is empty.
    """
    if not key:
        return True
    filesystem, base = storage.resolve(root)
    # The newest checkpoint whose state.json can be read, as load_latest would resume from it.
    for _, checkpoint_path in reversed(list_checkpoints(root)):
        _, path = storage.resolve(checkpoint_path)
        try:
            state = json.loads(filesystem.cat_file(f"{path}/{STATE}"))
        except UNREADABLE:
            continue
        return isinstance(state, dict) and state.get(STATE_RESUME_KEY) == key
    try:
        return filesystem.cat_file(f"{base}/{RESUME_KEY}").decode().strip() == key
    except FileNotFoundError:
        return not (filesystem.isdir(base) and filesystem.ls(base, detail=False))


def record_resume_key(root: Path | str, key: str) -> None:
    """Write the `resume-key` file of the run that writes checkpoints under root."""
    if not key:
        return
    filesystem, base = storage.resolve(root)
    filesystem.makedirs(base, exist_ok=True)
    filesystem.pipe_file(f"{base}/{RESUME_KEY}", key.encode())


def remove_all(root: Path | str) -> None:
    """Remove every checkpoint under root, for a run that starts over without --resume."""
    filesystem, base = storage.resolve(root)
    if filesystem.isdir(base):
        storage.remove_tree(filesystem, base)


def _write_tensors(
    filesystem: fsspec.AbstractFileSystem, path: str, value: Any
) -> dict[str, Any]:
    """Write `value` with torch.save and return the file's record for state.json."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = buffer.getvalue()
    filesystem.pipe_file(path, data)
    return file_record(data)


def _remove_checkpoint(filesystem: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete a checkpoint directory, state.json first.

    NB: an object store deletes the files of a directory in no particular order, so without
    this a save or prune killed midway could leave state.json beside missing tensor files.
    """
    try:
        filesystem.rm_file(f"{path}/{STATE}")
    except FileNotFoundError:
        pass
    storage.remove_tree(filesystem, path)


def _remove_incomplete_dirs(filesystem: fsspec.AbstractFileSystem, base: str) -> None:
    """Remove `.tmp-*` directories and step directories without state.json."""
    # NB: object stores have no empty directories, so base does not exist before the first save.
    if not filesystem.isdir(base):
        return
    for path in filesystem.ls(base, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        incomplete = STEP_DIR.match(name) and not filesystem.isfile(f"{path}/{STATE}")
        if name.startswith(".tmp-step-") or incomplete:
            storage.remove_tree(filesystem, path)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
