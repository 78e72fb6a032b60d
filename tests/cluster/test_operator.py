"""The operator against a real API server, Job controller, garbage collector and kwok nodes."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import urllib.request
from pathlib import Path

import yaml

from argocd_lua import run_health
from lathe.k8s import handlers, reconcile
from lathe.k8s.settings import OperatorSettings
from lathe_objects import (EXAMPLES, HOLD, ORDER, KINDS, condition, corpus_and_tokenizer,
                           events_about, fail_pod, finetune, get, is_true, jobs_of, plural,
                           pretrain_job)

# The folder of one run in the artifact store: `<root>/<namespace>/<kind>/<name>/run-<digest>`.
RUN_FOLDER = re.compile(r"/[a-z]+/[a-z0-9-]+/run-[0-9a-f]{16}$")
# A finalizer that only the tests set and remove.
HOLD_POD = "lathe.dev/test-hold"

def test_every_transition_posts_one_event(cluster, namespace, lathe_operator, ready_inputs):
    """The Tokenizer waited for its Corpus, started and succeeded: one Event per reconcile that
    changed conditions, naming each change, and none twice."""

    def events() -> list[tuple[str, str]]:
        return [(event["reason"], event["message"]) for event in
                events_about(cluster, namespace, "Tokenizer", "missing-on-purpose")]  # fmt: skip

    expected = {"InputNotReady", "JobCreated", "JobSucceeded"}
    cluster.wait_for(lambda: expected <= {reason for reason, _ in events()},
                     f"Events with reasons {sorted(expected)}")  # fmt: skip
    # kopf posts Events from a queue; give a duplicate the time to arrive before counting.
    time.sleep(3)
    seen = events()
    assert len(seen) == len(set(seen)), seen
    by_reason = {}
    for reason, message in seen:
        by_reason.setdefault(reason, []).append(message)
    assert by_reason["InputNotReady"][0].startswith("InputsReady=False: Waiting for Corpus")
    # The wake-up that found the Corpus finished also created the Job: one Event for both.
    assert len(by_reason["JobCreated"]) == 1, by_reason
    assert by_reason["JobCreated"][0].startswith("InputsReady=True: ")
    assert "Running=True: Created Job missing-on-purpose-tokenizer-r1-" in (
        by_reason["JobCreated"][0])
    assert len(by_reason["JobSucceeded"]) == 1, by_reason
    assert by_reason["JobSucceeded"][0].startswith("Running=False: The Job completed. ")
    assert "Succeeded=True: Job missing-on-purpose-tokenizer-r1-" in (
        by_reason["JobSucceeded"][0])
    # `kubectl describe` shows the operator as the source, in its From column.
    sources = {event["source"].get("component") for event in
               events_about(cluster, namespace, "Tokenizer", "missing-on-purpose")}
    assert sources == {"lathe-operator"}


def test_example_runs_in_dependency_order(cluster, namespace, lathe_operator):
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
    names = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            names[document["kind"]] = document["metadata"]["name"]

    def summary(kind: str) -> str:
        return KINDS[kind].summary_condition

    cluster.wait_for(
        lambda: is_true(cluster, "ModelDeployment", names["ModelDeployment"], namespace, "Ready"),
        "the ModelDeployment to become Ready", timeout=300,
    )
    finished = []
    for kind in ORDER:
        obj = get(cluster, kind, names[kind], namespace)
        done = condition(obj, summary(kind))
        assert done and done["status"] == "True", (kind, obj.get("status"))
        assert done["observedGeneration"] == obj["metadata"]["generation"]
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        assert obj["status"]["phase"] in ("Succeeded", "Ready")
        assert obj["status"]["artifact"]["uri"].startswith("file://")
        # Argo CD's health check, run as Argo CD runs it, agrees on the live object.
        assert run_health(kind, obj)["status"] == "Healthy", (kind, run_health(kind, obj))
        finished.append(obj)

    # Triton serves the export that the status reports: a new export changes this annotation,
    # which rolls the pods.
    deployment_status = get(cluster, "ModelDeployment", names["ModelDeployment"], namespace)
    triton = cluster.get_json("deployment", f"{names['ModelDeployment']}-triton", "-n", namespace)
    assert triton["spec"]["template"]["metadata"]["annotations"] == {
        "lathe.dev/repository-digest": deployment_status["status"]["artifact"]["digest"]
    }

    # Each stage's Job was created only after the Job of the stage it reads from completed.
    for upstream, downstream in zip(ORDER, ORDER[1:]):
        upstream_job = jobs_of(cluster, names[upstream], namespace)
        downstream_job = jobs_of(cluster, names[downstream], namespace)
        upstream_done = [j for j in upstream_job if j["metadata"]["labels"]["lathe.dev/kind"]
                         == upstream][-1]["status"]["completionTime"]
        downstream_start = [j for j in downstream_job if j["metadata"]["labels"]["lathe.dev/kind"]
                            == downstream][0]["metadata"]["creationTimestamp"]
        assert upstream_done <= downstream_start, (upstream, downstream)

    # Scaling Triton updates its Deployment and keeps the export: no new export Job, the same
    # artifact, still Ready.
    model = names["ModelDeployment"]
    export_jobs = [job["metadata"]["name"] for job in jobs_of(cluster, model, namespace)]
    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"serving": {"replicas": 2}}}')
    cluster.wait_for(
        lambda: cluster.get_json("deployment", f"{model}-triton", "-n", namespace)
        ["spec"]["replicas"] == 2, "the Triton Deployment to scale to 2 replicas", timeout=60,
    )
    cluster.wait_for(
        lambda: get(cluster, "ModelDeployment", model, namespace)["status"]
        ["observedGeneration"] == 2, "observedGeneration 2", timeout=60,
    )
    scaled = get(cluster, "ModelDeployment", model, namespace)
    assert [job["metadata"]["name"] for job in jobs_of(cluster, model, namespace)] == export_jobs
    assert scaled["status"]["artifact"] == deployment_status["status"]["artifact"]
    assert condition(scaled, "Exported")["status"] == "True"
    _triton_objects_follow_operator(cluster, namespace, model)


def _ready(cluster, namespace: str, model: str) -> dict:
    return condition(get(cluster, "ModelDeployment", model, namespace), "Ready") or {}


def _wait_for_new_export(cluster, namespace: str, model: str) -> None:
    """Wait until the ModelDeployment's current generation runs its export."""

    def exporting() -> bool:
        obj = get(cluster, "ModelDeployment", model, namespace)
        running = condition(obj, "Running") or {}
        return (obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
                and running.get("status") == "True")

    cluster.wait_for(exporting, "the new export to run", timeout=90)


def _triton_objects_follow_operator(cluster, namespace: str, model: str) -> None:
    """A deleted Triton Deployment or Service is created again, a `kubectl scale` is undone,
    Ready follows the pods, and zero replicas are reported as such."""
    triton = f"{model}-triton"
    cluster.wait_for(lambda: _ready(cluster, namespace, model).get("status") == "True",
                     "Ready with 2 replicas", timeout=90)
    cluster.kubectl("scale", "deployment", triton, "-n", namespace, "--replicas=4")
    cluster.wait_for(
        lambda: cluster.get_json("deployment", triton, "-n", namespace)["spec"]["replicas"] == 2,
        "the operator to undo kubectl scale", timeout=60,
    )
    for kind in ("deployment", "service"):
        uid = cluster.get_json(kind, triton, "-n", namespace)["metadata"]["uid"]
        cluster.kubectl("delete", kind, triton, "-n", namespace)
        cluster.wait_for(
            lambda kind=kind, uid=uid: cluster.kubectl(
                "get", kind, triton, "-n", namespace, "-o", "jsonpath={.metadata.uid}",
                check=False).stdout not in ("", uid),
            f"the Triton {kind} to be created again", timeout=60,
        )
    cluster.wait_for(lambda: _ready(cluster, namespace, model).get("status") == "True",
                     "Ready again with the re-created Deployment", timeout=90)

    # A third replica that no node accepts, because every node is cordoned: Ready turns False
    # with the reason. The pod template stays the same, so no rollout replaces the two pods.
    nodes = cluster.kubectl("get", "nodes", "-o", "name").stdout.split()
    try:
        for node in nodes:
            cluster.kubectl("cordon", node)
        cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace,
                        "--type=merge", "-p", '{"spec": {"serving": {"replicas": 3}}}')

        def not_ready() -> bool:
            ready = _ready(cluster, namespace, model)
            return (ready.get("status") == "False"
                    and ready.get("reason") in ("ServerNotReady", "PodsNotStarting")
                    and ready.get("message", "").startswith("2 of 3 Triton replicas are ready."))

        cluster.wait_for(not_ready, "Ready=False while a replica cannot be placed", timeout=90)
    finally:
        for node in nodes:
            cluster.kubectl("uncordon", node, check=False)

    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"serving": {"replicas": 0}}}')
    cluster.wait_for(lambda: _ready(cluster, namespace, model).get("reason") == "ScaledToZero",
                     "Ready=False (ScaledToZero) at 0 replicas", timeout=90)
    assert _ready(cluster, namespace, model)["status"] == "False"

    # A new export, held Running: Triton still serves the earlier export, so Ready stays True.
    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"serving": {"replicas": 1}}}')
    cluster.wait_for(lambda: _ready(cluster, namespace, model).get("status") == "True",
                     "Ready again at 1 replica", timeout=90)
    change = {"spec": {"export": {"tolerance": 0.02}, "podMetadata": {"annotations": HOLD}}}
    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", json.dumps(change))

    _wait_for_new_export(cluster, namespace, model)
    exporting_status = get(cluster, "ModelDeployment", model, namespace)
    ready = condition(exporting_status, "Ready")
    assert ready is not None, exporting_status["status"]
    assert ready["status"] == "True", ready
    assert ready["message"] == ("1 of 1 Triton replicas are ready. They serve the earlier "
                                "export until the new one is done; changes to spec.serving "
                                "apply then."), ready
    assert condition(exporting_status, "Exported") is None
    assert exporting_status["status"]["phase"] == "Ready"

    # The next export runs without the hold. Ready stays True while it runs, and once its Job
    # completes, Exported returns and Triton rolls to it.
    triton = f"{model}-triton"
    served_before = cluster.get_json("deployment", triton, "-n", namespace)[
        "spec"]["template"]["metadata"]["annotations"]["lathe.dev/repository-digest"]
    change = {"spec": {"export": {"tolerance": 0.03}, "podMetadata": {"annotations": None}}}
    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", json.dumps(change))

    def exported() -> bool:
        obj = get(cluster, "ModelDeployment", model, namespace)
        done = condition(obj, "Exported") or {}
        return (obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
                and done.get("status") == "True")

    cluster.wait_for(exported, "the next export to complete while Triton serves", timeout=120)
    exported_status = get(cluster, "ModelDeployment", model, namespace)
    digest = exported_status["status"]["artifact"]["digest"]
    assert digest != served_before

    def rolled() -> bool:
        template = cluster.get_json("deployment", triton, "-n", namespace)["spec"]["template"]
        return template["metadata"]["annotations"]["lathe.dev/repository-digest"] == digest

    cluster.wait_for(rolled, "Triton to serve the new export", timeout=60)

    # Autoscaling on creates the HPA; off deletes it, so that it stops resizing the Deployment.
    def autoscaler_exists() -> bool:
        found = cluster.kubectl("get", "hpa", triton, "-n", namespace, "-o", "name",
                                check=False)
        return found.returncode == 0

    on = {"spec": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 3}}}
    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", json.dumps(on))
    cluster.wait_for(autoscaler_exists, "the HPA to be created", timeout=60)
    off = {"spec": {"autoscaling": {"enabled": False}}}
    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", json.dumps(off))
    cluster.wait_for(lambda: not autoscaler_exists(), "the HPA to be deleted", timeout=60)
    cluster.wait_for(
        lambda: cluster.get_json("deployment", triton, "-n", namespace)["spec"]["replicas"] == 1,
        "the Deployment back at spec.serving.replicas", timeout=60,
    )


