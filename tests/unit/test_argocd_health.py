"""The Argo CD health checks (charts/lathe/argocd/*.lua) run in a real Lua interpreter.

The scripts run as Argo CD runs them (tests/argocd_lua.py). The status objects here are built
with the operator's own `lathe.status` helpers and the texts the reconciler writes, so a change
to the status shapes shows up here; tests/fixtures/status/ keeps a few whole objects as JSON.
tests/cluster/test_argocd_live.py runs the same scripts on objects the operator wrote to a real
API server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lathe import status
from lathe.api import KINDS
from lathe.status import ConditionType as C
from lathe.status import Phase, Reason

from argocd_lua import SCRIPTS, run_health, script_path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "status"

# Argo CD's health status for each phase of the PHASE printer column.
PHASE_HEALTH = {
    Phase.PENDING: "Progressing",
    Phase.WAITING: "Progressing",
    Phase.RUNNING: "Progressing",
    Phase.SUSPENDED: "Suspended",
    Phase.FAILED: "Degraded",
    Phase.SUCCEEDED: "Healthy",
    Phase.READY: "Healthy",
}

# -- status objects shaped as the reconciler writes them ----------------------------------------


def resource(kind: str, generation: int = 1, status_: dict | None = None) -> dict[str, Any]:
    obj = {
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "pubmed", "namespace": "lathe", "generation": generation,
                     "uid": "7c1c6a4e-0000-4000-8000-000000000001"},
        "spec": {},
    }
    if status_ is not None:
        obj["status"] = status_
    return obj


def with_phase(kind: str, new: dict[str, Any]) -> dict[str, Any]:
    new["phase"] = status.derive_phase(new["conditions"], KINDS[kind].summary_condition)
    return new


def inputs_ready(generation: int = 1) -> list[dict]:
    return status.set_condition(
        [], C.INPUTS_READY, True, Reason.INPUTS_AVAILABLE,
        "All referenced inputs have succeeded.", generation,
    )


def waiting_status(kind: str) -> dict:
    conditions = status.set_condition(
        [], C.INPUTS_READY, False, Reason.INPUT_NOT_READY,
        "Waiting for Corpus 'pubmed' to reach Succeeded (corpus).", 1,
    )
    return with_phase(kind, {"observedGeneration": 1, "conditions": conditions})


def running_status(kind: str, progress: dict | None = None) -> dict:
    conditions = status.set_condition(
        inputs_ready(), C.RUNNING, True, Reason.JOB_RUNNING,
        "Job pubmed-g1-0 has 2 active pods.", 1,
    )
    new = {"observedGeneration": 1, "conditions": conditions, "jobName": "pubmed-g1-0",
           "attempt": 0, "runGeneration": 1}
    if progress is not None:
        new["progress"] = progress
    return with_phase(kind, new)


def suspended_status(kind: str) -> dict:
    conditions = status.set_condition(
        inputs_ready(), C.SUSPENDED, True, Reason.SUSPENDED,
        "The spec sets suspend; the Job's pods are stopped and training resumes from the "
        "latest checkpoint when it is cleared.", 1,
    )
    conditions = status.set_condition(
        conditions, C.RUNNING, False, Reason.SUSPENDED,
        "Job pubmed-finetune-r1-0 is suspended because spec.suspend is true; clear it to "
        "continue.", 1,
    )
    return with_phase(kind, {"observedGeneration": 1, "conditions": conditions})


def failed_status(kind: str) -> dict:
    conditions = status.set_condition(
        inputs_ready(), C.RUNNING, False, Reason.JOB_FAILED, "The Job failed.", 1
    )
    conditions = status.set_condition(
        conditions, C.FAILED, True, Reason.BACKOFF_LIMIT_EXCEEDED,
        "Gave up after 3 attempts: exit code 1 (Error). Node 1 (pubmed-g1-2-1-x7k2p): "
        "CUDA out of memory.", 1,
    )
    return with_phase(kind, {"observedGeneration": 1, "conditions": conditions,
                             "failedAttempts": [{"attempt": 2, "exitCode": 1}]})


def invalid_spec_status(kind: str) -> dict:
    # What Reconciler._failed writes for a spec that the CRD accepted but pydantic rejects.
    conditions = status.set_condition(
        [], C.FAILED, True, Reason.INVALID_SPEC,
        "spec.training.maxSteps: Input should be greater than 0", 1,
    )
    return with_phase(kind, {"observedGeneration": 1, "conditions": conditions})


def done_status(kind: str) -> dict:
    conditions = status.set_condition(
        inputs_ready(), C.RUNNING, False, Reason.JOB_SUCCEEDED, "The Job completed.", 1
    )
    if kind == "ModelDeployment":
        conditions = status.set_condition(
            conditions, "Exported", True, Reason.JOB_SUCCEEDED, "The export Job completed.", 1
        )
        conditions = status.set_condition(
            conditions, C.READY, True, Reason.SERVER_READY, "1 of 1 Triton replicas are ready.", 1
        )
    else:
        conditions = status.set_condition(
            conditions, C.SUCCEEDED, True, Reason.JOB_SUCCEEDED, "Job pubmed-g1-0 completed.", 1
        )
    return with_phase(kind, {
        "observedGeneration": 1, "conditions": conditions,
        "artifact": {"uri": "pvc://lathe-artifacts/lathe/pubmed", "digest": "sha256:" + "0" * 64},
    })


def server_not_ready_status() -> dict:
    new = done_status("ModelDeployment")
    new["conditions"] = status.set_condition(
        new["conditions"], C.READY, False, Reason.SERVER_NOT_READY,
        "0 of 1 Triton replicas are ready.", 1,
    )
    return with_phase("ModelDeployment", new)


ALL_KINDS = sorted(KINDS)
# Corpus has no inputs, so it never waits for one.
KINDS_WITH_INPUTS = [kind for kind in ALL_KINDS if kind != "Corpus"]


def summary_message(kind: str) -> str:
    if kind == "ModelDeployment":
        return "1 of 1 Triton replicas are ready."
    return "Job pubmed-g1-0 completed."


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_script_exists_per_kind(kind):
    assert script_path(kind).is_file()


def test_no_script_without_kind():
    kinds = {path.stem.removeprefix("lathe.dev_") for path in SCRIPTS.glob("*.lua")}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_scripts_differ_only_in_names(kind):
    """Each script is self-contained, so the shared logic is checked for drift here."""

    def normalized(name: str) -> str:
        summary = KINDS[name].summary_condition
        text = script_path(name).read_text().replace(name, "KIND")
        text = re.sub(rf"\b{summary}\b", "SUMMARY", text)
        # The rules comment pads its arrows after the summary condition's name.
        return re.sub(r"SUMMARY=True \(the summary condition\) +->", "SUMMARY=True ->", text)

    assert normalized(kind) == normalized("Corpus")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_script_declares_summary_condition(kind):
    text = script_path(kind).read_text()
    assert f'local kind = "{kind}"' in text
    assert f'local summary = "{KINDS[kind].summary_condition}"' in text


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("status_, expected, message", [
    (None, "Progressing", "Waiting for the Lathe operator to reconcile this KIND."),
    ({"kopf": {"progress": {}}}, "Progressing",
     "Waiting for the Lathe operator to reconcile this KIND."),
    ({"observedGeneration": 1, "conditions": []}, "Progressing",
     "Waiting for the Lathe operator to start the workload."),
], ids=["no-status", "kopf-bookkeeping-only", "no-conditions"])
def test_health_before_first_reconcile(kind, status_, expected, message):
    health = run_health(kind, resource(kind, status_=status_))
    assert health["status"] == expected
    assert health["message"] == message.replace("KIND", kind)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("old_status", [done_status, failed_status, suspended_status],
                         ids=["was-done", "was-failed", "was-suspended"])
def test_stale_generation_is_progressing(kind, old_status):
    health = run_health(kind, resource(kind, generation=2, status_=old_status(kind)))
    assert health["status"] == "Progressing"
    assert health["message"] == (
        "Waiting for the Lathe operator to reconcile generation 2; status describes "
        "generation 1."
    )


@pytest.mark.parametrize("kind", KINDS_WITH_INPUTS)
def test_waiting_names_the_input(kind):
    health = run_health(kind, resource(kind, status_=waiting_status(kind)))
    assert health["status"] == "Progressing"
    assert health["message"] == "Waiting for Corpus 'pubmed' to reach Succeeded (corpus)."


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_running_without_progress(kind):
    health = run_health(kind, resource(kind, status_=running_status(kind)))
    assert health["status"] == "Progressing"
    assert health["message"] == "Job pubmed-g1-0 has 2 active pods."


@pytest.mark.parametrize("kind", ["PretrainJob", "FineTune"])
@pytest.mark.parametrize("progress, prefix", [
    ({"step": 120, "totalSteps": 300, "loss": 3.25}, "Running step 120 of 300. "),
    ({"step": 7}, "Running step 7. "),
    ({"updatedAt": "2026-12-04T10:00:00Z"}, ""),
], ids=["step-of-total", "step-only", "no-step"])
def test_running_reports_step(kind, progress, prefix):
    health = run_health(kind, resource(kind, status_=running_status(kind, progress)))
    assert health["status"] == "Progressing"
    assert health["message"] == prefix + "Job pubmed-g1-0 has 2 active pods."


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_suspended(kind):
    health = run_health(kind, resource(kind, status_=suspended_status(kind)))
    assert health["status"] == "Suspended"
    assert health["message"].startswith("The spec sets suspend;")


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("make_status, message", [
    (failed_status, "Gave up after 3 attempts: exit code 1 (Error). Node 1 "
                    "(pubmed-g1-2-1-x7k2p): CUDA out of memory."),
    (invalid_spec_status, "spec.training.maxSteps: Input should be greater than 0"),
], ids=["job-failed", "invalid-spec"])
def test_failed_is_degraded_with_message(kind, make_status, message):
    health = run_health(kind, resource(kind, status_=make_status(kind)))
    assert health["status"] == "Degraded"
    assert health["message"] == message


def test_failed_without_message_uses_reason():
    new = failed_status("Tokenizer")
    for condition in new["conditions"]:
        condition["message"] = ""
    health = run_health("Tokenizer", resource("Tokenizer", status_=new))
    assert health["status"] == "Degraded"
    assert health["message"] == Reason.BACKOFF_LIMIT_EXCEEDED


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_summary_condition_is_healthy(kind):
    health = run_health(kind, resource(kind, status_=done_status(kind)))
    assert health["status"] == "Healthy"
    assert health["message"] == summary_message(kind)


@pytest.mark.parametrize("kind", [k for k in ALL_KINDS if k != "ModelDeployment"])
def test_bounded_kind_ignores_ready(kind):
    """Only ModelDeployment's summary is Ready; a Ready condition on a stage means nothing."""
    new = running_status(kind)
    new["conditions"] = status.set_condition(
        new["conditions"], C.READY, True, Reason.SERVER_READY, "Ready.", 1
    )
    assert run_health(kind, resource(kind, status_=new))["status"] == "Progressing"


