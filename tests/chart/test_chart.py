"""The Helm chart in charts/lathe, rendered with the real `helm` and checked without a cluster.

`helm` is built once from the Go module proxy by scripts/tools/helm.sh (or named by LATHE_HELM);
when it cannot be built, the tests that need it are skipped and say how to build it. The RBAC
tests keep a table of every API call the operator and kopf make, and check that the chart grants
exactly that table, and that the table covers every call in operator/lathe/k8s.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

import lathe
from lathe import crdgen
from lathe.api import GROUP, KINDS

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lathe"
HELM_SCRIPT = REPO / "scripts" / "tools" / "helm.sh"
K8S_PACKAGE = REPO / "operator" / "lathe" / "k8s"
RELEASE = "lathe"
RELEASE_NAMESPACE = "lathe-system"
SERVICE_ACCOUNT = "lathe"
# Building helm takes several minutes on 2 cores the first time, seconds after.
HELM_BUILD_TIMEOUT_SECONDS = 3600

PLURALS = sorted(model.plural for model in KINDS.values())

# Every (apiGroup, resource, verb) the operator needs, with the call that needs it. The chart must
# grant exactly these; test_operator_calls_are_in_table keeps the table in step with the code.
OPERATOR_PERMISSIONS: dict[tuple[str, str, str], str] = {
    **{(GROUP, plural, "get"): "Reconciler._resolve_inputs and on_job_event read resources"
       for plural in PLURALS},
    **{(GROUP, plural, "list"): "kopf lists the kinds it handles" for plural in PLURALS},
    **{(GROUP, plural, "watch"): "kopf watches the kinds it handles" for plural in PLURALS},
    **{(GROUP, plural, "patch"): "kopf patches the object (finalizers of the progress timers)"
       for plural in PLURALS},
    **{(GROUP, f"{plural}/status", "patch"): "kopf's patch.status and on_job_event write status"
       for plural in PLURALS},
    **{(GROUP, f"{plural}/finalizers", "update"):
       "owned objects set blockOwnerDeletion, which OwnerReferencesPermissionEnforcement checks"
       for plural in PLURALS},
    ("batch", "jobs", "create"): "Reconciler._create (training and export Jobs)",
    ("batch", "jobs", "get"): "Reconciler._read_job",
    ("batch", "jobs", "list"): "kopf lists Jobs for on_job_event; Reconciler._superseded",
    ("batch", "jobs", "watch"): "kopf watches Jobs for on_job_event",
    ("batch", "jobs", "patch"): "Reconciler patches a Job to suspend or resume it",
    ("batch", "jobs", "delete"): "Reconciler._delete_job after a failed attempt",
    ("", "pods", "list"): "Reconciler._job_pods reads exit codes and termination messages",
    ("", "configmaps", "create"): "Reconciler._create (stage config)",
    ("", "configmaps", "delete"): "Reconciler._delete_job deletes an attempt's ConfigMap",
    ("", "services", "delete"): "Reconciler._delete_job deletes an attempt's headless Service",
    ("", "services", "create"): "Reconciler._create (headless Service) and server-side apply",
    ("", "services", "patch"): "Reconciler._apply (Triton Service)",
    ("", "services", "list"): "kopf lists Triton Services for on_serving_event",
    ("", "services", "watch"): "kopf watches Triton Services for on_serving_event",
    ("apps", "deployments", "list"): "kopf lists Triton Deployments for on_serving_event",
    ("apps", "deployments", "watch"): "kopf watches Triton Deployments for on_serving_event",
    ("apps", "deployments", "create"): "Reconciler._apply creates the Triton Deployment",
    ("apps", "deployments", "patch"): "Reconciler._apply (Triton Deployment) and the handover "
                                      "of its replicas to the HorizontalPodAutoscaler",
    ("apps", "deployments", "get"): "Reconciler reads the Triton Deployment's ready replicas",
    ("autoscaling", "horizontalpodautoscalers", "create"): "Reconciler._apply creates the HPA",
    ("autoscaling", "horizontalpodautoscalers", "patch"): "Reconciler._apply (HPA)",
    ("autoscaling", "horizontalpodautoscalers", "list"):
        "kopf lists Triton HPAs for on_serving_event",
    ("autoscaling", "horizontalpodautoscalers", "watch"):
        "kopf watches Triton HPAs for on_serving_event",
    ("autoscaling", "horizontalpodautoscalers", "delete"):
        "Reconciler._delete_autoscaler, when autoscaling is turned off",
    ("monitoring.coreos.com", "podmonitors", "create"): "Reconciler._apply creates the PodMonitor",
    ("monitoring.coreos.com", "podmonitors", "patch"): "Reconciler._apply (PodMonitor)",
    ("", "events", "create"): "kopf posts events (core v1, POST only)",
    ("", "events", "list"): "Reconciler._failed_create reads a Job's FailedCreate events",
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"):
        "Reconciler._has_pod_monitor_crd",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf's resource discovery",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf's resource discovery",
}
CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions")}
POD_MONITOR_CRD = "podmonitors.monitoring.coreos.com"
# kopf lists and watches CRDs only while its scanning is on. The operator turns scanning off in
# namespaced mode (LATHE_WATCH_NAMESPACES), so the chart grants these in clusterWide mode only.
SCANNING_PERMISSIONS = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}

# Leader election (lathe/k8s/leader.py) needs the Lease in the release namespace only, so the
# chart grants it in a Role of its own there, in both modes.
LEADER_ELECTION_ROLE = f"{RELEASE}-leader-election"
LEASE = f"{RELEASE}-leader"
LEADER_ELECTION_PERMISSIONS: dict[tuple[str, str, str], str] = {
    ("coordination.k8s.io", "leases", "create"):
        "the client's LeaseLock.create, when no pod has held the Lease yet",
    ("coordination.k8s.io", "leases", "get"): "LeaseLock.get and LeaderElector.release",
    ("coordination.k8s.io", "leases", "update"):
        "LeaseLock.update renews or takes the Lease; LeaderElector.release frees it",
}

# kubernetes client methods the operator calls, as (apiGroup, resource, verb). A method missing
# here fails test_operator_calls_are_in_table: add it, and grant it in the chart's rules.
CLIENT_METHODS: dict[str, tuple[str, str, str]] = {
    "get_namespaced_custom_object": (GROUP, "*", "get"),
    "list_namespaced_custom_object": (GROUP, "*", "list"),
    # Reconciler._apply uses it only for PodMonitors.
    "patch_namespaced_custom_object": ("monitoring.coreos.com", "podmonitors", "patch"),
    "patch_namespaced_custom_object_status": (GROUP, "*/status", "patch"),
    "create_namespaced_config_map": ("", "configmaps", "create"),
    "delete_namespaced_config_map": ("", "configmaps", "delete"),
    "delete_namespaced_service": ("", "services", "delete"),
    "delete_namespaced_horizontal_pod_autoscaler": ("autoscaling", "horizontalpodautoscalers", "delete"),
    "create_namespaced_service": ("", "services", "create"),
    "create_namespaced_job": ("batch", "jobs", "create"),
    "read_namespaced_job": ("batch", "jobs", "get"),
    "list_namespaced_job": ("batch", "jobs", "list"),
    "patch_namespaced_job": ("batch", "jobs", "patch"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),
    "list_namespaced_pod": ("", "pods", "list"),
    "list_namespaced_event": ("", "events", "list"),
    "read_namespaced_deployment": ("apps", "deployments", "get"),
    # The handover of spec.replicas to the HorizontalPodAutoscaler (reconcile._hand_over_replicas).
    "patch_namespaced_deployment": ("apps", "deployments", "patch"),
    "read_custom_resource_definition": ("apiextensions.k8s.io", "customresourcedefinitions", "get"),
    # The kubernetes client's LeaseLock also calls create_namespaced_lease, outside this package.
    "read_namespaced_lease": ("coordination.k8s.io", "leases", "get"),
    "replace_namespaced_lease": ("coordination.k8s.io", "leases", "update"),
}
# API groups of the objects Reconciler._apply writes with server-side apply, by plural.
APPLY_GROUPS = {
    "deployments": "apps", "services": "", "horizontalpodautoscalers": "autoscaling",
    "podmonitors": "monitoring.coreos.com",
}

NAMESPACES = ["team-a", "team-b"]
MODES = {
    "default": [],
    "cluster-wide": ["--set", "mode=clusterWide"],
    "namespaced": ["--set", "mode=namespaced", "--set", f"watchNamespaces={{{','.join(NAMESPACES)}}}"],
    "crds-off": ["--set", "crds.install=false"],
    "service-monitor": ["--set", "metrics.serviceMonitor.enabled=true"],
}
EXPECTED_KINDS = {
    "default": {"CustomResourceDefinition": 5, "ServiceAccount": 1, "ClusterRole": 1,
                "ClusterRoleBinding": 1, "Role": 1, "RoleBinding": 1, "Deployment": 1,
                "Service": 1},
    "cluster-wide": {"CustomResourceDefinition": 5, "ServiceAccount": 1, "ClusterRole": 1,
                     "ClusterRoleBinding": 1, "Role": 1, "RoleBinding": 1, "Deployment": 1,
                     "Service": 1},
    "namespaced": {"CustomResourceDefinition": 5, "ServiceAccount": 1, "ClusterRole": 1,
                   "ClusterRoleBinding": 1, "Role": 3, "RoleBinding": 3, "Deployment": 1,
                   "Service": 1},
    "crds-off": {"ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1, "Role": 1,
                 "RoleBinding": 1, "Deployment": 1, "Service": 1},
    "service-monitor": {"CustomResourceDefinition": 5, "ServiceAccount": 1, "ClusterRole": 1,
                        "ClusterRoleBinding": 1, "Role": 1, "RoleBinding": 1, "Deployment": 1,
                        "Service": 1, "ServiceMonitor": 1},
}


# -- helm ------------------------------------------------------------------------------------


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


@pytest.fixture(scope="session")
def helm() -> str:
    try:
        return find_helm()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(
            f"helm could not be built, so the chart was not rendered: {error}\n"
            f"Build it with `{HELM_SCRIPT.relative_to(REPO)}` (needs Go 1.26 and the Go module "
            "proxy), or set LATHE_HELM to a helm v3 or v4 binary."
        )


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=300, check=False)


def helm_template(helm: str, *set_args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
    return run_helm(helm, "template", RELEASE, str(chart), "--namespace", RELEASE_NAMESPACE,
                    *set_args)


def render(helm: str, *set_args: str, chart: Path = CHART) -> list[dict]:
    """Render the chart with `helm template` and return its objects."""
    result = helm_template(helm, *set_args, chart=chart)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(helm: str, *set_args: str) -> str:
    """Render the chart with values that must be rejected, and return helm's error output."""
    result = helm_template(helm, *set_args)
    assert result.returncode != 0, f"helm accepted {set_args}:\n{result.stdout[:2000]}"
    return result.stderr


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def operator_container(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# -- RBAC helpers ----------------------------------------------------------------------------


def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def operator_roles(objects: list[dict], kind: str) -> list[dict]:
    """The ClusterRoles or Roles for reconciling, without the leader election Role."""
    return [role for role in of_kind(objects, kind)
            if role["metadata"]["name"] != LEADER_ELECTION_ROLE]


def role_rules(objects: list[dict]) -> list[dict]:
    return [rule for kind in ("ClusterRole", "Role") for role in operator_roles(objects, kind)
            for rule in role.get("rules") or []]


# -- tests without helm ----------------------------------------------------------------------


def test_chart_versions_match_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == lathe.__version__
    assert chart["appVersion"] == lathe.__version__


def test_chart_crds_match_generator():
    """Fails when someone changed an API model without running `python -m lathe.crdgen`."""
    for name, text in crdgen.render_chart_all().items():
        path = crdgen.CHART_CRD_DIR / name
        assert path.is_file(), f"{path} is missing; run `python -m lathe.crdgen`."
        assert path.read_text() == text, f"{path} is stale; run `python -m lathe.crdgen`."


def test_chart_crds_have_no_stray_files():
    expected = set(crdgen.render_chart_all())
    assert {path.name for path in crdgen.CHART_CRD_DIR.iterdir()} == expected


def test_chart_kind_list_matches_api():
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    pairs = re.search(r'define "lathe.kinds" -}}\n(.*)\n', helpers).group(1).split()
    assert dict(pair.split("=") for pair in pairs) == {
        name: model.plural for name, model in KINDS.items()
    }


def test_operator_calls_are_in_table():
    """Every kubernetes client call and server-side apply in operator/lathe/k8s is granted."""
    client_methods = kubernetes_client_methods()
    needed: set[tuple[str, str, str]] = set()
    for path in sorted(K8S_PACKAGE.glob("*.py")):
        called = set(re.findall(r"\.(\w+)\(", path.read_text())) & client_methods
        for method in sorted(called):
            assert method in CLIENT_METHODS, (
                f"{path.name} calls {method}, which the RBAC table does not know: add it to "
                "CLIENT_METHODS and OPERATOR_PERMISSIONS, and grant it in charts/lathe."
            )
            group, resource, verb = CLIENT_METHODS[method]
            resources = [resource.replace("*", plural) for plural in PLURALS] \
                if "*" in resource else [resource]
            needed |= {(group, item, verb) for item in resources}
    needed |= applied_permissions()
    needed |= kopf_permissions()
    missing = sorted(needed - OPERATOR_PERMISSIONS.keys() - LEADER_ELECTION_PERMISSIONS.keys())
    assert not missing, f"the operator needs {missing}, which OPERATOR_PERMISSIONS lacks"


def kubernetes_client_methods() -> set[str]:
    """Names of the API methods of the kubernetes client (CoreV1Api.create_namespaced_pod, ...)."""
    import kubernetes.client

    return {
        name
        for class_name in dir(kubernetes.client) if class_name.endswith("Api")
        for name in dir(getattr(kubernetes.client, class_name))
        if re.match(r"(create|read|list|patch|delete|replace|connect)_", name)
        and not name.endswith("_with_http_info")
    }


def applied_permissions() -> set[tuple[str, str, str]]:
    """Server-side apply creates or patches, so each applied kind needs both verbs."""
    from lathe.k8s.reconcile import Reconciler

    plurals = re.findall(r'"\w+": "(\w+)"', inspect.getsource(Reconciler._apply))
    assert plurals, "Reconciler._apply no longer maps kinds to plurals; update this test"
    unknown = sorted(set(plurals) - APPLY_GROUPS.keys())
    assert not unknown, f"Reconciler._apply writes {unknown}; add their group to APPLY_GROUPS"
    return {(APPLY_GROUPS[plural], plural, verb) for plural in plurals
            for verb in ("create", "patch")}


def kopf_permissions() -> set[tuple[str, str, str]]:
    """kopf lists and watches every resource with a handler, and patches in finalizers."""
    import kopf

    import lathe.k8s.handlers  # noqa: F401 (registers the handlers)

    registry = kopf.get_default_registry()
    needed = set()
    for handler_registry in (registry._watching, registry._spawning, registry._changing):
        for handler in handler_registry.get_all_handlers():
            selector = handler.selector
            group, plural = selector.group or "", selector.plural or selector.any_name
            needed |= {(group, plural, "list"), (group, plural, "watch")}
            if getattr(handler, "requires_finalizer", False):
                needed.add((group, plural, "patch"))
    return needed


def schema_leaves(node: dict, prefix: str = "") -> dict[str, dict]:
    """Return {dotted path: schema} for every value the schema describes without sub-keys."""
    leaves = {}
    for key, child in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        if "properties" in child:
            leaves |= schema_leaves(child, f"{path}.")
        else:
            leaves[path] = child
    return leaves


def commented_keys(text: str) -> dict[str, bool]:
    """Return {dotted path: has a comment line right above it} for each key in a values file."""
    result, stack, previous = {}, [], ""
    for line in text.splitlines():
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if match:
            depth = len(match.group(1)) // 2
            stack = stack[:depth] + [match.group(2)]
            result[".".join(stack)] = previous.lstrip().startswith("#")
        if line.strip():
            previous = line
    return result


def test_every_value_is_documented():
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = schema_leaves(schema)
    comments = commented_keys((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    for path, node in leaves.items():
        assert node.get("description"), f"values.schema.json has no description of {path}"
        assert comments.get(path), f"values.yaml has no comment above {path}"
        assert f"| `{path}` |" in readme, f"charts/lathe/README.md has no row for {path}"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


# -- tests with helm -------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], MODES["namespaced"], MODES["service-monitor"],
                                    ["--set", "argocd.healthChecks.enabled=true"]],
                         ids=["default", "namespaced", "service-monitor", "argocd"])
def test_lint_strict(helm, values):
    result = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", RELEASE_NAMESPACE,
                      *values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mode", sorted(MODES))
def test_template_renders_expected_objects(helm, mode):
    objects = render(helm, *MODES[mode])
    assert dict(Counter(obj["kind"] for obj in objects)) == EXPECTED_KINDS[mode]
    for obj in objects:
        assert obj["metadata"]["name"], obj
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_default_mode_watches_all_namespaces(helm):
    args = operator_container(render(helm))["args"]
    assert args[:3] == ["run", "--module=lathe.k8s.handlers", "--standalone"]
    assert "--all-namespaces" in args
    assert not [arg for arg in args if arg.startswith("--namespace")]


def test_namespaced_mode_lists_namespaces(helm):
    objects = render(helm, *MODES["namespaced"])
    args = operator_container(objects)["args"]
    assert "--all-namespaces" not in args
    assert [arg for arg in args if arg.startswith("--namespace")] == [
        f"--namespace={name}" for name in NAMESPACES
    ]
    roles = operator_roles(objects, "Role")
    assert sorted(role["metadata"]["namespace"] for role in roles) == NAMESPACES
    for binding in of_kind(objects, "RoleBinding"):
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": binding["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                                        "namespace": RELEASE_NAMESPACE}]


