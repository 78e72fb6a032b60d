"""The local backend: run each stage's plan as local processes, in dependency order.

Each resource gets a directory in the workspace:

    <workspace>/<namespace>/<kind>/<name>/
        config.json    the StageConfig the plan produced
        resource.json  the resource as it was run
        status.json    conditions, artifact and metrics, as the operator would write to status
        stage.log      stdout and stderr of the workload
        output/        the artifact (manifest.json marks it finished)
        previous-output/
                       the last finished output, while a run of a changed spec replaces it
        scratch/       local copies of s3:// inputs and outputs, when the stage has any, and a
                       PretrainJob's token files, in one folder per stage key; the folders of
                       other keys are removed when a run starts, reuses or restores an output

A resource whose `spec.storage.uri` names an object store (s3://) or a local folder (file://)
writes its artifact there instead of to output/. The stage copies s3:// inputs and outputs
through scratch/ and uploads the output as it would in a pod (lathe_trainer.remote), and the
stages downstream read it from there. A `pvc://` URI names a cluster volume and is rejected here.

A stage whose output manifest carries the same stage key (spec, input digests, code version) is
reused instead of run again. When the key changed, a finished local output is moved to
previous-output/ and deleted only once the new run succeeds. A failed run therefore leaves the
last good output in previous-output/, and running the earlier spec again restores it to output/
without running the stage. A stage that failed or was interrupted keeps its checkpoints and is
resumed with `--resume` on the next run. A PretrainJob also continues from its checkpoints when
its resume key is unchanged (lathe.plans.base.resume_key): when its spec changed only in
`training` or `distributed`, or when only the code version changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import obstore.exceptions
import psutil

from lathe import loader, plans, preflight, status
from lathe.api import Resource
from lathe.errors import (
    InvalidResourceError,
    ObjectStoreError,
    StageFailedError,
    WorkspaceError,
    raise_errors,
)
from lathe.graph import REFERENCE_FIELDS, order, upstream_key
from lathe.plans.base import CONFIG_PATH_PLACEHOLDER, WorkloadPlan, has_continuable_fields
from lathe_trainer import remote
from lathe_trainer.processes import die_with_parent
from lathe_trainer.stage import (
    EXIT_PERMANENT,
    MANIFEST,
    PROGRESS,
    ResolvedInput,
    StageConfig,
    local_path,
)
from lathe_trainer.training import storage

log = logging.getLogger(__name__)

# Seconds between reads of a running stage's progress file.
POLL_SECONDS = 0.5
# Files in each stage directory that record the stage key and the resume key
# (lathe.plans.base.resume_key) of the run that last started writing the output.
STAGE_KEY_FILE = "stage-key"
RESUME_KEY_FILE = "resume-key"
# The resource as it was last run, for runs that reference it without its file.
RESOURCE_FILE = "resource.json"
# The stage directory's copy of the last finished output while a changed spec runs.
PREVIOUS_OUTPUT = "previous-output"


@dataclass
class StageResult:
    resource: Resource
    # The artifact: file:///path for a local output, else the object store URL.
    output_uri: str
    # The stage's workspace directory: config, status, log and scratch space.
    directory: Path
    manifest: dict[str, Any]
    reused: bool
    seconds: float

    @property
    def resolved(self) -> ResolvedInput:
        return ResolvedInput(
            kind=self.resource.kind,
            name=self.resource.metadata.name,
            uri=self.output_uri,
            digest=self.manifest["digest"],
        )


@dataclass
class FinishedOutput:
    """The output of a stage that finished in an earlier run and is not among the resources of
    this run, resolved from the workspace as a cluster resolves a reference to an existing
    resource."""

    key: str
    # The resource as it was run, from resource.json. None for a stage directory written
    # before the runner recorded it.
    resource: Resource | None
    resolved: ResolvedInput
    directory: Path
    manifest: dict[str, Any]


@dataclass
class ProgressEvent:
    """What the runner tells its display about one stage."""

    key: str
    state: str  # "started", "progress", "reused", "succeeded", "failed", "suspended", "waiting"
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
        # Stages the last run() did not start, by key, with the reason (see run).
        self.not_run: dict[str, str] = {}
        # Referenced stages that are not among the resources but finished in the workspace,
        # by key, as the last check() found them.
        self.from_workspace: dict[str, FinishedOutput] = {}
        # Whether hold_workspace() has taken the workspace lock, so that run() does not take it.
        self._holding = False

    @contextlib.contextmanager
    def hold_workspace(self) -> Iterator[None]:
        """Hold the workspace lock across calls, such as a run and the serving after it.

        Triton serves the model repository from the workspace, so another run must not
        replace it while Triton is running.
        """
        with workspace_lock(self.workspace):
            self._holding = True
            try:
                yield
            finally:
                self._holding = False

    def stage_dir(self, resource: Resource) -> Path:
        meta = resource.metadata
        return self.workspace / meta.namespace / resource.kind.lower() / meta.name

    def output_uri(self, resource: Resource) -> str:
        """Return where the stage writes its artifact: `spec.storage.uri`, else the workspace."""
        uri = resource.spec.storage.uri
        if not uri:
            return f"file://{self.stage_dir(resource) / 'output'}"
        if uri.startswith("pvc://"):
            raise InvalidResourceError(
                resource.label, "spec.storage.uri",
                f"{uri!r} names a PersistentVolumeClaim, which exists only in a cluster; for "
                "`lathe run`, use file:///path, s3://bucket/prefix, or leave the field unset to "
                "write to the workspace.",
            )
        if not storage.is_remote(uri):
            return f"file://{local_path(uri).resolve()}"
        try:
            storage.resolve(uri)
        except ValueError as error:
            raise InvalidResourceError(
                resource.label, "spec.storage.uri",
                f"{uri!r} cannot be opened: {error}",
            ) from error
        return uri.rstrip("/")

    def check(self, resources: list[Resource]) -> list[Resource]:
        """Validate references, files and output locations; return the dependency order."""
        if self.workspace.exists() and not self.workspace.is_dir():
            raise WorkspaceError(
                f"--workspace {str(self.workspace)!r} is a file; pass a directory, new or used "
                "by lathe run before."
            )
        # The nearest directory that exists is where the workspace will be created.
        existing = next(path for path in (self.workspace, *self.workspace.parents)
                        if path.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise WorkspaceError(
                f"--workspace {str(self.workspace)!r} cannot be written ({existing} is "
                "read-only or not yours); pass a writable directory."
            )
        self.from_workspace = self._find_finished(resources)
        ordered = order(resources, self.from_workspace, workspace=str(self.workspace),
                        unfinished=self._unfinished(resources))
        outputs: dict[str, Resource] = {}
        # Every resource is checked, so that one run lists the errors of all of them.
        errors: list[InvalidResourceError] = []
        for resource in ordered:
            try:
                preflight.check_files(resource, self.data_dir)
                preflight.check_patterns(resource)
                uri = self.output_uri(resource).rstrip("/")
                _check_output_overlap(resource, uri, outputs)
                storage_uri = resource.spec.storage.uri
                if storage_uri and storage_uri.startswith("file://"):
                    # The stage would delete what is there, so `lathe validate` rejects it too.
                    # An object store is left to the run, because listing it costs a request.
                    filesystem, path = storage.resolve(uri)
                    _check_writable(resource, path, uri)
                    _check_replaceable(resource, filesystem, path, uri)
            except InvalidResourceError as error:
                errors.append(error)
                continue
            outputs[uri] = resource
        raise_errors(errors)
        upstream = [found.resource for found in self.from_workspace.values() if found.resource]
        preflight.check_resources(ordered, self.data_dir,
                                  self._with_recorded_ancestors(upstream, ordered))
        return ordered

    def _with_recorded_ancestors(self, upstream: list[Resource],
                                 given: list[Resource]) -> list[Resource]:
        """Return `upstream` and the finished stages that it references in the workspace, at
        any depth, as their last runs recorded them.

        The checks compare a ModelDeployment with the PretrainJob under its FineTune, so a
        FineTune taken from the workspace needs its own PretrainJob there too.
        """
        known = {resource.key for resource in [*upstream, *given]}
        found = list(upstream)
        pending = list(upstream)
        while pending:
            resource = pending.pop()
            for kind, name in resource.references().values():
                key = upstream_key(resource, kind, name)
                if key in known:
                    continue
                known.add(key)
                finished = self.finished_output(kind, resource.metadata.namespace, name)
                if finished is not None and finished.resource is not None:
                    found.append(finished.resource)
                    pending.append(finished.resource)
        return found

    def _find_finished(self, resources: list[Resource]) -> dict[str, FinishedOutput]:
        """Return the referenced stages that are not in `resources` but have a finished output
        in the workspace, by key."""
        found = {}
        for key, kind, namespace, name in _outside_references(resources):
            finished = self.finished_output(kind, namespace, name)
            if finished:
                found[key] = finished
        return found

    def _unfinished(self, resources: list[Resource]) -> dict[str, str]:
        """Return why each referenced stage that is not in `resources` and ran in the workspace
        has no finished output there, by key."""
        reasons = {}
        for key, kind, namespace, name in _outside_references(resources):
            if key in self.from_workspace:
                continue
            directory = self.workspace / namespace / kind.lower() / name
            try:
                written = json.loads((directory / "status.json").read_text())
            except (FileNotFoundError, ValueError):
                continue
            phase = written.get("phase")
            recorded = (written.get("artifact") or {}).get("uri")
            reason = f"its last run in the workspace has phase {phase}"
            if phase == status.Phase.SUCCEEDED and recorded:
                # finished_output found no manifest with the recorded digest at that URI.
                reason = (f"its last run in the workspace succeeded, but its recorded output "
                          f"{recorded} no longer holds that output, as after the workspace was "
                          "moved")
            if (directory / PREVIOUS_OUTPUT / MANIFEST).is_file():
                reason += (f" (the output of its last successful run is kept in "
                           f"{directory / PREVIOUS_OUTPUT}, and passing its earlier spec "
                           "restores it)")
            reasons[key] = reason
        return reasons

    def finished_output(self, kind: str, namespace: str, name: str) -> FinishedOutput | None:
        """Return the finished output that status.json in the stage's directory records, or
        None when there is none or its manifest no longer carries the recorded digest."""
        directory = self.workspace / namespace / kind.lower() / name
        try:
            written = json.loads((directory / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        artifact = written.get("artifact") or {}
        uri, digest = artifact.get("uri"), artifact.get("digest")
        if not (uri and digest):
            return None
        try:
            manifest = _read_manifest(uri)
        except (OSError, ValueError):
            manifest = None
        if not manifest or manifest.get("digest") != digest:
            return None
        resource = None
        with contextlib.suppress(FileNotFoundError, ValueError, InvalidResourceError):
            recorded = directory / RESOURCE_FILE
            resource = loader.parse_resource(json.loads(recorded.read_text()), str(recorded))
        key = f"{kind}/{namespace}/{name}"
        return FinishedOutput(key, resource, ResolvedInput(kind=kind, name=name, uri=uri,
                                                           digest=digest), directory, manifest)

    def run(self, resources: list[Resource]) -> dict[str, StageResult]:
        """Run or reuse every stage in dependency order; return the finished ones by key.

        A stage whose spec sets `suspend` is not started (a finished output is still reused),
        and neither is a stage that needs its output. Both are left out of the result and
        listed in `self.not_run` with the reason. Their status.json shows them suspended or
        waiting, as the operator would.
        """
        results: dict[str, StageResult] = {}
        self.not_run = {}
        ordered = self.check(resources)
        lock = contextlib.nullcontext() if self._holding else workspace_lock(self.workspace)
        with lock:
            for resource in ordered:
                self._run_or_hold(resource, results)
        return results

    def _run_or_hold(self, resource: Resource, results: dict[str, StageResult]) -> None:
        """Run `resource` into `results`, or record in `self.not_run` why it was not run."""
        upstream = [upstream_key(resource, kind, name)
                    for kind, name in resource.references().values()]
        blocking = [key for key in upstream if key in self.not_run]
        if blocking:
            self._hold_waiting(resource, blocking[0])
            return
        inputs = {}
        manifests = {}
        for role, (kind, name) in resource.references().items():
            key = upstream_key(resource, kind, name)
            found = results[key] if key in results else self.from_workspace[key]
            inputs[role] = found.resolved
            manifests[role] = found.manifest
        _check_inputs_agree(resource, inputs, manifests)
        try:
            result = self.run_stage(resource, inputs)
        except obstore.exceptions.BaseError as error:
            raise ObjectStoreError(resource.label, _remote_field(resource), error) from error
        if result is None:
            self.not_run[resource.key] = (
                f"{resource.kind} {resource.metadata.name} was not run: its spec sets "
                "suspend. Set spec.suspend to false and run again; it resumes from its "
                "checkpoints, unless other spec fields changed too."
            )
        else:
            results[resource.key] = result

    def _hold_waiting(self, resource: Resource, blocking: str) -> None:
        """Record that `resource` waits for the stage `blocking`, which was not run."""
        kind, _, name = blocking.split("/")
        self.not_run[resource.key] = (
            f"{resource.kind} {resource.metadata.name} was not run: it needs the output of "
            f"{kind} {name}, which was not run."
        )
        generation = resource.metadata.generation
        conditions = status.set_condition(
            [], status.ConditionType.INPUTS_READY, False, status.Reason.INPUT_NOT_READY,
            f"Waiting for {kind} {name}, which was not run.", generation,
        )
        directory = self.stage_dir(resource)
        directory.mkdir(parents=True, exist_ok=True)
        self._write_conditions(resource, directory, conditions)
        self.on_progress(ProgressEvent(resource.key, "waiting",
                                       message=f"waits for {kind} {name}"))

    def run_stage(
        self, resource: Resource, inputs: dict[str, ResolvedInput]
    ) -> StageResult | None:
        """Run one stage, or reuse its finished output; None if the spec suspends it."""
        directory = self.stage_dir(resource)
        directory.mkdir(parents=True, exist_ok=True)
        output_uri = self.output_uri(resource)
        # A data file edited in place, or another --data-dir, must not reuse an old output.
        plan = plans.build(resource, inputs, output_uri, str(self.data_dir),
                           data_digests=preflight.data_digests(resource, self.data_dir))
        started = time.monotonic()

        manifest = _read_manifest(output_uri)
        if not (manifest and manifest.get("stageKey") == plan.config.stage_key):
            manifest = self._restore_previous(resource, directory, output_uri, plan.config)
        if manifest and manifest.get("stageKey") == plan.config.stage_key:
            log.info("Reusing %s: its output matches the stage key.", resource.key)
            _remove_other_scratch(directory / "scratch", plan.config)
            _record_resource(resource, directory)
            self.on_progress(ProgressEvent(resource.key, "reused", message="reused"))
            self._write_status(resource, directory, output_uri, manifest, reused=True)
            return StageResult(resource, output_uri, directory, manifest, True,
                               time.monotonic() - started)  # fmt: skip

        if getattr(resource.spec, "suspend", False):
            log.info("Not running %s: its spec sets suspend.", resource.key)
            conditions = status.set_condition(
                [], status.ConditionType.INPUTS_READY, True, status.Reason.INPUTS_AVAILABLE,
                generation=resource.metadata.generation,
            )
            conditions = status.set_condition(
                conditions, status.ConditionType.SUSPENDED, True, status.Reason.SUSPENDED,
                "The spec sets suspend; lathe run did not start the stage.",
                resource.metadata.generation,
            )
            self._write_conditions(resource, directory, conditions)
            self.on_progress(ProgressEvent(resource.key, "suspended", message="suspended"))
            return None
        resume = self._prepare_output(resource, directory, output_uri, plan.config)
        config_path = directory / "config.json"
        config_path.write_text(plan.config.model_dump_json(indent=2))
        _record_resource(resource, directory)
        self._write_status(resource, directory, output_uri, None)
        # NOTE: this reads the runner's resume-key record, not the key in the checkpoints'
        # state.json that the stage checks, so the two disagree if another run wrote them.
        checkpoints = ""
        if resume:
            checkpoints = _resume_points(*storage.resolve(_checkpoint_base(resource, output_uri)))
        progress_file = self._progress_file(plan, directory, output_uri)
        try:
            # Inside the try, because the display can raise too: printing this line into a
            # closed stdout interrupts lathe (lathe.cli.OutputConsole).
            self.on_progress(ProgressEvent(
                resource.key, "started",
                message=f"resumes from the checkpoint of {checkpoints}" if checkpoints else "",
            ))
            self._run_with_retries(resource, plan, directory, config_path, progress_file,
                                   resume)
            manifest = _read_manifest(output_uri)
            if not manifest:
                raise StageFailedError(
                    resource.key, 0, f"the stage exited without a manifest.json in {output_uri}."
                )
        except StageFailedError as error:
            previous = directory / PREVIOUS_OUTPUT
            if (previous / MANIFEST).is_file():
                error = StageFailedError(
                    resource.key, error.exit_code,
                    f"{error.detail} The output of the last successful run is kept in "
                    f"{previous}; run the earlier spec again to restore it.",
                )
            self._write_status(resource, directory, output_uri, None,
                               failure=(error.exit_code, error.detail))
            raise error from None
        except BaseException:
            # Ctrl-C, a signal, a closed stdout, or an error of the caller's progress callback:
            # _run_once has stopped the stage, and status.json must not say Running.
            self._write_status(resource, directory, output_uri, None, interrupted=True)
            raise
        # The new output replaces the last finished one for good.
        shutil.rmtree(directory / PREVIOUS_OUTPUT, ignore_errors=True)
        _remove_if_empty(directory / "scratch")
        self._write_status(resource, directory, output_uri, manifest)
        self.on_progress(ProgressEvent(resource.key, "succeeded", message="done"))
        return StageResult(resource, output_uri, directory, manifest, False,
                           time.monotonic() - started)  # fmt: skip

    def _prepare_output(
        self, resource: Resource, directory: Path, output_uri: str, config: StageConfig
    ) -> bool:
        """Prepare the output for a run of `config`; return whether the run resumes.

        A run of the same stage key resumes a failed or interrupted one. A PretrainJob whose
        resume key is the one its output was started under continues from the checkpoints
        (_continues). Any other output is cleared, and the run starts over.
        """
        key_file = directory / STAGE_KEY_FILE
        resume_key_file = directory / RESUME_KEY_FILE
        same_key = key_file.is_file() and key_file.read_text() == config.stage_key
        continues = not same_key and _continues(resource, resume_key_file, config.resume_key)
        filesystem, path = storage.resolve(output_uri)
        if continues:
            _check_continuable(resource, output_uri)
            log.info("Continuing %s from its checkpoints, because its stage key changed but its "
                     "resume key did not.", resource.key)
            if not self._keep_previous(resource, directory, output_uri, keep=remote.CHECKPOINTS):
                _empty_output(filesystem, path, keep=remote.CHECKPOINTS)
        elif not same_key:
            if resource.spec.storage.uri:
                _check_replaceable(resource, filesystem, path, output_uri)
            if not self._keep_previous(resource, directory, output_uri):
                # Checkpoints of another spec must not be resumed from.
                _empty_output(filesystem, path)
        if not same_key:
            # The staged copies of another key's run are never read again.
            shutil.rmtree(directory / "scratch", ignore_errors=True)
        if not storage.is_remote(output_uri):
            (local_path(output_uri) / PROGRESS).unlink(missing_ok=True)
            local_path(output_uri).mkdir(parents=True, exist_ok=True)
        resume_key_file.write_text(config.resume_key)
        key_file.write_text(config.stage_key)
        return same_key or continues

    def _keep_previous(self, resource: Resource, directory: Path, output_uri: str,
                       keep: str | None = None) -> bool:
        """Move a finished local output to previous-output/, and return whether it was moved.

        The entry named `keep` (the checkpoints a continuing run resumes from) stays in the
        output. An unfinished output, the remains of a failed run, is not moved, so that
        previous-output/ keeps the last finished one. An object store output is not moved
        either: copying it would cost as much as the run.
        """
        manifest = _read_manifest(output_uri)
        if storage.is_remote(output_uri) or not (manifest and manifest.get("stageKey")):
            return False
        previous = directory / PREVIOUS_OUTPUT
        shutil.rmtree(previous, ignore_errors=True)
        log.info("Keeping the finished output of %s in %s until the changed spec's run "
                 "succeeds.", resource.key, previous)
        output = local_path(output_uri)
        if resource.spec.storage.uri:
            _move_entries(output, previous, keep)
            return True
        shutil.move(output, previous)
        output.mkdir(parents=True)
        if keep and (previous / keep).exists():
            shutil.move(previous / keep, output / keep)
        return True

    def _restore_previous(
        self, resource: Resource, directory: Path, output_uri: str, config: StageConfig
    ) -> dict[str, Any] | None:
        """Put previous-output/ back as the output when it was made with `config`'s stage key.
        Return its manifest, or None when there is nothing to restore."""
        previous = directory / PREVIOUS_OUTPUT
        try:
            manifest = json.loads((previous / MANIFEST).read_text())
        except (FileNotFoundError, ValueError):
            return None
        if manifest.get("stageKey") != config.stage_key or storage.is_remote(output_uri):
            return None
        log.info("Restoring the earlier output of %s from %s: the spec is the one it was made "
                 "with.", resource.key, previous)
        output = local_path(output_uri)
        # The output contains an unfinished run of another spec. Its checkpoints stay when the
        # earlier output has none and they were written under the same resume key, because then
        # they belong to a run that continued the earlier output.
        checkpoints = output / remote.CHECKPOINTS
        resume_key_file = directory / RESUME_KEY_FILE
        continued = (resume_key_file.is_file()
                     and resume_key_file.read_text() == config.resume_key)
        if (previous / remote.CHECKPOINTS).exists() or not checkpoints.exists() or not continued:
            shutil.rmtree(output, ignore_errors=True)
        else:
            for entry in output.iterdir():
                if entry.name != remote.CHECKPOINTS:
                    _remove_local(entry)
        output.mkdir(parents=True, exist_ok=True)
        for entry in previous.iterdir():
            shutil.move(entry, output / entry.name)
        previous.rmdir()
        (directory / STAGE_KEY_FILE).write_text(config.stage_key)
        (directory / RESUME_KEY_FILE).write_text(config.resume_key)
        return manifest

    def _progress_file(self, plan: WorkloadPlan, directory: Path, output_uri: str) -> Path:
        """Return the local file the stage appends its progress to."""
        if not storage.is_remote(output_uri):
            return local_path(output_uri) / PROGRESS
        # The stage writes to its staged copy of the output (lathe_trainer.remote.staged).
        return remote.scratch_dir(plan.config, directory / "scratch") / "output" / PROGRESS

    def _run_with_retries(
        self, resource: Resource, plan: WorkloadPlan, directory: Path, config: Path,
        progress_file: Path, resume: bool,
    ) -> None:
        attempts = plan.max_restarts + 1
        stage_log = directory / "stage.log"
        for attempt in range(attempts):
            # stage.log keeps earlier runs, so a failure quotes only what this attempt wrote.
            start = stage_log.stat().st_size if stage_log.is_file() else 0
            exit_code = self._run_once(
                resource, plan, directory, config, progress_file, resume or attempt > 0
            )
            if exit_code == 0:
                return
            # torchrun exits 1 whatever its workers' codes, so a StageError printed by a worker
            # also marks the failure as permanent. torchrun's own report of the failed workers
            # follows it, so the whole attempt's log is searched, not only its tail.
            tail, stage_error = _scan_log(_log_lines(stage_log, start))
            if exit_code == EXIT_PERMANENT or stage_error or attempt == attempts - 1:
                # The stage's StageError names the resource too; keep one name in the message.
                own = f"{resource.kind} {resource.metadata.namespace}/{resource.metadata.name}: "
                body = stage_error.removeprefix(own) if stage_error else tail
                if not body.strip():
                    body = _silent_failure(directory)
                message = f"{body}\n(the whole log: {stage_log})"
                if stage_error:
                    exit_code = EXIT_PERMANENT
                self.on_progress(ProgressEvent(resource.key, "failed", message=message))
                raise StageFailedError(resource.key, exit_code, message)
            log.warning(
                "%s failed with exit code %d; retrying from the latest checkpoint (attempt %d "
                "of %d).", resource.key, exit_code, attempt + 2, attempts,
            )

    def command(self, plan: WorkloadPlan, config: Path, resume: bool) -> list[str]:
        args = [a.replace(CONFIG_PATH_PLACEHOLDER, str(config)) for a in plan.module_args(resume)]
        processes = plan.nodes * plan.processes_per_node
        if plan.distributed and processes > 1:
            # NOTE: locally, N nodes of P processes run as one standalone group of N*P processes.
            return [
                self.python, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}", "-m", *args,
            ]
        return [self.python, "-m", *args]

    def _run_once(
        self, resource: Resource, plan: WorkloadPlan, directory: Path, config: Path,
        progress_file: Path, resume: bool,
    ) -> int:
        """Run one attempt and return its exit code: the first non-zero one of its workers."""
        # A Corpus with several workers runs them as separate processes, as a Job runs its pods.
        workers = 1 if plan.distributed else plan.nodes
        processes = plan.nodes * plan.processes_per_node if plan.distributed else workers
        env = {
            **os.environ,
            **plan.env,
            "PYTHONUNBUFFERED": "1",
            # Split the cores between the processes instead of letting each take them all.
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)),
            "LATHE_SCRATCH_DIR": str(directory / "scratch"),
            "LATHE_RUN_ID": uuid.uuid4().hex,
        }
        # Records of an earlier attempt of a resumed stage were shown when they were written.
        offset = progress_file.stat().st_size if progress_file.is_file() else 0
        with (directory / "stage.log").open("a") as log_file:
            running: list[subprocess.Popen] = []
            failure = 0
            try:
                # Started inside the try, so that an interrupt between two starts stops the
                # workers already running.
                for index in range(workers):
                    running.append(subprocess.Popen(
                        self.command(plan, config, resume),
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env={**env, "JOB_COMPLETION_INDEX": str(index)},
                        cwd=directory,
                        # A process group of its own, which _stop_processes kills with it.
                        start_new_session=True,
                        # torchrun passes the SIGTERM on to its workers, so a stage stops
                        # writing into an output that the next run restores or reuses.
                        preexec_fn=die_with_parent(),
                    ))
                while any(process.poll() is None for process in running):
                    offset = self._forward_progress(resource, progress_file, offset)
                    failure = failure or next((p.returncode for p in running if p.returncode), 0)
                    if failure:
                        # A failed worker fails the attempt, as a Job's podFailurePolicy does.
                        for process in running:
                            if process.poll() is None:
                                process.terminate()
                    time.sleep(POLL_SECONDS)
            except BaseException:
                # On an interrupt (Ctrl-C, SIGTERM), stop the workers before lathe exits.
                _stop_processes(running)
                raise
            self._forward_progress(resource, progress_file, offset)
        return failure or next((p.returncode for p in running if p.returncode), 0)

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
        self, resource: Resource, directory: Path, output_uri: str, manifest: dict | None,
        reused: bool = False, failure: tuple[int, str] | None = None,
        interrupted: bool = False,
    ) -> None:
        """Write status.json as the operator would write the resource's status.

        `failure` is the exit code and message of a stage that gave up. Exit code 0 means the
        stage exited without its manifest, which no retry fixes either.
        """
        generation = resource.metadata.generation
        conditions = status.set_condition(
            [], status.ConditionType.INPUTS_READY, True, status.Reason.INPUTS_AVAILABLE,
            generation=generation,
        )
        summary = resource.summary_condition
        if manifest and summary == status.ConditionType.READY:
            # A ModelDeployment is exported by its stage and served by `lathe run` afterwards,
            # which records Ready in record_serving.
            reason = status.Reason.REUSED if reused else status.Reason.JOB_SUCCEEDED
            conditions = status.set_condition(
                conditions, status.ConditionType.EXPORTED, True, reason, generation=generation
            )
            conditions = status.set_condition(
                conditions, summary, False, status.Reason.SERVER_NOT_READY, SERVER_NOT_RUNNING,
                generation,
            )
        elif manifest:
            reason = status.Reason.REUSED if reused else status.Reason.JOB_SUCCEEDED
            conditions = status.set_condition(
                conditions, summary, True, reason, generation=generation
            )
        elif failure:
            exit_code, message = failure
            reason = (status.Reason.JOB_FAILED if exit_code in (0, EXIT_PERMANENT)
                      else status.Reason.BACKOFF_LIMIT_EXCEEDED)
            conditions = status.set_condition(
                conditions, status.ConditionType.RUNNING, False, status.Reason.JOB_FAILED,
                "The stage failed.", generation,
            )
            conditions = status.set_condition(
                conditions, status.ConditionType.FAILED, True, reason,
                f"Exit code {exit_code}: {message}", generation,
            )
        elif interrupted:
            conditions = status.set_condition(
                conditions, status.ConditionType.RUNNING, False, status.Reason.INTERRUPTED,
                "lathe run was interrupted; run it again to resume the stage from its "
                "checkpoints.", generation,
            )
        else:
            conditions = status.set_condition(
                conditions, status.ConditionType.RUNNING, True, status.Reason.JOB_RUNNING,
                generation=generation,
            )
        artifact = {}
        if manifest:
            artifact = {"artifact": {"uri": output_uri, "digest": manifest["digest"]},
                        "metrics": manifest.get("metrics", {})}
        self._write_conditions(resource, directory, conditions, artifact)

    def _write_conditions(
        self, resource: Resource, directory: Path, conditions: list[dict[str, Any]],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write status.json with `conditions`, the phase they give and the `extra` fields."""
        document = {
            "observedGeneration": resource.metadata.generation,
            "phase": status.derive_phase(conditions, resource.summary_condition),
            "conditions": conditions,
            **(extra or {}),
        }
        write_status(directory / "status.json", document)