def test_spec_only_models_reject_fails_readably(cluster, namespace, lathe_operator):
    """A spec the CRD accepts but the API model rejects fails with the field and the fix, not
    pydantic's own text."""
    tokenizer = next(doc for doc in corpus_and_tokenizer("bad-regex") if doc["kind"] == "Tokenizer")
    tokenizer["spec"]["protectedPatterns"] = [{"name": "open", "regex": "("}]
    cluster.apply(tokenizer, namespace)
    cluster.wait_for(lambda: is_true(cluster, "Tokenizer", "bad-regex", namespace, "Failed"),
                     "Failed=True on the Tokenizer")
    failed = condition(get(cluster, "Tokenizer", "bad-regex", namespace), "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("spec.protectedPatterns[0].regex: ")
    assert "invalid regular expression" in failed["message"]
    assert "errors.pydantic.dev" not in failed["message"]


def test_pretrain_job_shape(cluster, namespace, lathe_operator, ready_inputs):
    cluster.apply(pretrain_job("shape", gpus=8), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "shape", namespace)) == 1,
                     "the PretrainJob's Job", timeout=60)
    job = jobs_of(cluster, "shape", namespace)[0]
    owner = get(cluster, "PretrainJob", "shape", namespace)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    assert [r["action"] for r in spec["podFailurePolicy"]["rules"]] == [
        "Ignore", "FailJob", "FailJob"
    ]
    reference = job["metadata"]["ownerReferences"][0]
    assert reference["uid"] == owner["metadata"]["uid"]
    assert reference["controller"] is True

    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["NNODES"] == "2"
    assert env["NPROC"] == "8"
    assert env["RDZV_ENDPOINT"].startswith(f"{job['metadata']['name']}-0.")
    assert env["RDZV_ID"].endswith("-0")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["subdomain"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in volumes.values())
    assert any("configMap" in v for v in volumes.values())

    service = cluster.get_json("service", pod["subdomain"], "-n", namespace)
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    config_name = next(v["configMap"]["name"] for v in volumes.values() if "configMap" in v)
    config_map = cluster.get_json("configmap", config_name, "-n", namespace)
    config = json.loads(config_map["data"]["config.json"])
    assert config["kind"] == "PretrainJob"
    assert config["inputs"]["corpus"]["name"] == "missing-on-purpose"

    cluster.wait_for(
        lambda: get(cluster, "PretrainJob", "shape", namespace)["status"]["phase"] == "Running",
        "the PretrainJob to be Running",
    )


def test_waits_for_missing_input(cluster, namespace, lathe_operator):
    cluster.apply(pretrain_job("orphan"), namespace)

    def waiting() -> bool:
        found = condition(get(cluster, "PretrainJob", "orphan", namespace), "InputsReady")
        return bool(found and found["status"] == "False")

    cluster.wait_for(waiting, "InputsReady=False on the PretrainJob")
    found = condition(get(cluster, "PretrainJob", "orphan", namespace), "InputsReady")
    assert found["reason"] == "InputNotFound"
    # Both missing inputs are named, so one fix does not uncover the next.
    assert found["message"] == (
        "Waiting for Corpus 'missing-on-purpose', which does not exist yet (corpus). Waiting for "
        "Tokenizer 'missing-on-purpose', which does not exist yet (tokenizer)."), found
    assert jobs_of(cluster, "orphan", namespace) == []


def test_model_deployment_ready_false_first(cluster, namespace, lathe_operator):
    """Ready is set from the first reconcile, so `kubectl wait` for Ready=False returns."""
    cluster.apply({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "early"},
        "spec": {"model": {"fineTuneRef": {"name": "missing-on-purpose"}},
                 "export": {"heldOutData": "pubmed/ncbi-disease/conll/test.tsv"}},
    }, namespace)
    cluster.kubectl("wait", "--for=condition=Ready=False", "--timeout=60s",
                    f"{plural('ModelDeployment')}/early", "-n", namespace, timeout=90)
    ready = condition(get(cluster, "ModelDeployment", "early", namespace), "Ready")
    assert ready["reason"] == "InputNotFound", ready
    assert "Triton starts after the export" in ready["message"], ready
    assert "FineTune 'missing-on-purpose'" in ready["message"], ready


def test_progress_reaches_status_and_metrics(cluster, namespace, lathe_operator, ready_inputs):
    cluster.apply(pretrain_job("progress"), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "progress", namespace)) == 1, "the Job")
    # Rank 0 appends progress records to its run's output folder in the artifact store.
    output_uri = get(cluster, "PretrainJob", "progress", namespace)["status"]["outputUri"]
    output = Path(output_uri.removeprefix("file://"))
    assert output.parent == lathe_operator.artifact_root / namespace / "pretrainjob" / "progress"
    output.mkdir(parents=True, exist_ok=True)
    record = {"time": time.time(), "completed": 42, "total": 100, "loss": 3.25,
              "tokensPerSecond": 1234.0, "etaSeconds": 60.0}
    (output / "progress.jsonl").write_text(json.dumps(record) + "\n")

    def reported() -> bool:
        status = get(cluster, "PretrainJob", "progress", namespace).get("status") or {}
        return (status.get("progress") or {}).get("step") == 42

    cluster.wait_for(reported, "status.progress.step 42", timeout=60)
    progress = get(cluster, "PretrainJob", "progress", namespace)["status"]["progress"]
    assert progress["loss"] == 3.25
    assert progress["etaSeconds"] == 60.0
    text = urllib.request.urlopen(lathe_operator.metrics_url).read().decode()
    assert f'lathe_training_step{{kind="PretrainJob",name="progress",namespace="{namespace}"}} 42.0' in text
    assert 'lathe_reconciles_total{kind="PretrainJob",result="success"}' in text
    # The stalled-training alert finds the resource Running by its own phase series.
    phases = [line for line in text.splitlines() if line.startswith("lathe_resource_phase{")
              and 'name="progress"' in line and f'namespace="{namespace}"' in line]
    assert len(phases) == 1, phases
    assert 'phase="Running"' in phases[0]
    assert phases[0].endswith(" 1.0")


def test_progress_read_from_rank_zero_port(cluster, namespace, lathe_operator, ready_inputs,
                                           monkeypatch):
    """Where the operator cannot read the output directory (a claim it does not mount), it
    reads rank 0's metrics port. kwok runs no trainer, so the HTTP read of that pod's address
    is replaced; tests/unit/test_progress.py reads a real exporter."""
    from lathe.k8s import progress

    requested = []

    def rank_zero_metrics(address: str, port: int) -> dict:
        requested.append((address, port))
        return {"completed": 12, "total": 100, "loss": 4.5, "tokensPerSecond": 900.0,
                "etaSeconds": 80.0, "time": time.time()}

    monkeypatch.setattr(progress, "readable", lambda uri, mounts=None: "portread" not in uri)
    monkeypatch.setattr(progress, "read_pod_metrics", rank_zero_metrics)
    cluster.apply(pretrain_job("portread", nodes=1, gpus=0), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "portread", namespace)) == 1, "the Job")

    def reported() -> bool:
        status = get(cluster, "PretrainJob", "portread", namespace).get("status") or {}
        return (status.get("progress") or {}).get("step") == 12

    cluster.wait_for(reported, "status.progress.step 12 from rank 0's port", timeout=60)
    job_name = jobs_of(cluster, "portread", namespace)[0]["metadata"]["name"]
    pods = cluster.get_json("pods", "-n", namespace, "-l",
                            f"batch.kubernetes.io/job-name={job_name}")["items"]
    rank_zero = next(pod for pod in pods if pod["metadata"]["labels"][
        "batch.kubernetes.io/job-completion-index"] == "0")
    assert (rank_zero["status"]["podIP"], 9400) in requested, requested
    progress_status = get(cluster, "PretrainJob", "portread", namespace)["status"]["progress"]
    assert progress_status["etaSeconds"] == 80.0
    assert progress_status["totalSteps"] == 100