def test_deployment_is_hardened(helm):
    objects = render(helm)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(objects)
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT


def test_liveness_probe_matches_kopf_endpoint(helm):
    container = operator_container(render(helm))
    assert "--liveness=http://0.0.0.0:8081/healthz" in container["args"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in container["ports"]


def operator_env_names() -> set[str]:
    """LATHE_* variables the operator process reads (settings.py and the handlers).

    The builders' LATHE_* variables are set in the training pods, not read by the operator.
    """
    names = set()
    for path in (K8S_PACKAGE / "settings.py", K8S_PACKAGE / "handlers.py",
                 K8S_PACKAGE / "leader.py"):
        names |= set(re.findall(r'"(LATHE_[A-Z_]+)"', path.read_text()))
    return names


def test_env_sets_every_operator_setting(helm):
    env = {item["name"]: item.get("value") for item in operator_container(render(helm))["env"]}
    assert operator_env_names() <= env.keys()
    assert env["LATHE_ARTIFACT_ROOT"] == "pvc://lathe-artifacts/lathe"
    assert env["LATHE_DATA_ROOT"] == "pvc://lathe-artifacts/lathe/data"
    assert env["LATHE_TRAINER_IMAGE"] == f"ghcr.io/lathe-dev/trainer:{lathe.__version__}"
    assert env["LATHE_SYNC_IMAGE"] == env["LATHE_TRAINER_IMAGE"]
    assert env["LATHE_METRICS_PORT"] == "8080"
    assert env["LATHE_PROGRESS_INTERVAL"] == "15"
    assert env["LATHE_MOUNTS"] == ""


def test_s3_secret_reaches_operator_and_stages(helm):
    container = operator_container(render(helm, "--set", "operator.s3Secret=lathe-s3"))
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["LATHE_S3_SECRET"] == "lathe-s3"
    assert container["envFrom"] == [{"secretRef": {"name": "lathe-s3", "optional": True}}]
    assert "envFrom" not in operator_container(render(helm))


def test_env_follows_values(helm):
    container = operator_container(render(
        helm, "--set", "operator.artifactRoot=pvc://shared/runs", "--set",
        "operator.trainerImage=registry.local/trainer:1", "--set", "operator.queueName=gpu",
        "--set-json", "operator.progressInterval=2.5", "--set", "artifacts.mount.enabled=true",
        "--set", "metrics.enabled=false",
    ))
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["LATHE_DATA_ROOT"] == "pvc://shared/runs/data"
    assert env["LATHE_SYNC_IMAGE"] == "registry.local/trainer:1"
    assert env["LATHE_TRITON_IMAGE"].startswith("ghcr.io/lathe-dev/triton:")
    assert env["LATHE_QUEUE_NAME"] == "gpu"
    assert env["LATHE_PROGRESS_INTERVAL"] == "2.5"
    assert env["LATHE_METRICS_PORT"] == "0"
    assert env["LATHE_MOUNTS"] == "shared=/var/lib/lathe/artifacts"
    assert {"name": "artifacts", "mountPath": "/var/lib/lathe/artifacts",
            "readOnly": True} in container["volumeMounts"]


def test_artifact_mount_adds_claim_volume(helm):
    objects = render(helm, "--set", "artifacts.mount.enabled=true")
    volumes = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "artifacts", "persistentVolumeClaim": {
        "claimName": "lathe-artifacts", "readOnly": True}} in volumes


