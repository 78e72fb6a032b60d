"""The Triton objects of a ModelDeployment: Deployment, Service, HPA and PodMonitor.

The operator builds them once the export Job has written the model repository. An init container
copies the repository from the artifact store into an emptyDir at /models, so Triton reads local
files whatever the store is, and every replica serves the same copy.
"""

from __future__ import annotations

from lathe.api.deployment import AutoscalingSpec
from lathe.errors import InvalidResourceError
from lathe.k8s import builders
from lathe.k8s.builders import ArtifactStore
from lathe.plans.base import ServingPlan

KIND = "ModelDeployment"
COMPONENT = "triton"
CONTAINER_NAME = "triton"
MODELS_DIR = "/models"

# Copies the contents of a model repository at an fsspec URL (argv[1]) into a directory
# (argv[2]) with the trainer's object-store code, so s3:// works as it does for the stages. The
# sync image is the trainer image by default; s3:// takes the AWS_* variables of LATHE_S3_SECRET.


def triton_name(plan: ServingPlan) -> str:
    """Return the name shared by the Deployment, Service, HPA and PodMonitor."""
    return builders.object_name(plan.name, COMPONENT)


def triton_labels(plan: ServingPlan) -> dict[str, str]:
    return builders.labels(KIND, plan.name, component=COMPONENT)


def sync_command(repository_uri: str, store: ArtifactStore, digest: str = "") -> list[str]:
    """Return the init container command that copies the model repository to /models.

    lathe_trainer.serving.sync checks every file against the export's manifest, and the
    manifest against `digest`, so a pod never serves a half-written repository.
    """
    output_uri, repository = repository_uri.rstrip("/").rsplit("/", 1)
    if output_uri.startswith(("pvc://", "file://")):
        # NOTE: a pvc:// output is read from the claim mount; a file:// one gets no volume,
        # so its path must exist inside the sync container.
        output_uri = store.pod_uri(output_uri)
    command = ["python", "-m", "lathe_trainer.serving.sync", output_uri, MODELS_DIR,
               "--repository", repository]
    return [*command, "--digest", digest] if digest else command


def triton_deployment(
    plan: ServingPlan,
    owner: dict,
    store: ArtifactStore,
    *,
    image: str | None = None,
    sync_image: str,
    autoscaled: bool = False,
    s3_secret: str | None = None,
) -> dict:
    """Return the Deployment of Triton servers for a model repository.

    With `autoscaled`, spec.replicas is left out so that the HorizontalPodAutoscaler owns it and a
    re-applied Deployment does not reset the scale.
    """
    name = triton_name(plan)
    image = image or plan.image
    if not image:
        raise ValueError(f"ModelDeployment {plan.name!r} has no Triton image; set "
                         "spec.serving.image or the operator's LATHE_TRITON_IMAGE.")
    pod_labels = triton_labels(plan)
    claims = _repository_claims(plan)
    shm, shm_mount = builders.shm_volume(plan.resources.shm_size)
    models_mount = {"name": "models", "mountPath": MODELS_DIR}
    sync = {
        "name": "sync-models",
        "image": sync_image,
        "command": sync_command(plan.repository_uri, store, plan.repository_digest),
        "volumeMounts": [models_mount, *builders.claim_mounts(claims, read_only=True)],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                      "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": builders.container_security_context(),
    }
    if plan.repository_uri.startswith("s3://"):
        sync["envFrom"] = builders.secret_env(s3_secret)
    pod_spec = {
        "enableServiceLinks": False,
        "securityContext": builders.pod_security_context(),
        "initContainers": [sync],
        "containers": [_triton_container(plan, image, [models_mount, shm_mount])],
        "volumes": [{"name": "models", "emptyDir": {}}, shm, *builders.claim_volumes(claims)],
    }
    pod_spec.update(builders.scheduling_fields(plan.scheduling, plan.resources.gpus))
    # Lathe's own labels and annotation win over spec.serving.podMetadata on a clash.
    template_metadata: dict = {"labels": {**plan.pod_labels, **pod_labels}}
    annotations = dict(plan.pod_annotations)
    # A new export writes into the same repository URI. The annotation rolls the pods to the new
    # export, and the sync container rejects a repository that does not match it.
    if plan.repository_digest:
        annotations[builders.ANNOTATION_REPOSITORY_DIGEST] = plan.repository_digest
    if annotations:
        template_metadata["annotations"] = annotations
    spec = {
        "selector": {"matchLabels": pod_labels},
        "template": {"metadata": template_metadata, "spec": pod_spec},
    }
    if not autoscaled:
        spec = {"replicas": plan.replicas, **spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": builders.object_metadata(name, owner, pod_labels),
        "spec": spec,
    }


