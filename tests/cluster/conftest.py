"""Fixtures of the cluster suite: one local control plane (bed.py) per test session.

The session fixture `bare_cluster` builds the bed's binaries on first use
(scripts/cluster-bed/build.sh, about 40 minutes once on 2 shared cores, then instant), starts the
bed and stops it at the end of the session. `cluster` is the same bed with Lathe's CRDs from
crds/ installed, when that directory has any. Every test in this directory is marked `cluster`.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bed import BUILD_SCRIPT, POLL_INTERVAL_SECONDS, REPO, BedError, ClusterBed, build

CRD_DIR = REPO / "crds"
HERE = Path(__file__).resolve().parent
POD_MONITOR_CRD_SCRIPT = REPO / "scripts" / "tools" / "podmonitor-crd.sh"
POD_MONITOR_CRD = "podmonitors.monitoring.coreos.com"
# The apiserver deletes a CRD once its finalizer has deleted every custom resource of it.
CRD_DELETE_TIMEOUT_SECONDS = 300


@dataclass
class Cluster:
    """A running bed as tests see it: its kubeconfig and kubectl."""

    bed: ClusterBed

    @property
    def kubeconfig(self) -> Path:
        return self.bed.kubeconfig

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the bed; with check, a non-zero exit raises BedError."""
        return self.bed.kubectl(*args, input=input, check=check, timeout=timeout)

    def get_json(self, *args: str) -> dict:
        """Run `kubectl get ARGS -o json` and return the decoded object or list."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: dict, namespace: str | None = None) -> None:
        namespace_args = ["--namespace", namespace] if namespace else []
        self.kubectl("apply", *namespace_args, "-f", "-", input=json.dumps(manifest))

    def wait_for(
        self, condition: Callable[[], bool], description: str, timeout: float = 60.0
    ) -> None:
        """Poll condition until it holds; fail the test after timeout seconds or if the bed dies."""
        deadline = time.monotonic() + timeout
        while not condition():
            self.bed.check_running()
            if time.monotonic() > deadline:
                pytest.fail(f"Timed out after {timeout:.0f} s waiting for {description}.")
            time.sleep(POLL_INTERVAL_SECONDS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.cluster)


def install_crds(cluster: Cluster) -> None:
    """Apply the CRDs in crds/, if it has any, and wait until the apiserver serves them."""
    files = sorted([*CRD_DIR.glob("*.yaml"), *CRD_DIR.glob("*.yml")])
    if not files:
        return
    file_args = [arg for path in files for arg in ("-f", str(path))]
    # Server-side apply: a large CRD would overflow client-side apply's annotation (256 KiB).
    cluster.kubectl("apply", "--server-side", *file_args)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *file_args,
                    timeout=90)  # fmt: skip


@pytest.fixture(scope="session")
def bare_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The running bed without Lathe's CRDs, for tests of the bed itself."""
    try:
        bin_dir = build()
    except (BedError, OSError) as error:
        pytest.skip(
            f"The cluster bed could not be built: {error}\n"
            f"Build it with `make cluster-bed` ({BUILD_SCRIPT}); it needs Go 1.26 and the Go "
            f"module proxy."
        )
    bed = ClusterBed(bin_dir, tmp_path_factory.mktemp("cluster-bed"))
    bed.start()
    try:
        yield Cluster(bed)
    finally:
        bed.stop()


@pytest.fixture(scope="session")
def cluster(bare_cluster: Cluster) -> Cluster:
    """The running bed with Lathe's CRDs from crds/ installed (when that directory has any)."""
    install_crds(bare_cluster)
    return bare_cluster


