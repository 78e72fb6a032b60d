"""What to run for a stage, independent of where it runs.

A plan is built from a resource and its resolved inputs. The local backend runs it as local
processes; the Kubernetes backend renders the same plan into Jobs, Services and Deployments. So a
plan holds no local paths other than the URIs it was given and no Kubernetes objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from lathe import __version__
from lathe.api.common import Resource, ResourceRequirements, Scheduling
from lathe_trainer.stage import ResolvedInput, StageConfig

# Where the stage config is mounted inside a pod (a ConfigMap volume) and where the local
# backend substitutes its own path.
CONFIG_PATH_PLACEHOLDER = "{config}"


@dataclass(frozen=True)
class WorkloadPlan:
    """One bounded workload: a stage module run on one or more nodes."""

    kind: str
    name: str
    stage: str
    config: StageConfig
    nodes: int = 1
    procs_per_node: int = 1
    distributed: bool = False
    resources: ResourceRequirements = field(default_factory=ResourceRequirements)
    env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 0
    suspend: bool = False
    pod_labels: dict[str, str] = field(default_factory=dict)
    pod_annotations: dict[str, str] = field(default_factory=dict)
    scheduling: Scheduling = field(default_factory=Scheduling)
    # Which run of the resource this is, counted by the backend that starts it: a changed spec
    # or a changed input starts a new run. The Kubernetes backend names its Jobs with it.
    run: int = 1

    @property
    def processes_per_node(self) -> int:
        """Return torchrun's --nproc-per-node: one process per GPU on GPU nodes, else
        `procs_per_node`, in a cluster and under `lathe run` alike."""
        return self.resources.gpus if self.resources.gpus > 0 else self.procs_per_node

    def module_args(self, resume: bool = False) -> list[str]:
        """Arguments after `python -m` (or `torchrun -m`)."""
        args = ["lathe_trainer", self.stage, "--config", CONFIG_PATH_PLACEHOLDER]
        return args + (["--resume"] if resume else [])


@dataclass(frozen=True)
class ServingPlan:
    """A long-running Triton server for a model repository produced by an export workload."""

    name: str
    model_name: str
    repository_uri: str
    # None: the backend's default Triton image.
    image: str | None
    replicas: int
    http_port: int
    grpc_port: int
    metrics_port: int
    resources: ResourceRequirements
    scheduling: Scheduling = field(default_factory=Scheduling)
    # The digest of the export output the repository comes from; empty when unknown.
    repository_digest: str = ""
    # Extra labels and annotations of the Triton pods (spec.serving.podMetadata).
    pod_labels: dict[str, str] = field(default_factory=dict)
    pod_annotations: dict[str, str] = field(default_factory=dict)


# Spec fields that cannot change a stage's output: where and with what the pods run, how many
# Corpus workers share the work, and pausing. Changing them keeps a finished output and lets a
# new run continue from the checkpoints, as after raising the memory of an OOM-killed pod.
_NOT_IN_STAGE_KEY = {"scheduling", "workers", "suspend", "resources", "pod_metadata"}

# ModelDeployment fields that shape only the Triton Deployment, not the export: changing them
# (scaling, the image, the ports) neither runs the export again nor changes its stage key.
SERVING_ONLY_FIELDS: dict[str, Any] = {
    "autoscaling": True,
    "serving": {"image", "replicas", "http_port", "grpc_port", "metrics_port", "resources",
                "scheduling", "pod_metadata"},
}


def spec_exclusions(resource: Resource, fields: set[str]) -> dict[str, Any]:
    """Return the pydantic `exclude` argument that leaves `fields` (top-level spec field names)
    and, for a ModelDeployment, SERVING_ONLY_FIELDS out of a dump of the spec."""
    names = type(resource.spec).model_fields.keys()
    exclude: dict[str, Any] = {name: True for name in fields & names}
    if resource.kind == "ModelDeployment":
        exclude.update({name: value for name, value in SERVING_ONLY_FIELDS.items()
                        if name in names})
    return exclude


def _output_inputs(resource: Resource, inputs: dict[str, ResolvedInput],
                   data_digests: dict[str, str] | None = None) -> dict[str, Any]:
    payload = {
        "kind": resource.kind,
        "spec": resource.spec.model_dump(
            mode="json", by_alias=True, exclude=spec_exclusions(resource, _NOT_IN_STAGE_KEY),
        ),
        "inputs": {role: item.digest for role, item in sorted(inputs.items())},
    }
    if data_digests:
        payload["data"] = dict(sorted(data_digests.items()))
    return payload


def _digest(payload: dict[str, Any]) -> str:
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(encoded).hexdigest()


def stage_key(resource: Resource, inputs: dict[str, ResolvedInput],
              data_digests: dict[str, str] | None = None) -> str:
    """Digest of what determines a stage's output: kind, spec, input digests, code version, and
    the digests of the data files the spec names when the caller can read them.

    Two runs with the same key produce the same artifact, so a finished stage with a matching
    key is reused instead of being run again. `data_digests` maps a spec field to the digest of
    its file (lathe.preflight.data_digests); the operator cannot read the data volume and
    passes none.
    """
    return _digest({**_output_inputs(resource, inputs, data_digests), "codeVersion": __version__})


# Spec fields a PretrainJob may change and still continue from its checkpoints, as training
# systems allow: a lower learning rate after a divergence, a larger maxSteps to train longer, or
# more nodes. The trainer still rejects a checkpoint of another distributed.strategy.
_CONTINUABLE = {"PretrainJob": {"training", "distributed"}}


def has_continuable_fields(kind: str) -> bool:
    """Return whether a run of `kind` may change spec fields and still continue (_CONTINUABLE)."""
    return kind in _CONTINUABLE


def resume_key(resource: Resource, inputs: dict[str, ResolvedInput],
               data_digests: dict[str, str] | None = None) -> str:
    """Digest of the kind, spec and input digests, without the code version and the fields a
    run may change and continue (_CONTINUABLE).

    A stage resumes only from checkpoints written under the same resume key. The code version
    is left out so that an attempt started by a newer operator continues a long run instead of
    starting it over.
    """
    payload = _output_inputs(resource, inputs, data_digests)
    for name in _CONTINUABLE.get(resource.kind, ()):
        payload["spec"].pop(name, None)
    return _digest(payload)


def stage_config(
    resource: Resource,
    inputs: dict[str, ResolvedInput],
    output_uri: str,
    data_dir: str,
    image: str = "",
    data_digests: dict[str, str] | None = None,
) -> StageConfig:
    return StageConfig(
        kind=resource.kind,
        name=resource.metadata.name,
        namespace=resource.metadata.namespace,
        uid=resource.metadata.uid or "",
        generation=resource.metadata.generation,
        stage_key=stage_key(resource, inputs, data_digests),
        resume_key=resume_key(resource, inputs, data_digests),
        spec=resource.spec.model_dump(mode="json", by_alias=True),
        inputs=inputs,
        output_uri=output_uri,
        data_dir=data_dir,
        code_version=__version__,
        image=image,
    )


def spec_dict(resource: Resource) -> dict[str, Any]:
    return resource.spec.model_dump(mode="json", by_alias=True)