def test_reexport_ready_counts_served_replicas(cluster, namespace, lathe_operator):
    """While a new export runs, Ready counts the replicas that the Deployment of the earlier
    export runs, not those of the new spec, and a failed new export leaves that Ready as is."""
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
    model = "pubmed-ner"
    cluster.wait_for(lambda: _ready(cluster, namespace, model).get("status") == "True",
                     "the ModelDeployment to become Ready", timeout=300)
    change = {"spec": {"export": {"tolerance": 0.02}, "podMetadata": {"annotations": HOLD},
                       "serving": {"replicas": 2}}}
    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", json.dumps(change))

    _wait_for_new_export(cluster, namespace, model)
    ready = _ready(cluster, namespace, model)
    assert ready["status"] == "True", ready
    assert ready["message"] == ("1 of 1 Triton replicas are ready. They serve the earlier "
                                "export until the new one is done; changes to spec.serving "
                                "apply then."), ready
    triton = cluster.get_json("deployment", f"{model}-triton", "-n", namespace)
    assert triton["spec"]["replicas"] == 1

    job_name = get(cluster, "ModelDeployment", model, namespace)["status"]["jobName"]
    cluster.wait_for(
        lambda: cluster.get_json("pods", "-n", namespace, "-l", f"job-name={job_name}")["items"],
        "the export pod", timeout=60,
    )
    pod = cluster.get_json("pods", "-n", namespace, "-l", f"job-name={job_name}")["items"][0]
    fail_pod(cluster, namespace, pod, 42, "ONNX Runtime differs from PyTorch by 0.3.")
    cluster.wait_for(lambda: is_true(cluster, "ModelDeployment", model, namespace, "Failed"),
                     "the new export to fail", timeout=60)
    failed = get(cluster, "ModelDeployment", model, namespace)
    ready = condition(failed, "Ready")
    assert ready["status"] == "True", ready
    assert ready["message"] == ("1 of 1 Triton replicas are ready. They serve the earlier "
                                "export, because the new export failed; see the Failed "
                                "condition."), ready
    assert failed["status"]["phase"] == "Failed"


def test_waiting_deployment_keeps_serving(cluster, namespace, lathe_operator):
    """A ModelDeployment whose FineTune was deleted keeps serving its export: a deleted Triton
    Deployment is created again. After a spec change, Ready reports a deleted Deployment."""
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
    model = "pubmed-ner"
    triton = f"{model}-triton"
    cluster.wait_for(lambda: _ready(cluster, namespace, model).get("status") == "True",
                     "the ModelDeployment to become Ready", timeout=300)
    cluster.kubectl("delete", plural("FineTune"), model, "-n", namespace)
    cluster.wait_for(
        lambda: (condition(get(cluster, "ModelDeployment", model, namespace), "InputsReady")
                 or {}).get("reason") == "InputNotFound",
        "the ModelDeployment to wait for its FineTune", timeout=60,
    )

    uid = cluster.get_json("deployment", triton, "-n", namespace)["metadata"]["uid"]
    cluster.kubectl("delete", "deployment", triton, "-n", namespace)
    cluster.wait_for(
        lambda: cluster.kubectl("get", "deployment", triton, "-n", namespace, "-o",
                                "jsonpath={.metadata.uid}", check=False).stdout not in ("", uid),
        "the Triton Deployment to be created again", timeout=60,
    )
    cluster.wait_for(lambda: _ready(cluster, namespace, model).get("status") == "True",
                     "Ready with the re-created Deployment", timeout=90)
    assert get(cluster, "ModelDeployment", model, namespace)["status"]["phase"] == "Ready"

    # A changed spec waits for the FineTune to export again, so the earlier export's
    # Deployment is not re-created, and Ready reports that it is gone.
    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"export": {"tolerance": 0.02}}}')
    cluster.wait_for(
        lambda: get(cluster, "ModelDeployment", model, namespace)["status"][
            "observedGeneration"] == 2, "observedGeneration 2", timeout=60,
    )
    cluster.kubectl("delete", "deployment", triton, "-n", namespace)
    cluster.wait_for(lambda: _ready(cluster, namespace, model).get("status") == "False",
                     "Ready=False without the Deployment", timeout=60)
    ready = _ready(cluster, namespace, model)
    assert ready["reason"] == "ServerNotReady", ready
    assert ready["message"] == (f"The Triton Deployment {triton} of the earlier export was "
                                "deleted; the operator creates it again once the new export "
                                "is done."), ready


def test_rank_zero_read_stays_local(cluster, namespace, lathe_operator, ready_inputs):
    """kwok pods have addresses of no host here, so the operator's read of rank 0's metrics
    port is refused before it leaves the machine."""
    import loopback_only

    cluster.apply(pretrain_job("offhost", nodes=1, gpus=0), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "offhost", namespace)) == 1, "the Job")
    job_name = jobs_of(cluster, "offhost", namespace)[0]["metadata"]["name"]

    def rank_zero_address() -> str | None:
        pods = cluster.get_json("pods", "-n", namespace, "-l",
                                f"batch.kubernetes.io/job-name={job_name}")["items"]
        return next((pod["status"].get("podIP") for pod in pods
                     if pod["status"].get("phase") == "Running"), None)

    cluster.wait_for(lambda: rank_zero_address() is not None, "rank 0 to run", timeout=60)
    address = rank_zero_address()
    cluster.wait_for(lambda: (address, 9400) in loopback_only.REFUSED,
                     f"the guard to refuse the read of {address}:9400", timeout=30)


def test_failed_input_wakes_dependent(cluster, namespace, lathe_operator, ready_inputs,
                                      monkeypatch):
    """A FineTune that waits for its PretrainJob reports at once that the PretrainJob failed,
    without waiting for the periodic resync."""
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 3600.0)
    cluster.apply(pretrain_job("fails-soon", nodes=1), namespace)
    cluster.apply(finetune("waits-for-failed", "fails-soon"), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "fails-soon", namespace)) == 1, "the Job")
    job_name = jobs_of(cluster, "fails-soon", namespace)[0]["metadata"]["name"]
    cluster.wait_for(
        lambda: cluster.get_json("pods", "-n", namespace, "-l", f"job-name={job_name}")["items"],
        "the training pod", timeout=60,
    )
    pod = cluster.get_json("pods", "-n", namespace, "-l", f"job-name={job_name}")["items"][0]
    fail_pod(cluster, namespace, pod, 42, "The corpus has no training split.")
    cluster.wait_for(lambda: is_true(cluster, "PretrainJob", "fails-soon", namespace, "Failed"),
                     "the PretrainJob to fail", timeout=60)

    def names_failed_input() -> bool:
        waiting = condition(get(cluster, "FineTune", "waits-for-failed", namespace),
                            "InputsReady") or {}
        return "which failed" in waiting.get("message", "")

    cluster.wait_for(names_failed_input, "the FineTune to name the failed PretrainJob", timeout=10)


def test_writes_name_operator_manager(cluster, namespace, lathe_operator, ready_inputs):
    """The status writes and the Jobs are managed by `lathe-operator` in managedFields, not by
    the Kubernetes client's default User-Agent."""
    name = "missing-on-purpose"
    tokenizer = cluster.get_json(plural("Tokenizer"), name, "-n", namespace,
                                 "--show-managed-fields")
    status_managers = {entry["manager"] for entry in tokenizer["metadata"]["managedFields"]
                       if entry.get("subresource") == "status"}
    assert status_managers == {"lathe-operator"}, tokenizer["metadata"]["managedFields"]
    job = jobs_of(cluster, name, namespace)[0]["metadata"]["name"]
    job_fields = cluster.get_json("job", job, "-n", namespace, "--show-managed-fields")[
        "metadata"]["managedFields"]
    creator = next(entry for entry in job_fields if entry["operation"] == "Update"
                   and not entry.get("subresource"))
    assert creator["manager"] == "lathe-operator", job_fields