def test_deployment_waits_for_triton_replicas():
    health = run_health("ModelDeployment",
                        resource("ModelDeployment", status_=server_not_ready_status()))
    assert health["status"] == "Progressing"
    assert health["message"] == "0 of 1 Triton replicas are ready."


def test_deployment_exported_not_summary():
    """Exported=True alone (the export Job done) is not Healthy: Triton must be Ready."""
    new = done_status("ModelDeployment")
    new["conditions"] = [c for c in new["conditions"] if c["type"] != C.READY]
    new = with_phase("ModelDeployment", new)
    health = run_health("ModelDeployment", resource("ModelDeployment", status_=new))
    assert health["status"] == "Progressing"


STATE_BUILDERS = {
    "waiting": waiting_status,
    "running": running_status,
    "suspended": suspended_status,
    "failed": failed_status,
    "invalid-spec": invalid_spec_status,
    "done": done_status,
}


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("state", sorted(STATE_BUILDERS))
def test_health_matches_phase_column(kind, state):
    new = STATE_BUILDERS[state](kind)
    health = run_health(kind, resource(kind, status_=new))
    assert health["status"] == PHASE_HEALTH[new["phase"]]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_returns_only_status_and_message(kind):
    health = run_health(kind, resource(kind, status_=running_status(kind)))
    assert set(health) == {"status", "message"}
    assert all(isinstance(value, str) for value in health.values())


