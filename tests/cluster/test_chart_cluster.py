"""The Helm chart against the bed's real kube-apiserver: validation, admission and RBAC.

The chart's CRDs are applied for real; every other object of each mode goes through
`kubectl apply --server-side --dry-run=server`, so the API server validates and admits it without
keeping it. The RBAC tests create the ServiceAccount and its roles for real and ask the API
server, through impersonation, what that account may do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bed import REPO

CHART = REPO / "charts" / "lathe"
HELM_SCRIPT = REPO / "scripts" / "tools" / "helm.sh"
EXAMPLES = REPO / "examples" / "pubmed"
HELM_BUILD_TIMEOUT_SECONDS = 3600
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
CLUSTER_SCOPED_KINDS = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

# (verb, resource, subresource) the operator's account must be allowed in a watched namespace.
# PodMonitors are checked on their own, with their CRD installed (test_account_pod_monitors).
ALLOWED = [
    ("create", "jobs.batch", None),
    ("delete", "jobs.batch", None),
    ("watch", "jobs.batch", None),
    ("list", "pods", None),
    ("create", "configmaps", None),
    ("patch", "services", None),
    ("create", "deployments.apps", None),
    ("patch", "horizontalpodautoscalers.autoscaling", None),
    ("watch", "horizontalpodautoscalers.autoscaling", None),
    ("create", "events", None),
    ("list", "events", None),
    ("watch", "corpora.lathe.dev", None),
    ("patch", "pretrainjobs.lathe.dev", "status"),
    ("update", "modeldeployments.lathe.dev", "finalizers"),
]
# (verb, resource, subresource) it must be denied everywhere.
DENIED = [
    ("get", "secrets", None),
    ("list", "secrets", None),
    ("create", "pods", None),
    ("delete", "deployments.apps", None),
    ("get", "configmaps", None),
    ("delete", "corpora.lathe.dev", None),
    ("update", "pretrainjobs.lathe.dev", None),
    ("create", "rolebindings.rbac.authorization.k8s.io", None),
]


def find_helm() -> str:
    """Return the helm binary: LATHE_HELM if set, else the one scripts/tools/helm.sh builds."""
    if os.environ.get("LATHE_HELM"):
        return os.environ["LATHE_HELM"]
    result = subprocess.run(
        ["bash", str(HELM_SCRIPT)], capture_output=True, text=True,
        timeout=HELM_BUILD_TIMEOUT_SECONDS, check=False,
    )
    path = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not os.access(path, os.X_OK):
        raise RuntimeError(result.stderr.strip()[-2000:] or "helm.sh printed no path")
    return path


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return find_helm()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(
            f"helm could not be built, so the chart was not rendered: {error}\n"
            f"Build it with `{HELM_SCRIPT.relative_to(REPO)}` (needs Go 1.26 and the Go module "
            "proxy), or set LATHE_HELM to a helm v3 or v4 binary."
        )


def render(helm: str, release: str, namespace: str, *set_args: str) -> list[dict]:
    result = subprocess.run(
        [helm, "template", release, str(CHART), "--namespace", namespace, *set_args],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def as_yaml(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def chart_crds(cluster, helm) -> None:
    """Apply the chart's CRDs for real, so that the examples and the operator's objects validate."""
    crds = [obj for obj in render(helm, "lathe", "default")
            if obj["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 5
    cluster.kubectl("apply", "--server-side", "-f", "-", input=as_yaml(crds))
    for crd in crds:
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        f"crd/{crd['metadata']['name']}", timeout=90)


@pytest.fixture
def namespaces(cluster) -> Iterator[list[str]]:
    """Three fresh namespaces: the release's and two watched ones, deleted after the test."""
    names = [unique("chart"), unique("team-a"), unique("team-b")]
    for name in names:
        cluster.kubectl("create", "namespace", name)
    yield names
    for name in names:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def mode_args(mode: str, watched: list[str]) -> list[str]:
    return {
        "cluster-wide": [],
        "namespaced": ["--set", "mode=namespaced", "--set", f"watchNamespaces={{{','.join(watched)}}}"],
        "crds-off": ["--set", "crds.install=false"],
        "artifact-mount": ["--set", "artifacts.mount.enabled=true"],
        "s3": ["--set", "operator.artifactRoot=s3://lathe/runs", "--set",
               "operator.s3Secret=lathe-s3"],
    }[mode]


def delete_cluster_scoped(cluster, objects: list[dict]) -> None:
    for obj in objects:
        if obj["kind"] in CLUSTER_SCOPED_KINDS - {"CustomResourceDefinition"}:
            cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"],
                            "--ignore-not-found", check=False)


# NB: the ServiceMonitor mode is left out: the bed has no prometheus-operator CRDs.
@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced", "crds-off", "artifact-mount", "s3"])
def test_chart_passes_server_dry_run(cluster, helm, chart_crds, namespaces, mode):
    release_namespace, *watched = namespaces
    release = unique("lathe")
    objects = render(helm, release, release_namespace, *mode_args(mode, watched))
    result = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                             input=as_yaml(objects), check=False)
    assert result.returncode == 0, result.stderr
    for obj in objects:
        assert f"{obj['metadata']['name']} serverside-applied (server dry run)" in result.stdout


