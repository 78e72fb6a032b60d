"""One plan per kind: turn a resource and its resolved inputs into what to run."""

from __future__ import annotations

from lathe.api import Corpus, FineTune, ModelDeployment, PretrainJob, Resource, Tokenizer
from lathe.plans.base import ServingPlan, WorkloadPlan, stage_config, stage_key
from lathe_trainer.stage import ResolvedInput


def build(
    resource: Resource,
    inputs: dict[str, ResolvedInput],
    output_uri: str,
    data_dir: str,
    image: str = "",
    data_digests: dict[str, str] | None = None,
) -> WorkloadPlan:
    """Return the bounded workload for a resource (for ModelDeployment: its export Job).

    `data_digests` (see stage_key) makes a changed data file change the stage key.
    """
    config = stage_config(resource, inputs, output_uri, data_dir, image, data_digests)
    common = dict(kind=resource.kind, name=resource.metadata.name, config=config,
                  scheduling=resource.spec.scheduling)
    metadata = resource.spec.pod_metadata
    common = {**common, "pod_labels": metadata.labels, "pod_annotations": metadata.annotations}
    match resource:
        case Corpus():
            return WorkloadPlan(stage="corpus", nodes=resource.spec.workers,
                                resources=resource.spec.resources, **common)
        case Tokenizer():
            return WorkloadPlan(stage="tokenizer", resources=resource.spec.resources, **common)
        case PretrainJob() | FineTune():
            distributed = resource.spec.distributed
            return WorkloadPlan(
                stage="pretrain" if isinstance(resource, PretrainJob) else "finetune",
                nodes=distributed.nodes,
                procs_per_node=distributed.procs_per_node,
                distributed=True,
                resources=resource.spec.resources,
                max_restarts=distributed.max_restarts,
                suspend=resource.spec.suspend,
                **common,
            )
        case ModelDeployment():
            return WorkloadPlan(stage="export", resources=resource.spec.resources, **common)
    raise TypeError(f"No plan for kind {resource.kind!r}.")


def serving(resource: ModelDeployment, export_output_uri: str,
            export_digest: str = "") -> ServingPlan:
    """Return the Triton server for a ModelDeployment whose export finished.

    `export_digest` is the export output's digest; a new one rolls the servers onto the new
    model repository.
    """
    spec = resource.spec.serving
    return ServingPlan(
        name=resource.metadata.name,
        model_name=resource.spec.model_name,
        repository_uri=export_output_uri.rstrip("/") + "/model_repository",
        repository_digest=export_digest,
        image=spec.image,
        replicas=spec.replicas,
        http_port=spec.http_port,
        grpc_port=spec.grpc_port,
        metrics_port=spec.metrics_port,
        resources=spec.resources,
        scheduling=spec.scheduling,
        pod_labels=dict(spec.pod_metadata.labels),
        pod_annotations=dict(spec.pod_metadata.annotations),
    )


__all__ = ["ServingPlan", "WorkloadPlan", "build", "serving", "stage_config", "stage_key"]
