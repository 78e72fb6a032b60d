"""Pure builders of the Kubernetes backend: plans in, Kubernetes objects (plain dicts) out.

The kopf handlers turn a resource into a plan (lathe.plans) and call these functions to get the
objects to create. Nothing here talks to a cluster. This module contains what every workload
shares: names, labels, owner references, the artifact store and its volumes, and the pod pieces
(security context, resources, /dev/shm).

The workloads are built in `builders_training` (the stage Job, its ConfigMap and headless
Service) and `builders_serving` (Triton). Their functions are re-exported here, so callers write
`builders.training_job(...)`.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass
from typing import Any

from lathe.api.common import ResourceRequirements, Scheduling
from lathe.errors import InvalidResourceError
from lathe_trainer.stage import StageConfig

APP_NAME = "lathe"
MANAGED_BY = "lathe-operator"
LABEL_KIND = "lathe.dev/kind"
LABEL_NAME = "lathe.dev/name"
LABEL_ATTEMPT = "lathe.dev/attempt"
# Kueue's label on a Job that names its LocalQueue; Kueue then admits the Job by unsuspending it.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# On a stage Job: the generation of the spec whose run the Job belongs to.
LABEL_RUN_GENERATION = "lathe.dev/run-generation"
# On a stage Job: the run of the resource the Job belongs to (WorkloadPlan.run; its name has it).
LABEL_RUN = "lathe.dev/run"
# On Triton's pod template: the digest of the export output it serves, so a new export rolls
# the pods, whose init container then copies the new model repository.
ANNOTATION_REPOSITORY_DIGEST = "lathe.dev/repository-digest"
LABEL_COMPONENT = "app.kubernetes.io/component"

# Kubernetes object names used as Service names and pod host names must be DNS-1123 labels.
MAX_NAME_LENGTH = 63
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# Hex digits of the name digest appended to a truncated name.
_HASH_LENGTH = 8

# Parent directory of the claim mounts: each claim is mounted at <ARTIFACTS_MOUNT>/<claim>.
ARTIFACTS_MOUNT = "/artifacts"
_STORE_SCHEMES = ("pvc://", "s3://", "file://")

# NB: runAsNonRoot makes the kubelet reject an image whose USER is root or not numeric, so the
# pods set a fixed non-root user. fsGroup makes the artifact claims writable for that user.
RUN_AS_USER = 1000

GPU_RESOURCE = "nvidia.com/gpu"


def object_name(
    resource_name: str,
    suffix: str = "",
    attempt: int | None = None,
    *,
    max_length: int = MAX_NAME_LENGTH,
) -> str:
    """Return `<resource_name>[-<suffix>][-<attempt>]` as a DNS-1123 label of max_length chars.

    A name that would be too long keeps its suffix and attempt, and its resource name part is cut
    and followed by a digest of the whole resource name, so two long names stay distinct. A name
    starting with a digit gets the prefix `lathe-`, because Service names must start with a letter.
    """
    tail = "".join(f"-{part}" for part in (suffix, attempt) if part not in ("", None))
    head = resource_name if resource_name[:1].isalpha() else f"{APP_NAME}-{resource_name}"
    if len(head) + len(tail) > max_length:
        digest = hashlib.sha256(resource_name.encode()).hexdigest()[:_HASH_LENGTH]
        keep = max_length - len(tail) - _HASH_LENGTH - 1
        if keep < 1:
            raise ValueError(
                f"The name suffix {tail!r} leaves no room for the resource name in "
                f"{max_length} characters; use a shorter suffix."
            )
        head = f"{head[:keep].rstrip('-')}-{digest}"
    name = head + tail
    if not _DNS_LABEL.match(name):
        raise ValueError(
            f"The object name {name!r} is not a DNS-1123 label; resource names and suffixes may "
            "contain only lowercase letters, digits and '-'."
        )
    return name


def labels(
    kind: str, name: str, attempt: int | None = None, *, component: str | None = None
) -> dict[str, str]:
    """Return the labels of an object made for a Lathe resource.

    `component` (the stage, or `triton`) separates the export Job's pods from the Triton pods of
    the same ModelDeployment, so selectors include it.
    """
    result = {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_KIND: kind,
        LABEL_NAME: name,
    }
    if component:
        result[LABEL_COMPONENT] = component
    if attempt is not None:
        result[LABEL_ATTEMPT] = str(attempt)
    return result


def owner_reference(owner: dict) -> dict:
    """Return an owner reference that makes the custom resource the controller of an object.

    Deleting the resource then deletes the object (garbage collection), so the Jobs need no TTL.
    """
    metadata = owner.get("metadata") or {}
    values = {
        "apiVersion": owner.get("apiVersion"),
        "kind": owner.get("kind"),
        "name": metadata.get("name"),
        "uid": metadata.get("uid"),
    }
    missing = [field for field, value in values.items() if not value]
    if missing:
        raise ValueError(
            f"The owner object lacks {', '.join(missing)}; pass the custom resource as read from "
            "the API server (apiVersion, kind, metadata.name, metadata.uid)."
        )
    return {**values, "controller": True, "blockOwnerDeletion": True}


def object_metadata(
    name: str, owner: dict, object_labels: dict[str, str], namespace: str | None = None
) -> dict:
    """Return metadata for an object owned by `owner`, in `namespace` or else the owner's."""
    return {
        "name": name,
        "namespace": namespace or namespace_of(owner),
        "labels": dict(object_labels),
        "ownerReferences": [owner_reference(owner)],
    }


