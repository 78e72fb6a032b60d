"""The handlers' retry backoff, the message of a rejected request, and the reason given for
pods that cannot start, without a cluster."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lathe.k8s import handlers, reconcile


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(1, 10.0), (2, 20.0), (3, 40.0), (5, 160.0), (6, 300.0), (50, 300.0)],
)
def test_retry_delay_doubles_up_to_the_cap(failures, seconds):
    assert handlers.retry_delay(failures) == seconds


def api_error(status: int, message: str | None) -> ApiException:
    error = ApiException(status=status, reason="Forbidden")
    error.body = json.dumps({"kind": "Status", "message": message}) if message else "not json"
    return error


def test_api_message_prefers_the_servers_text():
    text = 'jobs.batch "x" is forbidden: exceeded quota: no-jobs'
    assert handlers.api_message(api_error(403, text)) == text
    assert handlers.api_message(api_error(403, None)) == "Forbidden"


def pod(name: str, waiting: tuple[str, str] | None = None, init: bool = False,
        unschedulable: str | None = None, age: float = 600.0) -> client.V1Pod:
    """A pod as the API server returns it, with one container waiting for `waiting`."""
    state = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(
        reason=waiting[0], message=waiting[1])) if waiting else client.V1ContainerState()
    container = client.V1ContainerStatus(name="sync" if init else "trainer", image="x",
                                         image_id="", ready=False, restart_count=0, state=state)
    conditions = [client.V1PodCondition(type="PodScheduled", status="False",
                                        reason="Unschedulable", message=unschedulable)
                  ] if unschedulable else []  # fmt: skip
    created = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age)
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, creation_timestamp=created),
        status=client.V1PodStatus(
            conditions=conditions,
            init_container_statuses=[container] if init else None,
            container_statuses=None if init else [container],
        ),
    )


def test_stuck_pod_names_container_reason():
    pods = [pod("lm-0", ("ContainerCreating", "")),
            pod("lm-1", ("CreateContainerConfigError", 'secret "lathe-s3" not found'))]
    assert reconcile._stuck_pod(pods) == (
        'Container trainer of pod lm-1 cannot start: CreateContainerConfigError: secret '
        '"lathe-s3" not found.'
    )


def test_stuck_pod_init_and_scheduler():
    assert reconcile._stuck_pod([pod("triton-x", ("ImagePullBackOff", "Back-off pulling image"),
                                     init=True)]) == (  # fmt: skip
        "Container sync of pod triton-x cannot start: ImagePullBackOff: Back-off pulling image."
    )
    placed = reconcile._stuck_pod([pod("lm-0", unschedulable="0/4 nodes are available: 4 "
                                       "Insufficient nvidia.com/gpu.")])  # fmt: skip
    assert placed == "Pod lm-0 cannot be scheduled: 0/4 nodes are available: 4 Insufficient " \
                     "nvidia.com/gpu."


def test_starting_pods_not_stuck():
    assert reconcile._stuck_pod([pod("lm-0", ("ContainerCreating", "")), pod("lm-1")]) == ""


def test_pods_late_after_grace(monkeypatch):
    monkeypatch.setattr(reconcile, "POD_START_GRACE_SECONDS", 30.0)
    now = dt.datetime.now(dt.timezone.utc)
    old = (now - dt.timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert reconcile.pods_late(2, 1, old)
    assert reconcile.pods_late(1, None, now - dt.timedelta(seconds=31))
    assert not reconcile.pods_late(2, 1, now - dt.timedelta(seconds=5))
    assert not reconcile.pods_late(2, 2, old)
    assert not reconcile.pods_late(0, 0, old)
    assert not reconcile.pods_late(1, 0, None)


def test_server_crash_loop_reported_after_grace():
    looping = ("CrashLoopBackOff", "back-off 40s restarting failed container=sync-models")
    reasons = reconcile.SERVER_STUCK_REASONS
    assert reconcile._stuck_pod([pod("triton-a", looping, init=True)], reasons,
                                late_only=True).startswith(
        "Container sync of pod triton-a cannot start: CrashLoopBackOff")  # fmt: skip
    # A pod younger than the grace is still starting, and Jobs do not count crash loops.
    assert reconcile._stuck_pod([pod("triton-b", looping, init=True, age=5)], reasons,
                                late_only=True) == ""  # fmt: skip
    assert reconcile._stuck_pod([pod("lm-0", looping)]) == ""


def test_status_patch_deletes_dropped_keys():
    """The status write is a JSON merge patch, so a key the desired status drops must be sent
    as null: a role the spec no longer references, or the artifact of a finished run."""
    current = {"artifact": {"uri": "s3://b/x", "digest": "sha256:a"},
               "inputDigests": {"baseModel": "sha256:p", "corpus": "sha256:c"},
               "phase": "Succeeded", "kopf": {"progress": {}}}
    desired = {"inputDigests": {"corpus": "sha256:c2"}, "phase": "Running",
               "kopf": {"progress": {}}}
    assert handlers._changes(current, desired) == {
        "artifact": None,
        "inputDigests": {"baseModel": None, "corpus": "sha256:c2"},
        "phase": "Running",
    }
    assert handlers._changes(current, current) == {}


def running_status(reason: str, message: str) -> dict:
    """A status whose only condition is Running=True with `reason` and `message`."""
    return {"conditions": [{"type": "Running", "status": "True", "reason": reason,
                            "message": message}]}


@pytest.mark.parametrize(
    ("reason", "before", "after", "posted"),
    [
        ("AttemptRestarted",
         "Attempt 0 failed with exit code 1 (Error); started attempt 1, resuming from the "
         "latest checkpoint.",
         "Attempt 1 failed with exit code 1 (Error); started attempt 2, resuming from the "
         "latest checkpoint.", [("Warning", "AttemptRestarted")]),
        ("PodsNotStarting",
         "Job lm-r1-0: Pod lm-r1-0-0 cannot be scheduled: 0/3 nodes are available.",
         "Job lm-r1-0: Container trainer of pod lm-r1-0-0 cannot start: ErrImagePull.",
         [("Warning", "PodsNotStarting")]),
        ("JobCreated", "Created Job lm-r1-0 (attempt 0).",
         "The pods of Job lm-r1-0 were stopped while it was suspended, so created Job lm-r1-1 "
         "(attempt 1).", [("Normal", "JobCreated")]),
        ("JobRunning", "Job lm-r1-0 has 1 active pod.", "Job lm-r1-0 has 2 active pods.", []),
        ("AttemptRestarted", "Attempt 0 failed.", "Attempt 0 failed.", []),
    ],
    ids=["next-failed-attempt", "new-stuck-cause", "next-job", "active-count", "same-message"],
)
def test_announce_new_message_events(monkeypatch, reason, before, after, posted):
    """A condition that keeps its status and reason posts an Event when its message reports a
    new failed attempt, Job or stuck cause, and none when it only refreshes a count."""
    events = []
    monkeypatch.setattr(handlers.kopf, "warn",
                        lambda body, reason, message: events.append(("Warning", reason)))
    monkeypatch.setattr(handlers.kopf, "info",
                        lambda body, reason, message: events.append(("Normal", reason)))
    body = {"kind": "PretrainJob", "metadata": {"uid": "u-1", "name": "lm", "namespace": "a"}}

    handlers._announce(body, running_status(reason, before), running_status(reason, after),
                       logging.getLogger("test"))

    assert events == posted


def test_internal_error_reported_and_backed_off(monkeypatch):
    """A reconcile that fails with a bug, not an API error, is counted in the metric, posted as
    a Warning Event and retried with backoff, as an API error is."""
    from lathe.k8s import metrics

    class Broken:
        def reconcile(self, body):
            raise AttributeError("module 'lathe.k8s.builders' has no attribute 'x'")

    posted = []
    monkeypatch.setattr(handlers, "reconciler", lambda: Broken())
    monkeypatch.setattr(handlers.kopf, "warn",
                        lambda body, reason, message: posted.append((reason, message)))
    monkeypatch.setattr(handlers, "_FAILURES", {})
    body = {"kind": "ModelDeployment",
            "metadata": {"uid": "u-1", "name": "ner", "namespace": "team-a"}}
    errors = metrics.RECONCILES.labels("ModelDeployment", "error")
    before = errors._value.get()

    assert handlers._reconcile(body, logging.getLogger("test")) is None
    assert errors._value.get() == before + 1
    assert handlers._FAILURES["u-1"][0] == 1
    assert [reason for reason, _ in posted] == ["ReconcileFailed"]
    assert "internal error of the operator (AttributeError: module" in posted[0][1]
    assert "Retrying in 10 s" in posted[0][1]


@pytest.mark.parametrize(
    ("reason", "message", "expected"),
    [
        ("OOMKilled", "", "Node 1 (lm-0-x): the container ran out of memory; raise "
         "spec.resources.memory."),
        ("Error", "", "Node 1 (lm-0-x): the container exited with code 137 without writing an "
         "error message or any log output."),
        ("Error", "NCCL timeout\n", "Node 1 (lm-0-x): NCCL timeout"),
    ],
)
def test_failed_pod_message_never_dangles(reason, message, expected):
    """A failed container without a termination message still gets a sentence after the
    colon, with the fix for an out-of-memory kill."""
    terminated = client.V1ContainerStateTerminated(exit_code=137, reason=reason,
                                                   message=message)
    failed = client.V1Pod(
        metadata=client.V1ObjectMeta(name="lm-0-x", annotations={
            "batch.kubernetes.io/job-completion-index": "1"}),
        status=client.V1PodStatus(container_statuses=[client.V1ContainerStatus(
            name="stage", image="i", image_id="", ready=False, restart_count=0,
            state=client.V1ContainerState(terminated=terminated))]),
    )
    reconciler = reconcile.Reconciler.__new__(reconcile.Reconciler)
    reconciler._job_pods = lambda namespace, job_name: [failed]
    job = client.V1Job(metadata=client.V1ObjectMeta(name="lm-pretrain-r1-0"))
    assert reconciler._failed_pod("team-a", job) == (137, reason, expected)


def failed_node(index: int, exit_code: int, message: str, finished_minute: int,
                terminating: bool = False) -> client.V1Pod:
    """A pod of node `index` of Job lm-pretrain-r1-0 whose trainer container exited."""
    now = dt.datetime(2026, 1, 1, 12, finished_minute, tzinfo=dt.timezone.utc)
    terminated = client.V1ContainerStateTerminated(
        exit_code=exit_code, reason="Error", message=message, finished_at=now)
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=f"lm-pretrain-r1-0-{index}-x", deletion_timestamp=now if terminating else None,
            annotations={"batch.kubernetes.io/job-completion-index": str(index)}),
        status=client.V1PodStatus(container_statuses=[client.V1ContainerStatus(
            name="trainer", image="i", image_id="", ready=False, restart_count=0,
            state=client.V1ContainerState(terminated=terminated))]),
    )


def failed_job(message: str | None) -> client.V1Job:
    conditions = [client.V1JobCondition(type="Failed", status="True", reason="PodFailurePolicy",
                                        message=message)] if message else None
    return client.V1Job(metadata=client.V1ObjectMeta(name="lm-pretrain-r1-0"),
                        status=client.V1JobStatus(conditions=conditions))


# Node 1 exits 42 (a permanent error). The Job controller then terminates node 0, whose
# launcher exits 1 on SIGTERM; its pod sorts first in the API server's list.
TERMINATED_NODE_0 = failed_node(0, 1, "SignalException: Process got signal: 15", 2,
                                terminating=True)
FAILED_NODE_1 = failed_node(1, 42, "ValueError: no documents", 1)
FAIL_JOB = ("Container trainer for pod team-a/lm-pretrain-r1-0-1-x failed with exit code 42 "
            "matching FailJob rule at index 1")


@pytest.mark.parametrize(
    ("pods", "message", "expected"),
    [
        ([TERMINATED_NODE_0, FAILED_NODE_1], FAIL_JOB,
         (42, "Error", "Node 1 (lm-pretrain-r1-0-1-x): ValueError: no documents")),
        ([TERMINATED_NODE_0, FAILED_NODE_1], None,
         (42, "Error", "Node 1 (lm-pretrain-r1-0-1-x): ValueError: no documents")),
        ([], FAIL_JOB, (42, "PodFailurePolicy", FAIL_JOB)),
        # Both nodes failed on their own in the same second, and the Job controller happened
        # to name node 0: the permanent error still decides.
        ([failed_node(0, 1, "NCCL error", 1), FAILED_NODE_1],
         FAIL_JOB.replace("0-1-x failed with exit code 42", "0-0-x failed with exit code 1")
         .replace("index 1", "index 2"),
         (42, "Error", "Node 1 (lm-pretrain-r1-0-1-x): ValueError: no documents")),
        ([failed_node(0, 1, "NCCL error", 1), failed_node(1, 137, "", 2)], None,
         (1, "Error", "Node 0 (lm-pretrain-r1-0-0-x): NCCL error")),
        ([failed_node(0, 1, "NCCL error", 1), failed_node(1, 137, "", 2)],
         FAIL_JOB.replace("exit code 42", "exit code 137").replace("index 1", "index 2"),
         (137, "Error", "Node 1 (lm-pretrain-r1-0-1-x): the container exited with code 137 "
          "without writing an error message or any log output.")),
    ],
    ids=["named-by-job", "not-terminating-first", "failed-pod-gone", "permanent-decides",
         "earliest-exit", "named-before-earlier"],
)
def test_failed_pod_picks_attempt_cause(pods, message, expected):
    """The attempt's failure is a permanent error on any node, else the pod that failed
    first, not a pod that the Job controller terminated afterwards."""
    reconciler = reconcile.Reconciler.__new__(reconcile.Reconciler)
    reconciler._job_pods = lambda namespace, job_name: pods
    assert reconciler._failed_pod("team-a", failed_job(message)) == expected


# A pod that the kubelet rejected at admission: phase Failed, and no container ever ran.
REJECTED_MESSAGE = ("Pod was rejected: Node didn't have enough resource: cpu, requested: 4000, "
                    "used: 7000, capacity: 8000")
REJECTED_NODE_0 = client.V1Pod(
    metadata=client.V1ObjectMeta(name="lm-pretrain-r1-0-0-x", annotations={
        "batch.kubernetes.io/job-completion-index": "0"}),
    status=client.V1PodStatus(phase="Failed", reason="OutOfcpu", message=REJECTED_MESSAGE),
)
BACKOFF_JOB = client.V1Job(
    metadata=client.V1ObjectMeta(name="lm-pretrain-r1-0"),
    status=client.V1JobStatus(conditions=[client.V1JobCondition(
        type="Failed", status="True", reason="BackoffLimitExceeded",
        message="Job has reached the specified backoff limit")]),
)


def test_failed_pod_without_containers():
    """A pod that failed before any container ran gives the pod's own reason and message."""
    reconciler = reconcile.Reconciler.__new__(reconcile.Reconciler)
    reconciler._job_pods = lambda namespace, job_name: [REJECTED_NODE_0]

    assert reconciler._failed_pod("team-a", BACKOFF_JOB) == (
        None, "OutOfcpu", f"Node 0 (lm-pretrain-r1-0-0-x): {REJECTED_MESSAGE}")