# -- the argocd-cm patch and the Applications in examples/gitops/ -------------------------------

GITOPS = REPO / "examples" / "gitops"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_argocd_cm_patch_matches_script(kind):
    data = yaml.safe_load((GITOPS / "argocd-cm-health.yaml").read_text())["data"]
    assert data[f"resource.customizations.health.lathe.dev_{kind}"] == script_path(kind).read_text()


def test_argocd_cm_patch_has_only_lathe_keys():
    data = yaml.safe_load((GITOPS / "argocd-cm-health.yaml").read_text())["data"]
    assert set(data) == {f"resource.customizations.health.lathe.dev_{kind}" for kind in KINDS}


def application(name: str) -> dict:
    return yaml.safe_load((GITOPS / name).read_text())


def test_operator_application_syncs_first():
    app = application("lathe-operator.yaml")
    assert app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1"
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    assert app["spec"]["source"]["path"] == "charts/lathe"


def test_operator_application_named_as_release():
    """Argo CD's label tracking (the default before 3.0) sets app.kubernetes.io/instance to the
    Application's name on the chart's objects. The ServiceMonitor selects the metrics Service by
    that label, so it must stay the release name."""
    app = application("lathe-operator.yaml")
    assert app["metadata"]["name"] == app["spec"]["source"]["helm"]["releaseName"]


