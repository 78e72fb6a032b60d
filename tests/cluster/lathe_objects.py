"""Lathe objects and their status as the cluster tests create and read them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from lathe.api import KINDS

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "pubmed"
ORDER = ["Corpus", "Tokenizer", "PretrainJob", "FineTune", "ModelDeployment"]
# kwok's general pod-complete Stage completes a Job's pod after a random time between `delay`
# and `jitter-delay`, or after `jitter-delay` when it is not longer. Its default is 5 s, so both
# are set, to hold the pod Running while a test acts.
HOLD = {
    "pod-complete.stage.kwok.x-k8s.io/delay": "3600s",
    "pod-complete.stage.kwok.x-k8s.io/jitter-delay": "3600s",
}


def plural(kind: str) -> str:
    return f"{KINDS[kind].plural}.lathe.dev"


def get(cluster, kind: str, name: str, namespace: str) -> dict:
    return cluster.get_json(plural(kind), name, "-n", namespace)


def condition(obj: dict, type_: str) -> dict | None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), None)


def is_true(cluster, kind, name, namespace, type_) -> bool:
    found = condition(get(cluster, kind, name, namespace), type_)
    return bool(found and found["status"] == "True")


def jobs_of(cluster, name: str, namespace: str) -> list[dict]:
    items = cluster.get_json("jobs", "-n", namespace, "-l", f"lathe.dev/name={name}")["items"]
    return sorted(items, key=lambda job: job["metadata"]["creationTimestamp"])


def pretrain_job(name: str, nodes: int = 2, gpus: int = 1, hold: bool = True) -> dict:
    spec = {
        "corpusRef": {"name": "missing-on-purpose"},
        "tokenizerRef": {"name": "missing-on-purpose"},
        "distributed": {"nodes": nodes, "procsPerNode": gpus or 1},
        "resources": {"gpus": gpus, "cpu": "4", "memory": "16Gi"},
        "training": {"maxSteps": 100},
    }
    if hold:
        spec["podMetadata"] = {"annotations": HOLD}
    return {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": name}, "spec": spec,
    }


def events_about(cluster, namespace: str, kind: str, name: str) -> list[dict]:
    items = cluster.get_json("events", "-n", namespace)["items"]
    return [event for event in items if event["involvedObject"]["kind"] == kind
            and event["involvedObject"]["name"] == name]  # fmt: skip


def finetune(name: str, base: str) -> dict:
    document = next(doc for doc in yaml.safe_load_all((EXAMPLES / "04-finetune.yaml").read_text())
                    if doc)  # fmt: skip
    document["metadata"] = {"name": name}
    document["spec"]["baseModel"]["pretrainJobRef"]["name"] = base
    return document


def corpus_and_tokenizer(name: str) -> list[dict]:
    """The example Corpus and Tokenizer, both named `name`, the Tokenizer reading the Corpus."""
    documents = [doc for path in ("01-corpus.yaml", "02-tokenizer.yaml")
                 for doc in yaml.safe_load_all((EXAMPLES / path).read_text()) if doc]
    for document in documents:
        document["metadata"]["name"] = name
        if document["kind"] == "Tokenizer":
            document["spec"]["corpusRef"]["name"] = name
    return documents


def fail_pod(cluster, namespace: str, pod: dict, exit_code: int, message: str) -> None:
    """Act as the kubelet: mark the pod Failed, its container terminated with `exit_code` and
    the termination message `message`."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    container = pod["spec"]["containers"][0]
    patch = {"status": {"phase": "Failed", "containerStatuses": [{
        "name": container["name"], "image": container["image"], "ready": False,
        "restartCount": 0, "imageID": "", "containerID": "kwok://failed",
        "state": {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message,
                                 "startedAt": now, "finishedAt": now}},
    }]}}
    cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace,
                    "--subresource=status", "--type=merge", "-p", json.dumps(patch))
