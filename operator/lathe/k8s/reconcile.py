"""Reconcile one Lathe resource: wait for inputs, run its workload, and compute its status.

The logic is level-triggered: every call looks at the resource, its inputs and the objects it
owns, creates what is missing, and returns the status the resource should have. The kopf handlers
(lathe.k8s.handlers) call it on every event of the resource or of a Job it owns, and patch the
status only when it changed. Nothing here writes `spec` or annotations.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from lathe import __version__, plans, status
from lathe.api import GROUP, KINDS, VERSION, ModelDeployment, Resource
from lathe.api.common import ObjectMeta
from lathe.errors import InvalidResourceError
from lathe.k8s import builders
from lathe.k8s.settings import OperatorSettings
from lathe.loader import describe_errors
from lathe.status import ConditionType as C
from lathe.status import Reason
from lathe_trainer.stage import EXIT_PERMANENT, ResolvedInput

log = logging.getLogger(__name__)

FIELD_MANAGER = "lathe-operator"
# The field manager of the merge patch that repairs an object a hand edit left unappliable
# (Reconciler._replace_edited_lists); its managedFields entry is removed right after.
REPAIR_FIELD_MANAGER = "lathe-operator-repair"
# The field manager of a Triton Deployment's spec.replicas while the operator applies it without
# them: the live count when autoscaling is turned on (Reconciler._hand_over_replicas), and
# minReplicas for a new autoscaled one (_start_at_min_replicas). The HorizontalPodAutoscaler's
# first scale takes the field over.
HANDOVER_FIELD_MANAGER = "lathe-operator-handover"
# Seconds a finished upstream read from the API server is reused, because many resources often
# share one Corpus or Tokenizer and each reconcile would read it again. A change to a finished
# upstream reaches reconciles up to this late. An unfinished upstream is never cached, so a
# waiting resource reads its finished status on the next reconcile.
UPSTREAM_CACHE_SECONDS = 1.0
# Seconds a Job from the operator's Job watch is trusted without an event refreshing it. kopf
# (1.45) reports no DELETED event for a Job deleted while its watch was re-listing, so an older
# entry is read from the API server again.
JOB_CACHE_SECONDS = 30.0
# Seconds the presence or absence of the PodMonitor CRD is trusted before it is read again, so
# that installing or removing the Prometheus Operator takes effect without an operator restart.
POD_MONITOR_CRD_CACHE_SECONDS = 60.0

# Hex digits of the resume key in a run's folder name (`run-<digits>`): 64 bits, so two runs of
# one resource with different resume keys share a folder with a probability of 2^-64.
RUN_FOLDER_DIGITS = 16
# Seconds a Job's pods may take to start before the operator looks at them for the reason they
# have not. Within it, pods that wait for a node or an image are normal and cost no pod reads.
POD_START_GRACE_SECONDS = 30.0
# Seconds a found reason for pods not starting is reused before the pods are read again.
STUCK_RECHECK_SECONDS = 300.0
# Waiting reasons of a container that will not start until its spec or the cluster is fixed.
# The kubelet keeps retrying them, so they leave the Job active rather than failed.
STUCK_WAITING_REASONS = frozenset({
    "CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff",
    "InvalidImageName", "RunContainerError",
})
# The message of a Job's Failed condition when a podFailurePolicy FailJob rule matched, as the
# Job controller writes it (kubernetes pkg/controller/job/pod_failure_policy.go). It names the
# pod whose failure ended the attempt.
FAIL_JOB_MESSAGE = re.compile(
    r"Container (?P<container>\S+) for pod (?P<namespace>[^/\s]+)/(?P<pod>\S+) failed with exit "
    r"code (?P<exit_code>-?\d+) matching FailJob rule at index (?P<rule>\d+)"
)
# A Triton pod restarts its containers, so a crash loop (the model repository copy failing, or
# Triton exiting on a model it cannot load) also keeps it from becoming ready.
SERVER_STUCK_REASONS = STUCK_WAITING_REASONS | {"CrashLoopBackOff"}


def operator_api_client() -> client.ApiClient:
    """Return an API client that names the operator in its User-Agent.

    The API server takes the User-Agent up to its first '/' as the field manager of a create,
    update or patch that names none (so status writes and Job creates), and audit logs show it.
    The client's default would be `OpenAPI-Generator`.
    """
    api_client = client.ApiClient()
    api_client.user_agent = f"{FIELD_MANAGER}/{__version__}"
    return api_client


@dataclass
class Clients:
    api_client: client.ApiClient = field(default_factory=operator_api_client)
    batch: client.BatchV1Api = field(init=False)
    core: client.CoreV1Api = field(init=False)
    apps: client.AppsV1Api = field(init=False)
    autoscaling: client.AutoscalingV2Api = field(init=False)
    custom: client.CustomObjectsApi = field(init=False)
    extensions: client.ApiextensionsV1Api = field(init=False)

    def __post_init__(self) -> None:
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)
        self.autoscaling = client.AutoscalingV2Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.extensions = client.ApiextensionsV1Api(self.api_client)


def parse(body: dict[str, Any]) -> Resource:
    """Build the API model from a custom resource body, ignoring server-set metadata."""
    meta = body["metadata"]
    document = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": ObjectMeta(
            name=meta["name"],
            namespace=meta.get("namespace", "default"),
            uid=meta.get("uid"),
            generation=meta.get("generation", 1),
        ),
        "spec": body.get("spec") or {},
    }
    return KINDS[body["kind"]].model_validate(document)


class Reconciler:
    """Reconcile Lathe resources against the API server."""

    def __init__(self, settings: OperatorSettings, clients: Clients | None = None):
        self.settings = settings
        self.api = clients or Clients()
        self.store = builders.ArtifactStore(settings.artifact_root)
        # (time.monotonic() of the read, whether the PodMonitor CRD exists), or None before.
        self._pod_monitor_crd: tuple[float, bool] | None = None
        self._upstreams: dict[tuple[str, str, str], tuple[float, dict]] = {}
        # The fields the reconcile reads of each managed Job, by (namespace, name), with the
        # time.monotonic() of the watch event that delivered them
        # (see lathe.k8s.handlers.on_job_event). A Job not in it is read from the API server.
        self.jobs: dict[tuple[str, str], tuple[float, dict]] = {}
        # (namespace, Job name) -> (monotonic time, why its pods have not started, pod counts).
        self.stuck: dict[tuple[str, str], tuple[float, str, tuple]] = {}
        self._api_client = client.ApiClient()

    # -- entry point -----------------------------------------------------------------------

    def reconcile(self, body: dict[str, Any]) -> dict[str, Any]:
        """Return the desired status of the resource, creating owned objects as needed."""
        current = dict(body.get("status") or {})
        generation = body["metadata"].get("generation", 1)
        try:
            resource = parse(body)
        except ValidationError as error:
            # A spec the CRD accepted but the API model rejects.
            field, message = describe_errors(error, body["kind"])
            return self._failed(current, generation, Reason.INVALID_SPEC, f"{field}: {message}",
                                body["kind"])
        except Exception as error:  # noqa: BLE001 - any other parse failure fails the spec too
            return self._failed(current, generation, Reason.INVALID_SPEC, str(error), body["kind"])

        conditions = [
            condition for condition in _without_reconcile_failure(current)
            # The spec parses now, so an InvalidSpec failure of an earlier generation is over,
            # also when the spec went back to the last good one, whose run is recorded as done.
            if not (condition["type"] == C.FAILED and condition["reason"] == Reason.INVALID_SPEC
                    and condition.get("observedGeneration") != generation)
        ]
        new = {**current, "observedGeneration": generation}
        inputs, waiting = self._resolve_inputs(resource)
        if waiting:
            recorded_hash = new.get("runSpecHash")
            spec_changed = bool(recorded_hash) and recorded_hash not in (
                _run_hash(resource), _legacy_run_hash(resource))
            if spec_changed:
                # The spec changed, so the finished output belongs to the previous spec. A
                # Succeeded kept here would show this generation as done and hand the old
                # output to the stages that read it. A Failed would blame this generation for
                # the previous spec's error. The new run replaces them once the inputs are
                # ready, and a changed `suspend` or input alone keeps them. A ModelDeployment
                # keeps its Ready and artifact, because Triton serves the earlier export.
                stale = (C.FAILED,)
                if not isinstance(resource, ModelDeployment):
                    stale = (resource.summary_condition, C.FAILED)
                    new.pop("artifact", None)
                conditions = [c for c in conditions if c["type"] not in stale]
            new["conditions"] = status.set_condition(
                conditions, C.INPUTS_READY, False, waiting[0], waiting[1], generation
            )
            if isinstance(resource, ModelDeployment):
                new = self._serve_while_waiting(resource, body, new, spec_changed)
                return self._with_phase(new, resource)
            recorded = _recorded_inputs(resource, new)
            if not spec_changed and recorded is not None and _run_in_progress(resource, new):
                # The run read its inputs when it started, and their folders stay, so it goes
                # on: the operator keeps following its Job (outcome, retries, progress) rather
                # than leaving it to hold its nodes unwatched. A new run starts once the inputs
                # are ready again with other digests.
                new = self._reconcile_bounded(resource, body, recorded, new)
            return self._with_phase(new, resource)
        conditions = status.set_condition(
            conditions, C.INPUTS_READY, True, Reason.INPUTS_AVAILABLE,
            "All referenced inputs have succeeded.", generation,
        )
        new["conditions"] = conditions
        try:
            if isinstance(resource, ModelDeployment):
                new = self._reconcile_deployment(resource, body, inputs, new)
            else:
                new = self._reconcile_bounded(resource, body, inputs, new)
        except InvalidResourceError as error:
            # A spec that builds no valid workload, such as a stage config over the ConfigMap
            # limit: a retry cannot fix it, so it fails the generation as a bad spec does.
            return self._failed(current, generation, Reason.INVALID_SPEC,
                                f"{error.field}: {error.detail}", body["kind"])
        return self._with_phase(new, resource)

    # -- inputs ----------------------------------------------------------------------------

    def _resolve_inputs(
        self, resource: Resource
    ) -> tuple[dict[str, ResolvedInput], tuple[str, str] | None]:
        resolved: dict[str, ResolvedInput] = {}
        upstreams: dict[str, dict] = {}
        # Every input that is not ready, so that the condition names all of them at once.
        waits: list[tuple[str, str]] = []
        for role, (kind, name) in resource.references().items():
            model = KINDS[kind]
            try:
                upstream = self._read_upstream(resource.metadata.namespace, model.plural, name)
            except ApiException as error:
                if error.status == 404:
                    waits.append((Reason.INPUT_NOT_FOUND, f"Waiting for {kind} {name!r}, which "
                                  f"does not exist yet ({role})."))
                    continue
                raise
            upstream_status = upstream.get("status") or {}
            artifact = upstream_status.get("artifact")
            done = status.condition_true(
                upstream_status.get("conditions") or [], model.summary_condition
            )
            current = upstream_status.get("observedGeneration") == upstream["metadata"].get(
                "generation"
            )
            if current and status.condition_true(upstream_status.get("conditions") or [],
                                                 C.FAILED):
                waits.append((Reason.INPUT_NOT_READY, f"Waiting for {kind} {name!r}, which "
                              f"failed ({role}); fix it as its Failed condition says, and this "
                              "resource continues once it succeeds."))
                continue
            if not (done and artifact and current):
                waits.append((Reason.INPUT_NOT_READY, f"Waiting for {kind} {name!r} to reach "
                              f"{model.summary_condition} ({role})."))
                continue
            self._remember_upstream(resource.metadata.namespace, model.plural, name, upstream)
            upstreams[role] = upstream
            resolved[role] = ResolvedInput(
                kind=kind, name=name, uri=artifact["uri"], digest=artifact["digest"]
            )
        if waits:
            # A missing input needs the user to act, so it decides the reason.
            reasons = [reason for reason, _ in waits]
            reason = (Reason.INPUT_NOT_FOUND if Reason.INPUT_NOT_FOUND in reasons
                      else Reason.INPUT_NOT_READY)
            return {}, (reason, " ".join(message for _, message in waits))
        disagreement = _inputs_disagree(resolved, upstreams)
        if disagreement:
            return {}, (Reason.INPUT_NOT_READY, disagreement)
        return resolved, None

    def _read_upstream(self, namespace: str, plural: str, name: str) -> dict:
        cached = self._upstreams.get((namespace, plural, name))
        if cached and time.monotonic() - cached[0] < UPSTREAM_CACHE_SECONDS:
            return cached[1]
        return self.api.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)

    def forget_upstream(self, namespace: str, plural: str, name: str) -> None:
        """Drop a cached upstream that was deleted or started a new run, so that the resources
        woken for it read it again."""
        self._upstreams.pop((namespace, plural, name), None)

    def _remember_upstream(self, namespace: str, plural: str, name: str, upstream: dict) -> None:
        """Cache a finished upstream for UPSTREAM_CACHE_SECONDS, dropping expired entries."""
        now = time.monotonic()
        expired = [key for key, (read_at, _) in list(self._upstreams.items())
                   if now - read_at >= UPSTREAM_CACHE_SECONDS]
        for key in expired:
            self._upstreams.pop(key, None)
        self._upstreams.setdefault((namespace, plural, name), (now, upstream))

    # -- bounded stages (Corpus, Tokenizer, PretrainJob, FineTune, the export of a deployment) --

    def _output_uri(self, resource: Resource, key: str, previous: dict, same_run: bool) -> str:
        """Return where a run writes: spec.storage.uri when set, else a folder per run.

        The folder is named after the run's resume key `key` (lathe.plans.base.resume_key), so
        a run of another spec or other inputs leaves the finished output that stages downstream
        and Triton pods read as it is. A run with the resume key of the run before it writes
        where that run wrote: a PretrainJob that changed only `training` or `distributed`
        continues from its checkpoints there. `previous` is the status before this run.
        """
        if resource.spec.storage.uri:
            return resource.spec.storage.uri
        meta = resource.metadata
        recorded = previous.get("outputUri")
        if same_run or (recorded and previous.get("runResumeKey") == key):
            return recorded or self.store.output_uri(meta.namespace, resource.kind, meta.name)
        if previous.get("runGeneration") and not recorded:
            # NB: a run started by an earlier release recorded no folder and wrote to the
            # resource's folder. The next run writes there too, so that it can continue from
            # those checkpoints; the stage starts over when their resume key differs.
            return self.store.output_uri(meta.namespace, resource.kind, meta.name)
        digits = key.rpartition(":")[2][:RUN_FOLDER_DIGITS]
        return self.store.output_uri(meta.namespace, resource.kind, meta.name, f"run-{digits}")

    def _plan(self, resource: Resource, inputs: dict[str, ResolvedInput],
              output: str) -> plans.WorkloadPlan:
        return plans.build(
            resource, inputs, output, self.settings.data_root, self.settings.trainer_image
        )

    def _reconcile_bounded(
        self, resource: Resource, body: dict, inputs: dict[str, ResolvedInput], new: dict
    ) -> dict:
        generation = resource.metadata.generation
        conditions = new["conditions"]
        summary = resource.summary_condition
        # A run is identified by its spec (see _run_hash) and by its inputs' digests. Pausing
        # and resuming bump the generation but continue the same run. A changed spec starts a
        # new run, and so does an input that finished again with another digest.
        run_hash = _run_hash(resource)
        input_digests = {role: item.digest for role, item in sorted(inputs.items())}
        # NB: a run started by an earlier release recorded the hash of the whole spec. It
        # stays the same run, so that an operator upgrade does not export every model again.
        recorded_hash = new.get("runSpecHash")
        same_run = (recorded_hash in (run_hash, _legacy_run_hash(resource))
                    and bool(new.get("runGeneration"))
                    and new.get("inputDigests", input_digests) == input_digests)
        # A ModelDeployment's Ready follows Triton, which keeps serving the earlier export
        # while a new one runs, so its run is finished only once Exported is True.
        finished = "Exported" if isinstance(resource, ModelDeployment) else summary
        if same_run and (status.condition_true(conditions, finished)
                         or status.condition_true(conditions, C.FAILED)):
            # A run finished by an earlier release recorded no inputs; it read the current ones.
            new.setdefault("inputDigests", input_digests)
            return new

        # NB: an earlier release named a Job after the spec generation (`-g<N>-`) and kept no
        # run number. A run it started continues under the Job name its status records, and
        # counts as run 1, until a new run starts.
        recorded_run = int(new.get("run") or 0)
        legacy_job = new.get("jobName") if same_run and not recorded_run else None
        if not recorded_run and new.get("jobName"):
            recorded_run = 1
        run_generation = int(new["runGeneration"]) if same_run else generation
        run = resource.model_copy(deep=True)
        run.metadata.generation = run_generation
        resume_key = plans.base.resume_key(run, inputs)
        output = self._output_uri(run, resume_key, new, same_run)
        plan = replace(self._plan(run, inputs, output),
                       run=max(1, recorded_run + (0 if same_run else 1)))
        attempt = int(new.get("attempt", 0)) if same_run else 0
        new["runSpecHash"] = run_hash
        new["runGeneration"] = run_generation
        if not legacy_job:
            new["run"] = plan.run
        new["inputDigests"] = input_digests
        new["inputUris"] = {role: item.uri for role, item in sorted(inputs.items())}
        new["outputUri"] = output
        new["runResumeKey"] = resume_key
        new["attempt"] = attempt
        if not same_run:
            # A new run starts over: stop the previous run's Job and forget its outcome.
            previous = new.get("jobName")
            if previous:
                self._delete_job(resource.metadata.namespace, previous)
            new.pop("artifact", None)
            # The previous run's last progress (its step count, loss and an ETA of 0) would
            # otherwise show in `kubectl get` until the new run writes its own.
            new.pop("progress", None)
            new["failedAttempts"] = []
            new["restartCount"] = 0
            conditions = [c for c in conditions if c["type"] in (C.INPUTS_READY,)]
        job_name = legacy_job or builders.job_name(plan, attempt)
        # A resource whose status records no run has no Job yet, so the Job is created without a
        # read. If a concurrent reconcile created it first, the create returns 409 and it is kept.
        fresh = not same_run and not new.get("jobName")
        job = None if fresh else self._read_job(resource.metadata.namespace, job_name)
        suspended = bool(getattr(resource.spec, "suspend", False))

        if job is None and not fresh:
            # NB: a status older than the cluster (a concurrent reconcile moved on, or a restart
            # whose status write was lost) names a Job that is gone. Creating it again would run
            # two attempts at once.
            latest = self._latest_job(resource, body, run_generation, plan.run)
            if latest is not None and latest[0] > plan.run:
                return _stale(body)  # a newer run's status is on its way
            if latest is not None and latest[0] == plan.run and latest[1] > attempt:
                attempt = latest[1]
                new["attempt"] = attempt
                job_name = latest[2]
                job = self._read_job(resource.metadata.namespace, job_name)
            elif same_run and not legacy_job and new.get("jobName") == job_name and not suspended:
                # The current attempt's Job was deleted while it ran, by hand or by a tool.
                # Its pods may still be terminating under the same host names and rendezvous
                # id, so the Job is not created again under its name: the next attempt, with
                # a new Service and rendezvous id, resumes from the latest checkpoint. It is
                # not a failure of the stage, so it counts neither as failed nor as a restart.
                log.info("Job %s of %s was deleted while it ran, so attempt %d starts.",
                         job_name, resource.key, attempt + 1)
                attempt += 1
                new["attempt"] = attempt
                job_name = builders.job_name(plan, attempt)
        if job is None:
            if suspended:
                # The Job that status.jobName named is gone (a new run deleted it), and no Job
                # exists until the spec is resumed.
                new.pop("jobName", None)
                new["conditions"] = status.set_condition(
                    conditions, C.SUSPENDED, True, Reason.SUSPENDED,
                    "spec.suspend is true, so no Job is created; clear it to start the stage.",
                    generation,
                )
                return new
            self._create_workload(resource, body, plan, attempt)
            new["conditions"] = status.set_condition(
                _resumed(conditions, generation), C.RUNNING, True, Reason.JOB_CREATED,
                f"Created Job {job_name} (attempt {attempt}).", generation,
            )
            new["jobName"] = job_name
            return new

        if not _owned_by(job.metadata, body):
            # NB: a Job left from an earlier object of the same name (deleted and re-created)
            # is being garbage-collected; wait for it instead of adopting it.
            new["conditions"] = status.set_condition(
                conditions, C.RUNNING, False, Reason.JOB_CREATED,
                f"Waiting for the old Job {job_name} of a deleted object to be removed.",
                generation,
            )
            return new

        new["jobName"] = job_name
        outcome = _job_outcome(job)
        stopped = _stopped_while_suspended(job)
        queued = builders.KUEUE_QUEUE_LABEL in (job.metadata.labels or {})
        # Kueue admits a queued Job by unsuspending it, so the operator never does that itself.
        # A finished Job stays finished, and one stopped while suspended is replaced below, so
        # their suspend is left as it is.
        if (outcome is None and not stopped and suspended != bool(job.spec.suspend)
                and (suspended or not queued)):
            self.api.batch.patch_namespaced_job(
                job_name, resource.metadata.namespace, {"spec": {"suspend": suspended}}
            )
        if suspended:
            conditions = status.set_condition(
                conditions, C.SUSPENDED, True, Reason.SUSPENDED,
                "The spec sets suspend; the Job's pods are stopped and training resumes from "
                "the latest checkpoint when it is cleared.", generation,
            )
            new["conditions"] = status.set_condition(
                conditions, C.RUNNING, False, Reason.SUSPENDED,
                f"Job {job_name} is suspended because spec.suspend is true; clear it to "
                "continue.", generation,
            )
            return new
        conditions = _resumed(conditions, generation)

        if outcome == "Complete":
            return self._succeeded(resource, plan, job, new, conditions)
        if stopped:
            return self._next_attempt_after_suspend(resource, body, plan, job, new, conditions,
                                                    attempt)
        if outcome == "Failed":
            return self._attempt_failed(resource, body, plan, job, new, conditions, attempt)
        active = job.status.active or 0
        stuck = self._pods_not_starting(resource.metadata.namespace, job)
        if stuck:
            new["conditions"] = status.set_condition(
                conditions, C.RUNNING, False, Reason.PODS_NOT_STARTING,
                f"Job {job_name}: {stuck} The Job waits and its pods start once the cause is "
                "fixed.", generation,
            )
            return new
        running = next((c for c in conditions if c["type"] == C.RUNNING), None)
        if active == 0 and running and running["status"] == "True" and (
            running["reason"] in (Reason.JOB_CREATED, Reason.ATTEMPT_RESTARTED)
        ):
            # The new attempt's pods are not running yet, so the condition still describes it.
            new["conditions"] = conditions
            return new
        message = (f"Job {job_name} has {active} active pod{'s' if active != 1 else ''}."
                   if active else f"Job {job_name} is starting its pods.")
        new["conditions"] = status.set_condition(
            conditions, C.RUNNING, True, Reason.JOB_RUNNING, message, generation,
        )
        return new

    def _succeeded(self, resource, plan, job, new, conditions) -> dict:
        generation = resource.metadata.generation
        summary = resource.summary_condition
        result = self._termination_result(resource.metadata.namespace, job.metadata.name)
        digest = result.get("digest") or f"job-uid:{job.metadata.uid}"
        new["artifact"] = {"uri": plan.config.output_uri, "digest": digest}
        if result.get("metrics"):
            new["metrics"] = result["metrics"]
        conditions = status.set_condition(
            conditions, C.RUNNING, False, Reason.JOB_SUCCEEDED, "The Job completed.", generation
        )
        if isinstance(resource, ModelDeployment):
            new["conditions"] = status.set_condition(
                conditions, "Exported", True, Reason.JOB_SUCCEEDED,
                "The export Job completed.", generation,
            )
            return new
        new["conditions"] = status.set_condition(
            conditions, summary, True, Reason.JOB_SUCCEEDED,
            f"Job {job.metadata.name} completed.", generation,
        )
        return new

    def _attempt_failed(self, resource, body, plan, job, new, conditions, attempt) -> dict:
        generation = resource.metadata.generation
        exit_code, reason, message = self._failed_pod(resource.metadata.namespace, job)
        attempts = list(new.get("failedAttempts") or [])
        if not any(a.get("attempt") == attempt for a in attempts):
            attempts.append({
                "attempt": attempt, "exitCode": exit_code, "reason": reason, "message": message,
            })
        new["failedAttempts"] = attempts
        permanent = exit_code == EXIT_PERMANENT
        # A pod that the kubelet rejected before its container ran has no exit code.
        exit_text = "no exit code" if exit_code is None else f"exit code {exit_code}"
        failed_how = "without an exit code" if exit_code is None else f"with {exit_text}"
        # Attempts stopped by a suspension are not failures, so the failed attempts count, not
        # the attempt number.
        if permanent or len(attempts) > plan.max_restarts:
            why = "a permanent error" if permanent else f"{len(attempts)} failed attempts"
            conditions = status.set_condition(
                conditions, C.RUNNING, False, Reason.JOB_FAILED, "The Job failed.", generation
            )
            new["conditions"] = status.set_condition(
                conditions, C.FAILED, True,
                Reason.JOB_FAILED if permanent else Reason.BACKOFF_LIMIT_EXCEEDED,
                f"Gave up after {why}: {exit_text} ({reason}). {message}".strip(),
                generation,
            )
            return new
        # Tear down what is left of the failed attempt, then start the next one, which resumes
        # from the latest checkpoint with a new rendezvous id.
        # The next attempt's Job is created before the failed one is deleted, so a reconcile
        # that still reads the old status finds the next attempt and creates nothing.
        self._create_workload(resource, body, plan, attempt + 1)
        self._delete_job(resource.metadata.namespace, job.metadata.name)
        new["attempt"] = attempt + 1
        new["restartCount"] = len(attempts)
        new["jobName"] = builders.job_name(plan, attempt + 1)
        new["conditions"] = status.set_condition(
            conditions, C.RUNNING, True, Reason.ATTEMPT_RESTARTED,
            f"Attempt {attempt} failed {failed_how} ({reason}); started attempt {attempt + 1}, "
            "resuming from the latest checkpoint.", generation,
        )
        return new

    def _next_attempt_after_suspend(self, resource, body, plan, job, new, conditions,
                                    attempt) -> dict:
        """Start the next attempt of a Job whose pods were stopped by a suspension.

        The pods of a suspended Job get SIGTERM and exit with 143. The Job controller applies the
        pod failure policy to them as to any failed pod, so the catch-all FailJob rule fails the
        Job. tests/cluster/test_operator.py shows it on a real control plane. That is the
        suspension (spec.suspend, or Kueue preempting the workload), not an error of the stage:
        the next attempt resumes from the latest checkpoint and the stopped one counts neither
        as a failed attempt nor as a restart.
        """
        self._create_workload(resource, body, plan, attempt + 1)
        self._delete_job(resource.metadata.namespace, job.metadata.name)
        next_job = builders.job_name(plan, attempt + 1)
        new["attempt"] = attempt + 1
        new["jobName"] = next_job
        new["conditions"] = status.set_condition(
            conditions, C.RUNNING, True, Reason.JOB_CREATED,
            f"The pods of Job {job.metadata.name} were stopped while it was suspended, so "
            f"created Job {next_job} (attempt {attempt + 1}), which resumes from the latest "
            "checkpoint. The stopped attempt does not count as a failure.",
            resource.metadata.generation,
        )
        return new

    # -- ModelDeployment -------------------------------------------------------------------

    def _reconcile_deployment(
        self, resource: ModelDeployment, body: dict, inputs: dict[str, ResolvedInput], new: dict
    ) -> dict:
        new = self._reconcile_bounded(resource, body, inputs, new)
        if not status.condition_true(new["conditions"], "Exported"):
            return self._serving_previous_export(resource, new)
        return self._serve(resource, body, new)

    def _serve_while_waiting(self, resource: ModelDeployment, body: dict, new: dict,
                             spec_changed: bool) -> dict:
        """Keep the finished export served while the FineTune is missing or runs again, so that
        a deleted Triton object is created again and Ready follows the pods.

        After a spec change the export belongs to the earlier spec, so only Ready is set from
        its Deployment, as while a new export runs.
        """
        if (not spec_changed and new.get("artifact")
                and status.condition_true(new["conditions"], "Exported")):
            return self._serve(resource, body, new)
        return self._serving_previous_export(resource, new)

    def _serve(self, resource: ModelDeployment, body: dict, new: dict) -> dict:
        """Apply the Triton objects that serve the export in status.artifact, and set Ready."""
        serving = plans.serving(resource, new["artifact"]["uri"], new["artifact"]["digest"])
        owner = _owner(body)
        namespace = resource.metadata.namespace
        autoscaling = resource.spec.autoscaling
        existed = True
        if autoscaling.enabled:
            existed = self._hand_over_replicas(namespace, builders.triton_name(serving))
        self._apply(namespace, builders.triton_deployment(
            serving, owner, self.store, image=serving.image or self.settings.triton_image,
            sync_image=self.settings.sync_image,
            autoscaled=autoscaling.enabled, s3_secret=self.settings.s3_secret,
        ))
        if not existed and autoscaling.min_replicas > 1:
            self._start_at_min_replicas(namespace, builders.triton_name(serving),
                                        autoscaling.min_replicas)
        self._apply(namespace, builders.triton_service(serving, owner))
        if resource.spec.autoscaling.enabled:
            self._apply(namespace, builders.horizontal_pod_autoscaler(
                serving, owner, resource.spec.autoscaling
            ))
        else:
            # An HPA left from when autoscaling was on would keep resizing the Deployment,
            # against the replicas that the operator applies.
            self._delete_autoscaler(namespace, builders.triton_name(serving))
        if self._has_pod_monitor_crd():
            self._apply_pod_monitor(namespace, builders.pod_monitor(serving, owner))
        name = builders.triton_name(serving)
        deployment = self.api.apps.read_namespaced_deployment(name, namespace)
        new["endpoint"] = f"http://{name}.{namespace}.svc:{serving.http_port}"
        return self._set_ready(resource, serving, deployment, new)

    def _serving_previous_export(self, resource: ModelDeployment, new: dict) -> dict:
        """Set Ready from the Triton Deployment of an earlier export while a new export runs.

        NB: the Deployment keeps serving the earlier model until the new export succeeds, so
        Ready must not drop for the minutes the export takes.
        """
        if not new.get("endpoint"):
            return new  # no export has been served yet
        serving = plans.serving(resource, "", "")
        try:
            deployment = self.api.apps.read_namespaced_deployment(
                builders.triton_name(serving), resource.metadata.namespace
            )
        except ApiException as error:
            if error.status != 404:
                raise
            new["conditions"] = status.set_condition(
                new["conditions"], C.READY, False, Reason.SERVER_NOT_READY,
                f"The Triton Deployment {builders.triton_name(serving)} of the earlier export "
                "was deleted; the operator creates it again once the new export is done.",
                resource.metadata.generation,
            )
            return new
        if status.condition_true(new["conditions"], C.FAILED):
            note = ("They serve the earlier export, because the new export failed; see the "
                    "Failed condition.")
        else:
            note = ("They serve the earlier export until the new one is done; changes to "
                    "spec.serving apply then.")
        return self._set_ready(resource, serving, deployment, new, note, earlier_export=True)

    def _set_ready(self, resource: ModelDeployment, serving, deployment, new: dict,
                   note: str = "", earlier_export: bool = False) -> dict:
        """Set the Ready condition from the ready replicas of the Triton Deployment.

        With `earlier_export`, the Deployment serves an earlier export while a new one runs.
        It keeps that export's replicas until the new export is applied, so Ready counts
        against the replicas the Deployment requests, not those of the current spec.
        """
        generation = resource.metadata.generation
        namespace = resource.metadata.namespace
        # With autoscaling, the HorizontalPodAutoscaler sets the replicas, and serving needs
        # its minimum.
        autoscaling = resource.spec.autoscaling
        target = autoscaling.min_replicas if autoscaling.enabled else serving.replicas
        if earlier_export:
            requested = deployment.spec.replicas if deployment.spec.replicas is not None else 1
            target = min(target, requested) if autoscaling.enabled else requested
        ready_replicas = deployment.status.ready_replicas or 0
        ready = target > 0 and ready_replicas >= target
        message = (f"{ready_replicas} Triton replicas are ready; the autoscaler's minimum is "
                   f"{target}." if autoscaling.enabled
                   else f"{ready_replicas} of {target} Triton replicas are ready.")
        if note:
            message = f"{message} {note}"
        reason = Reason.SERVER_READY if ready else Reason.SERVER_NOT_READY
        if target == 0 and earlier_export:
            reason = Reason.SCALED_TO_ZERO
            # The note is about what the replicas serve, and there are none.
            message = "The Triton Deployment of the earlier export has 0 replicas, so no " + (
                "Triton replica runs; the new export failed, see the Failed condition."
                if status.condition_true(new["conditions"], C.FAILED)
                else "Triton replica runs until the new export is done.")
        elif target == 0:
            reason = Reason.SCALED_TO_ZERO
            message = ("spec.serving.replicas is 0, so no Triton replica runs; set it to 1 or "
                       "more to serve.")
        elif not ready:
            selector = ",".join(f"{key}={value}"
                                for key, value in builders.triton_labels(serving).items())
            stuck = _stuck_pod(self.api.core.list_namespaced_pod(
                namespace, label_selector=selector
            ).items, SERVER_STUCK_REASONS, late_only=True)
            if stuck:
                reason = Reason.PODS_NOT_STARTING
                message = f"{message} {stuck} Triton starts once the cause is fixed."
        new["conditions"] = status.set_condition(
            new["conditions"], C.READY, ready, reason, message, generation
        )
        return new

    # -- Kubernetes objects ----------------------------------------------------------------

    def _create_workload(self, resource: Resource, body: dict, plan, attempt: int) -> None:
        owner = _owner(body)
        namespace = resource.metadata.namespace
        self._create(namespace, builders.config_map(plan, owner, self.store, attempt))
        if builders.needs_headless_service(plan):
            self._create(namespace, builders.headless_service(plan, owner, attempt))
        self._create(namespace, builders.training_job(
            plan, owner, self.store, attempt=attempt, image=self.settings.trainer_image,
            resume=plan.distributed, queue_name=self.settings.queue_name,
            s3_secret=self.settings.s3_secret,
        ))

    def _create(self, namespace: str, obj: dict) -> None:
        kind = obj["kind"]
        create = {
            "ConfigMap": self.api.core.create_namespaced_config_map,
            "Service": self.api.core.create_namespaced_service,
            "Job": self.api.batch.create_namespaced_job,
        }[kind]
        try:
            create(namespace, obj)
        except ApiException as error:
            if error.status != 409:  # already exists: created by a concurrent reconcile
                raise

    def _apply(self, namespace: str, obj: dict) -> None:
        """Create or update an object with server-side apply, as the operator's field manager."""
        name = obj["metadata"]["name"]
        plural = {
            "Deployment": "deployments", "Service": "services",
            "HorizontalPodAutoscaler": "horizontalpodautoscalers", "PodMonitor": "podmonitors",
        }[obj["kind"]]
        apply = {
            "Deployment": self.api.apps.patch_namespaced_deployment,
            "Service": self.api.core.patch_namespaced_service,
            "HorizontalPodAutoscaler":
                self.api.autoscaling.patch_namespaced_horizontal_pod_autoscaler,
        }.get(obj["kind"])
        options = {
            "field_manager": FIELD_MANAGER, "force": True,
            "_content_type": "application/apply-patch+yaml",
        }
        if apply is not None:
            try:
                apply(name, namespace, obj, **options)
            except ApiException as error:
                if error.status != 422 or "Duplicate value" not in api_message(error):
                    raise
                self._replace_edited_lists(namespace, obj, apply, error)
                applied = apply(name, namespace, obj, **options)
                self._drop_repair_manager(namespace, obj, apply, applied)
            return
        group, _, version = obj["apiVersion"].rpartition("/")
        self.api.custom.patch_namespaced_custom_object(
            group, version, namespace, plural, name, obj, **options
        )

    def _hand_over_replicas(self, namespace: str, name: str) -> bool:
        """Keep a Deployment's live spec.replicas when the operator's next apply leaves them out.

        With server-side apply, an apply that leaves out a field that only its field manager
        owns resets the field to its default, so an autoscaled Triton Deployment would drop to
        1 replica before its HorizontalPodAutoscaler exists. As the Kubernetes documentation
        describes under "Server-Side Apply: transferring ownership", the live value is first
        applied under HANDOVER_FIELD_MANAGER. The apply without replicas then only drops the
        operator's share of the field, and the HPA's first scale takes the field over.

        Returns whether the Deployment exists.
        """
        try:
            live = self.api.apps.read_namespaced_deployment(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        if _applies_replicas(live.metadata.managed_fields) and self._apply_replicas(
            namespace, name, live.spec.replicas
        ):
            log.info("Handed spec.replicas (%d) of Deployment %s/%s over to field manager %s, "
                     "so that they stay until the HorizontalPodAutoscaler scales it.",
                     live.spec.replicas, namespace, name, HANDOVER_FIELD_MANAGER)
        return True

    def _start_at_min_replicas(self, namespace: str, name: str, replicas: int) -> None:
        """Scale a Triton Deployment just created without spec.replicas to the autoscaler's
        minimum, under HANDOVER_FIELD_MANAGER.

        At the default of 1, its first pod would start alone, and the others only once the
        HorizontalPodAutoscaler, created after it, raises it to minReplicas.
        """
        if self._apply_replicas(namespace, name, replicas):
            log.info("Started Deployment %s/%s at the autoscaler's minimum of %d replicas.",
                     namespace, name, replicas)

    def _apply_replicas(self, namespace: str, name: str, replicas: int) -> bool:
        """Apply spec.replicas alone under HANDOVER_FIELD_MANAGER; return False on a conflict.

        Without force: a conflict means that another client, such as the HPA, changed the
        replicas since the caller read or created the Deployment, and its value stays.
        """
        handover = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas},
        }
        try:
            self.api.apps.patch_namespaced_deployment(
                name, namespace, handover, field_manager=HANDOVER_FIELD_MANAGER,
                _content_type="application/apply-patch+yaml",
            )
        except ApiException as error:
            if error.status != 409:
                raise
            log.info("Left spec.replicas of Deployment %s/%s as they are, because another "
                     "client changed them: %s", namespace, name, api_message(error))
            return False
        return True

    def _replace_edited_lists(self, namespace: str, obj: dict, patch, error: ApiException) -> None:
        """Replace the lists of `obj`'s spec that a hand edit made impossible to apply.

        Server-side apply merges list items by key. A Service port edited from 8000 to 9000 is
        an item of another field manager, keyed by its port. The operator's port 8000 then
        joins it under the same name, which the API server rejects (HTTP 422) on every retry. A JSON
        merge patch replaces each list whole, after which the apply owns the items again.
        """
        name = obj["metadata"]["name"]
        log.warning("The API server rejected the apply of %s %s/%s (HTTP 422: %s), probably "
                    "because another client edited a list of its spec. Replacing the lists "
                    "of its spec with the operator's and applying it again.", obj["kind"],
                    namespace, name, api_message(error))
        patch(name, namespace, {"spec": obj["spec"]}, field_manager=REPAIR_FIELD_MANAGER,
              _content_type="application/merge-patch+json")

    def _drop_repair_manager(self, namespace: str, obj: dict, patch, applied) -> None:
        """Remove the repair's managedFields entry, so that the operator alone owns the fields
        it applies, and a field it stops applying later is removed as usual."""
        entries = [entry for entry in applied.metadata.managed_fields or []
                   if entry.manager != REPAIR_FIELD_MANAGER]
        managed = self._api_client.sanitize_for_serialization(entries)
        patch(obj["metadata"]["name"], namespace, {"metadata": {"managedFields": managed}},
              _content_type="application/merge-patch+json")

    def _read_job(self, namespace: str, name: str):
        """Return the Job from the watch cache, else from the API server; None if it is gone.

        NB: a cached Job can be older than the API server's, as in an informer cache. Each
        change of it arrives as a watch event, which updates the cache and reconciles again.
        """
        cached = self.jobs.get((namespace, name))
        if cached is not None and time.monotonic() - cached[0] < JOB_CACHE_SECONDS:
            return self._api_client.deserialize(json.dumps(cached[1]), "V1Job", "application/json")
        if cached is not None:
            self.jobs.pop((namespace, name), None)
        try:
            return self.api.batch.read_namespaced_job(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _delete_autoscaler(self, namespace: str, name: str) -> None:
        try:
            self.api.autoscaling.delete_namespaced_horizontal_pod_autoscaler(name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            return
        log.info("Deleted the HorizontalPodAutoscaler %s/%s, because autoscaling is off.",
                 namespace, name)

    def _delete_job(self, namespace: str, name: str) -> None:
        """Delete an attempt's Job, and its ConfigMap and headless Service, which share its name,
        so that the objects of earlier attempts and runs do not pile up until the owner goes."""
        deletions = (
            lambda: self.api.batch.delete_namespaced_job(
                name, namespace, propagation_policy="Background", grace_period_seconds=0
            ),
            lambda: self.api.core.delete_namespaced_config_map(name, namespace),
            lambda: self.api.core.delete_namespaced_service(name, namespace),
        )
        for delete in deletions:
            try:
                delete()
            except ApiException as error:
                if error.status != 404:
                    raise

    def _latest_job(self, resource: Resource, body: dict, run_generation: int,
                    run: int) -> tuple[int, int, str] | None:
        """Return the (run, attempt, name) of the latest Job the resource owns, if any.

        A Job of an earlier release, which has no run label, counts as run `run` when its
        generation is `run_generation`, and is left out otherwise.
        """
        selector = (f"{builders.LABEL_KIND}={resource.kind},"
                    f"{builders.LABEL_NAME}={resource.metadata.name}")  # fmt: skip
        jobs = self.api.batch.list_namespaced_job(
            resource.metadata.namespace, label_selector=selector
        ).items
        latest = None
        for job in jobs:
            if not _owned_by(job.metadata, body):
                continue
            job_labels = job.metadata.labels or {}
            try:
                if builders.LABEL_RUN in job_labels:
                    job_run = int(job_labels[builders.LABEL_RUN])
                elif int(job_labels[builders.LABEL_RUN_GENERATION]) == run_generation:
                    job_run = run
                else:
                    continue
                seen = (job_run, int(job_labels[builders.LABEL_ATTEMPT]), job.metadata.name)
            except (KeyError, ValueError):
                continue
            latest = seen if latest is None else max(latest, seen)
        return latest

    def _job_pods(self, namespace: str, job_name: str) -> list:
        pods = self.api.core.list_namespaced_pod(
            namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}"
        )
        return pods.items

    def _pods_not_starting(self, namespace: str, job) -> str:
        """Return why a Job's pods have not started, once they are late. Return "" while they
        are not late, or when neither the pods nor the Job's events give a reason.

        A found reason is reused for STUCK_RECHECK_SECONDS, so that many stuck Jobs do not
        each cost a pod list on every resync.
        """
        key = (namespace, job.metadata.name)
        job_status = job.status
        if not job_overdue(job_status.active, job_status.ready, job_status.succeeded,
                           job_status.failed, bool(job.spec.suspend), job_status.start_time):
            self.stuck.pop(key, None)
            return ""
        # A reason found for other pod counts is stale: pods that admission rejected may now
        # exist, and wait for a node instead.
        counts = (job_status.active, job_status.ready, job_status.succeeded, job_status.failed)
        cached = self.stuck.get(key)
        if cached and cached[2] == counts and time.monotonic() - cached[0] < STUCK_RECHECK_SECONDS:
            return cached[1]
        if not (job_status.active or job_status.succeeded or job_status.failed):
            # No pod exists: admission rejected them (a missing PriorityClass, a quota), and
            # only the Job controller's FailedCreate event records why.
            reason = self._failed_create(namespace, job.metadata.name)
        else:
            reason = _stuck_pod(self._job_pods(namespace, job.metadata.name))
        self.stuck[key] = (time.monotonic(), reason, counts)
        return reason

    def _failed_create(self, namespace: str, job_name: str) -> str:
        """Return the latest FailedCreate event of a Job as a sentence, or ""."""
        events = self.api.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind=Job,involvedObject.name={job_name}"
        ).items
        failed = [event for event in events if event.reason == "FailedCreate"]
        if not failed:
            return ""
        latest = max(failed, key=lambda event: event.last_timestamp or event.event_time
                     or event.metadata.creation_timestamp)  # fmt: skip
        detail = (latest.message or "").strip().rstrip(".")
        return f"The Job controller cannot create its pods: {detail}."

    def _failed_pod(self, namespace: str, job) -> tuple[int | None, str, str]:
        """Return the exit code, reason and message of the container that failed the attempt.

        A permanent error (EXIT_PERMANENT) on any node decides, because no retry can fix it.
        Next comes the pod that the Job's FailJob condition names, then a pod that failed on its
        own before the pods the Job controller terminated afterwards (those carry a
        deletionTimestamp and often exit non-zero on SIGTERM), then the earliest exit.
        Without a failed container, a pod that failed before any container ran, as when the
        kubelet rejects it (OutOfcpu, UnexpectedAdmissionError), gives its own reason and
        message, with no exit code.
        """
        job_conditions = (job.status.conditions if job.status else None) or []
        condition = next((c for c in job_conditions if c.type == "Failed"), None)
        cause = FAIL_JOB_MESSAGE.search(condition.message or "") if condition else None
        failed = []
        failed_pods = []
        for pod in self._job_pods(namespace, job.metadata.name):
            for container in pod.status.container_statuses or []:
                terminated = container.state.terminated if container.state else None
                if terminated and terminated.exit_code:
                    failed.append((pod, terminated))
            if pod.status.phase == "Failed":
                failed_pods.append(pod)
        if failed:
            named = cause["pod"] if cause else None
            return _describe_failure(*min(failed, key=lambda item: _failure_order(item, named)))
        if cause:
            # The pods are gone (pod garbage collection), but the condition still has the code.
            return (int(cause["exit_code"]), condition.reason or "PodFailurePolicy",
                    condition.message.strip())
        if failed_pods:
            return _describe_pod_failure(min(failed_pods, key=_pod_failure_order))
        return None, condition.reason if condition else "Failed", condition.message if condition else ""

    def _termination_result(self, namespace: str, job_name: str) -> dict:
        """Read the final metrics and digest that rank 0 wrote to its termination message."""
        for pod in self._job_pods(namespace, job_name):
            index = (pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index")
            if index not in (None, "0"):
                continue
            for container in pod.status.container_statuses or []:
                terminated = container.state.terminated if container.state else None
                if terminated and terminated.message:
                    try:
                        return json.loads(terminated.message)
                    except json.JSONDecodeError:
                        log.warning("Pod %s wrote a termination message that is not JSON; "
                                    "its metrics are not copied to status.", pod.metadata.name)
        return {}

    def _has_pod_monitor_crd(self) -> bool:
        """Return whether the Prometheus Operator's PodMonitor CRD is installed, read again
        after POD_MONITOR_CRD_CACHE_SECONDS."""
        cached = self._pod_monitor_crd
        if cached is not None and time.monotonic() - cached[0] < POD_MONITOR_CRD_CACHE_SECONDS:
            return cached[1]
        try:
            self.api.extensions.read_custom_resource_definition(
                "podmonitors.monitoring.coreos.com"
            )
            exists = True
        except ApiException as error:
            if error.status != 404:
                raise
            exists = False
        self._pod_monitor_crd = (time.monotonic(), exists)
        return exists

    def _apply_pod_monitor(self, namespace: str, obj: dict) -> None:
        """Apply a PodMonitor, or skip it when its CRD was removed since the last check."""
        try:
            self._apply(namespace, obj)
        except ApiException as error:
            if error.status != 404:
                raise
            log.info("Skipped the PodMonitor %s/%s: the PodMonitor CRD is no longer served.",
                     namespace, obj["metadata"]["name"])
            self._pod_monitor_crd = (time.monotonic(), False)

    # -- status helpers --------------------------------------------------------------------

    def _with_phase(self, new: dict, resource: Resource) -> dict:
        if isinstance(resource, ModelDeployment):
            new["conditions"] = _with_ready(new.get("conditions") or [],
                                            resource.metadata.generation)
        new["phase"] = status.derive_phase(new.get("conditions") or [], resource.summary_condition)
        return new

    def _failed(self, current, generation, reason, message, kind) -> dict:
        conditions = status.set_condition(
            _without_reconcile_failure(current), C.FAILED, True, reason, message, generation
        )
        if kind == "ModelDeployment":
            conditions = _with_ready(conditions, generation)
        return {**current, "observedGeneration": generation, "conditions": conditions,
                "phase": status.derive_phase(conditions)}


# The reasons of a ModelDeployment's Ready that _with_ready sets, before any Triton pod exists.
# An earlier version of this function set ExportFailed for every failure, so a status it wrote
# can still contain that reason, which is set again like the others.
READY_WITHOUT_TRITON_REASONS = frozenset({
    Reason.EXPORTING, Reason.INPUT_NOT_FOUND, Reason.INPUT_NOT_READY, Reason.INVALID_SPEC,
    Reason.JOB_FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, "ExportFailed",
})


def _with_ready(conditions: list[dict], generation: int | None) -> list[dict]:
    """Return a ModelDeployment's conditions with Ready set: as it is when the reconcile set it
    from the Triton pods, else False with why no Triton serves yet.

    The API conventions ask for a controller's conditions from its first visit, so that
    `kubectl wait --for=condition=Ready=False` and clients that read Ready see it at once, as
    with a KServe InferenceService.
    """
    ready = next((c for c in conditions if c["type"] == C.READY), None)
    failed = next((c for c in conditions if c["type"] == C.FAILED and c["status"] == "True"),
                  None)
    if failed is not None and (ready is None or ready["status"] != "True"):
        return status.set_condition(
            conditions, C.READY, False, failed["reason"],
            "No Triton serves this generation, because it failed; see the Failed condition.",
            generation,
        )
    # A Ready that this function set earlier describes the Failed and InputsReady conditions
    # of then, so it is set again from the current ones.
    if ready is not None and ready["reason"] not in READY_WITHOUT_TRITON_REASONS:
        return conditions
    inputs = next((c for c in conditions if c["type"] == C.INPUTS_READY), None)
    if inputs is not None and inputs["status"] == "False":
        return status.set_condition(
            conditions, C.READY, False, inputs["reason"],
            f"Triton starts after the export, which waits for its input: {inputs['message']}",
            generation,
        )
    return status.set_condition(
        conditions, C.READY, False, Reason.EXPORTING,
        "Triton starts once the export Job has written the model repository.", generation,
    )


def _without_reconcile_failure(current: dict) -> list[dict]:
    """Return the conditions of a status without the one that a failed first reconcile wrote
    (handlers._show_first_failure), so that it lasts only until a reconcile succeeds."""
    return [condition for condition in current.get("conditions") or []
            if condition.get("reason") != Reason.RECONCILE_FAILED]


def _inputs_disagree(resolved: dict[str, ResolvedInput], upstreams: dict[str, dict]) -> str:
    """Return why the inputs do not fit each other, or "" when they do.

    Two inputs fit when the one built from the other recorded the other's current digest. A
    PretrainJob reads a Corpus and a Tokenizer trained on that Corpus: after the Corpus runs
    again, the Tokenizer is rerun too, and until then it still describes the old Corpus.
    """
    current = {(item.kind, item.name): item.digest for item in resolved.values()}
    for role, item in resolved.items():
        body = upstreams[role]
        try:
            references = parse(body).references()
        except Exception:  # noqa: BLE001 - an input that no longer parses fits nothing to check
            continue
        recorded = (body.get("status") or {}).get("inputDigests") or {}
        for its_role, (kind, name) in references.items():
            digest = current.get((kind, name))
            if digest and recorded.get(its_role) not in (None, digest):
                return (f"Waiting for {item.kind} {item.name!r} ({role}) to run again on the "
                        f"current output of {kind} {name!r}: it was built from "
                        f"{recorded[its_role][:19]}, and {kind} {name!r} now contains "
                        f"{digest[:19]}.")
    return ""


# Kinds whose `podMetadata` labels only the pods of the next run. Their runs do not continue
# from checkpoints, so a label change would start the whole stage over. These kinds got the
# field after their run hashes were first recorded, so leaving it out also keeps those hashes.
_POD_METADATA_OUTSIDE_RUN = {"Corpus", "Tokenizer", "ModelDeployment"}


def _run_hash(resource: Resource) -> str:
    """Return the hash that identifies a run: the spec without `suspend` and, for a
    ModelDeployment, without the fields that shape only its Triton Deployment."""
    fields = {"suspend"}
    if resource.kind in _POD_METADATA_OUTSIDE_RUN:
        fields.add("pod_metadata")
    exclude = plans.base.spec_exclusions(resource, fields)
    return _spec_hash(_without_unset_additions(
        resource.spec.model_dump(mode="json", by_alias=True, exclude=exclude)
    ))


# Spec fields added after a release, by path in the dumped spec. Unset (None), they stay out of
# the run hash, so that the upgrade that adds them reruns no finished stage.
_ADDED_FIELDS: tuple[tuple[str, ...], ...] = (("export", "windowStride"),)


def _without_unset_additions(spec: dict) -> dict:
    for path in _ADDED_FIELDS:
        parent = spec
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and parent.get(path[-1], 0) is None:
            del parent[path[-1]]
    return spec


def _legacy_run_hash(resource: Resource) -> str:
    """Return the run hash of releases that hashed every ModelDeployment field but `suspend`,
    which had no `podMetadata` on a ModelDeployment or its `serving`."""
    exclude: dict[str, Any] = {"suspend": True}
    if resource.kind == "ModelDeployment":
        exclude.update({"pod_metadata": True, "serving": {"pod_metadata"}})
    return _spec_hash(_without_unset_additions(
        resource.spec.model_dump(mode="json", by_alias=True, exclude=exclude)
    ))


def _spec_hash(spec: dict) -> str:
    encoded = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def _owner(body: dict) -> dict:
    return {
        "apiVersion": body["apiVersion"], "kind": body["kind"],
        "metadata": {
            "name": body["metadata"]["name"],
            "namespace": body["metadata"].get("namespace", "default"),
            "uid": body["metadata"]["uid"],
        },
    }


def _stale(body: dict) -> dict:
    """Return the stored status unchanged, so that the caller writes nothing."""
    return copy.deepcopy(body.get("status") or {})


def _applies_replicas(managed_fields) -> bool:
    """Return whether the operator's server-side apply owns spec.replicas, given an object's
    metadata.managedFields."""
    for entry in managed_fields or []:
        if (entry.manager, entry.operation, entry.subresource or "") != (
            FIELD_MANAGER, "Apply", ""
        ):
            continue
        if "f:replicas" in ((entry.fields_v1 or {}).get("f:spec") or {}):
            return True
    return False


def _owned_by(metadata, body: dict) -> bool:
    uid = body["metadata"].get("uid")
    return any(ref.uid == uid for ref in metadata.owner_references or [])


def pods_late(active: int | None, ready: int | None, started: dt.datetime | str | None) -> bool:
    """Return True when a Job that started POD_START_GRACE_SECONDS ago or more has active pods
    that are not ready. `started` is the Job's status.startTime."""
    if not active or (ready or 0) >= active or not started:
        return False
    if isinstance(started, str):
        started = dt.datetime.fromisoformat(started.replace("Z", "+00:00"))
    return time.time() - started.timestamp() >= POD_START_GRACE_SECONDS


def api_message(error: ApiException) -> str:
    """Return the API server's own message from an error response, else the HTTP reason."""
    try:
        return json.loads(error.body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return str(error.reason or "no message")


def job_overdue(active: int | None, ready: int | None, succeeded: int | None,
                failed: int | None, suspended: bool, started: dt.datetime | str | None) -> bool:
    """Return True when a Job that started POD_START_GRACE_SECONDS ago or more has active pods
    that are not ready, or, unless suspended, has never had a pod, as when admission rejects
    them. The arguments are the Job's spec.suspend and status fields."""
    if pods_late(active, ready, started):
        return True
    never_created = not (active or succeeded or failed)
    return never_created and not suspended and pods_late(1, 0, started)


def _stuck_pod(pods: list, reasons: frozenset[str] = STUCK_WAITING_REASONS,
               late_only: bool = False) -> str:  # fmt: skip
    """Describe the first pod that the scheduler cannot place or whose container cannot start:
    a sentence that names the pod, the reason and the kubelet's or scheduler's message.

    With `late_only`, pods created less than POD_START_GRACE_SECONDS ago are left out.
    """
    for pod in sorted(pods, key=lambda item: item.metadata.name):
        name = pod.metadata.name
        created = pod.metadata.creation_timestamp
        if late_only and (created is None
                          or time.time() - created.timestamp() < POD_START_GRACE_SECONDS):
            continue
        for condition in pod.status.conditions or []:
            if (condition.type, condition.status, condition.reason) == (
                "PodScheduled", "False", "Unschedulable"
            ):
                detail = (condition.message or "").strip().rstrip(".")
                return f"Pod {name} cannot be scheduled: {detail}."
        statuses = [*(pod.status.init_container_statuses or []),
                    *(pod.status.container_statuses or [])]  # fmt: skip
        for container in statuses:
            waiting = container.state.waiting if container.state else None
            if waiting and waiting.reason in reasons:
                detail = (waiting.message or "").strip().rstrip(".")
                return (f"Container {container.name} of pod {name} cannot start: "
                        f"{waiting.reason}{': ' + detail if detail else ''}.")  # fmt: skip
    return ""


def _failure_order(item: tuple, named_pod: str | None) -> tuple:
    """Sort key of a failed (pod, terminated state) for _failed_pod: the first one decides."""
    pod, terminated = item
    finished = terminated.finished_at.timestamp() if terminated.finished_at else float("inf")
    return (terminated.exit_code != EXIT_PERMANENT, pod.metadata.name != named_pod,
            pod.metadata.deletion_timestamp is not None, finished, pod.metadata.name)


def _describe_failure(pod, terminated) -> tuple[int, str, str]:
    """Return the exit code, reason and a message naming the node for a failed container."""
    index = (pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index", "?")
    message = (terminated.message or "").strip()[-500:]
    reason = terminated.reason or "Error"
    where = f"Node {index} ({pod.metadata.name})"
    if reason == "OOMKilled" and not message:
        message = "the container ran out of memory; raise spec.resources.memory."
    elif not message:
        message = (f"the container exited with code {terminated.exit_code} "
                   "without writing an error message or any log output.")
    return terminated.exit_code, reason, f"{where}: {message}"


def _recorded_inputs(resource: Resource, current: dict) -> dict[str, ResolvedInput] | None:
    """Return the inputs that the recorded run read, or None when status does not name them all
    (a run started by an earlier release recorded no URIs)."""
    digests = current.get("inputDigests") or {}
    uris = current.get("inputUris") or {}
    recorded: dict[str, ResolvedInput] = {}
    for role, (kind, name) in resource.references().items():
        if role not in digests or role not in uris:
            return None
        recorded[role] = ResolvedInput(kind=kind, name=name, uri=uris[role], digest=digests[role])
    return recorded


def _run_in_progress(resource: Resource, current: dict) -> bool:
    """Tell whether status records a Job of a run that has neither succeeded nor failed."""
    conditions = current.get("conditions") or []
    return bool(current.get("jobName")) and not (
        status.condition_true(conditions, resource.summary_condition)
        or status.condition_true(conditions, C.FAILED))


def _pod_failure_order(pod) -> tuple:
    """Sort key of a failed pod without a failed container for _failed_pod: a pod that failed
    on its own before pods that the Job controller deleted afterwards, then by name."""
    return (pod.metadata.deletion_timestamp is not None, pod.metadata.name)


def _describe_pod_failure(pod) -> tuple[None, str, str]:
    """Return no exit code, the reason and a message naming the node for a pod that failed
    before any container ran."""
    index = (pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index", "?")
    reason = pod.status.reason or "Failed"
    message = (pod.status.message or "").strip()[-500:]
    if not message:
        message = ("the pod failed before any container ran, and the kubelet recorded no "
                   "message; see `kubectl describe pod` for its events.")
    return None, reason, f"Node {index} ({pod.metadata.name}): {message}"


def _stopped_while_suspended(job) -> bool:
    """Tell whether the Job failed, or is failing, because a suspension stopped its pods.

    The Job controller sets Suspended=True when it deletes the pods of a suspended Job, before
    they exit. When they exit non-zero, the pod failure policy sets FailureTarget=True, and
    Failed=True follows once the Job is resumed. Neither step clears Suspended, so the
    condition outlives the failure.
    """
    true = {condition.type for condition in job.status.conditions or []
            if condition.status == "True"}
    return "Suspended" in true and bool(true & {"FailureTarget", "Failed"})


def _resumed(conditions: list[dict], generation: int) -> list[dict]:
    """Return the conditions with Suspended turned False, if it was True."""
    if not status.condition_true(conditions, C.SUSPENDED):
        return conditions
    return status.set_condition(
        conditions, C.SUSPENDED, False, Reason.RESUMED,
        "Resumed; the stage continues from its latest checkpoint, if it wrote one.", generation,
    )


def _job_outcome(job) -> str | None:
    for condition in job.status.conditions or []:
        if condition.status == "True" and condition.type in ("Complete", "Failed"):
            return condition.type
    return None

