"""The PretrainJob resource: train a language model from scratch on a Corpus."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lathe.api.common import (
    ApiModel,
    CelRule,
    LocalObjectReference,
    PodMetadata,
    PrinterColumn,
    Resource,
    ResourceRequirements,
    StageStatus,
    StorageSpec,
)
from lathe.api.training import GPU_RULES, DistributedSpec, TrainingSpec


class ModelArchitectureSpec(ApiModel):
    """The model to build from a `transformers` config."""

    architecture: Literal["llama", "gpt2"] = Field(
        default="llama", description="Decoder-only architecture family."
    )
    hidden_size: int = Field(default=128, ge=16, description="Hidden size.")
    num_layers: int = Field(default=2, ge=1, description="Transformer layers.")
    num_heads: int = Field(default=4, ge=1, description="Attention heads.")
    intermediate_size: int = Field(default=512, ge=16, description="MLP inner size.")
    max_position_embeddings: int = Field(default=512, ge=16, description="Maximum positions.")

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.hiddenSize % self.numHeads == 0",
            message="spec.model.hiddenSize must be a multiple of spec.model.numHeads; pick a "
            "numHeads that divides hiddenSize",
            check=lambda model: model.hidden_size % model.num_heads == 0,
        ),
    )


class PretrainJobSpec(ApiModel):
    """Desired state of a PretrainJob."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.sequenceLength <= self.model.maxPositionEmbeddings",
            message="spec.sequenceLength must not exceed spec.model.maxPositionEmbeddings; lower "
            "sequenceLength or raise maxPositionEmbeddings",
            check=lambda spec: spec.sequence_length <= spec.model.max_position_embeddings,
        ),
        *GPU_RULES,
    )

    corpus_ref: LocalObjectReference = Field(description="The Corpus to train on.")
    tokenizer_ref: LocalObjectReference = Field(description="The Tokenizer to encode with.")
    model: ModelArchitectureSpec = Field(
        default_factory=ModelArchitectureSpec, description="Model architecture."
    )
    sequence_length: int = Field(
        default=128, ge=8,
        description="Tokens per training sequence; at most model.maxPositionEmbeddings.",
    )
    eval_sequences: int = Field(
        default=256, ge=1,
        description="Validation sequences (from the start of the validation split) scored "
        "for validation perplexity.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimization.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Processes and nodes."
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Labels and annotations for the training pods."
    )
    suspend: bool = Field(default=False, description="Pause the job; resuming continues from "
                          "the latest checkpoint.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Output location.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Compute resources per node."
    )


class PretrainJob(Resource):
    """A model trained from scratch, with checkpoints and a final Hugging Face model."""

    kind_name: ClassVar[str] = "PretrainJob"
    plural: ClassVar[str] = "pretrainjobs"
    short_names: ClassVar[tuple[str, ...]] = ("ptj",)
    printer_columns: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn(name="Phase", json_path=".status.phase"),
        PrinterColumn(name="Step", json_path=".status.progress.step", type="integer"),
        PrinterColumn(name="Loss", json_path=".status.progress.loss", type="number"),
        PrinterColumn(name="Age", json_path=".metadata.creationTimestamp", type="date"),
    )

    kind: Literal["PretrainJob"] = "PretrainJob"
    spec: PretrainJobSpec
    status: StageStatus | None = None

    def references(self) -> dict[str, tuple[str, str]]:
        return {
            "corpus": ("Corpus", self.spec.corpus_ref.name),
            "tokenizer": ("Tokenizer", self.spec.tokenizer_ref.name),
        }
