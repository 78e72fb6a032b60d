"""The contract between a plan and the code that runs inside its workload.

A plan (lathe.plans) serializes a StageConfig to JSON. The workload reads it with
`load_config`, does its work in `config.output_uri`, reports progress with `ProgressReporter`,
and finishes with `write_manifest`, which records the input and output digests for lineage and
for the reuse of finished stages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from lathe_trainer.training import storage

MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"


class ResolvedInput(BaseModel):
    """A finished upstream stage, as the consuming stage sees it."""

    kind: str
    name: str
    uri: str
    digest: str


class StageConfig(BaseModel):
    """Everything a stage workload needs, produced by the plan for its kind."""

    kind: str
    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 1
    stage_key: str = Field(description="Digest of the spec, the input digests and code version.")
    resume_key: str = Field(
        default="",
        description="Digest of the spec and the input digests. A stage resumes only from "
        "checkpoints written under the same key; empty matches any.",
    )
    spec: dict[str, Any] = Field(description="The resource spec, in its wire (camelCase) form.")
    inputs: dict[str, ResolvedInput] = Field(default_factory=dict)
    output_uri: str
    data_dir: str = Field(description="Where relative source paths in the spec resolve.")
    code_version: str = ""
    image: str = ""
    staged_from: dict[str, str] = Field(
        default_factory=dict,
        description="Local URI -> remote URI of the inputs that lathe_trainer.remote copied to "
        "the node, so that the manifest records where they came from.",
    )


def load_config(path: str | os.PathLike[str]) -> StageConfig:
    return StageConfig.model_validate_json(Path(path).read_text())


def local_path(uri: str) -> Path:
    """Return the local directory behind a `file://` URI or a plain path."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        # The backend mounts pvc:// claims, and lathe_trainer.remote stages s3:// inputs,
        # outputs and data paths through local directories, so stages see local paths.
        raise ValueError(f"URI {uri!r} is not a local path; pass a file:// URI or a plain "
                         "path here.")
    return Path(uri)


def resolve_data_path(config: StageConfig, path: str) -> Path:
    """Resolve a path from the spec against the data directory.

    A path on an object store, or relative to a data directory there, is downloaded to the
    node first (lathe_trainer.remote.fetch).
    """
    if storage.is_remote(path):
        resolved = _fetch(path)
    elif storage.is_remote(config.data_dir) and not path.startswith("file://") and not (
        Path(path).is_absolute()
    ):
        resolved = _fetch(f"{config.data_dir.rstrip('/')}/{path}")
    elif Path(path).is_absolute():
        resolved = Path(path)
    elif path.startswith("file://"):
        resolved = local_path(path)
    else:
        resolved = local_path(config.data_dir) / path
    _DATA_READ.setdefault(config.output_uri, {})[path] = resolved
    return resolved


# The data paths each stage output's run resolved, as the spec gives them, with their local
# files. The manifest records a digest of each file among them, for lineage.
_DATA_READ: dict[str, dict[str, Path]] = {}


def _fetch(uri: str) -> Path:
    from lathe_trainer import remote  # imports this module

    return remote.fetch(uri)


def data_digests(config: StageConfig) -> dict[str, str]:
    """Return {path as the spec gives it: digest} of the data files and directories the stage
    has read.

    A directory, such as a FineTune's baseModel.uri, gets the digest a stage output gets, so a
    model directory that a PretrainJob wrote has its manifest's digest.
    """
    digests = {}
    for path, resolved in sorted(_DATA_READ.get(config.output_uri, {}).items()):
        if resolved.is_file():
            digests[path] = data_file_digest(resolved)
        elif resolved.is_dir():
            digests[path] = combined_digest(digest_outputs(resolved))
    return digests


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def data_file_digest(path: Path) -> str:
    """Return sha256_file(path) of an input data file, hashed once per process.

    A stage hashes a data file for its statistics and again for the manifest. Data files are
    inputs, which the stage does not write, unlike its outputs.
    """
    return _data_file_digest(path.resolve())


@functools.lru_cache(maxsize=4096)
def _data_file_digest(path: Path) -> str:
    return sha256_file(path)


