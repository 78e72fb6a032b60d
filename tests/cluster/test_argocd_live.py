"""The Argo CD health checks on status objects that the operator wrote to a real API server.

tests/unit/test_argocd_health.py checks the scripts on status objects shaped in code; here the
same scripts read what `kubectl get -o json` returns while the operator reconciles.
"""

from __future__ import annotations

import json
import time

from argocd_lua import run_health
from lathe_objects import condition, get, is_true, jobs_of, plural, pretrain_job
from lathe_trainer.stage import EXIT_PERMANENT


def health(cluster, kind: str, name: str, namespace: str) -> dict:
    return run_health(kind, get(cluster, kind, name, namespace))


def test_health_follows_a_pretrain_job(cluster, namespace, lathe_operator, ready_inputs):
    """Succeeded inputs are Healthy. A PretrainJob is Progressing while it runs and while its new
    spec is unobserved, then Suspended."""
    for kind in ("Corpus", "Tokenizer"):
        assert health(cluster, kind, "missing-on-purpose", namespace)["status"] == "Healthy"

    cluster.apply(pretrain_job("watched", nodes=1), namespace)
    cluster.wait_for(lambda: is_true(cluster, "PretrainJob", "watched", namespace, "Running"),
                     "Running=True on the PretrainJob")  # fmt: skip
    running = health(cluster, "PretrainJob", "watched", namespace)
    assert running["status"] == "Progressing", running

    # The object as the API server returns it right after a spec change: the operator has not
    # observed the new generation yet.
    patched = json.loads(cluster.kubectl(
        "patch", plural("PretrainJob"), "watched", "-n", namespace, "--type=merge",
        "-p", '{"spec": {"suspend": true}}', "-o", "json",
    ).stdout)
    assert patched["metadata"]["generation"] > patched["status"]["observedGeneration"]
    assert run_health("PretrainJob", patched)["status"] == "Progressing"

    cluster.wait_for(lambda: is_true(cluster, "PretrainJob", "watched", namespace, "Suspended"),
                     "Suspended=True on the PretrainJob")  # fmt: skip
    suspended = health(cluster, "PretrainJob", "watched", namespace)
    assert suspended["status"] == "Suspended", suspended


def test_health_of_waiting_and_failed(cluster, namespace, lathe_operator, ready_inputs):
    """A resource that waits for an input is Progressing; one whose Job failed for good is
    Degraded, with the failure in the message."""
    document = pretrain_job("waits")
    document["spec"]["corpusRef"]["name"] = "not-there"
    cluster.apply(document, namespace)
    cluster.wait_for(
        lambda: (condition(get(cluster, "PretrainJob", "waits", namespace), "InputsReady")
                 or {}).get("status") == "False",
        "InputsReady=False on the PretrainJob",
    )  # fmt: skip
    waiting = health(cluster, "PretrainJob", "waits", namespace)
    assert waiting["status"] == "Progressing", waiting

    cluster.apply(pretrain_job("fails", nodes=1), namespace)

    def running_pod() -> dict | None:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "lathe.dev/name=fails")["items"]
        return next((pod for pod in pods if pod["status"].get("phase") == "Running"), None)

    cluster.wait_for(lambda: running_pod() is not None, "the PretrainJob's pod to run")
    pod = running_pod()
    # Act as the kubelet: the trainer exited with the code for an error no retry can fix.
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    container = pod["spec"]["containers"][0]
    patch = {"status": {"phase": "Failed", "containerStatuses": [{
        "name": container["name"], "image": container["image"], "ready": False,
        "restartCount": 0, "imageID": "", "containerID": "kwok://failed",
        "state": {"terminated": {
            "exitCode": EXIT_PERMANENT, "reason": "Error", "startedAt": now, "finishedAt": now,
            "message": "spec.training.artifactUri: the bucket does not exist",
        }},
    }]}}
    cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace,
                    "--subresource=status", "--type=merge", "-p", json.dumps(patch))
    cluster.wait_for(lambda: is_true(cluster, "PretrainJob", "fails", namespace, "Failed"),
                     "Failed=True on the PretrainJob", timeout=90)  # fmt: skip
    failed = health(cluster, "PretrainJob", "fails", namespace)
    assert failed["status"] == "Degraded", failed
    assert "the bucket does not exist" in failed["message"], failed
    assert len(jobs_of(cluster, "fails", namespace)) == 1