def test_examples_validate_against_chart_crds(cluster, chart_crds, namespaces):
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert files, f"no examples in {EXAMPLES}"
    args = [arg for path in files for arg in ("-f", str(path))]
    result = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-n", namespaces[0],
                             *args, check=False)
    assert result.returncode == 0, result.stderr


def can_i(cluster, account: str, namespace: str, verb: str, resource: str,
          subresource: str | None) -> bool:
    args = ["auth", "can-i", verb, resource, "--namespace", namespace, f"--as={account}"]
    if subresource:
        args.append(f"--subresource={subresource}")
    result = cluster.kubectl(*args, check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


@pytest.fixture
def installed_rbac(cluster, helm, namespaces, request) -> Iterator[tuple[str, list[str]]]:
    """Create the chart's ServiceAccount and RBAC for real; yield the account and watched names."""
    release_namespace, *watched = namespaces
    release = unique("lathe")
    objects = [obj for obj in render(helm, release, release_namespace,
                                     *mode_args(request.param, watched))
               if obj["kind"] in RBAC_KINDS]
    cluster.kubectl("apply", "--server-side", "-f", "-", input=as_yaml(objects))
    account = f"system:serviceaccount:{release_namespace}:{release}"
    try:
        yield account, watched
    finally:
        delete_cluster_scoped(cluster, objects)


@pytest.mark.parametrize("installed_rbac", ["cluster-wide", "namespaced"], indirect=True)
def test_account_may_do_operator_work(cluster, installed_rbac):
    account, watched = installed_rbac
    for namespace in watched:
        for verb, resource, subresource in ALLOWED:
            assert can_i(cluster, account, namespace, verb, resource, subresource), (
                f"{account} may not {verb} {resource} {subresource or ''} in {namespace}"
            )


@pytest.mark.parametrize("installed_rbac", ["cluster-wide", "namespaced"], indirect=True)
def test_account_is_denied_the_rest(cluster, installed_rbac, namespaces):
    account, _ = installed_rbac
    for namespace in namespaces:
        for verb, resource, subresource in DENIED:
            assert not can_i(cluster, account, namespace, verb, resource, subresource), (
                f"{account} may {verb} {resource} {subresource or ''} in {namespace}"
            )
    assert not can_i(cluster, account, "default", "delete", "namespaces", None)
    assert not can_i(cluster, account, "default", "create", "customresourcedefinitions"
                     ".apiextensions.k8s.io", None)


@pytest.mark.parametrize("installed_rbac", ["cluster-wide", "namespaced"], indirect=True)
def test_account_pod_monitors(cluster, installed_rbac, pod_monitor_crd):
    """With the PodMonitor CRD installed, so that kubectl resolves the name, the account may
    apply PodMonitors in a watched namespace (server-side apply is create or patch) and do
    nothing else with them."""
    account, watched = installed_rbac
    for verb in ("create", "patch"):
        assert can_i(cluster, account, watched[0], verb, "podmonitors.monitoring.coreos.com",
                     None), verb
    for verb in ("get", "list", "watch", "delete"):
        assert not can_i(cluster, account, watched[0], verb,
                         "podmonitors.monitoring.coreos.com", None), verb


@pytest.mark.parametrize("installed_rbac", ["cluster-wide", "namespaced"], indirect=True)
def test_account_reads_only_pod_monitor_crd(cluster, installed_rbac, request):
    """Both modes read the PodMonitor CRD by name. Only clusterWide mode lists and watches
    CRDs, because kopf's scanning is on there."""
    account, _ = installed_rbac
    crds = "customresourcedefinitions.apiextensions.k8s.io"
    assert can_i(cluster, account, "default", "get",
                 f"{crds}/podmonitors.monitoring.coreos.com", None)
    assert not can_i(cluster, account, "default", "get", f"{crds}/corpora.lathe.dev", None)
    scanning = request.node.callspec.params["installed_rbac"] == "cluster-wide"
    for verb in ("list", "watch"):
        assert can_i(cluster, account, "default", verb, crds, None) == scanning, verb


@pytest.mark.parametrize("installed_rbac", ["cluster-wide", "namespaced"], indirect=True)
def test_account_may_hold_only_its_lease(cluster, installed_rbac, namespaces):
    account, watched = installed_rbac
    release_namespace = namespaces[0]
    lease = f"leases.coordination.k8s.io/{account.rsplit(':', 1)[1]}-leader"
    for verb in ("get", "update"):
        assert can_i(cluster, account, release_namespace, verb, lease, None), verb
    assert can_i(cluster, account, release_namespace, "create", "leases.coordination.k8s.io",
                 None)
    assert not can_i(cluster, account, release_namespace, "update",
                     "leases.coordination.k8s.io/kube-scheduler", None)
    assert not can_i(cluster, account, release_namespace, "delete", lease, None)
    for namespace in [*watched, "kube-system"]:
        assert not can_i(cluster, account, namespace, "create", "leases.coordination.k8s.io",
                         None), namespace


@pytest.mark.parametrize("installed_rbac", ["namespaced"], indirect=True)
def test_namespaced_account_stays_in_its_namespaces(cluster, installed_rbac, namespaces):
    account, _ = installed_rbac
    release_namespace = namespaces[0]
    for namespace in (release_namespace, "default"):
        assert not can_i(cluster, account, namespace, "create", "jobs.batch", None)
        assert not can_i(cluster, account, namespace, "list", "corpora.lathe.dev", None)


@pytest.mark.parametrize("installed_rbac", ["namespaced"], indirect=True)
def test_namespaced_operator_serves_its_namespaces(cluster, installed_rbac, tmp_path):
    """The operator, with the namespaced account's token and the chart's arguments, reconciles
    in a watched namespace without first trying to list namespaces, which it may not.

    It runs as its own process, as in the chart, because kopf keeps state between runs in one
    process.
    """
    from lathe_objects import corpus_and_tokenizer, is_true

    account, watched = installed_rbac
    release_namespace, name = account.rsplit(":", 2)[1:]
    token = cluster.kubectl("create", "token", name, "-n", release_namespace).stdout.strip()
    kubeconfig = tmp_path / "operator.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "bed", "cluster": {
            "server": cluster.bed.server,
            "certificate-authority": str(cluster.bed.pki_dir / "ca.crt")}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "bed", "user": "operator"}}],
    }))
    environment = {
        **os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1",
        "LATHE_ARTIFACT_ROOT": f"file://{tmp_path / 'artifacts'}", "LATHE_METRICS_PORT": "0",
        "LATHE_TRAINER_IMAGE": "lathe-trainer:test", "LATHE_SYNC_IMAGE": "lathe-trainer:test",
        "LATHE_WATCH_NAMESPACES": ",".join(watched),
    }
    kopf = Path(sys.executable).with_name("kopf")
    command = [str(kopf), "run", "--standalone", "--module=lathe.k8s.handlers",
               *(f"--namespace={namespace}" for namespace in watched)]
    log_path = tmp_path / "operator.log"
    with log_path.open("w") as log_file:
        operator = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=environment)
        try:
            for document in corpus_and_tokenizer("scoped"):
                cluster.apply(document, watched[0])
            cluster.wait_for(lambda: is_true(cluster, "Tokenizer", "scoped", watched[0],
                                             "Succeeded"),
                             "the Corpus and Tokenizer to succeed under the namespaced account",
                             timeout=90)
        finally:
            operator.terminate()
            operator.wait(timeout=60)
    output = log_path.read_text()
    # kopf logs each forbidden request, and retries listing namespaces for about a minute.
    forbidden = [line for line in output.splitlines() if "Forbidden" in line]
    assert forbidden == [], output[-3000:]