def _repository_claims(plan: ServingPlan) -> list[str]:
    if plan.repository_uri.startswith("pvc://"):
        return [builders.parse_pvc_uri(plan.repository_uri)[0]]
    return []


def _triton_container(plan: ServingPlan, image: str, mounts: list[dict]) -> dict:
    # `args` only: the NGC image's entrypoint runs them, after its own setup.
    args = [
        "tritonserver",
        f"--model-repository={MODELS_DIR}",
        f"--http-port={plan.http_port}",
        f"--grpc-port={plan.grpc_port}",
        f"--metrics-port={plan.metrics_port}",
    ]
    return {
        "name": CONTAINER_NAME,
        "image": image,
        "args": args,
        "ports": [
            {"name": "http", "containerPort": plan.http_port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": plan.grpc_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": plan.metrics_port, "protocol": "TCP"},
        ],
        # Ready only when every model has loaded. Triton reports live while models still load.
        "readinessProbe": _http_probe("/v2/health/ready", period=5, failures=3),
        "livenessProbe": _http_probe("/v2/health/live", period=10, failures=6),
        # Loading large models can take minutes, so the startup probe delays the liveness probe
        # for up to 60 x 5 s.
        "startupProbe": _http_probe("/v2/health/live", period=5, failures=60),
        "resources": builders.resource_requirements(plan.resources),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": builders.container_security_context(),
    }


def _http_probe(path: str, *, period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 3,
    }


def triton_service(plan: ServingPlan, owner: dict) -> dict:
    """Return the ClusterIP Service in front of the Triton pods, with the three named ports."""
    ports = [
        {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
        for name, port in (
            ("http", plan.http_port),
            ("grpc", plan.grpc_port),
            ("metrics", plan.metrics_port),
        )
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": builders.object_metadata(triton_name(plan), owner, triton_labels(plan)),
        "spec": {"type": "ClusterIP", "selector": triton_labels(plan), "ports": ports},
    }


def horizontal_pod_autoscaler(plan: ServingPlan, owner: dict, spec: AutoscalingSpec) -> dict:
    """Return an autoscaling/v2 HPA that scales the Triton Deployment on CPU utilization.

    Utilization is measured against the CPU request, which `resource_requirements` always sets.
    """
    if spec.min_replicas > spec.max_replicas:
        raise InvalidResourceError(
            f"{KIND} {builders.namespace_of(owner)}/{plan.name}",
            "spec.autoscaling",
            f"minReplicas {spec.min_replicas} exceeds maxReplicas {spec.max_replicas}; "
            "set minReplicas to at most maxReplicas.",
        )
    name = triton_name(plan)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": builders.object_metadata(name, owner, triton_labels(plan)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": spec.target_cpu_utilization,
                        },
                    },
                }
            ],
        },
    }


def pod_monitor(plan: ServingPlan, owner: dict) -> dict:
    """Return a Prometheus Operator PodMonitor that scrapes Triton's `metrics` port."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": builders.object_metadata(triton_name(plan), owner, triton_labels(plan)),
        "spec": {
            "selector": {"matchLabels": triton_labels(plan)},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}],
        },
    }