@pytest.mark.parametrize("set_args, image", [
    ([], f"ghcr.io/lathe-dev/operator:{lathe.__version__}"),
    (["--set", "image.tag=dev"], "ghcr.io/lathe-dev/operator:dev"),
    (["--set", "image.digest=sha256:" + "a" * 64], "ghcr.io/lathe-dev/operator@sha256:" + "a" * 64),
])
def test_image_reference(helm, set_args, image):
    assert operator_container(render(helm, *set_args))["image"] == image


def test_metrics_service_and_service_monitor_agree(helm):
    objects = render(helm, *MODES["service-monitor"])
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= (
        one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}


def test_service_monitor_keeps_resource_namespace(helm):
    """The operator's series label the Lathe resource's namespace, which must win over the
    target's: the dashboard and alerts select and report it."""
    endpoint = one(render(helm, *MODES["service-monitor"]), "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint.get("honorLabels") is True


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("release, set_args", [
    ("lathe", ["--set", "fullnameOverride=" + "o" * 63]),
    ("r" * 53, []),
], ids=["fullname-override-63", "release-53"])
def test_long_names_keep_service_name_valid(helm, release, set_args):
    """A Service name is a DNS label of at most 63 characters. The longest prefix the schema
    accepts, and Helm's longest release name (53 characters), must both still give one."""
    result = run_helm(helm, "template", release, str(CHART), "--namespace", RELEASE_NAMESPACE,
                      "--set", "metrics.serviceMonitor.enabled=true", *set_args)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    name = one(objects, "Service")["metadata"]["name"]
    assert len(name) <= 63, name
    assert DNS_LABEL.match(name), name
    assert name.endswith("-metrics"), name


def test_digit_release_name_rejected(helm):
    """A Service name must start with a letter. A release such as 2024-lathe fails to render
    with a message that names the fix, instead of a Service the API server rejects."""
    result = run_helm(helm, "template", "2024-lathe", str(CHART), "--namespace",
                      RELEASE_NAMESPACE)
    assert result.returncode != 0, result.stdout
    assert '"2024-lathe-metrics" starts with a digit' in result.stderr
    assert "fullnameOverride to a name that starts with a letter, such as lathe-2024-lathe" in (
        result.stderr)
    renamed = run_helm(helm, "template", "2024-lathe", str(CHART), "--namespace",
                       RELEASE_NAMESPACE, "--set", "fullnameOverride=lathe-2024")
    assert renamed.returncode == 0, renamed.stderr
    without_metrics = run_helm(helm, "template", "2024-lathe", str(CHART), "--namespace",
                               RELEASE_NAMESPACE, "--set", "metrics.enabled=false")
    assert without_metrics.returncode == 0, without_metrics.stderr


def test_shared_port_allowed_without_metrics(helm):
    render(helm, "--set", "metrics.enabled=false", "--set", "metrics.port=8081")


def test_service_monitor_timeout_within_interval(helm):
    render(helm, "--set", "metrics.serviceMonitor.enabled=true",
           "--set", "metrics.serviceMonitor.interval=2s",
           "--set", "metrics.serviceMonitor.scrapeTimeout=1500ms")


@pytest.mark.parametrize("interval, timeout", [
    ("1m30s", "1m"), ("1h", "1m30s"), ("2s", "1500ms"), ("1d", "2h"),
])
def test_service_monitor_takes_compound_durations(helm, interval, timeout):
    """Prometheus durations combine units, largest first, as 1m30s."""
    monitor = one(render(helm, "--set", "metrics.serviceMonitor.enabled=true",
                         "--set", f"metrics.serviceMonitor.interval={interval}",
                         "--set", f"metrics.serviceMonitor.scrapeTimeout={timeout}"),
                  "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["interval"] == interval
    assert endpoint["scrapeTimeout"] == timeout


def test_rendered_crds_match_generator(helm):
    crds = {obj["metadata"]["name"]: obj for obj in of_kind(render(helm), "CustomResourceDefinition")}
    for model in KINDS.values():
        rendered = crds[f"{model.plural}.{GROUP}"]
        metadata = rendered.pop("metadata")
        assert metadata["annotations"] == {
            "helm.sh/resource-policy": "keep",
            "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
        }
        assert rendered == {key: value for key, value in crdgen.crd(model).items()
                            if key != "metadata"}


def test_crds_keep_can_be_turned_off(helm):
    for crd in of_kind(render(helm, "--set", "crds.keep=false"), "CustomResourceDefinition"):
        assert "annotations" not in crd["metadata"]


def test_template_escaping_survives_helm(helm, tmp_path):
    """Text that looks like a Go template action comes out of helm unchanged."""
    chart = tmp_path / "escape"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: escape\nversion: 0.1.0\n")
    text = 'rule: "{{ .Values.x }} and {{- and }} and }} and {{"'
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: escape\ndata:\n  "
        + crdgen.escape_template(text) + "\n"
    )
    assert render(helm, chart=chart)[0]["data"] == yaml.safe_load(text)


# -- Argo CD health checks -------------------------------------------------------------------


def chart_copy_with_health_checks(tmp_path: Path, files: dict[str, str]) -> Path:
    chart = tmp_path / "lathe"
    shutil.copytree(CHART, chart)
    shutil.rmtree(chart / "argocd", ignore_errors=True)
    for name, text in files.items():
        path = chart / "argocd" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return chart


def test_argocd_health_checks_ship_every_kind(helm):
    objects = render(helm, "--set", "argocd.healthChecks.enabled=true")
    data = one(objects, "ConfigMap")["data"]
    assert data == {
        f"resource.customizations.health.lathe.dev_{kind}":
            (CHART / "argocd" / f"lathe.dev_{kind}.lua").read_text()
        for kind in KINDS
    }


def test_argocd_health_check_names_are_matched(helm, tmp_path):
    chart = chart_copy_with_health_checks(tmp_path, {
        "lathe.dev_Tokenizer.lua": "return {status = \"Healthy\"}\n",
        "Corpus.lua": "hs = {}\nhs.status = \"Healthy\"\nreturn hs\n",
        "lathe.dev/ModelDeployment/health.lua": "  -- indented first line\nreturn {}\n",
        "notes.lua": "return nil\n",
    })
    objects = render(helm, "--set", "argocd.healthChecks.enabled=true", chart=chart)
    data = one(objects, "ConfigMap")["data"]
    assert data == {
        "resource.customizations.health.lathe.dev_Tokenizer": "return {status = \"Healthy\"}\n",
        "resource.customizations.health.lathe.dev_Corpus":
            "hs = {}\nhs.status = \"Healthy\"\nreturn hs\n",
        "resource.customizations.health.lathe.dev_ModelDeployment":
            "  -- indented first line\nreturn {}\n",
    }


def test_argocd_health_checks_absent_render_nothing(helm, tmp_path):
    chart = chart_copy_with_health_checks(tmp_path, {})
    objects = render(helm, "--set", "argocd.healthChecks.enabled=true", chart=chart)
    assert not of_kind(objects, "ConfigMap")
    result = run_helm(helm, "install", "--dry-run=client", RELEASE, str(chart),
                      "--set", "argocd.healthChecks.enabled=true")
    assert result.returncode == 0, result.stderr
    assert "no Lua files under argocd/" in result.stdout


def test_argocd_health_checks_off_by_default(helm):
    assert not of_kind(render(helm), "ConfigMap")


# -- rejected values -------------------------------------------------------------------------

REJECTED = [
    (["--set-string", "replicaCount=two"], r"replicaCount"),
    (["--set", "replicaCount=11"], r"replicaCount"),
    (["--set", "replicaCount=2", "--set", "leaderElection.enabled=false"],
     r"replicaCount is 2 but leaderElection.enabled is false"),
    (["--set", "leaderElection.leaseDuration=11"],
     r"leaderElection.leaseDuration \(11\) must be at least leaderElection.renewDeadline "
     r"\(10\) plus leaderElection.retryPeriod \(2\)"),
    (["--set", "leaderElection.retryPeriod=9", "--set", "leaderElection.leaseDuration=30"],
     r"leaderElection.renewDeadline \(10\) must exceed 1.2 times leaderElection.retryPeriod"),
    (["--set", "leaderElection.lease=15"], r"lease"),
    (["--set", "mode=everywhere"], r"mode"),
    (["--set", "replicas=1"], r"replicas"),
    (["--set", "mode=namespaced", "--set", "watchNamespaces={Team_A}"], r"watchNamespaces"),
    (["--set", "mode=namespaced"], r"watchNamespaces is empty"),
    (["--set", "watchNamespaces={team-a}"], r"but mode is \"clusterWide\""),
    (["--set", "operator.artifactRoot=s3://bucket/lathe", "--set", "artifacts.mount.enabled=true"],
     r"artifacts.mount.claimName is empty"),
    (["--set", "operator.artifactRoot=/data"], r"artifactRoot"),
    (["--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"],
     r"metrics.enabled is false"),
    (["--set", "operator.logLevel=loud"], r"logLevel"),
    (["--set", "metrics.port=8081"], r"metrics.port and healthPort are both 8081"),
    (["--set", "metrics.serviceMonitor.enabled=true",
      "--set", "metrics.serviceMonitor.scrapeTimeout=1m"],
     r"scrapeTimeout \(1m\) exceeds metrics.serviceMonitor.interval \(30s\)"),
    (["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.interval=1m",
      "--set", "metrics.serviceMonitor.scrapeTimeout=1m30s"],
     r"scrapeTimeout \(1m30s\) exceeds metrics.serviceMonitor.interval \(1m\)"),
    (["--set", "metrics.serviceMonitor.interval=30"], r"/metrics/serviceMonitor/interval"),
    (["--set", "metrics.serviceMonitor.interval=30s1m"], r"/metrics/serviceMonitor/interval"),
    (["--set", "metrics.serviceMonitor.scrapeTimeout="], r"/metrics/serviceMonitor/scrapeTimeout"),
    (["--set", "serviceAccount.create=false"], r"serviceAccount.name is required"),
    (["--set", "resources.limits.memory=abc"], r"/resources/limits/memory"),
    (["--set", "resources.limit.memory=1Gi"], r"resources"),
    (["--set", "image.repository= "], r"/image/repository"),
    (["--set", "fullnameOverride=Lathe_Operator"], r"/fullnameOverride"),
    (["--set", "nameOverride=Lathe"], r"/nameOverride"),
]


@pytest.mark.parametrize("set_args, message", REJECTED, ids=[" ".join(a) for a, _ in REJECTED])
def test_wrong_value_is_rejected(helm, set_args, message):
    assert re.search(message, render_error(helm, *set_args))


def test_schema_message_names_value_and_type(helm):
    error = render_error(helm, "--set-string", "replicaCount=two")
    assert "values don't meet the specifications of the schema" in error
    assert re.search(r"replicaCount.*(integer|string)", error)


# -- RBAC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_rbac_has_no_wildcards_or_secrets(helm, mode):
    for rule in role_rules(render(helm, *MODES[mode])):
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert "*" not in (rule.get(field) or []), rule
            assert not any("*" in item for item in rule.get(field) or []), rule
        assert not {"secrets"} & set(rule["resources"]), rule


def expected_grants(mode: str) -> set[tuple[str, str, str]]:
    """The operator's permissions in a mode, without leader election."""
    expected = set(OPERATOR_PERMISSIONS)
    if mode == "namespaced":
        expected -= SCANNING_PERMISSIONS
    return expected


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_rbac_grants_exactly_operator_calls(helm, mode):
    granted = grants(role_rules(render(helm, *MODES[mode])))
    assert sorted(expected_grants(mode) - granted) == [], "not granted"
    assert sorted(granted - expected_grants(mode)) == [], "granted beyond the table"


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_crd_get_limited_to_pod_monitor(helm, mode):
    """The operator reads one CRD by name, so the `get` rule names it. RBAC cannot limit list
    and watch by name."""
    crd_rules = [rule for rule in role_rules(render(helm, *MODES[mode]))
                 if "customresourcedefinitions" in rule["resources"]]
    get_rules = [rule for rule in crd_rules if "get" in rule["verbs"]]
    assert len(get_rules) == 1, crd_rules
    assert get_rules[0]["verbs"] == ["get"]
    assert get_rules[0]["resourceNames"] == [POD_MONITOR_CRD]


def test_namespaced_mode_has_no_crd_list_or_watch(helm):
    """kopf's scanning is off in namespaced mode, so nothing lists or watches CRDs."""
    granted = grants(role_rules(render(helm, *MODES["namespaced"])))
    assert not granted & SCANNING_PERMISSIONS
    env = {item["name"]: item.get("value")
           for item in operator_container(render(helm, *MODES["namespaced"]))["env"]}
    assert env["LATHE_WATCH_NAMESPACES"], "the operator would keep kopf's scanning on"


def test_cluster_wide_mode_has_one_cluster_role(helm):
    objects = render(helm, *MODES["cluster-wide"])
    role = one(objects, "ClusterRole")
    binding = one(objects, "ClusterRoleBinding")
    assert grants(role["rules"]) == OPERATOR_PERMISSIONS.keys()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                                    "namespace": RELEASE_NAMESPACE}]