def test_autoscaler_follows_operator(cluster, namespace, lathe_operator):
    """A deleted Triton HorizontalPodAutoscaler is created again, and an edit of it is undone."""
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
    model = "pubmed-ner"
    triton = f"{model}-triton"
    on = {"spec": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}}}
    cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace, "--type=merge",
                    "-p", json.dumps(on))

    def autoscaler_uid() -> str:
        return cluster.kubectl("get", "hpa", triton, "-n", namespace, "-o",
                               "jsonpath={.metadata.uid}", check=False).stdout

    cluster.wait_for(lambda: autoscaler_uid() != "", "the HPA to be created", timeout=300)
    uid = autoscaler_uid()
    cluster.kubectl("delete", "hpa", triton, "-n", namespace)
    cluster.wait_for(lambda: autoscaler_uid() not in ("", uid), "the HPA to be created again",
                     timeout=60)

    cluster.kubectl("patch", "hpa", triton, "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"maxReplicas": 10}}')
    cluster.wait_for(
        lambda: cluster.get_json("hpa", triton, "-n", namespace)["spec"]["maxReplicas"] == 3,
        "the operator to undo the edit of maxReplicas", timeout=60,
    )

    def cpu_target() -> int:
        metric = cluster.get_json("hpa", triton, "-n", namespace)["spec"]["metrics"][0]
        return metric["resource"]["target"]["averageUtilization"]

    target = cpu_target()
    edited = cluster.get_json("hpa", triton, "-n", namespace)["spec"]["metrics"]
    edited[0]["resource"]["target"]["averageUtilization"] = target + 20
    cluster.kubectl("patch", "hpa", triton, "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"metrics": edited}}))
    cluster.wait_for(lambda: cpu_target() == target, "the operator to undo the edit of the "
                     "CPU target", timeout=60)


def test_autoscaling_keeps_live_replicas(cluster, namespace):
    """Turning autoscaling on keeps the Triton Deployment's replica count, which an apply
    without spec.replicas would reset to 1 before the HPA exists. Turning it off applies
    spec.serving.replicas again, and a Deployment created with autoscaling on starts at
    minReplicas."""
    from kubernetes import config

    import loopback_only

    loopback_only.install()
    model = "autoscaled"
    triton = f"{model}-triton"
    document = {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": model},
        "spec": {"model": {"fineTuneRef": {"name": "missing-on-purpose"}},
                 "export": {"heldOutData": "ner/test.conll"}, "serving": {"replicas": 4}},
    }
    cluster.apply(document, namespace)
    body = get(cluster, "ModelDeployment", model, namespace)
    settings = OperatorSettings.from_env({
        "LATHE_ARTIFACT_ROOT": "file:///artifacts", "LATHE_SYNC_IMAGE": "lathe-trainer:test",
        "LATHE_TRITON_IMAGE": "triton:test",
    })
    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    reconciler = reconcile.Reconciler(settings, reconcile.Clients(api_client))
    export = {"uri": f"file:///artifacts/{namespace}/{model}/run-1/repository",
              "digest": "sha256:" + "0" * 64}

    def serve(autoscaling: dict) -> None:
        body["spec"]["autoscaling"] = autoscaling
        reconciler._serve(reconcile.parse(body), body,
                          {"artifact": export, "conditions": []})

    def replicas() -> int:
        return cluster.get_json("deployment", triton, "-n", namespace)["spec"]["replicas"]

    def applies_replicas(manager: str) -> bool:
        entries = cluster.get_json("deployment", triton, "-n", namespace,
                                   "--show-managed-fields")["metadata"]["managedFields"]
        return any(entry["manager"] == manager
                   and entry["operation"] == "Apply"
                   and "f:replicas" in entry.get("fieldsV1", {}).get("f:spec", {})
                   for entry in entries)

    def operator_applies_replicas() -> bool:
        return applies_replicas(reconcile.FIELD_MANAGER)

    serve({"enabled": False})
    assert replicas() == 4
    assert operator_applies_replicas()

    on = {"enabled": True, "minReplicas": 1, "maxReplicas": 8}
    serve(on)
    assert replicas() == 4
    assert not operator_applies_replicas()
    assert cluster.get_json("hpa", triton, "-n", namespace)["spec"]["maxReplicas"] == 8

    # A scale by the HPA (here kubectl, through the same scale subresource) is kept.
    cluster.kubectl("scale", "deployment", triton, "-n", namespace, "--replicas=6")
    serve(on)
    assert replicas() == 6

    serve({"enabled": False})
    assert replicas() == 4
    assert operator_applies_replicas()
    hpas = cluster.get_json("hpa", "-n", namespace)["items"]
    assert hpas == []

    # A Deployment created with autoscaling on starts at minReplicas, not at 1. The HPA
    # controller scales a new HPA's target at once, so the replicas alone do not show who set
    # them: the operator sets them before it creates the HPA.
    cluster.kubectl("delete", "deployment", triton, "-n", namespace, "--wait=true")
    serve({"enabled": True, "minReplicas": 3, "maxReplicas": 8})
    assert replicas() == 3
    assert applies_replicas(reconcile.HANDOVER_FIELD_MANAGER)
    assert not operator_applies_replicas()


def test_pod_monitor_with_real_crd(cluster, namespace, lathe_operator, pod_monitor_crd,
                                   monkeypatch, caplog):
    """With the Prometheus Operator's real PodMonitor CRD installed after the operator started,
    the operator creates a PodMonitor that the CRD's schema keeps whole and that selects the
    Triton pods by their metrics port. Once the CRD is deleted, a reconcile that still expects
    it skips the PodMonitor and goes on."""
    # The operator trusts a read of the CRD for a minute, and a ModelDeployment that is Ready
    # by then is not reconciled again, so every reconcile here reads the CRD.
    monkeypatch.setattr(reconcile, "POD_MONITOR_CRD_CACHE_SECONDS", 0.0)
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
    model = "pubmed-ner"
    triton = f"{model}-triton"

    def monitor_uid() -> str:
        return cluster.kubectl("get", "podmonitors.monitoring.coreos.com", triton, "-n",
                               namespace, "-o", "jsonpath={.metadata.uid}", check=False).stdout

    cluster.wait_for(lambda: monitor_uid() != "", "the PodMonitor to be created", timeout=300)
    monitor = cluster.get_json("podmonitors.monitoring.coreos.com", triton, "-n", namespace)
    deployment = cluster.get_json("deployment", triton, "-n", namespace)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items(), (selector, pod_labels)
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(endpoint["port"], endpoint["path"]) for endpoint in endpoints] == [
        ("metrics", "/metrics")], endpoints
    port_names = {port["name"] for container in deployment["spec"]["template"]["spec"][
        "containers"] for port in container.get("ports", [])}
    assert "metrics" in port_names, port_names
    owners = monitor["metadata"]["ownerReferences"]
    assert [(owner["kind"], owner["name"]) for owner in owners] == [("ModelDeployment", model)]

    def serve_on(port: int) -> None:
        change = {"spec": {"serving": {"httpPort": port}}}
        cluster.kubectl("patch", plural("ModelDeployment"), model, "-n", namespace,
                        "--type=merge", "-p", json.dumps(change))
        # The endpoint is set after the PodMonitor step, so the reconcile got past it.
        cluster.wait_for(
            lambda: get(cluster, "ModelDeployment", model, namespace)["status"].get(
                "endpoint", "").endswith(f":{port}"),
            f"status.endpoint to take port {port}", timeout=60,
        )

    # The operator now goes on trusting its last read, which found the CRD, so the next
    # reconcile applies the PodMonitor, fails with 404 and skips it. That may be a reconcile of
    # a ModelDeployment of an earlier test that is still being deleted.
    monkeypatch.setattr(reconcile, "POD_MONITOR_CRD_CACHE_SECONDS", 3600.0)
    with caplog.at_level(logging.INFO, logger="lathe"):
        cluster.kubectl("delete", "crd", "podmonitors.monitoring.coreos.com", "--wait=true",
                        timeout=120)
        serve_on(8080)
    assert "Skipped the PodMonitor" in caplog.text
    # With the cached read expired, the next reconcile reads the CRD again and finds none.
    monkeypatch.setattr(reconcile, "POD_MONITOR_CRD_CACHE_SECONDS", 0.0)
    serve_on(8081)
    assert is_true(cluster, "ModelDeployment", model, namespace, "Exported")


def test_service_edit_undone(cluster, namespace, lathe_operator):
    """A hand edit of the Triton Service's ports is undone, as one of its Deployment's replicas
    is, so that clients keep reaching Triton on the ports of spec.serving."""
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
    service = "pubmed-ner-triton"

    def http_port() -> int | None:
        found = cluster.kubectl("get", "service", service, "-n", namespace, "-o",
                                "jsonpath={.spec.ports[?(@.name=='http')].port}", check=False)
        return int(found.stdout) if found.stdout.strip() else None

    cluster.wait_for(lambda: http_port() == 8000, "the Triton Service", timeout=300)
    ports = cluster.get_json("service", service, "-n", namespace)["spec"]["ports"]
    edited = [{**port, "port": 9000} if port["name"] == "http" else port for port in ports]
    cluster.kubectl("patch", "service", service, "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"ports": edited}}))
    cluster.wait_for(lambda: http_port() == 8000, "the operator to undo the edit of the port",
                     timeout=60)
    managers = [entry["manager"] for entry in cluster.get_json(
        "service", service, "-n", namespace, "--show-managed-fields")["metadata"]["managedFields"]]
    assert "lathe-operator-repair" not in managers, managers

    # The operator alone owns its ports again, so a port it stops applying goes.
    cluster.kubectl("patch", plural("ModelDeployment"), "pubmed-ner", "-n", namespace,
                    "--type=merge", "-p", '{"spec": {"serving": {"httpPort": 8080}}}')

    def ports() -> list[int]:
        spec = cluster.get_json("service", service, "-n", namespace)["spec"]
        return sorted(port["port"] for port in spec["ports"])

    cluster.wait_for(lambda: 8080 in ports(), "the new HTTP port", timeout=60)
    assert 8000 not in ports(), ports()


def test_one_node_failure_restarts_attempt(cluster, namespace, lathe_operator, ready_inputs):
    """C6: node 1 exits 1 while node 0 runs; the attempt is torn down and retried."""
    cluster.apply(pretrain_job("c6"), namespace)

    def two_running() -> bool:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "lathe.dev/name=c6")["items"]
        return sum(p["status"].get("phase") == "Running" for p in pods) == 2

    cluster.wait_for(two_running, "two running pods", timeout=90)
    first = jobs_of(cluster, "c6", namespace)[0]["metadata"]
    first_job, first_uid = first["name"], first["uid"]
    before_failure = get(cluster, "PretrainJob", "c6", namespace)
    pods = cluster.get_json("pods", "-n", namespace, "-l", f"job-name={first_job}")["items"]
    node1 = next(p for p in pods if p["metadata"]["annotations"][
        "batch.kubernetes.io/job-completion-index"] == "1")
    # Act as the kubelet of node 1: its container exited with code 1.
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    container = node1["spec"]["containers"][0]["name"]
    patch = {"status": {"phase": "Failed", "containerStatuses": [{
        "name": container, "image": node1["spec"]["containers"][0]["image"], "ready": False,
        "restartCount": 0, "imageID": "", "containerID": "kwok://failed",
        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "NCCL timeout",
                                 "startedAt": now, "finishedAt": now}},
    }]}}
    cluster.kubectl("patch", "pod", node1["metadata"]["name"], "-n", namespace,
                    "--subresource=status", "--type=merge", "-p", json.dumps(patch))

    def restarted() -> bool:
        status = get(cluster, "PretrainJob", "c6", namespace).get("status") or {}
        return status.get("restartCount") == 1

    cluster.wait_for(restarted, "the operator to start attempt 1", timeout=60)
    status = get(cluster, "PretrainJob", "c6", namespace)["status"]
    failed = status["failedAttempts"][0]
    assert failed["attempt"] == 0
    assert failed["exitCode"] == 1
    assert "NCCL timeout" in failed["message"]

    # Replay a late reconcile that reads the status from before the restart, through the
    # operator's own handler code. It must not create attempt 0's Job again.
    handlers._reconcile_stored(
        handlers.reconciler().api.custom, before_failure, logging.getLogger(__name__)
    )
    assert get(cluster, "PretrainJob", "c6", namespace)["status"]["restartCount"] == 1
    attempt_zero = [job for job in jobs_of(cluster, "c6", namespace)
                    if job["metadata"]["name"] == first_job]  # fmt: skip
    assert all(job["metadata"]["uid"] == first_uid for job in attempt_zero), attempt_zero

    # The failed attempt's pods are gone within seconds, so no pod keeps its GPUs.
    def attempt_released() -> bool:
        pods = cluster.get_json("pods", "-n", namespace, "-l", f"job-name={first_job}")["items"]
        return not any(p["status"].get("phase") in ("Pending", "Running")
                       and not p["metadata"].get("deletionTimestamp") for p in pods)

    cluster.wait_for(attempt_released, "the failed attempt's pods to stop", timeout=60)

    def live_attempts() -> list[str]:
        return [job["metadata"]["labels"]["lathe.dev/attempt"]
                for job in jobs_of(cluster, "c6", namespace)
                if not job["metadata"].get("deletionTimestamp")]

    # The operator deletes the failed attempt's Job; the garbage collector finishes it later.
    cluster.wait_for(lambda: live_attempts() == ["1"], "only attempt 1's Job", timeout=60)
    jobs = [job for job in jobs_of(cluster, "c6", namespace)
            if job["metadata"]["labels"]["lathe.dev/attempt"] == "1"]
    container = jobs[0]["spec"]["template"]["spec"]["containers"][0]
    assert "--resume" in " ".join(container.get("args", []) + container.get("command", []))
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["RDZV_ID"].endswith("-1")