@pytest.mark.parametrize(("max_restarts", "condition_type", "expected"), [
    (1, "Running", "Attempt 0 failed without an exit code (OutOfcpu); started attempt 1, "
     "resuming from the latest checkpoint."),
    (0, "Failed", "Gave up after 1 failed attempts: no exit code (OutOfcpu). Node 0 "
     f"(lm-pretrain-r1-0-0-x): {REJECTED_MESSAGE}"),
], ids=["restarted", "gave-up"])
def test_attempt_without_exit_code(monkeypatch, max_restarts, condition_type, expected):
    """An attempt whose pod never ran records the pod's reason, and no message of it
    contains "exit code None"."""
    from types import SimpleNamespace

    reconciler = reconcile.Reconciler.__new__(reconcile.Reconciler)
    reconciler._job_pods = lambda namespace, job_name: [REJECTED_NODE_0]
    reconciler._create_workload = lambda *args: None
    reconciler._delete_job = lambda *args: None
    monkeypatch.setattr(reconcile.builders, "job_name",
                        lambda plan, attempt: f"lm-pretrain-r1-{attempt}")
    resource = SimpleNamespace(metadata=SimpleNamespace(generation=1, namespace="team-a"))
    plan = SimpleNamespace(max_restarts=max_restarts)

    new = reconciler._attempt_failed(resource, {}, plan, BACKOFF_JOB, {}, [], 0)

    assert new["failedAttempts"] == [{
        "attempt": 0, "exitCode": None, "reason": "OutOfcpu",
        "message": f"Node 0 (lm-pretrain-r1-0-0-x): {REJECTED_MESSAGE}"}]
    condition = next(c for c in new["conditions"] if c["type"] == condition_type)
    assert condition["message"] == expected