def digest_outputs(output_dir: Path, exclude: tuple[str, ...] = (MANIFEST, PROGRESS)) -> dict:
    """Return {relative path: digest} for every file under output_dir, sorted by path."""
    files = {}
    for path in sorted(output_dir.rglob("*")):
        relative = path.relative_to(output_dir).as_posix()
        if path.is_file() and relative not in exclude and not relative.startswith("checkpoints/"):
            files[relative] = sha256_file(path)
    return files


def combined_digest(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for relative, file_digest in sorted(files.items()):
        digest.update(f"{relative}\0{file_digest}\n".encode())
    return "sha256:" + digest.hexdigest()


def write_manifest(
    config: StageConfig, metrics: dict[str, Any], run_records: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Write manifest.json into the output directory and return it.

    The manifest is written last and atomically (rename), so its presence means the stage
    finished: a reader never sees a manifest for a half-written output.
    `run_records` are output files that describe how the run went (speed, memory, the step it
    resumed from, local paths). They are listed in `outputs` but left out of the digest, so
    two runs that write the same artifact have the same digest and the stages after them are
    reused.
    """
    output_dir = local_path(config.output_uri)
    files = digest_outputs(output_dir)
    content = {path: digest for path, digest in files.items() if path not in run_records}
    manifest = {
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": config.kind,
        "name": config.name,
        "namespace": config.namespace,
        "uid": config.uid,
        "generation": config.generation,
        "stageKey": config.stage_key,
        "inputs": {
            role: {**item.model_dump(), "uri": config.staged_from.get(item.uri, item.uri)}
            for role, item in config.inputs.items()
        },
        "outputs": files,
        "digest": combined_digest(content),
        "runRecords": sorted(set(files) - set(content)),
        "data": data_digests(config),
        "metrics": metrics,
        "codeVersion": config.code_version,
        "image": config.image,
        "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = output_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, output_dir / MANIFEST)
    write_termination_message(manifest)
    return manifest


def write_termination_message(manifest: dict[str, Any]) -> None:
    """Hand the digest and final metrics to the operator through the pod's termination message.

    Kubernetes keeps at most 4096 bytes of it, so metrics are dropped before the digest is.
    Outside a pod (no LATHE_TERMINATION_LOG) this does nothing.
    """
    path = os.environ.get("LATHE_TERMINATION_LOG")
    if not path:
        return
    message = {"digest": manifest["digest"], "metrics": manifest["metrics"]}
    text = json.dumps(message, separators=(",", ":"))
    if len(text.encode()) > 4096:
        text = json.dumps({"digest": manifest["digest"]})
    Path(path).write_text(text)


def read_manifest(output_uri: str) -> dict[str, Any] | None:
    path = local_path(output_uri) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


class ProgressReporter:
    """Append progress records to progress.jsonl in the output directory.

    Only rank 0 should report. The local runner tails the file for its progress bars; in the
    cluster the same records reach the operator through the trainer's metrics endpoint.
    """

    def __init__(self, config: StageConfig, total: int | None = None, unit: str = "steps"):
        self.path = local_path(config.output_uri) / PROGRESS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total = total
        self.unit = unit
        self.started = time.monotonic()

    def update(self, completed: int, message: str = "", **metrics: Any) -> None:
        record = {
            "time": time.time(),
            "completed": completed,
            "total": self.total,
            "unit": self.unit,
            "message": message,
            "elapsedSeconds": round(time.monotonic() - self.started, 3),
            **metrics,
        }
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class StageError(Exception):
    """A permanent failure of a stage: bad input that a retry cannot fix.

    The message names the resource, the field, the bad value and the fix. The workload exits
    with EXIT_PERMANENT so that the Kubernetes podFailurePolicy does not retry it.
    """

    def __init__(self, config: StageConfig | None, field: str, message: str):
        prefix = f"{config.kind} {config.namespace}/{config.name}: " if config else ""
        super().__init__(f"{prefix}{field}: {message}")
        self.field = field


# Exit codes of stage workloads. The podFailurePolicy maps EXIT_PERMANENT to FailJob; any other
# non-zero exit is retried from the latest checkpoint.
EXIT_PERMANENT = 42
