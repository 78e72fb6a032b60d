"""The Kubernetes builders turn plans into the Jobs, Services and Deployments Lathe creates.

The plans come from real API models through `lathe.plans`. The launcher script runs for real
under `sh`, with stand-ins only for the cluster pieces a unit test lacks (cluster DNS, a stage),
and once under the real `torchrun`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from lathe import plans
from lathe.api import KINDS
from lathe.api.deployment import AutoscalingSpec
from lathe.errors import InvalidResourceError
from lathe.k8s import builders, builders_serving, builders_training, launcher
from lathe_trainer.stage import EXIT_PERMANENT, ResolvedInput, StageConfig

NAMESPACE = "ml"
UID = "5f1c2a9e-0d7b-4c1e-9a53-1b8e2f6d4c70"
ROOT = "pvc://lathe-artifacts/lathe"
DATA_DIR = "pvc://lathe-data/pubmed"
IMAGE = "ghcr.io/lathe-dev/trainer:test"
SYNC_IMAGE = "ghcr.io/lathe-dev/trainer:sync"
TRITON_IMAGE = "ghcr.io/lathe-dev/triton:test"
STORE = builders.ArtifactStore(ROOT)

SPECS = {
    "Corpus": {
        "sources": [{"name": "ncbi", "format": "ncbiDisease", "path": "ncbi/train.txt"}],
        "shards": 4,
    },
    "Tokenizer": {"corpusRef": {"name": "pubmed"}},
    "PretrainJob": {"corpusRef": {"name": "pubmed"}, "tokenizerRef": {"name": "tok"}},
    "FineTune": {
        "baseModel": {"pretrainJobRef": {"name": "lm"}},
        "data": {"train": "ner/train.conll", "test": "ner/test.conll"},
    },
    "ModelDeployment": {
        "model": {"fineTuneRef": {"name": "ner"}},
        "export": {"heldOutData": "ner/test.conll"},
    },
}


# --- helpers -----------------------------------------------------------------------------------


def resource(kind: str, name: str = "med", spec: dict | None = None, **extra):
    """Build an API model as the operator reads it from the API server."""
    body = {**SPECS[kind], **(spec or {}), **extra}
    return KINDS[kind].model_validate(
        {
            "apiVersion": "lathe.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": UID, "generation": 3},
            "spec": body,
        }
    )


def owner_of(model) -> dict:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def inputs_for(model) -> dict[str, ResolvedInput]:
    return {
        role: ResolvedInput(
            kind=kind,
            name=name,
            uri=STORE.output_uri(NAMESPACE, kind, name),
            digest="sha256:" + "0" * 64,
        )
        for role, (kind, name) in model.references().items()
    }


def plan_for(model, data_dir: str = DATA_DIR):
    output = STORE.output_uri(NAMESPACE, model.kind, model.metadata.name)
    return plans.build(model, inputs_for(model), output, data_dir)


def build_job(kind: str = "PretrainJob", spec: dict | None = None, **options) -> dict:
    model = resource(kind, spec=spec)
    options = {"attempt": 0, "image": IMAGE, "resume": False, **options}
    return builders.training_job(plan_for(model), owner_of(model), STORE, **options)


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    return pod_spec(job)["containers"][0]


def env(job: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(job)["env"]}


def volumes(spec: dict) -> dict[str, dict]:
    return {volume["name"]: volume for volume in spec["volumes"]}


def mounts(spec: dict) -> dict[str, dict]:
    return {mount["mountPath"]: mount for mount in spec["volumeMounts"]}


def serving_plan(spec: dict | None = None, name: str = "ner-api"):
    model = resource("ModelDeployment", name=name, spec=spec)
    export_uri = STORE.output_uri(NAMESPACE, "ModelDeployment", name)
    return plans.serving(model, export_uri), owner_of(model)


# --- names, labels, owner references -----------------------------------------------------------


@pytest.mark.parametrize(
    ("resource_name", "suffix", "attempt", "expected"),
    [
        ("med", "", None, "med"),
        ("med", "pretrain", None, "med-pretrain"),
        ("med", "pretrain", 0, "med-pretrain-0"),
        ("med", "", 2, "med-2"),
        ("2024-notes", "corpus", 1, "lathe-2024-notes-corpus-1"),
    ],
)
def test_object_name_short_names(resource_name, suffix, attempt, expected):
    assert builders.object_name(resource_name, suffix, attempt) == expected


@pytest.mark.parametrize("suffix", ["", "pretrain", "triton"])
@pytest.mark.parametrize("attempt", [None, 0, 17])
def test_object_name_long_names_distinct(suffix, attempt):
    first = builders.object_name("a" * 62 + "x", suffix, attempt)
    second = builders.object_name("a" * 62 + "y", suffix, attempt)
    for name in (first, second):
        assert len(name) <= 63
        assert builders._DNS_LABEL.match(name)
        assert name.endswith("".join(f"-{p}" for p in (suffix, attempt) if p not in ("", None)))
    assert first != second


def test_object_name_rejects_oversized_suffix():
    with pytest.raises(ValueError, match="leaves no room for the resource name"):
        builders.object_name("med", "s" * 60, 1)


def test_object_name_rejects_invalid_characters():
    with pytest.raises(ValueError, match="not a DNS-1123 label"):
        builders.object_name("med", "Pre_Train")


@pytest.mark.parametrize("nodes", [1, 2, 1024])
def test_job_host_names_fit_dns_label(nodes):
    model = resource("PretrainJob", name="p" * 63, spec={"distributed": {"nodes": nodes}})
    name = builders.job_name(plan_for(model), 12)
    assert len(f"{name}-{nodes - 1}") <= 63
    assert name.endswith("-pretrain-r1-12")


@pytest.mark.parametrize(
    ("attempt", "component", "extra"),
    [
        (None, None, {}),
        (3, None, {"lathe.dev/attempt": "3"}),
        (0, "pretrain", {"lathe.dev/attempt": "0", "app.kubernetes.io/component": "pretrain"}),
    ],
)
def test_labels_name_kind_attempt_component(attempt, component, extra):
    expected = {
        "app.kubernetes.io/name": "lathe",
        "app.kubernetes.io/managed-by": "lathe-operator",
        "lathe.dev/kind": "PretrainJob",
        "lathe.dev/name": "med",
        **extra,
    }
    assert builders.labels("PretrainJob", "med", attempt, component=component) == expected


def test_owner_reference_marks_controller():
    owner = owner_of(resource("PretrainJob"))
    assert builders.owner_reference(owner) == {
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": "PretrainJob",
        "name": "med",
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_owner_reference_requires_uid():
    owner = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "c"}}
    with pytest.raises(ValueError, match="lacks uid"):
        builders.owner_reference(owner)


def test_training_objects_use_plan_namespace():
    model = resource("PretrainJob", spec={"distributed": {"nodes": 2}})
    owner = owner_of(model)
    del owner["metadata"]["namespace"]
    job = builders.training_job(plan_for(model), owner, STORE, attempt=0, image=IMAGE, resume=False)
    assert job["metadata"]["namespace"] == NAMESPACE
    assert env(job)["RDZV_ENDPOINT"].endswith(f".{NAMESPACE}.svc:29500")


def test_training_objects_reject_other_namespace():
    model = resource("PretrainJob")
    owner = owner_of(model)
    owner["metadata"]["namespace"] = "elsewhere"
    with pytest.raises(ValueError, match="namespace 'elsewhere' differs"):
        builders.config_map(plan_for(model), owner, STORE, 0)


def test_serving_objects_require_owner_namespace():
    plan, owner = serving_plan()
    del owner["metadata"]["namespace"]
    with pytest.raises(ValueError, match="lacks metadata.namespace"):
        builders.triton_service(plan, owner)


def every_object() -> list[dict]:
    model = resource("PretrainJob", spec={"distributed": {"nodes": 2}})
    plan, owner = plan_for(model), owner_of(model)
    serving, serving_owner = serving_plan()
    return [
        builders.training_job(plan, owner, STORE, attempt=1, image=IMAGE, resume=False),
        builders.config_map(plan, owner, STORE, 1),
        builders.headless_service(plan, owner, 1),
        builders.triton_deployment(serving, serving_owner, STORE, image=TRITON_IMAGE,
                                   sync_image=SYNC_IMAGE),
        builders.triton_service(serving, serving_owner),
        builders.horizontal_pod_autoscaler(serving, serving_owner, AutoscalingSpec()),
        builders.pod_monitor(serving, serving_owner),
    ]


@pytest.mark.parametrize("index", range(7))
def test_every_object_owned_labelled_namespaced(index):
    built = every_object()[index]
    metadata = built["metadata"]
    assert metadata["namespace"] == NAMESPACE
    assert [ref["uid"] for ref in metadata["ownerReferences"]] == [UID]
    assert metadata["ownerReferences"][0]["controller"] is True
    assert metadata["labels"]["app.kubernetes.io/managed-by"] == "lathe-operator"
    assert metadata["labels"]["lathe.dev/name"] in {"med", "ner-api"}
    assert len(metadata["name"]) <= 63


MODEL_TYPES = {
    "Job": "V1Job",
    "ConfigMap": "V1ConfigMap",
    "Service": "V1Service",
    "Deployment": "V1Deployment",
    "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
}


def unknown_fields(value, type_name: str, path: str) -> list[str]:
    """Return the paths of keys that the Kubernetes API type (per its Python client) lacks."""
    if type_name.startswith("List["):
        inner = type_name[len("List["):-1]
        return [
            field
            for index, item in enumerate(value)
            for field in unknown_fields(item, inner, f"{path}[{index}]")
        ]
    if type_name.startswith("Dict[") or not hasattr(client, type_name):
        return []  # maps of strings, and primitives (str, int, bool, object)
    model = getattr(client, type_name)
    python_names = {wire: python for python, wire in model.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in python_names:
            problems.append(f"{path}.{key}")
            continue
        problems += unknown_fields(item, model.openapi_types[python_names[key]], f"{path}.{key}")
    return problems


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 5])
def test_objects_use_known_api_fields(index):
    """A misspelled field would be dropped by the API server without an error."""
    built = every_object()[index]
    assert unknown_fields(built, MODEL_TYPES[built["kind"]], built["kind"]) == []


# --- artifact store and pod config -------------------------------------------------------------


@pytest.mark.parametrize(
    ("root", "claim", "output"),
    [
        (
            "pvc://lathe-artifacts/lathe",
            "lathe-artifacts",
            "pvc://lathe-artifacts/lathe/ml/corpus/c",
        ),
        ("pvc://store", "store", "pvc://store/ml/corpus/c"),
        ("s3://bucket/prefix/", None, "s3://bucket/prefix/ml/corpus/c"),
        ("file:///var/lib/lathe", None, "file:///var/lib/lathe/ml/corpus/c"),
    ],
)
def test_artifact_store_outputs_and_volumes(root, claim, output):
    store = builders.ArtifactStore(root)
    assert store.output_uri("ml", "Corpus", "c") == output
    assert store.output_uri("ml", "Corpus", "c", "run-0123") == output + "/run-0123"
    assert store.claim == claim
    claims = [volume["persistentVolumeClaim"]["claimName"] for volume in store.volumes()]
    assert claims == ([claim] if claim else [])
    paths = [mount["mountPath"] for mount in store.volume_mounts()]
    assert paths == ([f"/artifacts/{claim}"] if claim else [])


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ("/var/lib/lathe", "no supported scheme"),
        ("gs://bucket", "no supported scheme"),
        ("pvc://Bad_Claim/x", "not name a valid PersistentVolumeClaim"),
        ("pvc://claim/a/../b", "contains '..'"),
    ],
)
def test_artifact_store_rejects_bad_roots(root, message):
    with pytest.raises(ValueError, match=message):
        builders.ArtifactStore(root)


@pytest.mark.parametrize(
    ("uri", "pod_uri"),
    [
        ("pvc://lathe-artifacts/lathe/ml/x", "file:///artifacts/lathe-artifacts/lathe/ml/x"),
        ("pvc://other/data/", "file:///artifacts/other/data"),
        ("pvc://other", "file:///artifacts/other"),
        ("s3://bucket/x", "s3://bucket/x"),
        ("file:///data", "file:///data"),
    ],
)
def test_pod_uri_rewrites_only_pvc(uri, pod_uri):
    assert STORE.pod_uri(uri) == pod_uri


def test_pod_config_rewrites_every_pvc_uri():
    model = resource(
        "FineTune", spec={"baseModel": {"uri": "pvc://models/base/llama"}}
    )
    plan = plans.build(model, {}, STORE.output_uri(NAMESPACE, "FineTune", "med"), DATA_DIR)
    config = builders.pod_config(plan.config, STORE)
    assert config.output_uri == "file:///artifacts/lathe-artifacts/lathe/ml/finetune/med"
    assert config.data_dir == "file:///artifacts/lathe-data/pubmed"
    assert config.spec["baseModel"]["uri"] == "file:///artifacts/models/base/llama"
    assert config.spec["data"]["train"] == "ner/train.conll"
    # The original plan is left as it was: the operator keeps reading pvc:// URIs.
    assert plan.config.output_uri.startswith("pvc://")


def test_pod_config_rewrites_input_uris():
    model = resource("PretrainJob")
    config = builders.pod_config(plan_for(model).config, STORE)
    assert {role: item.uri for role, item in config.inputs.items()} == {
        "corpus": "file:///artifacts/lathe-artifacts/lathe/ml/corpus/pubmed",
        "tokenizer": "file:///artifacts/lathe-artifacts/lathe/ml/tokenizer/tok",
    }


def test_pod_config_names_field_of_bad_uri():
    model = resource("Tokenizer")
    plan = plans.build(model, {}, "pvc://Bad_Claim/out", DATA_DIR)
    message = r"Tokenizer ml/med: spec.storage.uri: .*Bad_Claim"
    with pytest.raises(InvalidResourceError, match=message):
        builders.pod_config(plan.config, STORE)


# --- ConfigMap and headless Service ------------------------------------------------------------


def test_config_map_holds_pod_config():
    model = resource("PretrainJob")
    plan = plan_for(model)
    built = builders.config_map(plan, owner_of(model), STORE, 2)
    assert built["metadata"]["name"] == "med-pretrain-r1-2"
    config = StageConfig.model_validate_json(built["data"]["config.json"])
    assert config.output_uri == "file:///artifacts/lathe-artifacts/lathe/ml/pretrainjob/med"
    assert config.inputs["corpus"].uri.startswith("file:///artifacts/lathe-artifacts/")
    assert config.stage_key == plan.config.stage_key
    assert config.spec == plan.config.spec


def test_config_map_fits_corpus_with_5000_sources():
    sources = [
        {"name": f"s{i}", "format": "jsonl", "path": f"notes/2024/batch-{i:05d}.jsonl"}
        for i in range(5000)
    ]
    model = resource("Corpus", spec={"sources": sources})
    built = builders.config_map(plan_for(model), owner_of(model), STORE, 0)
    assert len(json.loads(built["data"]["config.json"])["spec"]["sources"]) == 5000


def test_config_map_rejects_oversized_config():
    long_path = "notes/" + "x" * 200 + "/batch-{:05d}.jsonl"
    sources = [
        {"name": f"s{i}", "format": "jsonl", "path": long_path.format(i)} for i in range(6000)
    ]
    model = resource("Corpus", spec={"sources": sources})
    with pytest.raises(InvalidResourceError, match=r"Corpus ml/med: spec: .*ConfigMap limit"):
        builders.config_map(plan_for(model), owner_of(model), STORE, 0)


def test_headless_service_selects_attempt_pods():
    model = resource("PretrainJob", spec={"distributed": {"nodes": 2}})
    plan, owner = plan_for(model), owner_of(model)
    service = builders.headless_service(plan, owner, 1)
    job = builders.training_job(plan, owner, STORE, attempt=1, image=IMAGE, resume=False)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"] == [
        {"name": "c10d", "port": 29500, "targetPort": 29500, "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == job["spec"]["template"]["metadata"]["labels"]
    assert service["metadata"]["name"] == pod_spec(job)["subdomain"]


# --- the training Job --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "spec", "nodes", "stage"),
    [
        ("Corpus", {}, 1, "corpus"),
        ("Corpus", {"workers": 3}, 3, "corpus"),
        ("Tokenizer", {}, 1, "tokenizer"),
        ("PretrainJob", {}, 1, "pretrain"),
        ("PretrainJob", {"distributed": {"nodes": 4}}, 4, "pretrain"),
        ("FineTune", {"distributed": {"nodes": 2}}, 2, "finetune"),
        ("ModelDeployment", {}, 1, "export"),
    ],
)
def test_job_is_indexed_with_one_pod_per_node(kind, spec, nodes, stage):
    job = build_job(kind, spec)
    assert job["apiVersion"] == "batch/v1"
    assert job["metadata"]["name"] == f"med-{stage}-r1-0"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == nodes
    assert job["spec"]["parallelism"] == nodes
    assert job["spec"]["backoffLimit"] == 0
    assert "ttlSecondsAfterFinished" not in job["spec"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert "hostname" not in pod_spec(job)


def test_job_pod_failure_policy_rules():
    rules = build_job()["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [42]},
        },
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "NotIn", "values": [0]},
        },
    ]
    assert rules[builders_training.RULE_PERMANENT]["onExitCodes"]["values"] == [EXIT_PERMANENT]
    assert rules[builders_training.RULE_RETRIABLE]["onExitCodes"]["operator"] == "NotIn"


@pytest.mark.parametrize(("resume", "tail"), [(False, []), (True, ["--resume"])])
def test_job_runs_launcher_with_module_args(resume, tail):
    job = build_job(resume=resume)
    command = container(job)["command"]
    assert command[:4] == ["sh", "-c", launcher.LAUNCHER, "lathe-launch"]
    assert command[4:] == ["lathe_trainer", "pretrain", "--config", "/etc/lathe/config.json", *tail]


def test_distributed_job_env_and_subdomain():
    job = build_job(spec={"distributed": {"nodes": 2, "procsPerNode": 3}}, attempt=4)
    values = env(job)
    assert values["NNODES"] == "2"
    assert values["NPROC"] == "3"
    assert values["RDZV_ENDPOINT"] == "med-pretrain-r1-4-0.med-pretrain-r1-4.ml.svc:29500"
    assert values["RDZV_ID"] == f"{UID}-r1-4"
    assert values["LATHE_ATTEMPT"] == "4"
    assert values["PYTHONUNBUFFERED"] == "1"
    assert "JOB_COMPLETION_INDEX" not in values  # the Job controller sets it
    assert pod_spec(job)["subdomain"] == "med-pretrain-r1-4"
    assert container(job)["ports"] == [
        {"name": "c10d", "containerPort": 29500, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9400, "protocol": "TCP"},
    ]


@pytest.mark.parametrize(("kind", "serves"), [("PretrainJob", True), ("FineTune", False),
                                              ("Corpus", False)])
def test_pretrain_rank_zero_serves_metrics(kind, serves):
    """A PretrainJob's rank 0 serves its training gauges, where the operator can read progress
    without the artifact store."""
    job = build_job(kind)
    ports = {port["name"]: port["containerPort"] for port in container(job).get("ports", [])}
    if serves:
        assert env(job)["LATHE_TRAINER_METRICS_PORT"] == "9400"
        assert ports["metrics"] == 9400
    else:
        assert "LATHE_TRAINER_METRICS_PORT" not in env(job)
        assert "metrics" not in ports


def test_single_node_job_rendezvous_on_loopback():
    """One node hosts its own rendezvous: no Service, no subdomain, no DNS wait."""
    model = resource("PretrainJob", spec={"distributed": {"nodes": 1, "procsPerNode": 2}})
    plan = plan_for(model)
    job = builders.training_job(plan, owner_of(model), STORE, attempt=0, image=IMAGE,
                                resume=False)  # fmt: skip
    values = env(job)
    assert values["RDZV_ENDPOINT"] == "127.0.0.1:29500"
    assert values["NNODES"] == "1"
    assert values["NPROC"] == "2"
    assert "subdomain" not in pod_spec(job)
    assert not builders.needs_headless_service(plan)


@pytest.mark.parametrize("kind", ["Corpus", "Tokenizer", "ModelDeployment"])
def test_single_process_job_has_no_rendezvous(kind):
    job = build_job(kind)
    assert not {"NNODES", "NPROC", "RDZV_ENDPOINT", "RDZV_ID"} & set(env(job))
    assert "subdomain" not in pod_spec(job)


def test_job_name_changes_with_run_not_generation():
    """A new run (a changed spec or input) gets new names; a generation bumped by suspend alone
    continues the run under the same names."""
    model = resource("PretrainJob")
    first = builders.job_name(plan_for(model), 0)
    model.metadata.generation = 4
    same_run = builders.job_name(plan_for(model), 0)
    next_run = builders.job_name(dataclasses.replace(plan_for(model), run=2), 0)
    assert (first, same_run, next_run) == (
        "med-pretrain-r1-0", "med-pretrain-r1-0", "med-pretrain-r2-0"
    )


def test_job_names_differ_between_kinds():
    corpus = builders.job_name(plan_for(resource("Corpus")), 0)
    tokenizer = builders.job_name(plan_for(resource("Tokenizer")), 0)
    assert corpus != tokenizer


def test_rendezvous_id_unique_per_attempt_and_run():
    spec = {"distributed": {"nodes": 2}}
    ids = {env(build_job(spec=spec, attempt=attempt))["RDZV_ID"] for attempt in range(3)}
    names = {build_job(attempt=a)["metadata"]["name"] for a in range(3)}
    assert len(ids) == 3
    assert len(names) == 3
    model = resource("PretrainJob", spec=spec)
    later = dataclasses.replace(plan_for(model), run=2)
    job = builders.training_job(later, owner_of(model), STORE, attempt=0, image=IMAGE,
                                resume=True)  # fmt: skip
    assert env(job)["RDZV_ID"] == f"{UID}-r2-0"
    assert env(job)["RDZV_ID"] not in ids
    assert job["metadata"]["labels"]["lathe.dev/run"] == "2"


@pytest.mark.parametrize(
    ("resources", "procs", "nproc", "threads"),
    [
        ({"cpu": "8", "gpus": 0}, 2, "2", "4"),
        ({"cpu": "16", "gpus": 4}, 1, "4", "4"),
        ({"cpu": "500m", "gpus": 0}, 1, "1", "1"),
        ({"cpu": "1.5", "gpus": 0}, 4, "4", "1"),
    ],
)
def test_processes_and_threads_per_node(resources, procs, nproc, threads):
    spec = {"resources": resources, "distributed": {"nodes": 2, "procsPerNode": procs}}
    values = env(build_job(spec=spec))
    assert values["NPROC"] == nproc
    assert values["OMP_NUM_THREADS"] == threads
    # `lathe run` starts as many processes per node as a pod would, in one group.
    from lathe.local.runner import LocalRunner

    model = resource("PretrainJob", spec=spec)
    command = LocalRunner(Path("/tmp/workspace"), Path(DATA_DIR)).command(
        plan_for(model), Path("/tmp/config.json"), resume=False)
    assert f"--nproc-per-node={2 * int(nproc)}" in command


def test_bad_cpu_quantity_names_field():
    """The API model rejects the quantity before any Job is built."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"not a Kubernetes quantity"):
        build_job(spec={"resources": {"cpu": "two"}})