def test_namespaced_mode_keeps_cluster_role_to_crds(helm):
    objects = render(helm, *MODES["namespaced"])
    cluster_grants = grants(one(objects, "ClusterRole")["rules"])
    assert cluster_grants == {("apiextensions.k8s.io", "customresourcedefinitions", "get")}
    namespaced = {key for key in OPERATOR_PERMISSIONS if key[:2] not in CLUSTER_SCOPED}
    for role in operator_roles(objects, "Role"):
        assert grants(role["rules"]) == namespaced, role["metadata"]["namespace"]


def test_namespaced_mode_names_watched_namespaces(helm):
    """In namespaced mode the operator learns the namespaces it serves, so kopf does not try
    to list every namespace, which its RBAC does not allow."""
    for mode, expected in (("namespaced", ",".join(NAMESPACES)), ("cluster-wide", "")):
        deployment = one(render(helm, *MODES[mode]), "Deployment")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env.get("LATHE_WATCH_NAMESPACES") == expected, mode


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_leader_election_role_grants_lease_only(helm, mode):
    objects = render(helm, *MODES[mode])
    role = next(role for role in of_kind(objects, "Role")
                if role["metadata"]["name"] == LEADER_ELECTION_ROLE)
    binding = next(binding for binding in of_kind(objects, "RoleBinding")
                   if binding["metadata"]["name"] == LEADER_ELECTION_ROLE)
    assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert grants(role["rules"]) == LEADER_ELECTION_PERMISSIONS.keys()
    for rule in role["rules"]:
        if rule["verbs"] != ["create"]:
            assert rule["resourceNames"] == [LEASE], rule
    assert binding["roleRef"]["name"] == LEADER_ELECTION_ROLE
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                                    "namespace": RELEASE_NAMESPACE}]