def test_unbuildable_spec_fails_as_invalid(monkeypatch):
    """A spec that builds no valid workload (a stage config over the ConfigMap limit) fails
    the generation with InvalidSpec instead of being retried as an operator error."""
    from lathe.errors import InvalidResourceError

    def too_large(*_args, **_kwargs):
        raise InvalidResourceError("Corpus team-a/c", "spec", "the stage config is 2000000 "
                                   "bytes, over the 1000000-byte ConfigMap limit; shorten it.")

    reconciler = reconcile.Reconciler.__new__(reconcile.Reconciler)
    monkeypatch.setattr(reconciler, "_resolve_inputs", lambda resource: ({}, None), raising=False)
    monkeypatch.setattr(reconciler, "_reconcile_bounded", too_large, raising=False)
    body = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus",
            "metadata": {"name": "c", "namespace": "team-a", "generation": 3, "uid": "u"},
            "spec": {"sources": [{"name": "a", "format": "text", "path": "a.txt"}]}}
    desired = reconciler.reconcile(body)
    failed = next(c for c in desired["conditions"] if c["type"] == "Failed")
    assert desired["phase"] == "Failed"
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("spec: the stage config is 2000000 bytes")
    assert failed["observedGeneration"] == 3


def test_invalid_spec_drops_reconcile_failed_condition():
    """The condition that a failed first reconcile wrote goes when a later reconcile fails the
    spec, so the status does not keep both."""
    body = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus",
            "metadata": {"name": "c", "namespace": "team-a", "generation": 2, "uid": "u"},
            "spec": {"sources": [{"name": "a", "format": "text", "path": "a.txt"}],
                     "minWords": "many"},
            "status": {"phase": "Pending", "observedGeneration": 1, "conditions": [
                {"type": "Succeeded", "status": "Unknown", "reason": "ReconcileFailed",
                 "message": "Reconciling failed: the API server answered HTTP 403 (exceeded "
                            "quota).", "lastTransitionTime": "2026-12-05T00:00:00Z",
                 "observedGeneration": 1}]}}
    reconciler = reconcile.Reconciler.__new__(reconcile.Reconciler)
    desired = reconciler.reconcile(body)
    assert [(c["type"], c["reason"]) for c in desired["conditions"]] == [("Failed", "InvalidSpec")]
    assert desired["phase"] == "Failed"


