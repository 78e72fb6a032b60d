"""Training settings shared by PretrainJob and FineTune."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from lathe.api.common import (
    DATA_PATH_MAX_LENGTH,
    ApiModel,
    CelRule,
    check_uri,
    pattern_rule,
)

# Any fsspec URL: file:/// with an absolute path, or a scheme with a host or bucket (pvc://,
# s3://, gs://). The stage rejects a scheme with no fsspec implementation when it runs.
_ARTIFACT_URI = re.compile(r"^(file:///|[a-z][a-z0-9+.-]*://[^/]+)")
_ARTIFACT_URI_FIX = (
    "use file:///absolute/path, pvc://<claim>/<path>, s3://<bucket>/<prefix> or another "
    "fsspec URL with a host"
)


class TrainingSpec(ApiModel):
    """Optimization settings of a training stage."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.warmupSteps) || !has(self.maxSteps) || "
            "self.warmupSteps < self.maxSteps",
            message="training.warmupSteps must be less than training.maxSteps; lower "
            "warmupSteps or raise maxSteps",
            check=lambda training: training.warmup_steps < training.max_steps,
            field="warmupSteps",
        ),
    )

    max_steps: int = Field(default=200, ge=1, description="Optimizer steps to run. Default: 200.")
    micro_batch_size: int = Field(
        default=8, ge=1,
        description="Sequences (FineTune: sentences) per process in each micro-batch. "
        "Default: 8.",
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1,
        description="Micro-batches accumulated into one optimizer step. Default: 1.",
    )
    learning_rate: float = Field(
        default=1e-3, gt=0.0,
        description="Peak learning rate, reached after warmupSteps and then decayed along a "
        "cosine to a tenth of it at maxSteps. Default: 0.001.",
    )
    warmup_steps: int = Field(
        default=10, ge=0,
        description="Optimizer steps over which the learning rate rises linearly to "
        "learningRate. Default: 10.",
    )
    weight_decay: float = Field(
        default=0.01, ge=0.0,
        description="AdamW weight decay, not applied to biases and norm weights. Default: 0.01.",
    )
    max_grad_norm: float = Field(
        default=1.0, gt=0.0,
        description="Gradients whose total L2 norm exceeds this are scaled down to it before "
        "each optimizer step. Default: 1.0.",
    )
    # NB: numpy and Python's random take seeds below 2**32; torch's take any int64.
    seed: int = Field(
        default=0, ge=0, le=2**32 - 1,
        description="Seed of the random number generators (weight initialization, data "
        "order, dropout), so that a rerun repeats. Default: 0.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="Training precision: `bf16` autocast, or `fp16` autocast with dynamic loss "
        "scaling (all three run on CPUs and GPUs). On CPUs a PretrainJob computes attention in "
        "fp32 where PyTorch's kernel for the reduced type is slower: in `bf16` for sequences "
        "shorter than 256 tokens, in `fp16` always. A FineTune evaluates in fp32 whatever "
        "its training precision.",
    )
    compile: bool = Field(
        default=False,
        description="Compile the training steps with torch.compile (Inductor), which speeds "
        "them up after a one-off compilation: a PretrainJob's model and loss, a FineTune's "
        "model (evaluation runs uncompiled).",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute each transformer layer's activations in the backward pass "
        "instead of keeping them, which lowers activation memory for about one more forward "
        "pass of compute per step. A PretrainJob's MFU counts the model FLOPs without the "
        "recomputation.",
    )
    checkpoint_interval: int = Field(
        default=50, ge=1, description="Save a checkpoint every this many steps. Default: 50."
    )
    keep_checkpoints: int = Field(
        default=2, ge=1,
        description="Latest checkpoints kept; older ones are deleted. Default: 2.",
    )
    eval_interval: int = Field(
        default=50, ge=1, description="Evaluate every this many steps. Default: 50."
    )
    non_finite: Literal["fail", "skip", "rollback"] = Field(
        default="fail",
        description="What a step with a NaN or infinite loss or gradient norm does. `fail` "
        "stops the run, `skip` drops the step without an optimizer update, `rollback` "
        "reloads the latest checkpoint and continues with the data after the offending "
        "batch. An fp16 overflow that the loss scaler skips is not a non-finite step.",
    )
    max_non_finite_steps: int = Field(
        default=10, ge=0,
        description="Non-finite steps that `skip` or `rollback` tolerate before the run "
        "fails; in a FineTune, per phase.",
    )
    artifact_uri: str | None = Field(
        default=None,
        max_length=DATA_PATH_MAX_LENGTH,
        json_schema_extra={"x-kubernetes-validations": [
            pattern_rule(_ARTIFACT_URI.pattern, _ARTIFACT_URI_FIX)
        ]},
        description="PretrainJob: fsspec URL where checkpoints and a copy of the final model "
        "are written (file://, pvc://<claim>/<path>, s3://...). Unset: the stage output "
        "directory.",
    )

    @field_validator("artifact_uri")
    @classmethod
    def _check_artifact_scheme(cls, uri: str | None) -> str | None:
        return check_uri(uri, _ARTIFACT_URI, _ARTIFACT_URI_FIX)


class DistributedSpec(ApiModel):
    """How many processes train together."""

    nodes: int = Field(
        default=1, ge=1, le=1024, description="Nodes, one pod each, that train together. "
        "Default: 1."
    )
    procs_per_node: int = Field(
        default=1, ge=1, le=16,
        description="Training processes per node (`torchrun --nproc-per-node`). On GPU nodes "
        "(`resources.gpus` above 0) every node runs one process per GPU, so leave this at 1, "
        "which then means `resources.gpus`, or set it to `resources.gpus`. On CPU nodes, the "
        "processes to run.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="Data parallelism: `ddp` replicates the model on every process, `fsdp` "
        "shards parameters, gradients and optimizer state with FSDP2 `fully_shard`. A "
        "FineTune gathers the sharded model whole again to evaluate and save it.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="torch.distributed backend; `auto` picks nccl on GPUs."
    )
    max_restarts: int = Field(
        default=3, ge=0, le=100, description="Retries of a failed attempt before giving up."
    )


# Rules over a training stage's spec as a whole, shared by PretrainJob and FineTune.
GPU_RULES: tuple[CelRule, ...] = (
    CelRule(
        rule="!has(self.distributed) || !has(self.distributed.backend) || "
        "self.distributed.backend != 'nccl' || "
        "(has(self.resources) && has(self.resources.gpus) && self.resources.gpus > 0)",
        message="spec.distributed.backend nccl needs GPUs; set spec.resources.gpus, or use "
        "backend gloo or auto",
        check=lambda spec: spec.distributed.backend != "nccl" or spec.resources.gpus > 0,
        field="distributed.backend",
    ),
    # NB: the default 1 passes, because the API server fills it in and CEL cannot tell it from
    # an explicit 1; with GPUs, lathe.k8s.builders_training.processes_per_node starts one
    # process per GPU either way.
    CelRule(
        rule="!has(self.resources) || !has(self.resources.gpus) || self.resources.gpus == 0 || "
        "!has(self.distributed) || !has(self.distributed.procsPerNode) || "
        "self.distributed.procsPerNode == 1 || "
        "self.distributed.procsPerNode == self.resources.gpus",
        message="spec.distributed.procsPerNode must be 1 or equal spec.resources.gpus, because "
        "each node runs one process per GPU; remove procsPerNode to take the GPU count, or set "
        "it to spec.resources.gpus",
        check=lambda spec: (
            spec.resources.gpus == 0
            or spec.distributed.procs_per_node in (1, spec.resources.gpus)
        ),
        field="distributed.procsPerNode",
    ),
)