def namespace_of(owner: dict) -> str:
    """Return the owner's namespace, which namespaced objects owned by it must share."""
    namespace = (owner.get("metadata") or {}).get("namespace")
    if not namespace:
        raise ValueError(
            "The owner object lacks metadata.namespace; pass the custom resource as read from "
            "the API server, with its namespace."
        )
    return namespace


def parse_pvc_uri(uri: str) -> tuple[str, str]:
    """Split `pvc://<claim>/<path>` into the claim name and the path inside the claim."""
    claim, _, path = uri[len("pvc://"):].partition("/")
    if not _DNS_SUBDOMAIN.match(claim) or len(claim) > 253:
        raise ValueError(
            f"The URI {uri!r} does not name a valid PersistentVolumeClaim; write "
            "pvc://<claim>/<path> with a lowercase claim name."
        )
    if ".." in path.split("/"):
        raise ValueError(f"The URI {uri!r} contains '..'; write the path inside the claim.")
    return claim, path.strip("/")


@dataclass(frozen=True)
class ArtifactStore:
    """The location of stage outputs, and how pods reach them.

    `pvc://<claim>/<path>` roots are mounted into the pods at /artifacts/<claim>. `s3://` and
    `file://` roots are passed to the pods unchanged and need no volume.
    """

    root: str

    def __post_init__(self) -> None:
        if not self.root.startswith(_STORE_SCHEMES):
            raise ValueError(
                f"The artifact store root {self.root!r} has no supported scheme; set "
                "LATHE_ARTIFACT_ROOT to pvc://<claim>/<path>, s3://<bucket>/<prefix> or "
                "file:///<path>."
            )
        if self.root.startswith("pvc://"):
            parse_pvc_uri(self.root)

    @property
    def claim(self) -> str | None:
        """The PersistentVolumeClaim of a pvc:// root, else None."""
        return parse_pvc_uri(self.root)[0] if self.root.startswith("pvc://") else None

    def output_uri(self, namespace: str, kind: str, name: str, run_id: str | None = None) -> str:
        """Return the output location of a run: `<root>/<namespace>/<kind>/<name>/<run_id>`.

        Without `run_id`, return the resource's folder, where runs started before outputs had
        a folder per run wrote.
        """
        folder = f"{self.root.rstrip('/')}/{namespace}/{kind.lower()}/{name}"
        return f"{folder}/{run_id}" if run_id else folder

    def volumes(self) -> list[dict]:
        return claim_volumes([self.claim] if self.claim else [])

    def volume_mounts(self, *, read_only: bool = False) -> list[dict]:
        return claim_mounts([self.claim] if self.claim else [], read_only=read_only)

    def pod_uri(self, uri: str) -> str:
        """Return the URI a pod uses: pvc://claim/path becomes file:///artifacts/claim/path."""
        if not uri.startswith("pvc://"):
            return uri
        claim, path = parse_pvc_uri(uri)
        return f"file://{claim_mount_path(claim)}" + (f"/{path}" if path else "")


def claim_mount_path(claim: str) -> str:
    return f"{ARTIFACTS_MOUNT}/{claim}"


def claim_volume_name(claim: str) -> str:
    # Claim names may contain dots, which volume names (DNS-1123 labels) may not.
    return object_name("artifacts", claim.replace(".", "-"))


def claim_volumes(claims: list[str]) -> list[dict]:
    return [
        {"name": claim_volume_name(claim), "persistentVolumeClaim": {"claimName": claim}}
        for claim in sorted(set(claims))
    ]


def claim_mounts(claims: list[str], *, read_only: bool = False) -> list[dict]:
    mounts = []
    for claim in sorted(set(claims)):
        mount = {"name": claim_volume_name(claim), "mountPath": claim_mount_path(claim)}
        if read_only:
            mount["readOnly"] = True
        mounts.append(mount)
    return mounts