def write_status(path: Path, document: dict[str, Any]) -> None:
    """Write a status.json through a temporary file and a rename, so that a reader, or a run
    killed in the middle of the write, never reads a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(json.dumps(document, indent=2))
        os.replace(partial, path)
    except OSError as error:
        raise WorkspaceError(
            f"Writing {path} failed ({error.strerror}); check that the workspace is writable "
            "and has free space, then run again."
        ) from None


LOCK_FILE = ".lathe-run.lock"


@contextlib.contextmanager
def workspace_lock(workspace: Path) -> Iterator[None]:
    """Hold an exclusive lock on `workspace` while a run writes to it.

    Two runs on one workspace would clear and rewrite each other's outputs, and each would
    report the other's artifact as its own. The lock is an flock, so the kernel releases it
    when the process dies, and a crashed run never leaves a stale lock behind.
    """
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        handle = (workspace / LOCK_FILE).open("a+")
    except OSError as error:
        raise WorkspaceError(
            f"--workspace {str(workspace)!r} cannot be written ({error.strerror}); pass a "
            "writable directory."
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise WorkspaceError(
                f"--workspace {str(workspace)!r} is in use by another lathe run (pid "
                f"{holder}); wait for it to finish (stop it with Ctrl-C if it serves with "
                "--serve), or pass another --workspace."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        close_abandoned_status(workspace)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


KILLED_WHILE_RUNNING = ("The lathe run that ran this stage stopped without recording its end, "
                        "as when it is killed; run it again to resume the stage from its "
                        "checkpoints.")
KILLED_WHILE_SERVING = ("Triton is not running: the lathe run that served the model stopped "
                        "without recording it, as when it is killed; run `lathe run --serve` to "
                        "serve it again.")


def close_abandoned_status(workspace: Path) -> None:
    """Rewrite the status.json files that a killed run left saying Running or Ready.

    A run records the end of each stage and of serving, but SIGKILL or a crash of the machine
    gives it no chance to, and status.json would then claim a stage or a Triton server that no
    process runs. The holder of the workspace lock is the only run on it, so it closes those
    conditions as the operator does when a pod disappears.
    """
    for path in sorted(workspace.glob("*/*/*/status.json")):
        try:
            document = json.loads(path.read_text())
            conditions = document["conditions"]
            if not all(isinstance(c, dict) and "type" in c and "status" in c
                       for c in conditions):
                raise TypeError("a condition without type or status")
        except (OSError, ValueError, KeyError, TypeError) as error:
            # The stage rewrites its status.json when it runs again, so the run goes on.
            log.warning("Skipped %s while closing conditions of killed runs: it is not a "
                        "status document (%s).", path, error)
            continue
        generation = document.get("observedGeneration")
        changed = False
        if status.condition_true(conditions, status.ConditionType.RUNNING):
            conditions = status.set_condition(
                conditions, status.ConditionType.RUNNING, False, status.Reason.INTERRUPTED,
                KILLED_WHILE_RUNNING, generation,
            )
            changed = True
        ready = next((c for c in conditions if c["type"] == status.ConditionType.READY), None)
        if (ready and ready["status"] == "True"
                and ready.get("reason") == status.Reason.SERVER_READY):
            conditions = status.set_condition(
                conditions, status.ConditionType.READY, False, status.Reason.SERVER_NOT_READY,
                KILLED_WHILE_SERVING, generation,
            )
            document.pop("endpoint", None)
            changed = True
        if not changed:
            continue
        # The stage directory is <namespace>/<kind>/<name>; only a ModelDeployment is Ready.
        summary = (status.ConditionType.READY if path.parent.parent.name == "modeldeployment"
                   else status.ConditionType.SUCCEEDED)
        document["conditions"] = conditions
        document["phase"] = status.derive_phase(conditions, summary)
        log.info("Marked %s as stopped: the run that wrote it ended without recording it.",
                 path)
        write_status(path, document)


SERVER_NOT_RUNNING = ("Triton is not running: lathe run starts it after the export and stops it "
                      "after the sample request unless --serve is given.")


def record_serving(result: StageResult, endpoint: str | None,
                   message: str = SERVER_NOT_RUNNING) -> None:
    """Record in a ModelDeployment's status.json whether Triton serves it, and where.

    `endpoint` is Triton's HTTP URL while it serves, None once it has stopped; `message` then
    states why it is not running.
    """
    path = result.directory / "status.json"
    document = json.loads(path.read_text())
    generation = result.resource.metadata.generation
    if endpoint:
        conditions = status.set_condition(
            document["conditions"], status.ConditionType.READY, True, status.Reason.SERVER_READY,
            f"Triton serves the model at {endpoint}.", generation,
        )
        document["endpoint"] = endpoint
    else:
        conditions = status.set_condition(
            document["conditions"], status.ConditionType.READY, False,
            status.Reason.SERVER_NOT_READY, message, generation,
        )
        document.pop("endpoint", None)
    document["conditions"] = conditions
    document["phase"] = status.derive_phase(conditions, status.ConditionType.READY)
    write_status(path, document)


def _continues(resource: Resource, resume_key_file: Path, resume_key: str) -> bool:
    """Return whether a run of `resource` continues from the checkpoints of the run that wrote
    its output. It does when the kind has continuable fields and the resume key recorded for the
    output is `resume_key`.

    A stage directory written before the runner recorded resume keys has no file, so its output
    is started over. The stage itself also checks the key that its checkpoints record.
    """
    if not resume_key or not has_continuable_fields(resource.kind):
        return False
    return resume_key_file.is_file() and resume_key_file.read_text() == resume_key


def _outside_references(resources: list[Resource]) -> Iterator[tuple[str, str, str, str]]:
    """Yield (key, kind, namespace, name) once for each stage that a resource references and
    that is not among `resources`."""
    named = {resource.key for resource in resources}
    for resource in resources:
        for kind, name in resource.references().values():
            key = upstream_key(resource, kind, name)
            if key not in named:
                named.add(key)
                yield key, kind, resource.metadata.namespace, name


def _check_output_overlap(resource: Resource, uri: str, outputs: dict[str, Resource]) -> None:
    """Raise when `uri` is, contains or lies in the output of another resource of the run."""
    for other_uri, other in outputs.items():
        if uri == other_uri or uri.startswith(other_uri + "/") or other_uri.startswith(uri + "/"):
            raise InvalidResourceError(
                resource.label, "spec.storage.uri",
                f"{uri!r} overlaps the output of {other.key} ({other_uri!r}), and each stage "
                "clears its output when it runs; give each resource a location of its own.",
            )


def _check_inputs_agree(resource: Resource, inputs: dict[str, ResolvedInput],
                        manifests: dict[str, dict[str, Any]]) -> None:
    """Raise when one input was built from an earlier output of another input of `resource`.

    A PretrainJob reads a Corpus and a Tokenizer trained on it. A Tokenizer taken from the
    workspace after its Corpus ran again with another output no longer fits that Corpus. The
    operator waits for the Tokenizer to run again; here only passing its file runs it.
    """
    current = {(item.kind, item.name): item.digest for item in inputs.values()}
    for role, item in inputs.items():
        for recorded in (manifests[role].get("inputs") or {}).values():
            kind, name = recorded.get("kind"), recorded.get("name")
            digest = current.get((kind, name))
            if digest and recorded.get("digest") != digest:
                raise InvalidResourceError(
                    resource.label, REFERENCE_FIELDS.get(role, role),
                    f"{item.kind} {item.name!r} was built from the output "
                    f"{recorded.get('digest', '')[:19]} of {kind} {name!r}, which now contains "
                    f"{digest[:19]}; pass the {item.kind}'s file too with -f, so that it runs "
                    "again on the current output.",
                )


def _record_resource(resource: Resource, directory: Path) -> None:
    """Write the resource that the stage's output now belongs to, so that a later run that
    references the stage without its file resolves it from here."""
    (directory / RESOURCE_FILE).write_text(json.dumps(
        resource.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"status"}),
        indent=2))


def _remove_other_scratch(scratch: Path, config: StageConfig) -> None:
    """Remove the scratch folders of runs of other stage keys from `scratch`, as when an output
    is reused or restored after a failed or interrupted run of another spec.

    No run reads them again: a run of another key clears scratch/ before it starts
    (_prepare_output). The folder of `config`'s key stays, for a rerun of that key.
    """
    if not scratch.is_dir():
        return
    own = remote.scratch_name(config)
    for entry in scratch.iterdir():
        if entry.name != own:
            log.info("Removing %s: it contains the scratch files of a run of another spec.",
                     entry)
            _remove_local(entry)
    _remove_if_empty(scratch)


def _remove_if_empty(path: Path) -> None:
    """Remove the directory `path` when the stage left nothing in it."""
    try:
        path.rmdir()
    except OSError:
        pass  # missing, or contains the staged copies that a rerun of the same key reads


def _remove_local(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# A checkpoint directory and the file that marks it complete (lathe_trainer.training.checkpoint,
# which this module does not import, because it imports torch).
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_CHECKPOINT_STATE = "state.json"


def _checkpoint_steps(filesystem, root: str) -> list[int]:
    """Return the steps of the complete checkpoints directly under `root`."""
    try:
        names = [entry.rstrip("/").rsplit("/", 1)[-1]
                 for entry in filesystem.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    return [int(match.group(1)) for name in names if (match := _STEP_DIR.match(name))
            and filesystem.isfile(f"{root}/{name}/{_CHECKPOINT_STATE}")]


def _resume_points(filesystem, path: str) -> str:
    """Describe the latest checkpoint in an output: "step 300", or per phase folder of a
    FineTune, "lora step 300, scratch step 20"; "" when there is none."""
    # NOTE: the files are not checked against their checksums here, so when the stage finds the
    # latest checkpoint damaged it resumes from an earlier one than this names, and logs that.
    root = f"{path}/{remote.CHECKPOINTS}"
    points = []
    steps = _checkpoint_steps(filesystem, root)
    if steps:
        points.append(f"step {max(steps)}")
    try:
        folders = filesystem.ls(root, detail=True)
    except FileNotFoundError:
        folders = []
    for entry in sorted(folders, key=lambda entry: entry["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "directory" and not _STEP_DIR.match(name):
            phase_steps = _checkpoint_steps(filesystem, f"{root}/{name}")
            if phase_steps:
                points.append(f"{name} step {max(phase_steps)}")
    return ", ".join(points)


def _checkpoint_base(resource: Resource, output_uri: str) -> str:
    """Return the location whose checkpoints/ folder a run resumes from: a PretrainJob's
    spec.training.artifactUri when set, else the output, as the stage chooses it
    (lathe_trainer.pretrain.stage._checkpoint_root)."""
    training = getattr(resource.spec, "training", None)
    return getattr(training, "artifact_uri", None) or output_uri


def _check_continuable(resource: Resource, output_uri: str) -> None:
    """Raise before anything is deleted when the latest checkpoint is past `maxSteps`, which the
    stage would reject only after the runner had cleared the finished output."""
    max_steps = resource.spec.training.max_steps
    filesystem, path = storage.resolve(_checkpoint_base(resource, output_uri))
    root = f"{path}/{remote.CHECKPOINTS}"
    steps = _checkpoint_steps(filesystem, root)
    if steps and max(steps) > max_steps:
        latest = max(steps)
        raise InvalidResourceError(
            resource.label, "spec.training.maxSteps",
            f"{max_steps} is below the step of the latest checkpoint ({latest}, "
            f"{root}/step-{latest:08d}); raise maxSteps to at least {latest}, or delete the "
            f"checkpoints after step {max_steps} under {root} to continue from an earlier one. "
            "The finished output was left as it is.",
        )


def _move_entries(output: Path, previous: Path, keep: str | None) -> None:
    """Move what a finished output holds, but `keep`, into `previous`, leaving the folder.

    A `spec.storage.uri` folder may sit in a folder the user cannot write to, so it is not
    moved itself. manifest.json leaves first and arrives last, so that if this is
    interrupted neither folder is taken for a finished output.
    """
    previous.mkdir(parents=True)
    pending = previous / f".{MANIFEST}.pending"
    shutil.move(output / MANIFEST, pending)
    for entry in output.iterdir():
        if entry.name != keep:
            shutil.move(entry, previous / entry.name)
    pending.rename(previous / MANIFEST)


def _empty_output(filesystem, path: str, keep: str | None = None) -> None:
    """Delete everything in an output but the entry named `keep`, manifest.json first.

    Without the manifest, the old output is never taken for a finished run, even when the
    run fails or is interrupted while the rest is deleted. The folder itself stays, so a
    `spec.storage.uri` folder in a folder the user cannot write to can still be reused.
    """
    try:
        entries = filesystem.ls(path, detail=False)
    except FileNotFoundError:
        return
    names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries}
    names.discard(keep)
    for name in sorted(names, key=lambda name: name != MANIFEST):
        storage.remove_tree(filesystem, f"{path}/{name}")


def _check_writable(resource: Resource, path: str, output_uri: str) -> None:
    """Raise unless the local folder that a `spec.storage.uri` names can be written, judged
    by the nearest folder on its path that exists."""
    location = Path(path)
    existing = next(folder for folder in (location, *location.parents) if folder.exists())
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is read-only or not yours"
    else:
        return
    raise InvalidResourceError(
        resource.label, "spec.storage.uri",
        f"{output_uri!r} cannot be written ({problem}); point it to a writable folder, or "
        "remove the field to write to the workspace.",
    )


def _check_replaceable(resource: Resource, filesystem, path: str, output_uri: str) -> None:
    """Raise unless the location a `spec.storage.uri` names is empty or contains a finished
    output of this kind of stage, because the stage deletes what is there."""
    try:
        names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in filesystem.ls(path, detail=False)}
    except FileNotFoundError:
        return
    if not names:
        return
    manifest = _read_manifest(output_uri) if MANIFEST in names else None
    if manifest and manifest.get("stageKey") and manifest.get("kind") == resource.kind:
        return
    raise InvalidResourceError(
        resource.label, "spec.storage.uri",
        f"{output_uri!r} contains files ({', '.join(sorted(names)[:5])}) but no finished "
        f"{resource.kind} output, and the stage would delete them; point it to a new or empty "
        "location, or empty it.",
    )


def _remote_field(resource: Resource) -> str:
    """Return the spec field that names an object store location of `resource`, or ""."""
    training = getattr(resource.spec, "training", None)
    candidates = (
        ("spec.storage.uri", resource.spec.storage.uri),
        ("spec.training.artifactUri", getattr(training, "artifact_uri", None)),
    )
    for name, uri in candidates:
        if uri and storage.is_remote(uri):
            return name
    return ""


def _read_manifest(output_uri: str) -> dict[str, Any] | None:
    """Return the output's manifest, or None while the output has none."""
    filesystem, path = storage.resolve(output_uri)
    # NB: cat_file, because obstore's file object (0.12) fails again in its destructor when
    # its open fails, and Python prints that traceback after lathe's error message.
    try:
        return json.loads(filesystem.cat_file(f"{path}/{MANIFEST}"))
    except (FileNotFoundError, obstore.exceptions.NotFoundError):
        return None


