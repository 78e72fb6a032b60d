"""The FineTune resource: adapt a pretrained model to a task, with LoRA or in full."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lathe.api.common import (
    ApiModel,
    CelRule,
    DataPath,
    LocalObjectReference,
    PodMetadata,
    PrinterColumn,
    Resource,
    ResourceRequirements,
    Scheduling,
    StageStatus,
    StorageSpec,
)
from lathe.api.training import GPU_RULES, DistributedSpec, TrainingSpec


class BaseModelSpec(ApiModel):
    """The model to start from."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="has(self.pretrainJobRef) != has(self.uri)",
            message="set exactly one of spec.baseModel.pretrainJobRef and spec.baseModel.uri",
            check=lambda base: (base.pretrain_job_ref is None) != (base.uri is None),
            field="uri",
        ),
    )

    pretrain_job_ref: LocalObjectReference | None = Field(
        default=None, description="A PretrainJob in the same namespace whose final model is used."
    )
    uri: DataPath | None = Field(
        default=None, description="A Hugging Face-format model directory, instead of a reference."
    )


class TaskDataSpec(ApiModel):
    """Labelled task data."""

    format: Literal["conll"] = Field(
        default="conll", description="`conll`: `token<TAB>tag` lines (IOB), blank line between "
        "sentences. Columns may be separated by spaces instead, as CoNLL-2003 is published. Columns between the token and the tag, such as the POS and chunk columns "
        "of CoNLL-2003, are ignored, and `-DOCSTART-` lines only separate documents."
    )
    train: DataPath = Field(description="Training split path, relative to the data directory.")
    validation: DataPath | None = Field(default=None, description="Validation split path.")
    test: DataPath = Field(description="Test split path, used for the final report.")


# Default LoRA targets per architecture (`model_type` in config.json): the attention projections
# and the token embeddings. NB: the embeddings matter for NER on small models. A 64-wide,
# 2-layer Llama pretrained for 300 steps was fine-tuned for 200 steps (rank 16, learning rate
# 1e-2) on 2,000 NCBI-disease sentences (peft 0.21, 2-core CPU, first 200 test sentences).
# Test F1 was 0.01 with attention-only adapters, 0.0 for a head-only linear probe, and 0.30
# with `embed_tokens` added. Other architectures (bert, t5) have no default and need spec.lora.targetModules.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"],
    "gpt2": ["c_attn", "c_proj", "wte"],
}


class LoraSpec(ApiModel):
    """LoRA adapter settings (peft)."""

    r: int = Field(
        default=8, ge=1, le=256,
        description="Rank of each adapter's two low-rank matrices; a higher rank trains more "
        "parameters. Default: 8.",
    )
    alpha: int = Field(
        default=16, ge=1,
        description="Scaling numerator (`lora_alpha`): adapter updates are scaled by alpha / r. "
        "Default: 16.",
    )
    dropout: float = Field(
        default=0.05, ge=0.0, lt=1.0,
        description="Dropout probability on the adapters' inputs. Default: 0.05.",
    )
    target_modules: list[str] = Field(
        default_factory=list,
        description="Module names that get adapters. Empty: the attention projections and the "
        "token embeddings of the architecture (`q_proj`, `k_proj`, `v_proj`, `o_proj`, "
        "`embed_tokens` for Llama; `c_attn`, `c_proj`, `wte` for GPT-2). BERT and T5 have no "
        "default, so a FineTune of them sets this (for BERT, for example `query`, `key`, "
        "`value`, `dense`, `word_embeddings`).",
    )


_LORA_DEFAULTS = LoraSpec()
# True when spec.lora is absent or has only the defaults, which the API server fills in when the
# field is left out.
_LORA_UNSET = (
    "!has(self.lora) || ("
    f"(!has(self.lora.r) || self.lora.r == {_LORA_DEFAULTS.r}) && "
    f"(!has(self.lora.alpha) || self.lora.alpha == {_LORA_DEFAULTS.alpha}) && "
    f"(!has(self.lora.dropout) || self.lora.dropout == {_LORA_DEFAULTS.dropout}) && "
    "(!has(self.lora.targetModules) || size(self.lora.targetModules) == 0))"
)