def test_rejected_pod_records_its_reason(cluster, namespace, lathe_operator, ready_inputs):
    """A pod that the kubelet rejects before its container runs fails the attempt with the
    pod's own reason and message, and no exit code."""
    cluster.apply(pretrain_job("rejected", nodes=1), namespace)

    def running_pod() -> dict | None:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "lathe.dev/name=rejected")["items"]
        return next((p for p in pods if p["status"].get("phase") == "Running"), None)

    cluster.wait_for(lambda: running_pod() is not None, "a running pod", timeout=90)
    pod = running_pod()
    # Act as a kubelet whose admission rejects the pod: phase Failed with the pod's reason
    # and message, and no container status, because no container ran.
    rejection = ("Pod was rejected: Node didn't have enough resource: cpu, requested: 4000, "
                 "used: 7000, capacity: 8000")
    patch = {"status": {"phase": "Failed", "reason": "OutOfcpu", "message": rejection,
                        "containerStatuses": None}}
    cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace,
                    "--subresource=status", "--type=merge", "-p", json.dumps(patch))

    def restarted() -> bool:
        status = get(cluster, "PretrainJob", "rejected", namespace).get("status") or {}
        return status.get("restartCount") == 1

    cluster.wait_for(restarted, "the operator to start attempt 1", timeout=60)
    resource = get(cluster, "PretrainJob", "rejected", namespace)
    failed = resource["status"]["failedAttempts"][0]
    assert failed["attempt"] == 0
    assert failed.get("exitCode") is None
    assert failed["reason"] == "OutOfcpu"
    assert rejection in failed["message"]

    # Attempt 1's pod soon turns the condition to JobRunning, so its Event is read instead.
    def restart_events() -> list[str]:
        return [event["message"] for event in
                events_about(cluster, namespace, "PretrainJob", "rejected")
                if event["reason"] == "AttemptRestarted"]  # fmt: skip

    cluster.wait_for(lambda: restart_events() != [], "the AttemptRestarted Event")
    message = restart_events()[0]
    assert "Attempt 0 failed without an exit code (OutOfcpu)" in message
    assert "None" not in message


def test_suspend_and_resume(cluster, namespace, lathe_operator, ready_inputs):
    cluster.apply(pretrain_job("pause"), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "pause", namespace)) == 1, "the Job")
    cluster.kubectl("patch", plural("PretrainJob"), "pause", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"suspend": true}}')
    cluster.wait_for(
        lambda: is_true(cluster, "PretrainJob", "pause", namespace, "Suspended"),
        "Suspended=True",
    )
    assert jobs_of(cluster, "pause", namespace)[0]["spec"]["suspend"] is True
    suspended = get(cluster, "PretrainJob", "pause", namespace)
    assert suspended["status"]["phase"] == "Suspended"
    running = condition(suspended, "Running")
    assert running["status"] == "False", running
    assert "spec.suspend is true" in running["message"], running
    cluster.wait_for(
        lambda: not cluster.get_json("pods", "-n", namespace, "-l", "lathe.dev/name=pause")[
            "items"],
        "the suspended Job's pods to be deleted", timeout=60,
    )

    cluster.kubectl("patch", plural("PretrainJob"), "pause", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"suspend": false}}')

    def resumed() -> bool:
        found = condition(get(cluster, "PretrainJob", "pause", namespace), "Suspended")
        return bool(found and found["status"] == "False" and found["reason"] == "Resumed")

    cluster.wait_for(resumed, "Suspended=False with reason Resumed")
    assert jobs_of(cluster, "pause", namespace)[0]["spec"]["suspend"] is False


def test_suspend_stop_not_a_failure(cluster, namespace, lathe_operator,
                                                ready_inputs):
    """A suspended Job's pods exit 143 on SIGTERM, and the Job controller fails the Job by the
    pod failure policy's catch-all rule. Resuming starts the next attempt without counting it."""
    cluster.apply(pretrain_job("stopped"), namespace)

    def running_pods() -> list[dict]:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "lathe.dev/name=stopped")["items"]
        return [p for p in pods if p["status"].get("phase") == "Running"]

    cluster.wait_for(lambda: len(running_pods()) == 2, "two running pods", timeout=90)
    first_job = jobs_of(cluster, "stopped", namespace)[0]["metadata"]["name"]
    # A finalizer of the test's own keeps each pod after its deletion, as a kubelet does while
    # the container handles SIGTERM, so that the test can write the exit code it then reports.
    hold = json.dumps([{"op": "add", "path": "/metadata/finalizers/-", "value": HOLD_POD}])
    for pod in running_pods():
        cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace,
                        "--type=json", "-p", hold)
    cluster.kubectl("patch", plural("PretrainJob"), "stopped", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"suspend": true}}')

    def deleted_pods() -> list[dict]:
        pods = cluster.get_json("pods", "-n", namespace, "-l", f"job-name={first_job}")["items"]
        return [p for p in pods if p["metadata"].get("deletionTimestamp")]

    def job_condition(type_: str) -> bool:
        job = cluster.get_json("job", first_job, "-n", namespace)
        return any(c["type"] == type_ and c["status"] == "True"
                   for c in job["status"].get("conditions") or [])

    cluster.wait_for(lambda: len(deleted_pods()) == 2, "the suspension to delete both pods")
    try:
        for pod in deleted_pods():
            fail_pod(cluster, namespace, pod, 143, "")
        # Kubernetes' own behaviour, which the operator must handle: the FailJob rule applies
        # to the pods that the suspension stopped.
        cluster.wait_for(lambda: job_condition("FailureTarget"),
                         "the Job controller to fail the suspended Job by its pod failure policy")
    finally:
        for pod in deleted_pods():
            kept = [f for f in pod["metadata"]["finalizers"] if f != HOLD_POD]
            cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace,
                            "--type=merge", "-p", json.dumps({"metadata": {"finalizers": kept}}))
    assert is_true(cluster, "PretrainJob", "stopped", namespace, "Suspended")

    cluster.kubectl("patch", plural("PretrainJob"), "stopped", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"suspend": false}}')
    cluster.wait_for(
        lambda: get(cluster, "PretrainJob", "stopped", namespace)["status"].get("jobName")
        == "stopped-pretrain-r1-1", "the Job of attempt 1",
    )
    status = get(cluster, "PretrainJob", "stopped", namespace)["status"]
    assert status.get("failedAttempts", []) == []
    assert status.get("restartCount", 0) == 0
    assert "Failed" not in {c["type"] for c in status["conditions"] if c["status"] == "True"}
    resumed = condition(get(cluster, "PretrainJob", "stopped", namespace), "Suspended")
    assert (resumed["status"], resumed["reason"]) == ("False", "Resumed")
    cluster.wait_for(
        lambda: any("stopped while it was suspended" in event.get("message", "")
                    for event in events_about(cluster, namespace, "PretrainJob", "stopped")),
        "the Event that says why attempt 1 started",
    )


def test_suspended_new_run_names_no_job(cluster, namespace, lathe_operator, ready_inputs):
    """A new run that starts suspended deletes the previous run's Job and names no Job until it
    is resumed."""
    cluster.apply(pretrain_job("paused-change"), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "paused-change", namespace)) == 1, "the Job")
    first_job = jobs_of(cluster, "paused-change", namespace)[0]["metadata"]["name"]
    change = {"spec": {"suspend": True, "training": {"maxSteps": 200}}}
    cluster.kubectl("patch", plural("PretrainJob"), "paused-change", "-n", namespace,
                    "--type=merge", "-p", json.dumps(change))

    def observed() -> bool:
        obj = get(cluster, "PretrainJob", "paused-change", namespace)
        return (obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
                and is_true(cluster, "PretrainJob", "paused-change", namespace, "Suspended"))

    cluster.wait_for(observed, "the suspended new run")
    cluster.wait_for(
        lambda: not [job for job in jobs_of(cluster, "paused-change", namespace)
                     if not job["metadata"].get("deletionTimestamp")],
        f"the first run's Job {first_job} to be deleted", timeout=60,
    )
    suspended = get(cluster, "PretrainJob", "paused-change", namespace)
    assert suspended["status"]["run"] == 2
    assert "jobName" not in suspended["status"], suspended["status"]

    cluster.kubectl("patch", plural("PretrainJob"), "paused-change", "-n", namespace,
                    "--type=merge", "-p", '{"spec": {"suspend": false}}')
    cluster.wait_for(
        lambda: get(cluster, "PretrainJob", "paused-change", namespace)["status"].get(
            "jobName") == "paused-change-pretrain-r2-0",
        "the second run's Job in status.jobName",
    )
    assert [job["metadata"]["name"] for job in jobs_of(cluster, "paused-change", namespace)] == [
        "paused-change-pretrain-r2-0"]
    # Resuming ends the suspension (tests/unit/test_reconcile_runs.py checks the first status
    # write after it).
    resumed = get(cluster, "PretrainJob", "paused-change", namespace)
    assert resumed["status"]["phase"] != "Suspended", resumed["status"]
    suspended_condition = condition(resumed, "Suspended")
    assert (suspended_condition["status"], suspended_condition["reason"]) == ("False", "Resumed")