def test_resource_logger_names_kind_and_resource(caplog):
    """A FineTune and a ModelDeployment may share a name, so the prefix carries the kind."""
    with caplog.at_level(logging.INFO, logger="kopf.objects"):
        handlers.resource_logger("FineTune", "team-a", "ner").info("Created Job ner-r1-0.")
    assert [record.getMessage() for record in caplog.records] == [
        "[FineTune team-a/ner] Created Job ner-r1-0."]


class CustomResourceDefinitions:
    """The apiextensions client's CRD read, raising a 404 ApiException until `installed` is set."""

    def __init__(self) -> None:
        self.installed = False

    def read_custom_resource_definition(self, name: str) -> dict:
        if not self.installed:
            raise ApiException(status=404, reason="Not Found")
        return {"metadata": {"name": name}}


def test_pod_monitor_crd_rechecked(monkeypatch):
    """A Prometheus Operator installed or removed after the operator started is noticed
    without a restart, and a PodMonitor whose CRD is gone fails no reconcile."""
    crds = CustomResourceDefinitions()
    reconciler = reconcile.Reconciler.__new__(reconcile.Reconciler)
    reconciler.api = reconcile.Clients.__new__(reconcile.Clients)
    reconciler.api.extensions = crds
    reconciler._pod_monitor_crd = None
    clock = [1000.0]
    monkeypatch.setattr(reconcile.time, "monotonic", lambda: clock[0])

    assert reconciler._has_pod_monitor_crd() is False
    crds.installed = True
    assert reconciler._has_pod_monitor_crd() is False  # still cached
    clock[0] += reconcile.POD_MONITOR_CRD_CACHE_SECONDS
    assert reconciler._has_pod_monitor_crd() is True

    def removed(namespace: str, obj: dict) -> None:
        raise ApiException(status=404, reason="Not Found")

    reconciler._apply = removed
    crds.installed = False
    reconciler._apply_pod_monitor("team-a", {"metadata": {"name": "ner-triton"}})
    assert reconciler._has_pod_monitor_crd() is False