def triton_like_objects(name: str) -> list[dict]:
    labels = {"app": name}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
         "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                      {"name": "triton", "image": "registry.invalid/triton:0"}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 8000}]}},
    ]


@pytest.mark.parametrize("installed_rbac", ["namespaced"], indirect=True)
def test_server_side_apply_creates_as_operator(cluster, installed_rbac, namespaces):
    """The operator creates Triton objects by server-side apply; the API server authorizes that
    as create and patch, so the account needs both, and nothing more, in a watched namespace."""
    account, watched = installed_rbac
    manifest = as_yaml(triton_like_objects("triton"))
    for namespace in watched:
        result = cluster.kubectl(
            "apply", "--server-side", "--field-manager=lathe-operator", f"--as={account}",
            "-n", namespace, "-f", "-", input=manifest, check=False,
        )
        assert result.returncode == 0, result.stderr
    denied = cluster.kubectl(
        "apply", "--server-side", "--field-manager=lathe-operator", f"--as={account}",
        "-n", namespaces[0], "-f", "-", input=manifest, check=False,
    )
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr


def test_upgrade_turns_leader_election_off(cluster, helm, chart_crds, namespaces):
    """A release installed with leader election (RollingUpdate) upgrades to Recreate: the
    rollingUpdate block the API server keeps must not block the change."""
    release_namespace = namespaces[0]
    release = unique("lathe")
    environment = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}

    def helm_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([helm, *args, release, str(CHART), "-n", release_namespace,
                               "--set", "crds.install=false"],
                              capture_output=True, text=True, timeout=300, env=environment,
                              check=False)  # fmt: skip

    try:
        installed = helm_run("install")
        assert installed.returncode == 0, installed.stderr
        upgraded = helm_run("upgrade", "--set", "leaderElection.enabled=false")
        assert upgraded.returncode == 0, upgraded.stderr
        deployment = cluster.get_json("deployment", release, "-n", release_namespace)
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        back = helm_run("upgrade", "--set", "leaderElection.enabled=true")
        assert back.returncode == 0, back.stderr
    finally:
        subprocess.run([helm, "uninstall", release, "-n", release_namespace], env=environment,
                       capture_output=True, timeout=300, check=False)