def test_spec_change_moves_observed_generation(cluster, namespace, lathe_operator, ready_inputs):
    cluster.apply(pretrain_job("regen"), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "regen", namespace)) == 1, "the Job")
    first_output = get(cluster, "PretrainJob", "regen", namespace)["status"]["outputUri"]
    assert RUN_FOLDER.search(first_output), first_output
    cluster.kubectl("patch", plural("PretrainJob"), "regen", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"training": {"maxSteps": 200}}}')

    def observed() -> bool:
        obj = get(cluster, "PretrainJob", "regen", namespace)
        return obj["metadata"]["generation"] == 2 and obj["status"]["observedGeneration"] == 2

    cluster.wait_for(observed, "observedGeneration 2")
    cluster.wait_for(
        lambda: [j["metadata"]["name"] for j in jobs_of(cluster, "regen", namespace)
                 if not j["metadata"].get("deletionTimestamp")] and all(
            "-r2-" in j["metadata"]["name"] for j in jobs_of(cluster, "regen", namespace)),
        "only the second run's Job to remain", timeout=60,
    )
    running = condition(get(cluster, "PretrainJob", "regen", namespace), "Running")
    assert running["observedGeneration"] == 2
    # A change of training settings only continues from the checkpoints in the same folder.
    assert get(cluster, "PretrainJob", "regen", namespace)["status"]["outputUri"] == first_output


def test_rerun_input_starts_new_run_downstream(cluster, namespace, lathe_operator):
    """A Corpus that runs again with a new output makes its finished Tokenizer run again. The
    new run keeps the generation but gets a new Job name, and the status records its input."""
    for document in corpus_and_tokenizer("rerun-input"):
        cluster.apply(document, namespace)
    # A PretrainJob that reads both, so that it must wait for the Tokenizer to run again on the
    # new Corpus output instead of starting on the new Corpus and the old Tokenizer.
    job = pretrain_job("rerun-input", nodes=1, hold=False)
    job["spec"]["corpusRef"]["name"] = job["spec"]["tokenizerRef"]["name"] = "rerun-input"
    cluster.apply(job, namespace)

    def tokenizer_read(digest: str) -> bool:
        obj = get(cluster, "Tokenizer", "rerun-input", namespace)
        return (is_true(cluster, "Tokenizer", "rerun-input", namespace, "Succeeded")
                and obj["status"].get("inputDigests") == {"corpus": digest})

    def corpus_digest() -> str | None:
        # One read for every check: a second read could see a newer status than `obj`.
        obj = get(cluster, "Corpus", "rerun-input", namespace)
        succeeded = (condition(obj, "Succeeded") or {}).get("status") == "True"
        done = succeeded and (
            obj["status"].get("observedGeneration") == obj["metadata"]["generation"])
        return obj["status"]["artifact"]["digest"] if done else None

    cluster.wait_for(lambda: corpus_digest() is not None, "the Corpus to succeed", timeout=120)
    first = corpus_digest()
    first_uri = get(cluster, "Corpus", "rerun-input", namespace)["status"]["artifact"]["uri"]
    assert RUN_FOLDER.search(first_uri), first_uri
    cluster.wait_for(lambda: tokenizer_read(first), "the Tokenizer to succeed on the Corpus",
                     timeout=120)
    tokenizer = get(cluster, "Tokenizer", "rerun-input", namespace)
    assert tokenizer["status"]["jobName"] == "rerun-input-tokenizer-r1-0"
    cluster.wait_for(
        lambda: is_true(cluster, "PretrainJob", "rerun-input", namespace, "Succeeded"),
        "the PretrainJob to succeed on the first Corpus and Tokenizer", timeout=120,
    )

    cluster.kubectl("patch", plural("Corpus"), "rerun-input", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"dedup": {"near": {"threshold": 0.85}}}}')
    cluster.wait_for(lambda: corpus_digest() not in (None, first),
                     "the changed Corpus to succeed with a new digest", timeout=120)
    second = corpus_digest()
    cluster.wait_for(lambda: tokenizer_read(second),
                     "the Tokenizer to run again on the new Corpus output", timeout=120)

    tokenizer = get(cluster, "Tokenizer", "rerun-input", namespace)
    assert tokenizer["metadata"]["generation"] == 1
    assert tokenizer["status"]["jobName"] == "rerun-input-tokenizer-r2-0"
    assert tokenizer["status"]["run"] == 2
    config_map = cluster.get_json("configmap", "rerun-input-tokenizer-r2-0", "-n", namespace)
    config = json.loads(config_map["data"]["config.json"])
    assert config["inputs"]["corpus"]["digest"] == second
    # The new Corpus run wrote a folder of its own, so the first run's output stayed intact
    # for the stages still reading it, and the Tokenizer read the new folder.
    second_uri = get(cluster, "Corpus", "rerun-input", namespace)["status"]["artifact"]["uri"]
    assert RUN_FOLDER.search(second_uri), second_uri
    assert second_uri != first_uri
    assert second_uri.rsplit("/", 1)[0] == first_uri.rsplit("/", 1)[0]
    assert config["inputs"]["corpus"]["uri"] == second_uri
    # The first run's Job is deleted once the new run starts.
    cluster.wait_for(
        lambda: [j["metadata"]["name"] for j in jobs_of(cluster, "rerun-input", namespace)
                 if j["metadata"]["labels"]["lathe.dev/kind"] == "Tokenizer"
                 and not j["metadata"].get("deletionTimestamp")]
        == ["rerun-input-tokenizer-r2-0"],
        "only the second run's Tokenizer Job to remain", timeout=60,
    )

    # Every run of the PretrainJob read a Tokenizer trained on the Corpus output it read.
    second_tokenizer = get(cluster, "Tokenizer", "rerun-input", namespace)["status"]["artifact"]
    cluster.wait_for(
        lambda: is_true(cluster, "PretrainJob", "rerun-input", namespace, "Succeeded")
        and get(cluster, "PretrainJob", "rerun-input", namespace)["status"]
        .get("inputDigests", {}).get("tokenizer") == second_tokenizer["digest"],
        "the PretrainJob to succeed on the new Corpus and Tokenizer", timeout=120,
    )
    # One new run, not one on the new Corpus with the old Tokenizer and another after it.
    job = get(cluster, "PretrainJob", "rerun-input", namespace)
    assert job["status"]["run"] == 2
    config_map = cluster.get_json("configmap", "rerun-input-pretrain-r2-0", "-n", namespace)
    inputs = json.loads(config_map["data"]["config.json"])["inputs"]
    assert inputs["corpus"]["digest"] == second
    assert inputs["tokenizer"]["digest"] == second_tokenizer["digest"]
    # The first run's ConfigMaps went with its Jobs.
    cluster.wait_for(
        lambda: sorted(item["metadata"]["name"] for item in cluster.get_json(
            "configmaps", "-n", namespace, "-l", "lathe.dev/name=rerun-input")["items"])
        == ["rerun-input-corpus-r2-0", "rerun-input-pretrain-r2-0", "rerun-input-tokenizer-r2-0"],
        "only the second runs' ConfigMaps to remain", timeout=60,
    )


def test_deleted_input_shown_downstream(cluster, namespace, lathe_operator, monkeypatch):
    """Deleting a Corpus turns its finished Tokenizer's InputsReady False at once, without a
    resync, and the Tokenizer keeps its output and Succeeded."""
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 3600.0)
    for document in corpus_and_tokenizer("gone-input"):
        cluster.apply(document, namespace)
    cluster.wait_for(lambda: is_true(cluster, "Tokenizer", "gone-input", namespace, "Succeeded"),
                     "the Tokenizer to succeed", timeout=120)
    cluster.kubectl("delete", plural("Corpus"), "gone-input", "-n", namespace, timeout=90)

    def waiting() -> bool:
        inputs = condition(get(cluster, "Tokenizer", "gone-input", namespace), "InputsReady")
        return bool(inputs) and inputs["status"] == "False"

    cluster.wait_for(waiting, "InputsReady=False on the Tokenizer", timeout=60)
    tokenizer = get(cluster, "Tokenizer", "gone-input", namespace)
    inputs = condition(tokenizer, "InputsReady")
    assert inputs["reason"] == "InputNotFound", inputs
    assert "Corpus 'gone-input'" in inputs["message"], inputs
    assert condition(tokenizer, "Succeeded")["status"] == "True"
    assert tokenizer["status"]["artifact"]["digest"]