@pytest.mark.parametrize(
    ("current", "desired", "ended"),
    [
        ({"phase": "Running", "progress": {"step": 5}},
         {"phase": "Running", "progress": {"step": 6}}, False),
        ({"phase": "Running", "progress": {"step": 5}},
         {"phase": "Succeeded", "progress": {"step": 100}}, True),
        ({"phase": "Running", "progress": {"step": 5}},
         {"phase": "Failed", "progress": {"step": 5}}, True),
        ({"phase": "Succeeded", "progress": {"step": 100}},
         {"phase": "Running"}, True),
        ({"phase": "Succeeded", "progress": {"step": 100}},
         {"phase": "Succeeded", "progress": {"step": 100}}, False),
        ({"phase": "Waiting"}, {"phase": "Running"}, False),
        ({"phase": "Running", "progress": {"step": 5}},
         {"phase": "Suspended", "progress": {"step": 5}}, True),
        ({"phase": "Suspended", "progress": {"step": 5}},
         {"phase": "Suspended", "progress": {"step": 5}}, False),
        ({"phase": "Suspended", "progress": {"step": 5}},
         {"phase": "Running", "progress": {"step": 5}}, False),
    ],
)
def test_training_gauges_end_with_run(current, desired, ended):
    assert handlers.training_ended(current, desired) is ended


