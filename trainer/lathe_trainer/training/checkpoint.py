"""Checkpoints of the whole training state, written atomically under `checkpoints/`.

Layout: `checkpoints/step-NNNNNNNN/` holding `model.pt`, `optimizer.pt`, `scheduler.pt`,
`rng.pt` (one entry per rank) and `state.json` (step, data position, counters, and whatever the
stage stores to check that a resume is compatible). Rank 0 writes the directory under a
temporary name and renames it into place, so a reader finds either a complete checkpoint or
none: a process killed while saving leaves only a `.tmp-*` directory, removed on the next save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lathe_trainer.training import distributed
from lathe_trainer.training.distributed import DistributedContext

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    """A checkpoint read back from disk, with tensors on the CPU."""

    path: Path
    step: int
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Return the complete checkpoints under root as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


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
    root: Path,
    step: int,
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
) -> Path:
    """Save a checkpoint for `step` and prune all but the newest `keep`. Collective call.

    Every rank must call it, because the RNG states of all ranks are gathered to rank 0, which
    alone writes. `model` is the unwrapped module (not the DDP wrapper).
    """
    rng_states = distributed.all_gather_objects(context, capture_rng_state())
    final = root / step_dir_name(step)
    if context.is_main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_temporary_dirs(root)
        tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        tmp.mkdir()
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        # state.json is written last: list_checkpoints treats a directory without it as
        # incomplete.
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        if final.exists():
            # A checkpoint for the same step from an earlier attempt: replace it.
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        prune(root, keep)
        log.info("Saved the checkpoint for step %d to %s.", step, final)
    distributed.barrier(context)
    return final


def load(path: Path) -> Checkpoint:
    """Read a checkpoint. Tensors land on the CPU; the caller moves what it needs."""
    state = json.loads((path / STATE).read_text())

    def read(name: str) -> Any:
        # NB: weights_only=True keeps torch.load from running arbitrary pickled code.
        return torch.load(path / name, map_location="cpu", weights_only=True)

    return Checkpoint(
        path=path,
        step=int(state["step"]),
        state=state,
        model=read("model.pt"),
        optimizer=read("optimizer.pt"),
        scheduler=read("scheduler.pt"),
        rng=read("rng.pt"),
    )


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    found = list_checkpoints(root)
    for step, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path)
        log.info("Removed the checkpoint for step %d, keeping the newest %d.", step, keep)


def remove_all(root: Path) -> None:
    """Remove every checkpoint under root, for a run that starts over without --resume."""
    if root.is_dir():
        shutil.rmtree(root)


def _remove_temporary_dirs(root: Path) -> None:
    for path in root.glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)


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