def test_run_continues_without_input(cluster, namespace, lathe_operator, ready_inputs):
    """A PretrainJob whose Tokenizer is deleted mid-run goes on with the inputs it read: the
    operator follows its Job to Succeeded while InputsReady is False."""
    cluster.apply(pretrain_job("orphaned"), namespace)

    def running_pods() -> list[dict]:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "lathe.dev/name=orphaned")["items"]
        return [p for p in pods if p["status"].get("phase") == "Running"]

    cluster.wait_for(lambda: len(running_pods()) == 2, "two running pods", timeout=90)
    cluster.kubectl("delete", plural("Tokenizer"), "missing-on-purpose", "-n", namespace,
                    timeout=90)

    def waiting() -> bool:
        inputs = condition(get(cluster, "PretrainJob", "orphaned", namespace), "InputsReady")
        return bool(inputs) and inputs["status"] == "False"

    cluster.wait_for(waiting, "InputsReady=False on the PretrainJob", timeout=60)
    assert get(cluster, "PretrainJob", "orphaned", namespace)["status"]["phase"] == "Running"
    # Act as the kubelet of both nodes: training finished.
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for pod in running_pods():
        container = pod["spec"]["containers"][0]
        patch = {"status": {"phase": "Succeeded", "containerStatuses": [{
            "name": container["name"], "image": container["image"], "ready": False,
            "restartCount": 0, "imageID": "", "containerID": "kwok://done",
            "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                     "startedAt": now, "finishedAt": now}},
        }]}}
        cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace,
                        "--subresource=status", "--type=merge", "-p", json.dumps(patch))

    cluster.wait_for(lambda: is_true(cluster, "PretrainJob", "orphaned", namespace, "Succeeded"),
                     "the PretrainJob to succeed without its Tokenizer", timeout=60)
    finished = get(cluster, "PretrainJob", "orphaned", namespace)
    assert finished["status"]["phase"] == "Succeeded"
    assert finished["status"]["artifact"]["digest"]
    assert condition(finished, "InputsReady")["status"] == "False"
    assert set(finished["status"]["inputUris"]) == {"corpus", "tokenizer"}


def test_dropped_input_leaves_status(cluster, namespace, lathe_operator, ready_inputs):
    """A FineTune moved from a PretrainJob to a model URI runs once more and then stays done:
    the status write deletes the dropped input's digest instead of keeping it beside {}."""
    cluster.apply(pretrain_job("drop-base", hold=False), namespace)
    cluster.wait_for(lambda: is_true(cluster, "PretrainJob", "drop-base", namespace, "Succeeded"),
                     "the base PretrainJob to succeed", timeout=120)
    base = get(cluster, "PretrainJob", "drop-base", namespace)["status"]["artifact"]["digest"]
    cluster.apply(finetune("drop-input", "drop-base"), namespace)

    def finished(expected: dict) -> bool:
        obj = get(cluster, "FineTune", "drop-input", namespace)
        return (is_true(cluster, "FineTune", "drop-input", namespace, "Succeeded")
                and obj["status"].get("inputDigests") == expected)

    cluster.wait_for(lambda: finished({"baseModel": base}), "the FineTune to succeed",
                     timeout=120)
    patch = {"spec": {"baseModel": {"pretrainJobRef": None, "uri": "file:///data/base-model"}}}
    cluster.kubectl("patch", plural("FineTune"), "drop-input", "-n", namespace, "--type=merge",
                    "-p", json.dumps(patch))
    cluster.wait_for(lambda: finished({}), "the FineTune to succeed on the model URI",
                     timeout=120)
    # Let any further reconcile happen: a status that kept the old digest would start run 3.
    time.sleep(5)
    obj = get(cluster, "FineTune", "drop-input", namespace)
    assert obj["status"]["run"] == 2
    assert obj["status"]["inputDigests"] == {}
    assert [job["metadata"]["name"] for job in jobs_of(cluster, "drop-input", namespace)
            if not job["metadata"].get("deletionTimestamp")] == ["drop-input-finetune-r2-0"]


def test_delete_mid_run_removes_owned_objects(cluster, namespace, lathe_operator, ready_inputs):
    cluster.apply(pretrain_job("gone"), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "gone", namespace)) == 1, "the Job")
    cluster.kubectl("delete", plural("PretrainJob"), "gone", "-n", namespace, "--wait=true",
                    timeout=90)

    def cleaned() -> bool:
        selector = ["-n", namespace, "-l", "lathe.dev/name=gone"]
        return all(not cluster.get_json(kind, *selector)["items"]
                   for kind in ("jobs", "services", "configmaps", "pods"))

    cluster.wait_for(cleaned, "the Job, Service, ConfigMap and pods to be deleted", timeout=90)


def test_create_delete_loop_never_sticks(cluster, namespace, lathe_operator):
    """C2: a PretrainJob is created and deleted fifty times; no deletion waits on the operator."""
    manifest = json.dumps(pretrain_job("churn", nodes=1, gpus=0))
    for _ in range(50):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
        cluster.kubectl("delete", plural("PretrainJob"), "churn", "-n", namespace,
                        "--wait=false")

    def gone() -> bool:
        result = cluster.kubectl("get", plural("PretrainJob"), "churn", "-n", namespace,
                                 check=False)
        return result.returncode != 0 and "NotFound" in result.stderr

    cluster.wait_for(gone, "the last deletion to complete", timeout=120)


def test_large_spec_is_not_copied_to_annotations(cluster, namespace, lathe_operator):
    """C3: a Corpus listing 5,000 files (over 256 KiB of YAML) is reconciled once."""
    sources = [{"name": f"part-{i:05d}", "format": "jsonl",
                "path": f"pubmed/shards/2026/part-{i:05d}-of-05000.{'x' * 20}.jsonl"}
               for i in range(5000)]
    corpus = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus",
              "metadata": {"name": "huge"}, "spec": {"sources": sources}}
    text = yaml.safe_dump(corpus)
    assert len(text.encode()) > 256 * 1024
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=text)

    def settled() -> bool:
        status = get(cluster, "Corpus", "huge", namespace).get("status") or {}
        return status.get("phase") in ("Succeeded", "Failed")

    cluster.wait_for(settled, "the large Corpus to be reconciled", timeout=90)
    obj = get(cluster, "Corpus", "huge", namespace)
    annotations = obj["metadata"].get("annotations") or {}
    assert sum(len(k) + len(v) for k, v in annotations.items()) < 4096
    # No finalizer: deleting a resource never waits for the operator to be running.
    assert not obj["metadata"].get("finalizers")
    # No patch loop: once reconciled, the object stops changing. (A Job event may land one
    # more status write just after success, so allow a settling time.)
    deadline = time.monotonic() + 60
    while True:
        version = get(cluster, "Corpus", "huge", namespace)["metadata"]["resourceVersion"]
        time.sleep(5)
        if get(cluster, "Corpus", "huge", namespace)["metadata"]["resourceVersion"] == version:
            break
        assert time.monotonic() < deadline, "the large Corpus kept changing for 60 s"

def test_reapplied_export_is_handled_as_new(cluster, namespace, lathe_operator, ready_inputs,
                                             tmp_path):
    """C4: an object exported with `kubectl get -o yaml`, deleted and re-created is new."""
    cluster.apply(pretrain_job("again"), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "again", namespace)) == 1, "the Job")
    exported = cluster.kubectl("get", plural("PretrainJob"), "again", "-n", namespace,
                               "-o", "yaml").stdout
    old_uid = yaml.safe_load(exported)["metadata"]["uid"]
    cluster.kubectl("delete", plural("PretrainJob"), "again", "-n", namespace, timeout=90)
    path = tmp_path / "again.yaml"
    path.write_text(exported)
    # kubectl refuses to create an object that still carries a resourceVersion, as users find;
    # `kubectl create --save-config` with the file minus that field is what they then run.
    document = yaml.safe_load(exported)
    document["metadata"].pop("resourceVersion", None)
    path.write_text(yaml.safe_dump(document))
    cluster.kubectl("create", "-n", namespace, "-f", str(path))
    new_uid = get(cluster, "PretrainJob", "again", namespace)["metadata"]["uid"]
    assert new_uid != old_uid

    def owned_by_new() -> bool:
        jobs = [job for job in jobs_of(cluster, "again", namespace)
                if not job["metadata"].get("deletionTimestamp")]
        return bool(jobs) and all(
            job["metadata"]["ownerReferences"][0]["uid"] == new_uid for job in jobs)

    cluster.wait_for(owned_by_new, "a Job owned by the re-created object", timeout=90)