class FineTuneSpec(ApiModel):
    """Desired state of a FineTune."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.data.train != self.data.test",
            message="spec.data.test must differ from spec.data.train; evaluate on held-out data",
            check=lambda spec: spec.data.train != spec.data.test,
            field="data.test",
        ),
        *GPU_RULES,
        # NB: a lora block equal to the defaults passes, because the API server fills it in
        # when a FineTune leaves it out, and so it did for method full before this rule.
        CelRule(
            rule=f"!has(self.method) || self.method == 'lora' || {_LORA_UNSET}",
            message="spec.lora applies only to method lora, and method full would ignore it; "
            "remove spec.lora or set method: lora",
            check=lambda spec: spec.method == "lora" or spec.lora == _LORA_DEFAULTS,
            field="lora",
        ),
        CelRule(
            rule="!has(self.training) || !has(self.training.artifactUri)",
            message="spec.training.artifactUri is PretrainJob only; a FineTune writes its "
            "checkpoints under its output, so remove it",
            check=lambda spec: spec.training.artifact_uri is None,
            field="training.artifactUri",
        ),
    )

    base_model: BaseModelSpec = Field(description="The model to start from.")
    task: Literal["tokenClassification"] = Field(
        default="tokenClassification",
        description="Task head to train: `tokenClassification` tags each word with an IOB "
        "label, as for NER. Default: tokenClassification.",
    )
    data: TaskDataSpec = Field(description="Labelled task data.")
    method: Literal["lora", "full"] = Field(
        default="lora",
        description="Adaptation method: `lora` trains low-rank adapters (peft) and the task "
        "head and saves the adapters merged into the model; `full` trains every weight. "
        "Default: lora.",
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec,
        description="LoRA settings, for method lora. With method full, a lora block other "
        "than the defaults is rejected.",
    )
    compare_from_scratch: bool = Field(
        default=True, description="Also train the same architecture from random initialization, "
        "so the report shows what pretraining bought."
    )
    max_length: int = Field(
        default=128, ge=8, description="Maximum tokens per sentence, counting the leading "
        "`bos` token. Longer sentences are truncated, counted in the report, and their cut-off "
        "words are predicted as `O`."
    )
    max_train_sentences: int | None = Field(
        default=None, ge=1, description="Use only the first this many training sentences "
        "(for quick runs and tests). Unset: all."
    )
    max_eval_sentences: int | None = Field(
        default=None, ge=1, description="Use only the first this many sentences of the "
        "validation and test splits (for quick runs and tests). Unset: all."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimization.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Processes and nodes."
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Labels and annotations for the training pods."
    )
    suspend: bool = Field(
        default=False,
        description="Pause training: the workload stops, and resuming continues from the "
        "latest checkpoint. Default: false.",
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Output location.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Compute resources per node."
    )
    scheduling: Scheduling = Field(
        default_factory=Scheduling,
        description="Node selector, tolerations and priority of the training pods.",
    )


class FineTune(Resource):
    """A task model and its evaluation report."""

    kind_name: ClassVar[str] = "FineTune"
    plural: ClassVar[str] = "finetunes"
    short_names: ClassVar[tuple[str, ...]] = ("ft",)
    printer_columns: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn(name="Phase", json_path=".status.phase"),
        PrinterColumn(name="Method", json_path=".spec.method"),
        PrinterColumn(name="F1", json_path=".status.metrics.f1", type="number"),
        PrinterColumn(name="Age", json_path=".metadata.creationTimestamp", type="date"),
    )
    kind: Literal["FineTune"] = "FineTune"
    spec: FineTuneSpec
    status: StageStatus | None = None

    def references(self) -> dict[str, tuple[str, str]]:
        ref = self.spec.base_model.pretrain_job_ref
        return {"baseModel": ("PretrainJob", ref.name)} if ref else {}
