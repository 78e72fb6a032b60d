"""Checkpoints of a FineTune run, so a retried attempt continues where the last one stopped.

Layout under the output directory: `checkpoints/<phase>/step-NNNNNNNN/state.pt` contains the
trainable parameters, the optimizer and scheduler state, the torch random state, the step,
the data step (batches consumed, skipped ones included), the counts of non-finite and fp16
overflow steps, and an fp16 run's loss scale.
A phase is `lora` or `full` (the fine-tuning of the base model) or `scratch` (the same
architecture from random initialization). `checkpoints/<phase>/result.json` marks a finished phase and contains its
evaluation. A resumed run skips the phases that finished. `state.json` beside each `state.pt`
records the step and, under `files`, the size and SHA-256 of state.pt, which `load` verifies.

Only rank 0 writes. Every process reads the same checkpoint on resume (`load_agreed`), because
all processes hold identical weights after each step. A remote output's mirror uploads state.json after state.pt
(lathe_trainer.remote.MARKERS), so a state.pt without state.json is either one written before
checksums were recorded or one whose state.json is still to come, and both load unverified.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import fsspec
import torch

from lathe_trainer.finetune import distributed
from lathe_trainer.training import checkpoint as training_checkpoint

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
# A checkpoint moved aside while a new one for the same step takes its place (see save).
ASIDE_DIR = re.compile(r"^\.old-step-(\d{8})$")
STATE_FILE = "state.pt"
# The step and the checksum of STATE_FILE, in the format of a training checkpoint's state.json.
# `lathe run` also finds a phase's checkpoints by this file when it names the resume point.
CHECKSUM_FILE = training_checkpoint.STATE
RESULT_FILE = "result.json"


def step_dirs(phase_dir: Path) -> list[tuple[int, Path]]:
    """Return the complete checkpoints of a phase as (step, path), oldest first."""
    found: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    if phase_dir.is_dir():
        for path in phase_dir.iterdir():
            match = STEP_DIR.match(path.name) or ASIDE_DIR.match(path.name)
            if match and (path / STATE_FILE).is_file():
                (found if match.re is STEP_DIR else aside)[int(match.group(1))] = path
    # A save interrupted between its two renames left the old checkpoint aside and none in
    # its place; that old one is still complete.
    for step, path in aside.items():
        found.setdefault(step, path)
    return sorted(found.items())


def save(phase_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically (temporary directory, then rename) and prune old ones."""
    target = phase_dir / f"step-{step:08d}"
    tmp = phase_dir / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    (tmp / STATE_FILE).write_bytes(data)
    record = {"step": step, training_checkpoint.FILES: {
        STATE_FILE: training_checkpoint.file_record(data)}}
    (tmp / CHECKSUM_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    # A checkpoint for the same step (a run that started over) is moved aside, not removed,
    # until the new one is in place: an interrupted save then still leaves a complete one.
    aside = phase_dir / f".old-step-{step:08d}"
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(tmp, target)
    shutil.rmtree(aside, ignore_errors=True)
    for _, old in training_checkpoint.prune_order(step_dirs(phase_dir), step)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("Saved checkpoint %s.", target)
    return target


def load_latest(phase_dir: Path) -> dict[str, Any] | None:
    """Return the state of the newest checkpoint of a phase that can be read, or None when none
    can.

    NB: a checkpoint damaged after it was written would fail every retry if it were read alone,
    so the one before it is used. Such damage includes a state.pt cut short and one whose bytes
    no longer match its checksum.
    """
    found = step_dirs(phase_dir)
    for step, path in reversed(found):
        try:
            state = load(path)
        except training_checkpoint.UNREADABLE as error:
            log.warning("Checkpoint %s cannot be read (%s: %s), so the checkpoint before it is "
                        "tried; delete the damaged one to keep this from repeating.", path,
                        type(error).__name__, error)
            continue
        log.info("Resuming from checkpoint %s at step %d.", path, step)
        return state
    if found:
        log.warning("None of the %d checkpoints in %s can be read, so the phase starts from "
                    "step 0.", len(found), phase_dir)
    return None


def load_agreed(phase_dir: Path) -> dict[str, Any] | None:
    """Return the state of the newest checkpoint that every process can read (collective).

    A process that cannot read the newest checkpoint falls back to an earlier one, and the
    others follow it: processes that continued from different steps would hold different
    weights and step through the loop a different number of times.
    """
    state = load_latest(phase_dir)
    step = int(state["step"]) if state is not None else -1
    agreed = min(distributed.all_gather_object(step))
    if agreed == step:
        return state
    if agreed < 0:
        log.warning("Process %d read the checkpoint of step %d in %s, but another process "
                    "could read none, so every process starts from step 0.",
                    distributed.rank(), step, phase_dir)
        return None
    log.warning("Process %d read the checkpoint of step %d in %s, but another process could "
                "read only up to step %d, so every process continues from step %d.",
                distributed.rank(), step, phase_dir, agreed, agreed)
    path = dict(step_dirs(phase_dir)).get(agreed)
    if path is None:
        raise FileNotFoundError(f"the checkpoint of step {agreed} in {phase_dir}, which another "
                                "process read, is gone on this one")
    return load(path)


def load(path: Path) -> dict[str, Any]:
    """Read the state of one checkpoint directory, verifying state.pt against state.json.

    Raises ChecksumMismatchError when state.pt differs from its recorded size and SHA-256. A
    checkpoint without state.json, written before checksums were recorded, loads unverified.
    """
    state_path = path / STATE_FILE
    checksum_path = path / CHECKSUM_FILE
    if checksum_path.is_file():
        recorded = json.loads(checksum_path.read_text())
        files = recorded.get(training_checkpoint.FILES) if isinstance(recorded, dict) else None
        # Hashed in chunks, so that a full fine-tune's state is not held in memory twice.
        actual = training_checkpoint.stored_record(fsspec.filesystem("file"), str(state_path))
        training_checkpoint.check_file(path, STATE_FILE, files, actual)
    # NB: weights_only=True keeps torch.load from running arbitrary pickled code. The state
    # holds only tensors, numbers and containers of them (lathe_trainer.finetune.train).
    return torch.load(state_path, map_location="cpu", weights_only=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return CPU copies of the parameters that training changes, by name."""
    return {
        name: parameter.detach().to("cpu", copy=True)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def restore_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Load trainable parameters saved by `trainable_state`; every one must be present."""
    check_trainable(model, saved)
    current = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            current[name].copy_(value)


def check_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless `saved` contains exactly the model's trainable parameters."""
    expected = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    if set(saved) != expected:
        missing = sorted(expected - set(saved))[:5]
        extra = sorted(set(saved) - expected)[:5]
        raise ValueError(
            "The checkpoint does not match the model: missing parameters "
            f"{missing}, unexpected parameters {extra}. Run without --resume to start over."
        )


def read_result(phase_dir: Path) -> dict[str, Any] | None:
    path = phase_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(phase_dir: Path, result: dict[str, Any]) -> None:
    phase_dir.mkdir(parents=True, exist_ok=True)
    tmp = phase_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    os.replace(tmp, phase_dir / RESULT_FILE)