def series(metric_name: str, name: str) -> list:
    """The samples of an operator metric whose `name` label is `name`."""
    from lathe.k8s import metrics

    return [sample for metric in metrics.REGISTRY.collect() if metric.name == metric_name
            for sample in metric.samples if sample.labels.get("name") == name]


def stored_resource(name: str, uid: str) -> dict:
    """A PretrainJob as read from the API server, Running with progress."""
    return {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": uid, "generation": 1,
                     "resourceVersion": "5"},
        "status": {"phase": "Running", "progress": {"step": 5}, "conditions": []},
    }


@pytest.mark.parametrize("status_write", ["not-found", "no-change"])
def test_deletion_during_reconcile_drops_phase(monkeypatch, status_write):
    """A resource whose DELETED event was handled while its reconcile ran gets no phase series
    back, whether the status write then fails with 404 or there is nothing to write."""
    from types import SimpleNamespace

    name = f"deleted-{status_write}"
    body = stored_resource(name, f"u-{status_write}")
    desired = {**body["status"], "phase": "Succeeded" if status_write == "not-found" else
               "Running"}
    logger = logging.getLogger("test")

    def reconcile_while_deleted(parent):
        # The DELETED event arrives while the reconcile runs, as on_resource_event handles it.
        handlers._INDEX.pop(handlers._key(parent), None)
        handlers.forget_resource(parent, logger)
        return desired

    def patch_status(*args):
        raise ApiException(status=404, reason="Not Found")

    handlers._remember(body)
    monkeypatch.setattr(handlers, "reconciler",
                        lambda: SimpleNamespace(reconcile=reconcile_while_deleted))
    monkeypatch.setattr(handlers, "_announce", lambda *args: None)
    api = SimpleNamespace(patch_namespaced_custom_object_status=patch_status)

    assert handlers._reconcile_stored(api, body, logger) is True

    assert series("lathe_resource_phase", name) == []
    assert handlers._key(body) not in handlers._INDEX


def test_status_write_404_drops_series(monkeypatch):
    """A status write that fails with 404 drops the series of the deleted resource, also when
    its DELETED event was missed."""
    from types import SimpleNamespace

    from lathe.k8s import metrics

    body = stored_resource("missed-delete", "u-missed")
    metrics.PHASES.set("PretrainJob", "team-a", "missed-delete", "Running")
    metrics.set_progress("team-a", "PretrainJob", "missed-delete", {"step": 5, "etaSeconds": 9})
    handlers._remember(body)
    desired = {**body["status"], "phase": "Succeeded"}

    def patch_status(*args):
        raise ApiException(status=404, reason="Not Found")

    monkeypatch.setattr(handlers, "reconciler", lambda: SimpleNamespace(reconcile=lambda b: desired))
    api = SimpleNamespace(patch_namespaced_custom_object_status=patch_status)

    assert handlers._reconcile_stored(api, body, logging.getLogger("test")) is True

    assert series("lathe_resource_phase", "missed-delete") == []
    assert series("lathe_training_step", "missed-delete") == []
    assert handlers._key(body) not in handlers._INDEX