RBAC_DOCS = {"chart-readme": CHART / "README.md", "rbac-doc": REPO / "docs" / "rbac.md"}
RBAC_VERB = re.compile(r"\b(get|list|watch|create|update|patch|delete)\b")


def documented_grants(text: str) -> set[tuple[str, str, str]]:
    """Return the (apiGroup, resource, verb) triples of the RBAC tables in a Markdown page.

    A table row reads `| API group | resources | verbs | why |`. "core" is the group "", and
    "the five kinds", "`<kind>/status`" or "the same five with `/status`" stand for the five
    plurals.
    """
    permissions = OPERATOR_PERMISSIONS.keys() | LEADER_ELECTION_PERMISSIONS.keys()
    resources_by_group: dict[str, set[str]] = {}
    for group, resource, _ in permissions:
        resources_by_group.setdefault(group, set()).add(resource.split("/")[0])
    found = set()
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4:
            continue
        group = "" if cells[0] == "core" else cells[0].strip("`")
        if group not in resources_by_group:
            continue
        if "five" in cells[1] or "<kind>" in cells[1]:
            suffix = next((f"/{name}" for name in ("status", "finalizers") if name in cells[1]), "")
            resources = {plural + suffix for plural in PLURALS}
        else:
            resources = set(re.findall(r"[a-z]+", cells[1])) & resources_by_group[group]
        found |= {(group, resource, verb) for resource in resources
                  for verb in RBAC_VERB.findall(cells[2])}
    return found