@pytest.mark.parametrize(
    ("gpus", "limit", "tolerations", "nccl"),
    [
        (0, None, None, None),
        (
            8,
            "8",
            [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "WARN",
        ),
    ],
)
def test_gpu_limits_tolerations_and_nccl(gpus, limit, tolerations, nccl):
    spec = {"resources": {"cpu": "4", "memory": "32Gi", "gpus": gpus}}
    job = build_job(spec=spec)
    resources = container(job)["resources"]
    assert resources["requests"] == {"cpu": "4", "memory": "32Gi"}
    assert resources["limits"].get("nvidia.com/gpu") == limit
    assert resources["limits"]["memory"] == "32Gi"
    assert pod_spec(job).get("tolerations") == tolerations
    assert env(job).get("NCCL_DEBUG") == nccl


def test_job_volumes_config_shm_and_claims():
    job = build_job(spec={"resources": {"shmSize": "16Gi"}}, attempt=2)
    spec = pod_spec(job)
    by_name = volumes(spec)
    by_path = mounts(container(job))
    assert by_name["config"] == {"name": "config", "configMap": {"name": "med-pretrain-r1-2"}}
    assert by_path["/etc/lathe"]["readOnly"] is True
    assert by_name[by_path["/dev/shm"]["name"]]["emptyDir"] == {
        "medium": "Memory",
        "sizeLimit": "16Gi",
    }
    claims = {
        volume["persistentVolumeClaim"]["claimName"]: volume["name"]
        for volume in spec["volumes"]
        if "persistentVolumeClaim" in volume
    }
    assert set(claims) == {"lathe-artifacts", "lathe-data"}
    for claim, volume_name in claims.items():
        assert by_path[f"/artifacts/{claim}"]["name"] == volume_name


def test_job_termination_message_and_security():
    job = build_job()
    assert container(job)["terminationMessagePath"] == "/dev/termination-log"
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    pod_security = pod_spec(job)["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(job)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize(
    ("queue_name", "suspend", "spec_suspend", "suspended", "queue_label"),
    [
        (None, False, False, False, None),
        (None, True, False, True, None),
        (None, False, True, True, None),
        ("team-a", False, False, True, "team-a"),
    ],
)
def test_job_suspend_and_kueue(queue_name, suspend, spec_suspend, suspended, queue_label):
    job = build_job(spec={"suspend": spec_suspend}, queue_name=queue_name, suspend=suspend)
    assert job["spec"]["suspend"] is suspended
    assert job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == queue_label
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]