def test_missing_resource_drops_series(monkeypatch):
    """A reconcile that finds the resource gone (its DELETED event missed across a watch
    restart) drops its phase and training series, its index entry and its backoff."""
    from types import SimpleNamespace

    from lathe.k8s import metrics

    body = stored_resource("gone", "u-gone")
    metrics.PHASES.set("PretrainJob", "team-a", "gone", "Running")
    metrics.set_progress("team-a", "PretrainJob", "gone", {"step": 5, "etaSeconds": 9})
    handlers._remember(body)
    monkeypatch.setitem(handlers._FAILURES, "u-gone", (1, "", 0.0, ""))
    def read(*args):
        raise ApiException(status=404, reason="Not Found")

    custom = SimpleNamespace(get_namespaced_custom_object=read)
    monkeypatch.setattr(handlers, "reconciler",
                        lambda: SimpleNamespace(api=SimpleNamespace(custom=custom)))

    done = handlers._reconcile_latest("team-a", "pretrainjobs", "gone", logging.getLogger("t"))

    assert done is True
    assert series("lathe_resource_phase", "gone") == []
    assert series("lathe_training_step", "gone") == []
    assert series("lathe_training_eta_seconds", "gone") == []
    assert handlers._key(body) not in handlers._INDEX
    assert "u-gone" not in handlers._FAILURES


def test_unchanged_progress_not_patched(tmp_path, monkeypatch):
    """A pass whose progress record matches status writes nothing, also when status keeps a
    field that the latest record leaves out, such as an earlier step's message."""
    import json
    from types import SimpleNamespace

    from lathe.k8s.settings import OperatorSettings

    (tmp_path / "progress.jsonl").write_text(
        json.dumps({"completed": 5, "total": 100, "message": "Skipped step 5.", "time": 100})
        + "\n" + json.dumps({"completed": 6, "total": 100, "loss": 1.9, "time": 110}) + "\n")
    stored = {"step": 5, "totalSteps": 100, "message": "Skipped step 5."}
    patches = []

    def patch(group, version, namespace, plural, name, body):
        patches.append(body)
        stored.update(body["status"]["progress"])  # a merge patch
        return {"kind": "PretrainJob",
                "metadata": {"name": name, "namespace": namespace, "uid": "u", "generation": 1,
                             "resourceVersion": str(len(patches))},
                "status": {"phase": "Running", "runGeneration": 1,
                           "outputUri": f"file://{tmp_path}", "progress": dict(stored)}}

    api = SimpleNamespace(custom=SimpleNamespace(patch_namespaced_custom_object_status=patch))
    monkeypatch.setattr(handlers, "reconciler", lambda: SimpleNamespace(api=api))
    monkeypatch.setattr(handlers, "_WRITTEN", {})
    monkeypatch.setitem(handlers.STATE, "settings", OperatorSettings.from_env(
        {"LATHE_ARTIFACT_ROOT": f"file://{tmp_path}"}))
    key = ("team-a", "pretrainjobs", "lm")
    monkeypatch.setitem(handlers._INDEX, key, {
        "kind": "PretrainJob", "uid": "u", "generation": 1, "phase": "Running",
        "running": True, "progress": dict(stored), "storage": None,
        "output": f"file://{tmp_path}", "job": "lm-pretrain-r1-0"})

    for _ in range(3):
        handlers.refresh_progress(key, handlers._INDEX[key])

    assert len(patches) == 1
    assert stored["step"] == 6