def _stop_processes(processes: list[subprocess.Popen], timeout_s: float = 30.0) -> None:
    """Send SIGTERM to the running processes, then SIGKILL to each that is still running after
    `timeout_s`, with every process it started. torchrun passes SIGTERM on to its workers.

    A second interrupt (Ctrl-C again) while this waits kills them all at once.
    """
    try:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("Stage process %d did not stop within %.0f s; killing it and the "
                            "processes it started.", process.pid, timeout_s)
                _kill_tree(process)
                process.wait()
    except KeyboardInterrupt:
        for process in processes:
            if process.poll() is None:
                _kill_tree(process)
        for process in processes:
            process.wait()
        raise


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process, its process group and every process it started.

    torch's elastic agent starts each worker in a session of its own, so the workers of a
    torchrun are in none of its groups; they are found as its descendants, before it dies.
    """
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        # No group of that id: the process was started without start_new_session.
        process.kill()
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _log_lines(path: Path, start: int = 0) -> Iterator[str]:
    """Yield the lines of a log file from byte offset `start` on, reading one line at a time."""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        handle.seek(start)
        for line in handle:
            yield line.decode(errors="replace").rstrip("\r\n")


# Lines that end a StageError message that spans lines: another process's error, a traceback
# such as torchrun's report of failed workers, a log record, or a rule. The trainer's log
# records start with the date, and torch's glog-style records with a level letter and the date.
_AFTER_STAGE_ERROR = re.compile(
    r"^(error: |Traceback |\d{4}-\d\d-\d\d |[EWIF]\d{4} |\[|={8,}|-{8,})"
)
# Lines of one StageError message at most; a pydantic error that lists many fields stays whole.
MAX_ERROR_LINES = 200


# Below this many free bytes, a stage that failed without a log line is reported as having run
# out of disk space, since writing its log was what failed.
LOW_DISK_BYTES = 16 * 2**20


def _silent_failure(directory: Path) -> str:
    """Describe a failed stage that wrote nothing to its log, naming a full disk if it is one."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < LOW_DISK_BYTES:
        return (f"the stage wrote no log, and the file system of {directory} has only "
                f"{free // 1024} KiB free: it probably ran out of space. Free space there, or "
                "pass --workspace on a larger file system, and run again")
    return ("the stage exited without writing to its log, as a process that the system kills "
            "(when memory runs out, for one) does; check the free memory and run again")


def _scan_log(lines: Iterable[str], tail_lines: int = 20) -> tuple[str, str]:
    """Return the last `tail_lines` lines and the last StageError a stage printed, with the
    lines it spans (or ""), keeping only those in memory, since a training log can be large."""
    tail: deque[str] = deque(maxlen=tail_lines)
    message: list[str] = []
    in_message = False
    for line in lines:
        tail.append(line)
        if line.startswith("error: "):
            message, in_message = [line.removeprefix("error: ")], True
        elif in_message and (_AFTER_STAGE_ERROR.match(line) or len(message) >= MAX_ERROR_LINES):
            in_message = False
        elif in_message:
            message.append(line)
    return "\n".join(tail), "\n".join(message).rstrip()


def _stage_error(log: str) -> str:
    """Return the last StageError in a log's text, with the lines it spans, or ""."""
    return _scan_log(log.splitlines())[1]