def test_job_and_pod_labels_carry_attempt():
    job = build_job(attempt=5)
    for object_labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert object_labels["lathe.dev/kind"] == "PretrainJob"
        assert object_labels["lathe.dev/attempt"] == "5"
        assert object_labels["app.kubernetes.io/component"] == "pretrain"


def test_job_is_plain_json():
    job = build_job(spec={"distributed": {"nodes": 2}})
    assert json.loads(json.dumps(job)) == job


# --- Triton ------------------------------------------------------------------------------------


def triton(**options) -> dict:
    plan, owner = serving_plan(options.pop("spec", None))
    options = {"image": TRITON_IMAGE, **options}
    return builders.triton_deployment(plan, owner, options.pop("store", STORE),
                                      sync_image=SYNC_IMAGE, **options)


def test_triton_container_ports_args_probes():
    deployment = triton(spec={"serving": {"httpPort": 9000, "grpcPort": 9001, "metricsPort": 9002}})
    server = deployment["spec"]["template"]["spec"]["containers"][0]
    assert server["image"] == TRITON_IMAGE
    assert server["args"] == [
        "tritonserver",
        "--model-repository=/models",
        "--http-port=9000",
        "--grpc-port=9001",
        "--metrics-port=9002",
    ]
    assert {port["name"]: port["containerPort"] for port in server["ports"]} == {
        "http": 9000,
        "grpc": 9001,
        "metrics": 9002,
    }
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert mounts(server)["/models"]["name"] == "models"


