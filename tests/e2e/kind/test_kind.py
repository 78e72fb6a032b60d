"""The PubMed example in a kind cluster: real images, the Helm chart, Jobs and Triton.

The suite creates a cluster from kind-config.yaml (one control plane, two workers, one labelled
as a GPU node). It builds the three images from images/, loads them into the nodes and installs
the chart. Then it applies examples/pubmed/ with CPU-sized training settings, waits for the
ModelDeployment to be Ready, and sends text to Triton through `kubectl port-forward`.

It needs Docker with a running engine, kind, helm and kubectl, and is skipped where any of them
is missing. tests/e2e/kind/README.md says how to run it and what it needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import yaml

from lathe.api import KINDS
from lathe.k8s import builders

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "pubmed"
HEALTH_SCRIPTS = REPO / "charts" / "lathe" / "argocd"
STATUS_FIXTURES = REPO / "tests" / "fixtures" / "status"

CLUSTER = os.environ.get("LATHE_KIND_CLUSTER", "lathe-e2e")
NAMESPACE = "lathe"
CLAIM = "lathe-artifacts"
# Where kind mounts the host's artifact directory inside every node.
NODE_ARTIFACTS = "/lathe-artifacts"
OPERATOR_IMAGE = ("lathe-operator", "e2e")
TRAINER_IMAGE = ("lathe-trainer", "e2e")
TRITON_IMAGE = ("lathe-triton", "e2e")
# The whole example (five stages, image pulls included) must finish within this many seconds.
PIPELINE_TIMEOUT = float(os.environ.get("LATHE_KIND_TIMEOUT", "3600"))
POLL_SECONDS = 10

# Sizes that keep the example to minutes on a workstation's CPUs, as in tests/e2e/test_pipeline.py.
CPU_OVERRIDES = {
    "PretrainJob": {"training": {"maxSteps": 30, "checkpointInterval": 15, "evalInterval": 15}},
    "FineTune": {"training": {"maxSteps": 60}, "maxTrainSentences": 1500,
                 "maxEvalSentences": 300},
}

# Values of charts/lathe for this cluster: the images loaded into the nodes (never pulled) and
# the artifact claim that every node shares through the kind mount.
HELM_VALUES = {
    "image.repository": OPERATOR_IMAGE[0],
    "image.tag": OPERATOR_IMAGE[1],
    "image.pullPolicy": "Never",
    "operator.trainerImage": ":".join(TRAINER_IMAGE),
    "operator.tritonImage": ":".join(TRITON_IMAGE),
    "operator.artifactRoot": f"pvc://{CLAIM}/lathe",
}


def _tool(name: str) -> str | None:
    """Return the path of a command line tool, looking next to this interpreter too (kubectl)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def missing_requirements() -> list[str]:
    """Return one sentence per missing tool or engine; empty when the suite can run."""
    missing = [f"`{name}` is not installed" for name in ("docker", "kind", "helm", "kubectl")
               if _tool(name) is None]
    if _tool("docker") is not None:
        try:
            subprocess.run([_tool("docker"), "info"], check=True, capture_output=True, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            missing.append("`docker info` failed, so no Docker engine is running")
    return missing


_MISSING = missing_requirements()
if _MISSING:
    pytest.skip(
        f"The kind suite is skipped: {'; '.join(_MISSING)}. It needs Docker with a running "
        "engine, kind, helm and kubectl; run it on a workstation that has them with "
        "`make e2e-kind`.",
        allow_module_level=True,
    )

pytestmark = pytest.mark.kind


# -- commands ------------------------------------------------------------------------------------


def run(*command: str, env: dict | None = None, input_text: str | None = None,
        timeout: float = 900) -> str:
    """Run a command, raise with its output when it fails, and return its stdout."""
    argv = [_tool(command[0]) or command[0], *command[1:]]
    log.info("Running %s.", " ".join(argv))
    result = subprocess.run(argv, capture_output=True, text=True, env=env, input=input_text,
                            timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(argv)}` failed with exit code {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kind")


@pytest.fixture(scope="module")
def kube_env(workdir) -> dict[str, str]:
    """Environment that points kubectl and helm at the test cluster only."""
    return {**os.environ, "KUBECONFIG": str(workdir / "kubeconfig")}


def kubectl(env: dict, *args: str, **kwargs) -> str:
    return run("kubectl", "--namespace", NAMESPACE, *args, env=env, **kwargs)


# -- cluster setup -------------------------------------------------------------------------------


def artifact_dir(workdir: Path, data_dir: Path) -> Path:
    """Return a host directory, writable by the pods' user, holding a copy of the PubMed data."""
    root = workdir / "artifacts"
    # The operator's data root defaults to <artifactRoot>/data, that is <claim>/lathe/data.
    shutil.copytree(data_dir / "pubmed", root / "lathe" / "data" / "pubmed")
    for path in [root, *root.rglob("*")]:
        # NB: a hostPath volume ignores fsGroup, and the pods run as uid 1000, not as the owner.
        path.chmod(0o777 if path.is_dir() else 0o666)
    return root


def cluster_config(workdir: Path, artifacts: Path) -> Path:
    """Write kind-config.yaml with the artifact directory mounted into every node.

    Every node mounts the same host directory, so the hostPath volume below behaves as one
    ReadWriteMany volume, and a Job on any node reads what the previous stage wrote.
    """
    config = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    for node in config["nodes"]:
        node.setdefault("extraMounts", []).append(
            {"hostPath": str(artifacts), "containerPath": NODE_ARTIFACTS}
        )
    path = workdir / "kind-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def storage_objects() -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"{NAMESPACE}-{CLAIM}"},
            "spec": {
                "capacity": {"storage": "20Gi"},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": NODE_ARTIFACTS, "type": "Directory"},
                "claimRef": {"namespace": NAMESPACE, "name": CLAIM},
            },
        },
        {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": CLAIM, "namespace": NAMESPACE},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": f"{NAMESPACE}-{CLAIM}",
                "resources": {"requests": {"storage": "20Gi"}},
            },
        },
    ]


def build_and_load(env: dict) -> None:
    revision = run("git", "rev-parse", "HEAD").strip()
    images = ((OPERATOR_IMAGE, "operator"), (TRAINER_IMAGE, "trainer"), (TRITON_IMAGE, "triton"))
    for (name, tag), dockerfile in images:
        run("docker", "build", "--file", f"images/{dockerfile}.Dockerfile",
            "--build-arg", f"REVISION={revision}", "--tag", f"{name}:{tag}", ".", timeout=3600)
        run("kind", "load", "docker-image", f"{name}:{tag}", "--name", CLUSTER, env=env,
            timeout=1800)


@pytest.fixture(scope="module")
def cluster(workdir, kube_env, data_dir) -> Iterator[dict]:
    config = cluster_config(workdir, artifact_dir(workdir, data_dir))
    run("kind", "create", "cluster", "--name", CLUSTER, "--config", str(config),
        "--kubeconfig", kube_env["KUBECONFIG"], "--wait", "5m", env=kube_env)
    try:
        build_and_load(kube_env)
        run("kubectl", "apply", "-f", "-", env=kube_env,
            input_text=yaml.safe_dump_all(storage_objects()))
        values = [f"--set-string={key}={value}" for key, value in HELM_VALUES.items()]
        run("helm", "install", "lathe", "charts/lathe", "--namespace", NAMESPACE, *values,
            "--wait", "--timeout", "5m", env=kube_env)
        yield kube_env
    finally:
        if os.environ.get("LATHE_KIND_KEEP") == "1":
            log.warning("Keeping kind cluster %s (LATHE_KIND_KEEP=1); delete it with "
                        "`kind delete cluster --name %s`.", CLUSTER, CLUSTER)
        else:
            run("kind", "delete", "cluster", "--name", CLUSTER, env=kube_env)


# -- the example -----------------------------------------------------------------------------------


def _merge(target: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def cpu_sized_example() -> list[dict]:
    """Return the documents of examples/pubmed/ with CPU-sized training settings."""
    documents = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            _merge(document["spec"], CPU_OVERRIDES.get(document["kind"], {}))
            document["metadata"]["namespace"] = NAMESPACE
            documents.append(document)
    return documents


def read_resources(env: dict, documents: list[dict]) -> list[dict]:
    return [
        json.loads(kubectl(env, "get", KINDS[doc["kind"]].plural, doc["metadata"]["name"],
                           "--output", "json"))
        for doc in documents
    ]


def condition(obj: dict, condition_type: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == condition_type), None)


def wait_until_ready(env: dict, documents: list[dict]) -> list[dict]:
    """Poll the resources until every summary condition is True; fail at the first Failed."""
    deadline = time.monotonic() + PIPELINE_TIMEOUT
    while True:
        objects = read_resources(env, documents)
        for obj in objects:
            failed = condition(obj, "Failed")
            if failed and failed["status"] == "True":
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} failed: "
                            f"{failed['message']}")
        pending = [
            obj for obj in objects
            if (condition(obj, KINDS[obj["kind"]].summary_condition) or {}).get("status") != "True"
        ]
        if not pending:
            return objects
        if time.monotonic() > deadline:
            phases = {obj["metadata"]["name"]: (obj.get("status") or {}).get("phase")
                      for obj in pending}
            pytest.fail(f"Timed out after {PIPELINE_TIMEOUT:.0f} s waiting for {phases}.")
        time.sleep(POLL_SECONDS)


@pytest.fixture(scope="module")
def example(cluster) -> list[dict]:
    documents = cpu_sized_example()
    kinds = {doc["kind"] for doc in documents}
    assert kinds == set(KINDS), f"examples/pubmed/ lacks {sorted(set(KINDS) - kinds)}"
    kubectl(cluster, "apply", "--server-side", "-f", "-",
            input_text=yaml.safe_dump_all(documents))
    return wait_until_ready(cluster, documents)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def port_forward(env: dict, service: str, remote_port: int) -> Iterator[int]:
    """Forward a free loopback port to the Service and yield it once Triton reports ready."""
    port = free_port()
    process = subprocess.Popen(
        [_tool("kubectl"), "--namespace", NAMESPACE, "port-forward", "--address", "127.0.0.1",
         f"service/{service}", f"{port}:{remote_port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready",
                                            timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Port-forward to {service} did not become ready: "
                                     f"{process.stderr.read() if process.stderr else ''}")
            time.sleep(1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- tests -----------------------------------------------------------------------------------------


def test_nodes_carry_gpu_label(cluster):
    nodes = json.loads(run("kubectl", "get", "nodes", "--output", "json", env=cluster))["items"]
    labelled = [node["metadata"]["name"] for node in nodes
                if node["metadata"]["labels"].get("nvidia.com/gpu.present") == "true"]
    assert len(nodes) == 3
    assert len(labelled) == 1


def test_every_resource_reaches_summary(example):
    for obj in example:
        summary = condition(obj, KINDS[obj["kind"]].summary_condition)
        assert summary["status"] == "True", obj["metadata"]["name"]
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]


def test_argocd_health_is_healthy(example):
    """The Lua health checks agree with the operator on objects read from the API server."""
    from lupa import lua51

    for obj in example:
        lua = lua51.LuaRuntime(unpack_returned_tuples=True)
        lua.globals().obj = lua.table_from(obj, recursive=True)
        script = (HEALTH_SCRIPTS / f"lathe.dev_{obj['kind']}.lua").read_text()
        health = dict(lua.execute(script).items())
        assert health["status"] == "Healthy", (obj["metadata"]["name"], health)
    if os.environ.get("LATHE_REFRESH_STATUS_FIXTURES") == "1":
        refresh_fixtures(example)


def refresh_fixtures(objects: list[dict]) -> None:
    """Replace the Healthy status fixtures with the objects this cluster produced."""
    by_kind = {obj["kind"]: obj for obj in objects}
    for kind, name in (("Corpus", "corpus-succeeded.json"),
                       ("ModelDeployment", "modeldeployment-ready.json")):
        (STATUS_FIXTURES / name).write_text(json.dumps(by_kind[kind], indent=2) + "\n")


def test_triton_answers_through_port_forward(example, cluster):
    from lathe_trainer.serving.client import infer_entities

    deployment = next(obj for obj in example if obj["kind"] == "ModelDeployment")
    service = builders.object_name(deployment["metadata"]["name"], "triton")
    # status.endpoint is http://<service>.<namespace>.svc:<HTTP port>.
    endpoint = urlsplit(deployment["status"]["endpoint"])
    assert endpoint.hostname == f"{service}.{NAMESPACE}.svc"
    text = "Cisplatin-induced nephrotoxicity was seen in 5 mg/kg rats with diabetes mellitus."
    with port_forward(cluster, service, endpoint.port) as port:
        [entities] = infer_entities(f"127.0.0.1:{port}", deployment["spec"]["modelName"], [text])
    for entity in entities:
        assert text[entity["start"]:entity["end"]] == entity["text"]
        assert entity["label"]