def test_pubmed_application_after_operator():
    app = application("pubmed.yaml")
    assert int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) > -1
    assert app["spec"]["source"]["path"] == "examples/pubmed"
    assert "ignoreDifferences" not in app["spec"]


def test_pubmed_resources_have_no_sync_waves():
    """The operator orders the stages itself; waves would hold a sync open for hours."""
    for path in sorted((REPO / "examples" / "pubmed").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            annotations = (document or {}).get("metadata", {}).get("annotations") or {}
            assert "argocd.argoproj.io/sync-wave" not in annotations, path.name


# -- fixtures kept as JSON for the cluster suite ---------------------------------------------------

FIXTURE_HEALTH = {
    "corpus-succeeded.json": "Healthy",
    "tokenizer-waiting.json": "Progressing",
    "pretrainjob-running.json": "Progressing",
    "pretrainjob-stale-generation.json": "Progressing",
    "finetune-suspended.json": "Suspended",
    "finetune-failed.json": "Degraded",
    "modeldeployment-ready.json": "Healthy",
    "modeldeployment-not-ready.json": "Progressing",
}


def build_fixtures() -> dict[str, dict]:
    """Return the fixture objects; the cluster suite may overwrite the files with real ones."""
    return {
        "corpus-succeeded.json": resource("Corpus", status_=done_status("Corpus")),
        "tokenizer-waiting.json": resource("Tokenizer", status_=waiting_status("Tokenizer")),
        "pretrainjob-running.json": resource("PretrainJob", status_=running_status(
            "PretrainJob", {"step": 120, "totalSteps": 300, "tokensSeen": 245760,
                            "loss": 4.1, "tokensPerSecond": 2048.0, "etaSeconds": 86,
                            "updatedAt": "2026-12-04T10:00:00Z"})),
        "pretrainjob-stale-generation.json": resource(
            "PretrainJob", generation=2, status_=done_status("PretrainJob")),
        "finetune-suspended.json": resource("FineTune", status_=suspended_status("FineTune")),
        "finetune-failed.json": resource("FineTune", status_=failed_status("FineTune")),
        "modeldeployment-ready.json": resource(
            "ModelDeployment", status_=done_status("ModelDeployment")),
        "modeldeployment-not-ready.json": resource(
            "ModelDeployment", status_=server_not_ready_status()),
    }


def test_fixture_files_present():
    assert sorted(path.name for path in FIXTURES.glob("*.json")) == sorted(FIXTURE_HEALTH)


@pytest.mark.parametrize("name", sorted(FIXTURE_HEALTH))
def test_fixture_health(name):
    obj = json.loads((FIXTURES / name).read_text())
    assert run_health(obj["kind"], obj)["status"] == FIXTURE_HEALTH[name]


@pytest.mark.parametrize("name", sorted(FIXTURE_HEALTH))
def test_fixture_has_current_condition_shape(name):
    """Every condition carries the fields that lathe.status.set_condition writes."""
    obj = json.loads((FIXTURES / name).read_text())
    fresh = build_fixtures()[name]["status"]["conditions"][0]
    for condition in obj["status"]["conditions"]:
        assert set(condition) == set(fresh)


def deployment_with_ready(reason: str, message: str) -> dict:
    """Return a Lua health input: an exported ModelDeployment with Ready False for `reason`."""
    new = done_status("ModelDeployment")
    new["conditions"] = status.set_condition(new["conditions"], C.READY, False, reason,
                                             message, 1)
    return resource("ModelDeployment", status_=with_phase("ModelDeployment", new))


def test_deployment_scaled_to_zero_is_healthy():
    """serving.replicas 0 turns serving off on purpose, as a Deployment scaled to zero."""
    health = run_health("ModelDeployment", deployment_with_ready(
        Reason.SCALED_TO_ZERO,
        "spec.serving.replicas is 0, so no Triton replica runs; set it to 1 or more to serve.",
    ))
    assert health["status"] == "Healthy"
    assert health["message"].startswith("spec.serving.replicas is 0")


def test_deployment_pods_not_starting_progressing():
    health = run_health("ModelDeployment", deployment_with_ready(
        Reason.PODS_NOT_STARTING,
        "0 of 1 Triton replicas are ready. Pod ner-triton-x: 0/4 nodes are available.",
    ))
    assert health["status"] == "Progressing"


if __name__ == "__main__":
    # Rewrite tests/fixtures/status/ from the builders above.
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for fixture_name, fixture in build_fixtures().items():
        (FIXTURES / fixture_name).write_text(json.dumps(fixture, indent=2) + "\n")