def test_triton_image_override_and_replicas():
    deployment = triton(image="registry.local/triton:25.01-py3", spec={"serving": {"replicas": 3}})
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.local/triton:25.01-py3"
    )
    assert "replicas" not in triton(autoscaled=True)["spec"]


def test_triton_init_container_copies_from_claim():
    spec = triton()["spec"]["template"]["spec"]
    sync = spec["initContainers"][0]
    assert sync["image"] == SYNC_IMAGE
    assert sync["command"] == [
        "python", "-m", "lathe_trainer.serving.sync",
        "file:///artifacts/lathe-artifacts/lathe/ml/modeldeployment/ner-api", "/models",
        "--repository", "model_repository",
    ]
    assert mounts(sync)["/artifacts/lathe-artifacts"]["readOnly"] is True
    assert mounts(sync)["/models"]["name"] == "models"
    assert volumes(spec)["models"] == {"name": "models", "emptyDir": {}}
    assert sync["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_triton_init_container_checks_export_digest():
    plan, owner = serving_plan()
    plan = dataclasses.replace(plan, repository_digest="sha256:" + "ab" * 32)
    deployment = builders.triton_deployment(plan, owner, STORE, image=TRITON_IMAGE,
                                            sync_image=SYNC_IMAGE)
    command = deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert command[-2:] == ["--digest", "sha256:" + "ab" * 32]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations[builders.ANNOTATION_REPOSITORY_DIGEST] == "sha256:" + "ab" * 32


def test_triton_init_container_syncs_s3():
    store = builders.ArtifactStore("s3://bucket/lathe")
    model = resource("ModelDeployment", name="ner-api")
    plan = plans.serving(model, store.output_uri(NAMESPACE, "ModelDeployment", "ner-api"))
    deployment = builders.triton_deployment(plan, owner_of(model), store, image=TRITON_IMAGE,
                                            sync_image=SYNC_IMAGE,
                                            s3_secret="lathe-s3")  # fmt: skip
    spec = deployment["spec"]["template"]["spec"]
    command = spec["initContainers"][0]["command"]
    assert command == ["python", "-m", "lathe_trainer.serving.sync",
                       "s3://bucket/lathe/ml/modeldeployment/ner-api", "/models",
                       "--repository", "model_repository"]
    assert not [volume for volume in spec["volumes"] if "persistentVolumeClaim" in volume]
    assert spec["initContainers"][0]["envFrom"] == [{"secretRef": {"name": "lathe-s3"}}]
    # The Triton server reads /models only, so it gets no credentials.
    assert "envFrom" not in spec["containers"][0]


@pytest.mark.parametrize(("root", "with_secret"), [("s3://bucket/lathe", True),
                                                   ("pvc://lathe-artifacts/lathe", False)])
def test_training_job_gets_s3_secret_for_s3_only(root, with_secret):
    store = builders.ArtifactStore(root)
    model = resource("PretrainJob")
    plan = plans.build(model, inputs_for(model), store.output_uri(NAMESPACE, "PretrainJob", "med"),
                       DATA_DIR)  # fmt: skip
    job = builders.training_job(plan, owner_of(model), store, attempt=0, image=IMAGE,
                                resume=False, s3_secret="lathe-s3")  # fmt: skip
    expected = [{"secretRef": {"name": "lathe-s3"}}] if with_secret else None
    assert container(job).get("envFrom") == expected


def write_export(output: Path) -> dict:
    """Write a model repository and its manifest as the export stage does."""
    from lathe_trainer.stage import combined_digest, digest_outputs

    repository = output / "model_repository"
    (repository / "ner" / "1").mkdir(parents=True)
    (repository / "ner" / "config.pbtxt").write_text('name: "ner"\n')
    (repository / "ner" / "1" / "model.onnx").write_bytes(b"\x08\x07")
    (output / "report.json").write_text("{}")
    files = digest_outputs(output)
    manifest = {"digest": combined_digest(files), "outputs": files}
    (output / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def run_sync(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the init container's command with this interpreter."""
    return subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True,
                          timeout=60, env=env)


def test_sync_copies_checked_repository(tmp_path):
    manifest = write_export(tmp_path / "export")
    target = tmp_path / "models"
    command = builders_serving.sync_command(f"file://{tmp_path}/export/model_repository", STORE,
                                            manifest["digest"])
    result = run_sync(command[:3] + [f"file://{tmp_path}/export", str(target)] + command[5:])
    assert result.returncode == 0, result.stderr
    assert (target / "ner" / "config.pbtxt").read_text() == 'name: "ner"\n'
    assert (target / "ner" / "1" / "model.onnx").read_bytes() == b"\x08\x07"
    assert not (target / "model_repository").exists()
    assert not (target / "report.json").exists()


@pytest.mark.parametrize("damage, message", [
    ("rewrite", "model.onnx of .* has digest sha256:.*, the manifest lists"),
    ("extra", "files not listed: \\['ner/2/model.onnx'\\]"),
    ("no-manifest", "has no manifest.json: its export has not finished"),
    ("other-digest", "but this pod expects sha256:0000"),
])
def test_sync_rejects_repository_unlike_manifest(tmp_path, damage, message):
    """A repository that an export is rewriting, or another export than the pod expects, is
    not copied. The container exits 1, so the kubelet retries it."""
    from lathe_trainer.serving import sync

    output = tmp_path / "export"
    manifest = write_export(output)
    expected = manifest["digest"]
    if damage == "rewrite":
        (output / "model_repository" / "ner" / "1" / "model.onnx").write_bytes(b"half")
    elif damage == "extra":
        (output / "model_repository" / "ner" / "2").mkdir()
        (output / "model_repository" / "ner" / "2" / "model.onnx").write_bytes(b"new")
    elif damage == "no-manifest":
        (output / "manifest.json").unlink()
    else:
        expected = "sha256:" + "0" * 64
    with pytest.raises(sync.SyncError, match=message):
        sync.sync(f"file://{output}", "model_repository", tmp_path / "models", expected)
    assert sync.main([f"file://{output}", str(tmp_path / "models2"), "--digest", expected]) == 1


def test_sync_copies_repository_from_s3(tmp_path, s3_store):
    """Runs the init container's command against a real S3 store, with the AWS_* variables
    that LATHE_S3_SECRET would give the container."""
    from lathe_trainer.training import storage

    local = tmp_path / "export"
    manifest = write_export(local)
    output = f"s3://lathe/sync-{uuid.uuid4().hex}"
    filesystem, base = storage.resolve(output)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            filesystem.pipe_file(f"{base}/{path.relative_to(local).as_posix()}",
                                 path.read_bytes())
    target = tmp_path / "models"
    command = builders_serving.sync_command(f"{output}/model_repository",
                                            builders.ArtifactStore("s3://lathe"),
                                            manifest["digest"])
    command[4] = str(target)
    result = run_sync(command, env={**os.environ, **s3_store.env})
    assert result.returncode == 0, result.stderr
    assert (target / "ner" / "config.pbtxt").read_text() == 'name: "ner"\n'
    assert (target / "ner" / "1" / "model.onnx").read_bytes() == b"\x08\x07"


@pytest.mark.parametrize(("gpus", "limit"), [(0, None), (1, "1")])
def test_triton_gpu_limit_and_shm(gpus, limit):
    deployment = triton(spec={"serving": {"resources": {"gpus": gpus, "shmSize": "2Gi"}}})
    spec = deployment["spec"]["template"]["spec"]
    server = spec["containers"][0]
    assert server["resources"]["limits"].get("nvidia.com/gpu") == limit
    assert bool(spec.get("tolerations")) is (gpus > 0)
    assert volumes(spec)[mounts(server)["/dev/shm"]["name"]]["emptyDir"]["sizeLimit"] == "2Gi"
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_triton_selectors_exclude_export_pods():
    plan, owner = serving_plan()
    deployment = builders.triton_deployment(plan, owner, STORE, image=TRITON_IMAGE,
                                            sync_image=SYNC_IMAGE)
    selector = deployment["spec"]["selector"]["matchLabels"]
    export_labels = build_job("ModelDeployment")["spec"]["template"]["metadata"]["labels"]
    assert selector == deployment["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= export_labels.items()


def test_triton_service_ports():
    plan, owner = serving_plan()
    service = builders.triton_service(plan, owner)
    assert service["metadata"]["name"] == "ner-api-triton"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"},
        {"name": "grpc", "port": 8001, "targetPort": "grpc", "protocol": "TCP"},
        {"name": "metrics", "port": 8002, "targetPort": "metrics", "protocol": "TCP"},
    ]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "triton"


def test_hpa_scales_deployment_on_cpu():
    plan, owner = serving_plan()
    spec = AutoscalingSpec(enabled=True, min_replicas=2, max_replicas=6, target_cpu_utilization=60)
    hpa = builders.horizontal_pod_autoscaler(plan, owner, spec)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ner-api-triton",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 60},
    }


def test_hpa_rejects_min_above_max():
    plan, owner = serving_plan()
    # The API model rejects it first; the builder still guards a spec built without validation.
    with pytest.raises(ValueError, match="minReplicas must not exceed"):
        AutoscalingSpec(min_replicas=5, max_replicas=2)
    spec = AutoscalingSpec.model_construct(min_replicas=5, max_replicas=2)
    with pytest.raises(InvalidResourceError, match="minReplicas 5 exceeds maxReplicas 2"):
        builders.horizontal_pod_autoscaler(plan, owner, spec)


def test_pod_monitor_scrapes_metrics_port():
    plan, owner = serving_plan()
    monitor = builders.pod_monitor(plan, owner)
    deployment = builders.triton_deployment(plan, owner, STORE, image=TRITON_IMAGE,
                                            sync_image=SYNC_IMAGE)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics"}]
    assert monitor["spec"]["selector"]["matchLabels"] == (
        deployment["spec"]["template"]["metadata"]["labels"]
    )


# --- the launcher script, run under sh ---------------------------------------------------------

MODULE_ARGS = ["lathe_trainer", "pretrain", "--config", "/etc/lathe/config.json", "--resume"]


def write_tool(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def tools(tmp_path) -> Path:
    """A directory for stand-in commands, first on PATH."""
    directory = tmp_path / "bin"
    directory.mkdir()
    return directory


def launch_env(tools: Path, tmp_path: Path, **values: str) -> dict[str, str]:
    return {
        "PATH": f"{tools}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "LATHE_DNS_RETRY_SECONDS": "0",
        "LATHE_PERMANENT_MARKER": str(tmp_path / "permanent"),
        "LATHE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        **values,
    }


def distributed_env(tools: Path, tmp_path: Path, **values: str) -> dict[str, str]:
    return launch_env(
        tools,
        tmp_path,
        NNODES="2",
        NPROC="4",
        RDZV_ENDPOINT="med-pretrain-3-0.med-pretrain-3.ml.svc:29500",
        RDZV_ID=f"{UID}-3",
        **values,
    )


def run_launcher(environment: dict[str, str], args=MODULE_ARGS) -> subprocess.CompletedProcess:
    return subprocess.run(
        launcher.command(list(args)),
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_launcher_is_valid_posix_sh(tmp_path):
    script = tmp_path / "launch.sh"
    script.write_text(launcher.LAUNCHER)
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("index", "is_host"), [("0", "1"), ("1", "0")])
def test_launcher_waits_for_dns(tools, tmp_path, index, is_host):
    """A worker that starts before node 0's DNS record exists waits, then starts torchrun."""
    calls = tmp_path / "getent-calls"
    write_tool(
        tools,
        "getent",
        f'echo "$*" >> {calls}\n[ "$(wc -l < {calls})" -ge 3 ] || exit 2\necho "10.0.0.7 $2"\n',
    )
    write_tool(tools, "torchrun", f'printf "%s\\n" "$@" > {tmp_path / "torchrun-args"}\n')
    result = run_launcher(distributed_env(tools, tmp_path, JOB_COMPLETION_INDEX=index))
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["hosts med-pretrain-3-0.med-pretrain-3.ml.svc"] * 3
    assert result.stderr.count("does not resolve yet") == 2
    args = (tmp_path / "torchrun-args").read_text().splitlines()
    assert args[:8] == [
        "--nnodes=2",
        "--nproc-per-node=4",
        f"--node-rank={index}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=med-pretrain-3-0.med-pretrain-3.ml.svc:29500",
        f"--rdzv-id={UID}-3",
        f"--rdzv-conf=is_host={is_host}",
        "--max-restarts=0",
    ]
    assert args[8:10] == ["--no-python", "sh"]
    assert args[-len(MODULE_ARGS) - 1:] == ["lathe-worker", *MODULE_ARGS]


def test_launcher_starts_single_node_without_dns(tools, tmp_path):
    """A loopback rendezvous needs no name lookup, even where getent would fail."""
    write_tool(tools, "getent", f"touch {tmp_path / 'getent-ran'}\nexit 2\n")
    write_tool(tools, "torchrun", f'printf "%s\\n" "$@" > {tmp_path / "torchrun-args"}\n')
    environment = launch_env(
        tools, tmp_path, NNODES="1", NPROC="2", RDZV_ENDPOINT="127.0.0.1:29500",
        RDZV_ID=f"{UID}-0", LATHE_DNS_TIMEOUT_SECONDS="0",
    )
    result = run_launcher(environment)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "getent-ran").exists()
    args = (tmp_path / "torchrun-args").read_text().splitlines()
    assert "--rdzv-endpoint=127.0.0.1:29500" in args
    assert "--nnodes=1" in args


def test_launcher_gives_up_on_dns_at_deadline(tools, tmp_path):
    write_tool(tools, "getent", "exit 2\n")
    write_tool(tools, "torchrun", f"touch {tmp_path / 'torchrun-ran'}\n")
    environment = distributed_env(tools, tmp_path, LATHE_DNS_TIMEOUT_SECONDS="0")
    result = run_launcher(environment)
    assert result.returncode == 1
    assert "Timed out after 0 s waiting for the rendezvous host" in result.stderr
    message = (tmp_path / "termination-log").read_text()
    assert "Timed out after 0 s waiting for the rendezvous host" in message
    assert not (tmp_path / "torchrun-ran").exists()


@pytest.mark.parametrize("missing", ["NNODES", "NPROC", "RDZV_ID"])
def test_launcher_requires_rendezvous_settings(tools, tmp_path, missing):
    environment = distributed_env(tools, tmp_path)
    del environment[missing]
    result = run_launcher(environment)
    assert result.returncode == 1
    assert f"The environment variable {missing} is not set" in result.stderr


@pytest.mark.parametrize("code", [0, 3, EXIT_PERMANENT])
def test_launcher_runs_single_process_stage(tools, tmp_path, code):
    write_tool(tools, "stage-python", f'printf "%s\\n" "$@" > {tmp_path / "args"}\nexit {code}\n')
    write_tool(tools, "torchrun", f"touch {tmp_path / 'torchrun-ran'}\n")
    environment = launch_env(tools, tmp_path, LATHE_PYTHON="stage-python")
    result = run_launcher(environment, ["lathe_trainer", "corpus", "--config", "/etc/c.json"])
    assert result.returncode == code
    args = (tmp_path / "args").read_text().splitlines()
    assert args == ["-m", "lathe_trainer", "corpus", "--config", "/etc/c.json"]
    assert not (tmp_path / "torchrun-ran").exists()


def test_launcher_requires_module_args(tools, tmp_path):
    result = run_launcher(launch_env(tools, tmp_path), [])
    assert result.returncode == 1
    assert "No module arguments given" in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("worker_code", "launcher_code"), [(1, 1), (EXIT_PERMANENT, EXIT_PERMANENT)]
)
def test_launcher_keeps_permanent_exit(tools, tmp_path, worker_code, launcher_code):
    """The real torchrun exits 1 for any worker failure; the launcher restores code 42."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.fail(f"torchrun is missing beside {sys.executable}; install torch there.")
    write_tool(tools, "stage-python", f"exit {worker_code}\n")
    environment = launch_env(
        tools,
        tmp_path,
        PATH=f"{tools}{os.pathsep}{torchrun.parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
        LATHE_PYTHON="stage-python",
        NNODES="1",
        NPROC="1",
        RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
        RDZV_ID="test-0",
        JOB_COMPLETION_INDEX="0",
        OMP_NUM_THREADS="1",
    )
    result = run_launcher(environment)
    assert result.returncode == launcher_code, result.stderr[-2000:]
    assert (tmp_path / "permanent").exists() is (worker_code == EXIT_PERMANENT)


def test_launcher_forwards_sigterm_to_stage(tools, tmp_path):
    """The launcher is PID 1 in the pod; a stopped pod must stop its stage too."""
    pid_file = tmp_path / "stage.pid"
    write_tool(tools, "stage-python", f"echo $$ > {pid_file}.tmp\nmv {pid_file}.tmp {pid_file}\n"
                                      "exec sleep 300\n")
    environment = launch_env(tools, tmp_path, LATHE_PYTHON="stage-python")
    process = subprocess.Popen(launcher.command(MODULE_ARGS), env=environment,
                               stderr=subprocess.PIPE, text=True)
    stage_pid = None
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stage_pid = int(pid_file.read_text())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(stage_pid, 0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if stage_pid is not None:
            try:
                os.kill(stage_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


SCHEDULING = {
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "training",
                     "effect": "NoSchedule"}],
    "priorityClassName": "training-high",
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.mark.parametrize("kind", ["Corpus", "Tokenizer", "PretrainJob", "FineTune",
                                  "ModelDeployment"])  # fmt: skip
def test_job_pods_follow_scheduling(kind):
    spec = pod_spec(build_job(kind, spec={"scheduling": SCHEDULING}))
    assert spec["nodeSelector"] == SCHEDULING["nodeSelector"]
    assert spec["tolerations"] == SCHEDULING["tolerations"]
    assert spec["priorityClassName"] == "training-high"


def test_gpu_toleration_kept_beside_scheduling():
    spec = pod_spec(build_job(spec={"scheduling": SCHEDULING, "resources": {"gpus": 8}}))
    assert spec["tolerations"] == [GPU_TOLERATION, *SCHEDULING["tolerations"]]


def test_triton_pods_follow_serving_scheduling():
    spec = triton(spec={"serving": {"scheduling": SCHEDULING, "resources": {"gpus": 1}}})[
        "spec"]["template"]["spec"]  # fmt: skip
    assert spec["nodeSelector"] == SCHEDULING["nodeSelector"]
    assert spec["tolerations"] == [GPU_TOLERATION, *SCHEDULING["tolerations"]]
    assert spec["priorityClassName"] == "training-high"


def test_default_scheduling_adds_no_pod_fields():
    spec = pod_spec(build_job())
    assert "nodeSelector" not in spec
    assert "tolerations" not in spec
    assert "priorityClassName" not in spec


@pytest.mark.parametrize(("toleration", "message"), [
    ({"key": "a", "operator": "Exists", "value": "b"}, "remove value, or use operator Equal"),
    ({"operator": "Equal", "value": "b"}, "a toleration without key must use operator Exists"),
    ({"key": "a", "tolerationSeconds": 30, "effect": "NoSchedule"},
     "tolerationSeconds applies only to effect NoExecute"),
])
def test_invalid_toleration_rejected(toleration, message):
    with pytest.raises(ValueError, match=message):
        resource("PretrainJob", spec={"scheduling": {"tolerations": [toleration]}})


def test_spec_image_wins_over_default():
    deployment = triton(spec={"serving": {"image": "registry.local/triton:1"}}, image=None)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.local/triton:1"


def test_missing_triton_image_names_fix():
    with pytest.raises(ValueError, match="set spec.serving.image or the operator's "
                                         "LATHE_TRITON_IMAGE"):  # fmt: skip
        triton(image=None)


def test_corpus_workers_share_run_id_without_rendezvous():
    job = build_job("Corpus", {"workers": 3}, attempt=2)
    variables = env(job)
    assert variables["LATHE_RUN_ID"] == f"{UID}-r1-2"
    assert "RDZV_ENDPOINT" not in variables
    assert "subdomain" not in pod_spec(job)
    assert container(job)["command"][-4:-2] == ["lathe_trainer", "corpus"]


def test_stage_key_ignores_placement_and_workers():
    base = plans.stage_key(resource("Corpus"), {})
    placed = resource("Corpus", spec={"scheduling": SCHEDULING, "workers": 4})
    assert plans.stage_key(placed, {}) == base
    assert plans.stage_key(resource("Corpus", spec={"shards": 7}), {}) != base


@pytest.mark.parametrize(("selector", "message"), [
    ({"bad key!": "x"}, "is not a Kubernetes label key"),
    ({"example.com/": "x"}, "is not a Kubernetes label key"),
    ({"zone": "has space"}, "is not a Kubernetes label value"),
])
def test_invalid_node_selector_rejected(selector, message):
    with pytest.raises(ValueError, match=message):
        resource("PretrainJob", spec={"scheduling": {"nodeSelector": selector}})


def test_invalid_priority_class_rejected():
    with pytest.raises(ValueError, match="priorityClassName"):
        resource("PretrainJob", spec={"scheduling": {"priorityClassName": "Not_Valid"}})


@pytest.mark.parametrize("uri", ["ftp://host/x", "/tmp/plain", "pvc://claim-only", "gs://b/p"])
def test_storage_uri_scheme_rejected(uri):
    with pytest.raises(ValueError, match="use file:///absolute/path, pvc://<claim>/<path> or "
                                         "s3://<bucket>/<prefix>"):  # fmt: skip
        resource("Corpus", spec={"storage": {"uri": uri}})


def test_new_export_rolls_triton_pods():
    """The export digest annotates the pod template, so a new export changes the template and
    the Deployment replaces its pods, whose init container copies the new repository."""
    model = resource("ModelDeployment")
    uri = STORE.output_uri(NAMESPACE, "ModelDeployment", model.metadata.name)

    def template(digest: str) -> dict:
        plan = plans.serving(model, uri, digest)
        deployment = builders.triton_deployment(plan, owner_of(model), STORE, image=TRITON_IMAGE,
                                                sync_image=SYNC_IMAGE)  # fmt: skip
        return deployment["spec"]["template"]

    first, again, second = template("sha256:aa"), template("sha256:aa"), template("sha256:bb")
    assert first["metadata"]["annotations"] == {"lathe.dev/repository-digest": "sha256:aa"}
    assert first == again
    assert first != second
    assert "annotations" not in template("")["metadata"]


@pytest.mark.parametrize(
    ("kind", "spec", "same_key"),
    [
        ("PretrainJob", {"training": {"maxSteps": 4000, "learningRate": 1e-4}}, True),
        ("PretrainJob", {"distributed": {"nodes": 4}}, True),
        ("PretrainJob", {"suspend": True}, True),
        ("PretrainJob", {"sequenceLength": 256}, False),
        ("FineTune", {"training": {"maxSteps": 77}}, False),
        ("FineTune", {"suspend": True}, True),
        # More memory for an OOM-killed pod, or other pod labels, keep the checkpoints.
        ("PretrainJob", {"resources": {"memory": "64Gi"}}, True),
        ("FineTune", {"resources": {"memory": "64Gi"}}, True),
        ("PretrainJob", {"podMetadata": {"labels": {"team": "nlp"}}}, True),
    ],
)
def test_resume_key_continuable_fields(kind, spec, same_key):
    """A PretrainJob continues its checkpoints across spec.training and spec.distributed
    changes, and every stage across pod placement and resources. Any other change, and any
    FineTune change but those, starts over."""
    before = plan_for(resource(kind)).config
    after = plan_for(resource(kind, spec=spec)).config
    assert (after.resume_key == before.resume_key) is same_key
    output_unchanged = set(spec) <= {"suspend", "resources", "podMetadata"}
    assert (after.stage_key == before.stage_key) is output_unchanged


@pytest.mark.parametrize(("serving", "same_run"), [
    ({"replicas": 3}, True),
    ({"image": "nvcr.io/nvidia/tritonserver:25.01-py3"}, True),
    ({"httpPort": 9000}, True),
    ({"resources": {"memory": "8Gi"}}, True),
    ({"podMetadata": {"annotations": {"sidecar.istio.io/inject": "true"}}}, True),
    ({"maxBatchSize": 16}, False),
    ({"modelBackend": "onnxruntime"}, False),
])
def test_serving_only_change_keeps_export(serving, same_run):
    """Scaling Triton, or changing its image or ports, neither starts a new export run nor
    changes the export's stage key. A change to what the repository records (batching, the
    backend) does both."""
    from lathe.k8s.reconcile import _legacy_run_hash, _run_hash

    before = resource("ModelDeployment")
    after = resource("ModelDeployment", spec={"serving": serving})
    assert (_run_hash(after) == _run_hash(before)) is same_run
    assert (plans.stage_key(after, {}) == plans.stage_key(before, {})) is same_run
    scaled = resource("ModelDeployment", spec={"autoscaling": {"enabled": True}})
    assert _run_hash(scaled) == _run_hash(before)
    # A status written by an earlier release recorded the hash of the whole spec.
    assert _legacy_run_hash(before) != _run_hash(before)


def test_every_builder_reference_resolves():
    """Each `builders.<name>` that the operator's modules use exists, including the workload
    builders that lathe.k8s.builders re-exports from its submodules."""
    import ast

    from lathe.k8s import builders as module

    used = set()
    for path in (Path(module.__file__).parent).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "builders"):
                used.add(node.attr)
    assert "triton_labels" in used
    missing = sorted(name for name in used if not hasattr(module, name))
    assert missing == []


@pytest.mark.parametrize("kind", ["Corpus", "Tokenizer", "ModelDeployment"])
def test_stage_pods_get_pod_metadata(kind):
    """Every kind's stage pods take spec.podMetadata next to Lathe's own labels."""
    metadata = {"labels": {"team": "nlp"},
                "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}}
    job = build_job(kind, spec={"podMetadata": metadata})
    template = job["spec"]["template"]["metadata"]
    assert template["labels"]["team"] == "nlp"
    assert template["labels"]["lathe.dev/kind"] == kind
    assert template["annotations"] == metadata["annotations"]


def test_triton_pods_get_serving_pod_metadata():
    """spec.serving.podMetadata reaches the Triton pods next to Lathe's labels and the export's
    digest annotation."""
    plan, owner = serving_plan({"serving": {"podMetadata": {
        "labels": {"team": "nlp"}, "annotations": {"sidecar.istio.io/inject": "true"}}}})
    plan = dataclasses.replace(plan, repository_digest="sha256:export")
    deployment = builders.triton_deployment(plan, owner, STORE, image=TRITON_IMAGE,
                                            sync_image=SYNC_IMAGE)
    template = deployment["spec"]["template"]["metadata"]
    assert template["labels"]["team"] == "nlp"
    assert template["labels"]["app.kubernetes.io/component"] == "triton"
    assert template["annotations"] == {"sidecar.istio.io/inject": "true",
                                       "lathe.dev/repository-digest": "sha256:export"}
    # The selector keeps to Lathe's labels, so other labels can change without a new selector.
    assert "team" not in deployment["spec"]["selector"]["matchLabels"]


# The run hashes of the example resources as the first release recorded them in status.
RELEASED_RUN_HASHES = {
    "Corpus": "6da5fa292cdbc20e",
    "Tokenizer": "1553ec76bddf06e6",
    "PretrainJob": "1e2705995f8001ba",
    "FineTune": "ef8a45ff2897c71b",
    "ModelDeployment": "3477206d943be920",
}


def test_run_hashes_survive_upgrade():
    """A finished stage is not rerun by an operator upgrade: the run hash of an unchanged
    spec stays what an earlier release recorded, also when a release adds a field with a
    default. Fails when a new defaulted field enters the hash; leave it out of the hash as
    reconcile._POD_METADATA_OUTSIDE_RUN does, and keep the values here."""
    from lathe import loader
    from lathe.k8s.reconcile import _run_hash

    released = Path(__file__).resolve().parents[1] / "fixtures" / "released-pubmed.yaml"
    hashes = {resource.kind: _run_hash(resource) for resource in loader.load_paths([released])}
    assert hashes == RELEASED_RUN_HASHES


def test_set_window_stride_starts_new_run():
    """An added field stays out of the run hash only while it is unset."""
    from lathe import loader
    from lathe.k8s.reconcile import _run_hash

    released = Path(__file__).resolve().parents[1] / "fixtures" / "released-pubmed.yaml"
    deployment = next(resource for resource in loader.load_paths([released])
                      if resource.kind == "ModelDeployment")
    deployment.spec.export.window_stride = 16
    assert _run_hash(deployment) != RELEASED_RUN_HASHES["ModelDeployment"]


@pytest.mark.parametrize(("kind", "section", "field", "first", "reordered"), [
    ("Corpus", "pii", "redact", ["email", "phone", "ssn", "mrn"], ["mrn", "ssn", "phone", "email"]),
    ("ModelDeployment", "export", "checkSequenceLengths", [3, 20, 200], [200, 3, 20]),
])
def test_set_list_order_keeps_keys(kind, section, field, first, reordered):
    """A list whose order carries no meaning (a CRD listType set) gives one stage key, resume
    key and stage config spec in any order, so reordering it runs nothing again."""

    def config(items):
        spec = {section: {**SPECS[kind].get(section, {}), field: items}}
        return plan_for(resource(kind, spec=spec)).config

    before, after = config(first), config(reordered)
    assert after.stage_key == before.stage_key
    assert after.resume_key == before.resume_key
    assert after.spec == before.spec
