"""Read live training progress from the artifact store, or from rank 0's metrics port.

Rank 0 appends progress records to `progress.jsonl` in the stage's output directory, which it
writes anyway. Reading that file needs no extra privileges for the training pods: no API access,
no open port. The operator's periodic pass reads the last record.

An operator that cannot read the output directory (a PersistentVolumeClaim it does not mount)
reads the gauges that rank 0 of a PretrainJob serves for Prometheus over HTTP instead, as a
Prometheus server would scrape them. That also needs no privileges for the pods.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.request
from typing import Any

import fsspec
from prometheus_client.parser import text_string_to_metric_families

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


def readable(output_uri: str, mounts: dict[str, str] | None = None) -> bool:
    """Return whether the operator can read the output directory: any URI but a claim that it
    does not mount, or a file:// path that does not exist on the operator's filesystem.

    NB: a file:// directory that rank 0 has not created yet also counts as unreadable, so the
    caller asks the pod, which refuses until it serves. An object store counts as readable
    without a request, because a listing per pass would cost one per running job.
    """
    url = _fsspec_url(output_uri, mounts or {})
    if url is None:
        return False
    if url.startswith("file://"):
        return os.path.isdir(url[len("file://"):])
    return True


# The gauges of lathe_trainer.training.metrics.PrometheusExporter, by progress record field.
POD_GAUGES = {
    "lathe_training_step": "completed",
    "lathe_training_total_steps": "total",
    "lathe_training_loss": "loss",
    "lathe_training_tokens_per_second": "tokensPerSecond",
    "lathe_training_eta_seconds": "etaSeconds",
    "lathe_training_tokens_seen": "tokensSeen",
    "lathe_training_mfu_ratio": "mfu",
    "lathe_training_non_finite_steps": "nonFiniteSteps",
    "lathe_training_curriculum_stage": "curriculumStage",
}
# Seconds to wait for rank 0's metrics, kept short because the periodic pass reads every
# running job.
POD_TIMEOUT_SECONDS = 2.0
# An opener that ignores http_proxy, because a pod IP is reached directly. urllib (Python 3.11)
# matches no_proxy against host names only, so an entry such as 10.0.0.0/8 would not exempt it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def read_pod_metrics(address: str, port: int,
                     timeout: float = POD_TIMEOUT_SECONDS) -> dict[str, Any] | None:
    """Return a progress record built from the gauges that rank 0 serves at `address`, or None
    before it has finished a step. Raises OSError when the pod does not respond or its reply
    is not valid HTTP."""
    host = f"[{address}]" if ":" in address else address  # an IPv6 pod IP
    url = f"http://{host}:{port}/metrics"
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except http.client.HTTPException as error:
        # A reply that is not HTTP (BadStatusLine) or a body cut short (IncompleteRead), as
        # from a pod stopped mid-reply. http.client raises these outside the OSError tree.
        raise OSError(f"invalid HTTP reply from {url}: {error!r}") from error
    record: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        field = POD_GAUGES.get(family.name)
        # NB: JSON, and so status, has no NaN or infinity; a non-finite loss shows in
        # status.progress.nonFiniteSteps instead.
        if field is not None and family.samples and math.isfinite(family.samples[0].value):
            record[field] = family.samples[0].value
    # The gauges exist from the start at 0, so a run without a finished step has no progress.
    if not record.get("completed"):
        return None
    for field in ("completed", "total", "tokensSeen", "nonFiniteSteps", "curriculumStage"):
        if field in record:
            record[field] = int(record[field])
    if not record.get("mfu"):
        record.pop("mfu", None)  # 0 on CPUs, where MFU is not reported
    record["time"] = time.time()
    return record


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