def test_progress_of_ended_run_not_written(tmp_path, monkeypatch):
    """A record read while the run ended sets no gauge and writes no status."""
    import json
    from types import SimpleNamespace

    from lathe.k8s import metrics
    from lathe.k8s.settings import OperatorSettings

    (tmp_path / "progress.jsonl").write_text(json.dumps({"completed": 6, "total": 100}) + "\n")
    patches = []
    api = SimpleNamespace(custom=SimpleNamespace(
        patch_namespaced_custom_object_status=lambda *args: patches.append(args)))
    monkeypatch.setattr(handlers, "reconciler", lambda: SimpleNamespace(api=api))
    monkeypatch.setitem(handlers.STATE, "settings", OperatorSettings.from_env(
        {"LATHE_ARTIFACT_ROOT": f"file://{tmp_path}"}))
    key = ("team-a", "pretrainjobs", "ended")
    entry = {"kind": "PretrainJob", "uid": "u", "generation": 1, "phase": "Running",
             "running": True, "progress": None, "storage": None,
             "output": f"file://{tmp_path}", "job": "ended-pretrain-r1-0"}
    # The pass took its snapshot while Running; the run has succeeded since.
    monkeypatch.setitem(handlers._INDEX, key, {**entry, "phase": "Succeeded"})
    handlers.refresh_progress(key, entry)
    assert patches == []
    step = metrics.REGISTRY.get_sample_value(
        "lathe_training_step", {"namespace": "team-a", "kind": "PretrainJob", "name": "ended"})
    assert step is None


def test_progress_write_404_drops_gauges(tmp_path, monkeypatch):
    """A progress write that finds the resource deleted drops the gauges it has just set."""
    import json
    from types import SimpleNamespace

    from lathe.k8s.settings import OperatorSettings

    (tmp_path / "progress.jsonl").write_text(
        json.dumps({"completed": 6, "total": 100, "etaSeconds": 40}) + "\n")

    def patch_status(*args):
        raise ApiException(status=404, reason="Not Found")

    api = SimpleNamespace(custom=SimpleNamespace(
        patch_namespaced_custom_object_status=patch_status))
    monkeypatch.setattr(handlers, "reconciler", lambda: SimpleNamespace(api=api))
    monkeypatch.setitem(handlers.STATE, "settings", OperatorSettings.from_env(
        {"LATHE_ARTIFACT_ROOT": f"file://{tmp_path}"}))
    key = ("team-a", "pretrainjobs", "deleted-mid-pass")
    entry = {"kind": "PretrainJob", "uid": "u-mid", "generation": 1, "phase": "Running",
             "running": True, "progress": None, "storage": None,
             "output": f"file://{tmp_path}", "job": "deleted-mid-pass-pretrain-r1-0"}
    monkeypatch.setitem(handlers._INDEX, key, entry)

    handlers.refresh_progress(key, entry)

    assert series("lathe_training_step", "deleted-mid-pass") == []
    assert series("lathe_training_eta_seconds", "deleted-mid-pass") == []
    assert key not in handlers._INDEX


def test_refused_connection_is_expected():
    import urllib.error

    assert handlers._connection_refused(urllib.error.URLError(ConnectionRefusedError(111, "refused")))
    assert not handlers._connection_refused(urllib.error.URLError(TimeoutError("timed out")))
    assert not handlers._connection_refused(TimeoutError("timed out"))


def test_invalid_settings_stop_startup(monkeypatch):
    """An invalid setting fails every startup step permanently, so that kopf stops the operator
    instead of retrying a step that no retry can fix."""
    import asyncio

    import kopf

    monkeypatch.setattr(handlers, "STATE", {})
    monkeypatch.setenv("LATHE_ARTIFACT_ROOT", "ftp://host/artifacts")
    logger = logging.getLogger(__name__)
    with pytest.raises(kopf.PermanentError, match="LATHE_ARTIFACT_ROOT"):
        handlers.configure(settings=kopf.OperatorSettings(), logger=logger)
    with pytest.raises(kopf.PermanentError, match="settings are invalid"):
        asyncio.run(handlers.wait_for_leadership(logger=logger))


def test_triton_ready_count_posts_no_event(monkeypatch):
    """A ModelDeployment's Ready=False PodsNotStarting message counts ready replicas, so a new
    count with the same stuck pod posts no Event."""
    events = []
    monkeypatch.setattr(handlers.kopf, "warn",
                        lambda body, reason, message: events.append(("Warning", reason)))
    body = {"kind": "ModelDeployment",
            "metadata": {"uid": "u-2", "name": "ner", "namespace": "a"}}

    def ready(message: str) -> dict:
        return {"conditions": [{"type": "Ready", "status": "False", "reason": "PodsNotStarting",
                                "message": message}]}

    handlers._announce(body, ready("1 of 3 replicas are ready; pod ner-2 cannot be scheduled."),
                       ready("2 of 3 replicas are ready; pod ner-2 cannot be scheduled."),
                       logging.getLogger("test"))

    assert events == []