@pytest.mark.parametrize("page", sorted(RBAC_DOCS))
def test_rbac_docs_match_chart(helm, page):
    """The RBAC tables of the chart README and docs/rbac.md list what the chart grants."""
    granted = grants([rule for kind in ("ClusterRole", "Role")
                      for role in of_kind(render(helm), kind) for rule in role["rules"]])
    documented = documented_grants(RBAC_DOCS[page].read_text())
    assert sorted(granted - documented) == [], "granted but not documented"
    assert sorted(documented - granted) == [], "documented but not granted"


def test_leader_election_settings_reach_operator(helm):
    objects = render(helm, "--set", "replicaCount=3")
    deployment = one(objects, "Deployment")
    container = operator_container(objects)
    env = {item["name"]: item for item in container["env"]}
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert env["LATHE_LEADER_ELECTION"]["value"] == "true"
    assert env["LATHE_LEADER_ELECTION_ID"]["value"] == LEASE
    assert env["LATHE_LEADER_ELECTION_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["LATHE_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert [env[name]["value"] for name in (
        "LATHE_LEASE_DURATION", "LATHE_RENEW_DEADLINE", "LATHE_RETRY_PERIOD")] == ["15", "10", "2"]
    assert f"--liveness={env['LATHE_LIVENESS_ENDPOINT']['value']}" in container["args"]


def test_leader_election_seconds_render_as_integers(helm, tmp_path):
    """Helm reads numbers of a values file as floats, and prints 1000000 as 1e+06."""
    values = tmp_path / "values.yaml"
    values.write_text("leaderElection:\n  leaseDuration: 1000000\n  renewDeadline: 800000\n"
                      "  retryPeriod: 100000\n")
    env = {item["name"]: item.get("value")
           for item in operator_container(render(helm, "-f", str(values)))["env"]}
    assert env["LATHE_LEASE_DURATION"] == "1000000"
    assert env["LATHE_RENEW_DEADLINE"] == "800000"
    assert env["LATHE_RETRY_PERIOD"] == "100000"


def test_leader_election_can_be_turned_off(helm):
    objects = render(helm, "--set", "leaderElection.enabled=false")
    env = {item["name"]: item.get("value") for item in operator_container(objects)["env"]}
    assert one(objects, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert env["LATHE_LEADER_ELECTION"] == "false"
    assert "LATHE_LEADER_ELECTION_ID" not in env
    assert LEADER_ELECTION_ROLE not in {role["metadata"]["name"]
                                        for role in of_kind(objects, "Role")}


def test_rbac_can_be_left_out(helm):
    objects = render(helm, "--set", "rbac.create=false")
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {
        obj["kind"] for obj in objects
    }


def test_triton_image_value(helm):
    container = operator_container(
        render(helm, "--set", "operator.tritonImage=registry.local/triton:2")
    )
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["LATHE_TRITON_IMAGE"] == "registry.local/triton:2"
