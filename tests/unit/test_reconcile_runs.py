"""What a new run of a resource resets in its status, with the API server replaced by fakes."""

from __future__ import annotations

from types import SimpleNamespace

from kubernetes.client.exceptions import ApiException

from lathe.k8s.reconcile import Clients, Reconciler
from lathe.k8s.settings import OperatorSettings

UPSTREAM_STATUS = {
    "observedGeneration": 1,
    "conditions": [{"type": "Succeeded", "status": "True", "reason": "JobSucceeded"}],
    "artifact": {"uri": "file:///artifacts/x", "digest": "sha256:1"},
}


def not_found(*args, **kwargs):
    raise ApiException(status=404, reason="Not Found")


def fake_clients(created: list[str]) -> Clients:
    """Clients whose inputs have succeeded and whose earlier Jobs are all gone."""
    def upstream(group, version, namespace, plural, name):
        return {"metadata": {"name": name, "generation": 1}, "status": UPSTREAM_STATUS}

    def create(namespace, obj):
        created.append(f"{obj['kind']} {obj['metadata']['name']}")

    clients = Clients.__new__(Clients)
    clients.custom = SimpleNamespace(get_namespaced_custom_object=upstream)
    clients.batch = SimpleNamespace(
        read_namespaced_job=not_found, delete_namespaced_job=not_found,
        list_namespaced_job=lambda namespace, label_selector: SimpleNamespace(items=[]),
        create_namespaced_job=create,
    )
    clients.core = SimpleNamespace(
        delete_namespaced_config_map=not_found, delete_namespaced_service=not_found,
        create_namespaced_config_map=create, create_namespaced_service=create,
    )
    return clients


def test_new_run_clears_progress():
    """A spec change that starts a new run drops the previous run's progress from status."""
    settings = OperatorSettings.from_env({"LATHE_ARTIFACT_ROOT": "file:///artifacts"})
    created: list[str] = []
    reconciler = Reconciler(settings, fake_clients(created))
    body = {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": "lm", "namespace": "team-a", "uid": "u-1", "generation": 2},
        "spec": {"corpusRef": {"name": "c"}, "tokenizerRef": {"name": "t"},
                 "sequenceLength": 256},
        "status": {
            "observedGeneration": 1, "runGeneration": 1, "run": 1, "runSpecHash": "earlier",
            "jobName": "lm-pretrain-r1-0", "outputUri": "file:///artifacts/team-a/lm/run-1",
            "progress": {"step": 100, "totalSteps": 100, "etaSeconds": 0},
        },
    }

    status = reconciler.reconcile(body)

    assert "Job lm-pretrain-r2-0" in created
    assert status["run"] == 2
    assert "progress" not in status


def test_new_run_drops_training_gauges(monkeypatch):
    """The status write that drops the progress of a finished run also drops its gauges."""
    import logging

    from lathe.k8s import handlers, metrics

    metrics.set_progress("team-a", "PretrainJob", "lm", {"step": 100, "etaSeconds": 0})
    body = {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": "lm", "namespace": "team-a", "uid": "u-2", "generation": 2,
                     "resourceVersion": "5"},
        "status": {"progress": {"step": 100}, "conditions": []},
    }
    desired = {"observedGeneration": 2, "conditions": []}
    monkeypatch.setattr(handlers, "_reconcile", lambda parent, logger: desired)
    monkeypatch.setattr(handlers, "_announce", lambda *args: None)
    stored = {**body, "metadata": {**body["metadata"], "resourceVersion": "6"}, "status": desired}
    api = SimpleNamespace(patch_namespaced_custom_object_status=lambda *args: stored)

    assert handlers._reconcile_stored(api, body, logging.getLogger("test")) is True

    samples = [sample for metric in metrics.REGISTRY.collect()
               if metric.name == "lathe_training_step" for sample in metric.samples
               if sample.labels.get("name") == "lm"]
    assert samples == []


def pretrain_body(uid: str, **spec) -> dict:
    """Return a PretrainJob of generation 1 named lm in team-a, with `spec` added."""
    return {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": "lm", "namespace": "team-a", "uid": uid, "generation": 1},
        "spec": {"corpusRef": {"name": "c"}, "tokenizerRef": {"name": "t"},
                 "sequenceLength": 256, **spec},
    }


def fake_reconciler(created: list[str]) -> Reconciler:
    settings = OperatorSettings.from_env({"LATHE_ARTIFACT_ROOT": "file:///artifacts"})
    return Reconciler(settings, fake_clients(created))


def test_resume_before_job_ends_suspension():
    """A stage suspended before its first Job, then resumed, shows Suspended=False in the status
    write that creates the Job, since the Job's first event is not reconciled."""
    created: list[str] = []
    reconciler = fake_reconciler(created)
    body = pretrain_body("u-3", suspend=True)
    suspended = reconciler.reconcile(body)
    assert created == []
    assert suspended["phase"] == "Suspended"

    body["metadata"]["generation"] = 2
    body["spec"]["suspend"] = False
    resumed = reconciler.reconcile({**body, "status": suspended})

    assert "Job lm-pretrain-r1-0" in created
    conditions = {c["type"]: c for c in resumed["conditions"]}
    assert (conditions["Suspended"]["status"], conditions["Suspended"]["reason"]) == (
        "False", "Resumed")
    assert resumed["phase"] != "Suspended"


def test_deleted_job_starts_next_attempt():
    """A Job deleted while it ran is not created again under its name, whose pods may still be
    terminating: the next attempt starts, and it counts as no failure."""
    created: list[str] = []
    reconciler = fake_reconciler(created)
    body = pretrain_body("u-4")
    first = reconciler.reconcile(body)
    assert created == ["ConfigMap lm-pretrain-r1-0", "Job lm-pretrain-r1-0"]

    # The fake reads every Job as gone: someone deleted lm-pretrain-r1-0.
    second = reconciler.reconcile({**body, "status": first})

    assert created[-1] == "Job lm-pretrain-r1-1"
    assert (second["attempt"], second["jobName"]) == (1, "lm-pretrain-r1-1")
    assert second.get("restartCount", 0) == 0
    assert second.get("failedAttempts", []) == []