@pytest.fixture
def namespace(bare_cluster: Cluster) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists, deleted after the test."""
    cluster = bare_cluster
    name = f"test-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    # Pods are rejected until kube-controller-manager creates the namespace's `default` account.
    cluster.wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name,
                                check=False).returncode == 0,
        f"the default ServiceAccount in namespace {name}",
    )  # fmt: skip
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
    # kwok's held pods (lathe_objects.HOLD) can stay Terminating for minutes, and their GPU
    # requests would keep the fake nodes full for the tests after this one. A terminating
    # namespace takes no new pods, so the Job controller cannot replace them.
    cluster.kubectl("delete", "pods", "--all", "-n", name, "--grace-period=0", "--force",
                    "--wait=false", check=False)


@pytest.fixture(scope="session")
def lathe_operator(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory):
    """The Lathe operator under kopf.testing.KopfRunner, watching every namespace of the bed.

    Yields an object with `runner`, `metrics_url` and `artifact_root` (the file:// artifact
    store it plans outputs into).
    """
    from operator_runner import run_operator

    artifact_root = tmp_path_factory.mktemp("artifacts")
    with run_operator(cluster.kubeconfig, artifact_root) as running:
        yield running


@pytest.fixture
def ready_inputs(cluster, namespace):
    """A Corpus and a Tokenizer named `missing-on-purpose` that have succeeded, the inputs that
    `lathe_objects.pretrain_job` refers to."""
    from lathe_objects import corpus_and_tokenizer, is_true

    for document in corpus_and_tokenizer("missing-on-purpose"):
        cluster.apply(document, namespace)
    cluster.wait_for(
        lambda: is_true(cluster, "Tokenizer", "missing-on-purpose", namespace, "Succeeded"),
        "the input Corpus and Tokenizer to succeed", timeout=120,
    )


@pytest.fixture
def pod_monitor_crd(cluster: Cluster) -> Iterator[None]:
    """The Prometheus Operator's PodMonitor CRD (scripts/tools/podmonitor-crd.sh), installed for
    one test and removed after it, so that the other tests see a bed without it."""
    result = subprocess.run(["bash", str(POD_MONITOR_CRD_SCRIPT)], capture_output=True,
                            text=True, timeout=600, check=False)
    path = Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    if result.returncode != 0 or path is None or not path.is_file():
        pytest.skip(
            f"The PodMonitor CRD could not be fetched: {result.stderr.strip()[-2000:]}\n"
            f"Fetch it with `{POD_MONITOR_CRD_SCRIPT.relative_to(REPO)}` (part of `make tools`; "
            "needs Go and the Go module proxy)."
        )
    cluster.kubectl("apply", "--server-side", "-f", str(path))

    def established() -> bool:
        # `kubectl wait` fails instead of waiting while a new CRD has no conditions yet.
        conditions = cluster.get_json("crd", POD_MONITOR_CRD).get("status", {}).get(
            "conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    cluster.wait_for(established, f"the CRD {POD_MONITOR_CRD} to be established", timeout=60)
    try:
        yield
    finally:
        # Deleting the CRD deletes every PodMonitor. Later tests must run without it, so the
        # teardown polls until it is gone, instead of `kubectl delete --wait`, which once still
        # waited after 120 s in CI while the CRD had no PodMonitors.
        cluster.kubectl("delete", "crd", POD_MONITOR_CRD, "--wait=false", "--ignore-not-found")
        _wait_until_deleted(cluster, "crd", POD_MONITOR_CRD, timeout=CRD_DELETE_TIMEOUT_SECONDS)


def _wait_until_deleted(cluster: Cluster, kind: str, name: str, timeout: float) -> None:
    """Poll until `kind/name` is gone; on timeout, fail with its finalizers and conditions."""
    deadline = time.monotonic() + timeout
    while True:
        output = cluster.kubectl("get", kind, name, "-o", "json", "--ignore-not-found").stdout
        if not output.strip():
            return
        if time.monotonic() > deadline:
            found = json.loads(output)
            pytest.fail(
                f"{kind}/{name} still exists {timeout:.0f} s after its deletion: finalizers "
                f"{found['metadata'].get('finalizers')}, conditions "
                f"{found.get('status', {}).get('conditions')}."
            )
        cluster.bed.check_running()
        time.sleep(POLL_INTERVAL_SECONDS)