def test_reapplying_examples_shows_no_drift(cluster, namespace, lathe_operator):
    """C4: applying the committed example files twice shows no difference."""
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(EXAMPLES))
    cluster.wait_for(
        lambda: (get(cluster, "Tokenizer", "pubmed", namespace).get("status") or {}).get("phase")
        is not None,
        "the operator to reconcile the examples",
    )
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(EXAMPLES))
    diff = cluster.kubectl("diff", "--server-side", "-n", namespace, "-f", str(EXAMPLES),
                           check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr



def reconciles(metrics_url: str, kind: str) -> float:
    """The operator's reconcile count for one kind, over all results."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "lathe_reconciles_total" and sample.labels.get("kind") == kind)


def test_rejected_reconcile_is_retried(cluster, namespace, lathe_operator, ready_inputs,
                                      monkeypatch):  # fmt: skip
    """A reconcile whose Job the API server rejects (a ResourceQuota) posts a Warning Event and
    is retried without any new event on the resource, so it proceeds once the quota is gone."""
    # With resyncs out of the way, only the retry can create the Job after the quota goes.
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 3600.0)
    cluster.apply({
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs"},
        "spec": {"hard": {"count/jobs.batch": "0"}},
    }, namespace)
    cluster.wait_for(
        lambda: bool((cluster.get_json("resourcequota", "no-jobs", "-n", namespace)
                      .get("status") or {}).get("hard")),
        "the quota controller to compute the quota's usage",
    )  # fmt: skip
    cluster.apply(pretrain_job("refused", nodes=1), namespace)

    def warnings() -> list[dict]:
        return [event for event in events_about(cluster, namespace, "PretrainJob", "refused")
                if event["reason"] == "ReconcileFailed"]  # fmt: skip

    cluster.wait_for(lambda: bool(warnings()), "a ReconcileFailed Event")
    warning = warnings()[0]
    assert warning["type"] == "Warning"
    assert "HTTP 403" in warning["message"], warning
    assert "exceeded quota" in warning["message"], warning
    assert jobs_of(cluster, "refused", namespace) == []
    # The status shows the failure too, so `kubectl get` has a phase and a reason.
    cluster.wait_for(lambda: condition(get(cluster, "PretrainJob", "refused", namespace),
                                       "Succeeded") is not None,
                     "the failed reconcile in the status")  # fmt: skip
    job = get(cluster, "PretrainJob", "refused", namespace)
    summary = condition(job, "Succeeded")
    assert job["status"]["phase"] == "Pending", job["status"]
    assert summary["status"] == "Unknown", summary
    assert summary["reason"] == "ReconcileFailed", summary
    assert "exceeded quota" in summary["message"], summary
    assert "retries with backoff" in summary["message"], summary
    health = run_health("PretrainJob", job)
    assert health["status"] == "Progressing", health
    assert "exceeded quota" in health["message"], health
    cluster.kubectl("delete", "resourcequota", "no-jobs", "-n", namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "refused", namespace)) == 1,
                     "the retried reconcile to create the Job", timeout=90)  # fmt: skip
    cluster.wait_for(lambda: is_true(cluster, "PretrainJob", "refused", namespace, "Running"),
                     "Running=True on the PretrainJob")  # fmt: skip
    assert condition(get(cluster, "PretrainJob", "refused", namespace), "Succeeded") is None
    # Retries that failed with the same error posted no further Events.
    assert len(warnings()) == 1, warnings()


def test_resync_posts_events(cluster, namespace, lathe_operator, ready_inputs, monkeypatch):
    """A transition found by the periodic resync, not by an event, also posts its Event."""
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 2.0)
    cluster.apply(finetune("late", base="slow"), namespace)
    cluster.wait_for(
        lambda: (condition(get(cluster, "FineTune", "late", namespace), "InputsReady")
                 or {}).get("reason") == "InputNotFound",
        "InputsReady=False (InputNotFound) on the FineTune",
    )  # fmt: skip
    # The base model now exists but never finishes, so no wake-up reaches the FineTune. Only
    # the resync finds that the reason changed.
    cluster.apply(pretrain_job("slow", nodes=1), namespace)
    cluster.wait_for(
        lambda: (condition(get(cluster, "FineTune", "late", namespace), "InputsReady")
                 or {}).get("reason") == "InputNotReady",
        "the resync to set InputNotReady on the FineTune",
    )  # fmt: skip
    cluster.wait_for(
        lambda: any(event["reason"] == "InputNotReady"
                    for event in events_about(cluster, namespace, "FineTune", "late")),
        "an InputNotReady Event about the FineTune",
    )  # fmt: skip


def test_own_status_write_is_not_reconciled_again(cluster, namespace, lathe_operator,
                                                  monkeypatch):  # fmt: skip
    """The watch event that brings back the operator's own status write starts no reconcile."""
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 3600.0)
    before = reconciles(lathe_operator.metrics_url, "FineTune")
    cluster.apply(finetune("echo", base="absent"), namespace)
    cluster.wait_for(lambda: (get(cluster, "FineTune", "echo", namespace).get("status") or {})
                     .get("phase") == "Waiting", "the FineTune to wait for its base model")
    # kopf delivers the write's echo within a watch round trip; give it the time to arrive.
    time.sleep(3)
    assert reconciles(lathe_operator.metrics_url, "FineTune") - before == 1


def test_queued_job_waits_for_kueue(cluster, namespace, lathe_operator, ready_inputs,
                                    monkeypatch):  # fmt: skip
    """With a Kueue LocalQueue, the Job is created suspended, and only Kueue's admission (here
    done by hand, as Kueue's controller would) unsuspends it."""
    running = handlers.reconciler()
    monkeypatch.setattr(running, "settings",
                        dataclasses.replace(running.settings, queue_name="team-a"))
    cluster.apply(pretrain_job("queued", nodes=1), namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "queued", namespace)) == 1, "the Job")
    job = jobs_of(cluster, "queued", namespace)[0]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True
    # A change to the resource reconciles it again; the Job must stay suspended.
    cluster.kubectl("annotate", plural("PretrainJob"), "queued", "-n", namespace, "touched=1")
    cluster.wait_for(lambda: bool(events_about(cluster, namespace, "PretrainJob", "queued")),
                     "the first Event")  # fmt: skip
    time.sleep(3)
    assert jobs_of(cluster, "queued", namespace)[0]["spec"]["suspend"] is True
    assert condition(get(cluster, "PretrainJob", "queued", namespace), "Running")["reason"] == (
        "JobCreated")
    cluster.kubectl("patch", "job", job["metadata"]["name"], "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"suspend": false}}')
    cluster.wait_for(
        lambda: (condition(get(cluster, "PretrainJob", "queued", namespace), "Running")
                 or {}).get("reason") == "JobRunning",
        "Running=True with reason JobRunning once the Job is admitted",
    )  # fmt: skip


def test_unschedulable_pods_reported(cluster, namespace, lathe_operator, ready_inputs,
                                    monkeypatch):  # fmt: skip
    """A Job whose pod the scheduler cannot place (16 GPUs on 8-GPU nodes) stays active without
    a Job event. Status gives the scheduler's reason, with a Warning Event, and recovers once a
    node fits."""
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 2.0)
    monkeypatch.setattr(reconcile, "POD_START_GRACE_SECONDS", 2.0)
    cluster.apply(pretrain_job("too-big", nodes=1, gpus=16), namespace)

    def running() -> dict:
        return condition(get(cluster, "PretrainJob", "too-big", namespace), "Running") or {}

    cluster.wait_for(lambda: running().get("reason") == "PodsNotStarting",
                     "Running=False (PodsNotStarting) on the PretrainJob", timeout=90)  # fmt: skip
    found = running()
    assert found["status"] == "False"
    assert "cannot be scheduled" in found["message"], found
    assert "Insufficient nvidia.com/gpu" in found["message"], found
    assert get(cluster, "PretrainJob", "too-big", namespace)["status"]["phase"] == "Pending"
    cluster.wait_for(
        lambda: any(event["reason"] == "PodsNotStarting" and event["type"] == "Warning"
                    for event in events_about(cluster, namespace, "PretrainJob", "too-big")),
        "a PodsNotStarting Warning Event about the PretrainJob",
    )  # fmt: skip

    # A node with 16 GPUs joins; the pod starts and the status follows without a spec change.
    node = cluster.bed.node_manifest(99)
    node["metadata"]["name"] = "kwok-gpu-16x"
    node["metadata"]["labels"]["kubernetes.io/hostname"] = "kwok-gpu-16x"
    for field in ("capacity", "allocatable"):
        node["status"][field]["nvidia.com/gpu"] = "16"
    cluster.apply(node)
    try:
        cluster.wait_for(lambda: running().get("reason") == "JobRunning",
                         "Running=True (JobRunning) once the pod is placed", timeout=90)  # fmt: skip
        assert running()["status"] == "True"
    finally:
        cluster.kubectl("delete", "pretrainjob", "too-big", "-n", namespace, "--wait=true",
                        check=False)  # fmt: skip
        cluster.kubectl("delete", "pods", "-n", namespace, "--all", "--grace-period=0",
                        "--force", check=False)  # fmt: skip
        cluster.kubectl("delete", "node", "kwok-gpu-16x", check=False)


def test_rejected_pods_reported(cluster, namespace, lathe_operator, ready_inputs, monkeypatch):
    """A Job whose pods admission rejects (a missing PriorityClass) has no pod to read. Status
    gives the Job controller's FailedCreate message and recovers once the class exists."""
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 2.0)
    monkeypatch.setattr(reconcile, "POD_START_GRACE_SECONDS", 2.0)
    priority = f"lathe-test-{namespace}"
    # Admission is the subject here, not scheduling. The Job asks for no GPU, because pods
    # of earlier tests can still hold the fake nodes' GPUs.
    manifest = pretrain_job("no-class", nodes=1, gpus=0)
    manifest["spec"]["scheduling"] = {"priorityClassName": priority}
    cluster.apply(manifest, namespace)

    def running() -> dict:
        return condition(get(cluster, "PretrainJob", "no-class", namespace), "Running") or {}

    cluster.wait_for(lambda: running().get("reason") == "PodsNotStarting",
                     "Running=False (PodsNotStarting) on the PretrainJob", timeout=90)  # fmt: skip
    assert "cannot create its pods" in running()["message"], running()
    assert f"no PriorityClass with name {priority}" in running()["message"], running()
    cluster.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                   "metadata": {"name": priority}, "value": 1000})  # fmt: skip
    try:
        # The Job controller retries a failed pod creation with a backoff that doubles up to
        # 60 s, and nothing wakes it when the class appears, so the pods can take a minute.
        try:
            cluster.wait_for(lambda: running().get("reason") == "JobRunning",
                             "Running=True (JobRunning) once the pods are created",
                             timeout=240)  # fmt: skip
        except BaseException:
            pods = cluster.get_json("pods", "-n", namespace)["items"]
            print("Pods:", [(p["metadata"]["name"], p["status"]) for p in pods])
            print("Job:", cluster.get_json("job", "no-class-pretrain-r1-0", "-n",
                                           namespace)["status"])
            raise
    finally:
        cluster.kubectl("delete", "priorityclass", priority, check=False)


def test_corpus_workers_job_shape(cluster, namespace, lathe_operator):
    """A Corpus with three workers runs an Indexed Job of three pods without a rendezvous, and
    each attempt's pods share one run id."""
    document = next(doc for doc in yaml.safe_load_all((EXAMPLES / "01-corpus.yaml").read_text())
                    if doc)  # fmt: skip
    document["metadata"] = {"name": "wide"}
    document["spec"]["workers"] = 3
    cluster.apply(document, namespace)
    cluster.wait_for(lambda: len(jobs_of(cluster, "wide", namespace)) == 1,
                     "the Corpus's Job", timeout=60)  # fmt: skip
    job = jobs_of(cluster, "wide", namespace)[0]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 3
    assert job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    env = {item["name"]: item.get("value") for item in pod["containers"][0]["env"]}
    owner = get(cluster, "Corpus", "wide", namespace)
    assert env["LATHE_RUN_ID"] == f"{owner['metadata']['uid']}-r1-0"
    assert "RDZV_ENDPOINT" not in env
    assert "subdomain" not in pod