def pod_config(config: StageConfig, store: ArtifactStore) -> StageConfig:
    """Return the stage config for use in a pod: every pvc:// URI becomes a mounted file:// path.

    Rewritten: output_uri, inputs[*].uri, data_dir, and any string value in the spec that starts
    with pvc:// (a source path or a base model URI). `config_claims` lists the claims to mount.
    """
    resource = f"{config.kind} {config.namespace}/{config.name}"

    def rewrite(uri: str, field: str) -> str:
        try:
            return store.pod_uri(uri)
        except ValueError as error:
            raise InvalidResourceError(resource, field, str(error)) from error

    inputs = {
        role: item.model_copy(update={"uri": rewrite(item.uri, f"inputs.{role}.uri")})
        for role, item in config.inputs.items()
    }
    return config.model_copy(
        update={
            "output_uri": rewrite(config.output_uri, "spec.storage.uri"),
            "data_dir": rewrite(config.data_dir, "dataDir"),
            "inputs": inputs,
            "spec": _rewrite_strings(config.spec, "spec", rewrite),
        }
    )


def _rewrite_strings(value: Any, field: str, rewrite) -> Any:
    if isinstance(value, str) and value.startswith("pvc://"):
        return rewrite(value, field)
    if isinstance(value, dict):
        return {
            key: _rewrite_strings(item, f"{field}.{key}", rewrite) for key, item in value.items()
        }
    if isinstance(value, list):
        return [_rewrite_strings(item, f"{field}[{i}]", rewrite) for i, item in enumerate(value)]
    return value


def uses_object_store(config: StageConfig) -> bool:
    """Return True when the stage reads or writes an s3:// URI (output, inputs or spec)."""
    uris = [config.output_uri, *(item.uri for item in config.inputs.values())]
    uris += _strings(config.spec)
    return any(uri.startswith("s3://") for uri in uris)


def secret_env(secret: str | None) -> list[dict]:
    """Return the container envFrom that loads every key of `secret`, if one is named."""
    return [{"secretRef": {"name": secret}}] if secret else []


def config_claims(config: StageConfig) -> list[str]:
    """Return the PersistentVolumeClaims named by pvc:// URIs anywhere in a stage config."""
    uris = [config.output_uri, config.data_dir, *(item.uri for item in config.inputs.values())]
    uris += _strings(config.spec)
    return sorted({parse_pvc_uri(uri)[0] for uri in uris if uri.startswith("pvc://")})


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []


def resource_requirements(resources: ResourceRequirements) -> dict:
    """Return container resources: requests equal limits, plus GPUs in limits when requested.

    Requests equal to limits give the pods the Guaranteed QoS class, so they are the last to be
    evicted under memory pressure. GPUs are extended resources, which go in limits only.
    """
    amounts = {"cpu": resources.cpu, "memory": resources.memory}
    limits = dict(amounts)
    if resources.gpus > 0:
        limits[GPU_RESOURCE] = str(resources.gpus)
    return {"requests": amounts, "limits": limits}


def scheduling_fields(scheduling: Scheduling, gpus: int) -> dict:
    """Return the pod spec's nodeSelector, tolerations and priorityClassName: the spec's
    settings, plus the GPU taint's toleration for pods that request GPUs."""
    fields = scheduling.pod_spec()
    tolerations = [*gpu_tolerations(gpus), *fields.get("tolerations", [])]
    if tolerations:
        fields["tolerations"] = tolerations
    return fields


def gpu_tolerations(gpus: int) -> list[dict]:
    """Return the toleration for the taint that GPU node pools commonly carry."""
    if gpus <= 0:
        return []
    return [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


def pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def shm_volume(size: str) -> tuple[dict, dict]:
    """Return a memory-backed /dev/shm volume and its mount.

    The container runtime's default /dev/shm is 64 MiB, too small for PyTorch DataLoader workers,
    NCCL and Triton's Python backend, which all pass tensors through shared memory.
    """
    volume = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}
    return volume, {"name": "dshm", "mountPath": "/dev/shm"}


# The workload builders, re-exported. Their modules import this one, so they are loaded on first
# use: an import at the top of this module would fail when a workload module is imported first.
# Every public name of theirs is found, so that a builder added there needs no entry here.
_WORKLOAD_MODULES = ("lathe.k8s.builders_training", "lathe.k8s.builders_serving")


def __getattr__(name: str) -> Any:
    if not name.startswith("_"):
        for module_name in _WORKLOAD_MODULES:
            module = importlib.import_module(module_name)
            if name in vars(module) and getattr(vars(module)[name], "__module__", None) == (
                module_name
            ):
                return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    names = set(globals())
    for module_name in _WORKLOAD_MODULES:
        module = importlib.import_module(module_name)
        names.update(name for name, value in vars(module).items()
                     if not name.startswith("_") and getattr(value, "__module__", None) == (
                         module_name))
    return sorted(names)
