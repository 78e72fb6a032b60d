"""Read live training progress from the artifact store.

Rank 0 appends progress records to `progress.jsonl` in the stage's output directory, which it
writes anyway. Reading that file needs no extra privileges for the training pods: no API access,
no open port. The operator's periodic pass reads the last record.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

# Imported for its side effect: it registers obstore's fsspec store for s3:// URIs.
import lathe_trainer.training.storage  # noqa: F401
from lathe_trainer.stage import PROGRESS

# Bytes read from the end of the file: far more than one record.
TAIL_BYTES = 8192


def _fsspec_url(uri: str, mounts: dict[str, str]) -> str | None:
    if uri.startswith("pvc://"):
        claim, _, path = uri[len("pvc://"):].partition("/")
        if claim not in mounts:
            return None  # NOTE: the operator reads only claims it mounts (see the Helm chart).
        return f"file://{mounts[claim].rstrip('/')}/{path}"
    return uri


def read_latest(output_uri: str, mounts: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Return the last progress record of a stage, or None when there is none yet."""
    url = _fsspec_url(output_uri.rstrip("/") + "/" + PROGRESS, mounts or {})
    if url is None:
        return None
    filesystem, path = fsspec.core.url_to_fs(url)
    # NB: checked first because obstore's file object (0.12) fails in its destructor when the
    # open raises FileNotFoundError.
    if not filesystem.isfile(path):
        return None
    try:
        with filesystem.open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - TAIL_BYTES))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # a partial line at the cut or mid-write
    return None


def to_status(record: dict[str, Any]) -> dict[str, Any]:
    """Map a progress record onto the `status.progress` fields.

    Fields the record lacks are left out, and so is an empty message. The operator writes the
    result with a merge patch, so a left-out field keeps its previous value in status: the
    message of a skipped step or a new curriculum stage stays until the trainer reports another.
    """
    import time

    progress = {
        "step": record.get("completed"),
        "totalSteps": record.get("total"),
        "tokensSeen": record.get("tokensSeen"),
        "loss": record.get("loss"),
        "tokensPerSecond": record.get("tokensPerSecond"),
        "etaSeconds": record.get("etaSeconds"),
        "nonFiniteSteps": record.get("nonFiniteSteps"),
        "curriculumStage": record.get("curriculumStage"),
        "mfu": record.get("mfu"),
        "message": record.get("message") or None,
        "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.get("time", 0))),
    }
    return {key: value for key, value in progress.items() if value is not None}
