"""The local backend: run each stage's plan as local processes, in dependency order.

Each resource gets a directory in the workspace:

    <workspace>/<namespace>/<kind>/<name>/
        config.json    the StageConfig the plan produced
        status.json    conditions, artifact and metrics, as the operator would write to status
        stage.log      stdout and stderr of the workload
        output/        the artifact (manifest.json marks it finished)

A stage whose output manifest carries the same stage key (spec, input digests, code version) is
reused instead of run again. A stage that failed or was interrupted keeps its checkpoints and is
resumed with `--resume` on the next run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lathe import plans, preflight, status
from lathe.api import Resource
from lathe.errors import StageFailedError
from lathe.graph import order, upstream_key
from lathe.plans.base import CONFIG_PATH_PLACEHOLDER, WorkloadPlan
from lathe_trainer.stage import EXIT_PERMANENT, MANIFEST, PROGRESS, ResolvedInput

log = logging.getLogger(__name__)

# Seconds between reads of a running stage's progress file.
POLL_SECONDS = 0.5


@dataclass
class StageResult:
    resource: Resource
    output_dir: Path
    manifest: dict[str, Any]
    reused: bool
    seconds: float

    @property
    def resolved(self) -> ResolvedInput:
        return ResolvedInput(
            kind=self.resource.kind,
            name=self.resource.metadata.name,
            uri=f"file://{self.output_dir}",
            digest=self.manifest["digest"],
        )


@dataclass
class ProgressEvent:
    """What the runner tells its display about one stage."""

    key: str
    state: str  # "started", "progress", "reused", "succeeded", "failed"
    completed: float | None = None
    total: float | None = None
    message: str = ""
    record: dict[str, Any] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


def _ignore(_event: ProgressEvent) -> None:
    return None


class LocalRunner:
    """Run resources on this machine. Stateless between runs except for the workspace."""

    def __init__(
        self,
        workspace: Path,
        data_dir: Path,
        on_progress: ProgressCallback = _ignore,
        python: str = sys.executable,
    ):
        self.workspace = workspace.resolve()
        self.data_dir = data_dir.resolve()
        self.on_progress = on_progress
        self.python = python

    def stage_dir(self, resource: Resource) -> Path:
        meta = resource.metadata
        return self.workspace / meta.namespace / resource.kind.lower() / meta.name

    def check(self, resources: list[Resource]) -> list[Resource]:
        """Validate references and files; return the resources in dependency order."""
        ordered = order(resources)
        for resource in ordered:
            preflight.check_files(resource, self.data_dir)
        return ordered

    def run(self, resources: list[Resource]) -> dict[str, StageResult]:
        results: dict[str, StageResult] = {}
        for resource in self.check(resources):
            inputs = {
                role: results[upstream_key(resource, kind, name)].resolved
                for role, (kind, name) in resource.references().items()
            }
            results[resource.key] = self.run_stage(resource, inputs)
        return results

    def run_stage(self, resource: Resource, inputs: dict[str, ResolvedInput]) -> StageResult:
        directory = self.stage_dir(resource)
        output = directory / "output"
        plan = plans.build(resource, inputs, f"file://{output}", str(self.data_dir))
        started = time.monotonic()

        manifest = _read_json(output / MANIFEST)
        if manifest and manifest.get("stageKey") == plan.config.stage_key:
            log.info("Reusing %s: its output matches the stage key.", resource.key)
            self.on_progress(ProgressEvent(resource.key, "reused", message="reused"))
            self._write_status(resource, directory, manifest, reused=True)
            return StageResult(resource, output, manifest, True, time.monotonic() - started)

        resume = self._prepare_output(directory, output, plan.config.stage_key)
        config_path = directory / "config.json"
        config_path.write_text(plan.config.model_dump_json(indent=2))
        self._write_status(resource, directory, None)
        self.on_progress(ProgressEvent(resource.key, "started"))
        self._run_with_retries(resource, plan, directory, config_path, resume)

        manifest = _read_json(output / MANIFEST)
        if not manifest:
            raise StageFailedError(resource.key, 0, "the stage exited without a manifest.json.")
        self._write_status(resource, directory, manifest)
        self.on_progress(ProgressEvent(resource.key, "succeeded", message="done"))
        return StageResult(resource, output, manifest, False, time.monotonic() - started)

    def _prepare_output(self, directory: Path, output: Path, key: str) -> bool:
        """Clear an output made for another key; return whether to resume a started run."""
        key_file = directory / "stage-key"
        same_key = key_file.is_file() and key_file.read_text() == key
        if output.exists() and not same_key:
            shutil.rmtree(output)
        (output / PROGRESS).unlink(missing_ok=True)
        output.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        return same_key

    def _run_with_retries(
        self, resource: Resource, plan: WorkloadPlan, directory: Path, config: Path, resume: bool
    ) -> None:
        attempts = plan.max_restarts + 1
        for attempt in range(attempts):
            exit_code = self._run_once(resource, plan, directory, config, resume or attempt > 0)
            if exit_code == 0:
                return
            tail = _tail(directory / "stage.log")
            if exit_code == EXIT_PERMANENT or attempt == attempts - 1:
                self.on_progress(ProgressEvent(resource.key, "failed", message=tail))
                raise StageFailedError(resource.key, exit_code, tail)
            log.warning(
                "%s failed with exit code %d; retrying from the latest checkpoint (attempt %d "
                "of %d).", resource.key, exit_code, attempt + 2, attempts,
            )

    def command(self, plan: WorkloadPlan, config: Path, resume: bool) -> list[str]:
        args = [a.replace(CONFIG_PATH_PLACEHOLDER, str(config)) for a in plan.module_args(resume)]
        processes = plan.nodes * plan.procs_per_node
        if plan.distributed and processes > 1:
            # NOTE: locally, N nodes of P processes run as one standalone group of N*P processes.
            return [
                self.python, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}", "-m", *args,
            ]
        return [self.python, "-m", *args]

    def _run_once(
        self, resource: Resource, plan: WorkloadPlan, directory: Path, config: Path, resume: bool
    ) -> int:
        processes = plan.nodes * plan.procs_per_node if plan.distributed else 1
        env = {
            **os.environ,
            **plan.env,
            "PYTHONUNBUFFERED": "1",
            # Split the cores between the processes instead of letting each take them all.
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)),
        }
        progress_file = directory / "output" / PROGRESS
        with (directory / "stage.log").open("a") as log_file:
            process = subprocess.Popen(
                self.command(plan, config, resume),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=directory,
            )
            offset = 0
            while process.poll() is None:
                offset = self._forward_progress(resource, progress_file, offset)
                time.sleep(POLL_SECONDS)
            self._forward_progress(resource, progress_file, offset)
        return process.returncode

    def _forward_progress(self, resource: Resource, path: Path, offset: int) -> int:
        if not path.is_file():
            return offset
        with path.open() as handle:
            handle.seek(offset)
            lines = handle.readlines()
            offset = handle.tell()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.on_progress(ProgressEvent(
                resource.key, "progress",
                completed=record.get("completed"),
                total=record.get("total"),
                message=record.get("message", ""),
                record=record,
            ))
        return offset

    def _write_status(
        self, resource: Resource, directory: Path, manifest: dict | None, reused: bool = False
    ) -> None:
        generation = resource.metadata.generation
        conditions = status.set_condition(
            [], status.ConditionType.INPUTS_READY, True, status.Reason.INPUTS_AVAILABLE,
            generation=generation,
        )
        summary = resource.summary_condition
        if manifest:
            reason = status.Reason.REUSED if reused else status.Reason.JOB_SUCCEEDED
            conditions = status.set_condition(
                conditions, summary, True, reason, generation=generation
            )
        else:
            conditions = status.set_condition(
                conditions, status.ConditionType.RUNNING, True, status.Reason.JOB_RUNNING,
                generation=generation,
            )
        document = {
            "observedGeneration": generation,
            "phase": status.derive_phase(conditions, summary),
            "conditions": conditions,
        }
        if manifest:
            document["artifact"] = {
                "uri": f"file://{directory / 'output'}", "digest": manifest["digest"],
            }
            document["metrics"] = manifest.get("metrics", {})
        (directory / "status.json").write_text(json.dumps(document, indent=2))


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _tail(path: Path, lines: int = 20) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
