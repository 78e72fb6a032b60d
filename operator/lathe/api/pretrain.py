"""The PretrainJob resource: train a language model from scratch on a Corpus."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from lathe.api.common import (
    ApiModel,
    CelRule,
    LocalObjectReference,
    Location,
    PodMetadata,
    PrinterColumn,
    Resource,
    ResourceRequirements,
    Scheduling,
    StageStatus,
    StorageSpec,
    field_path,
    rule_error,
)
from lathe.api.training import GPU_RULES, DistributedSpec, TrainingSpec


Architecture = Literal["llama", "gpt2", "bert", "t5"]
Objective = Literal["causalLM", "maskedLM", "spanCorruption"]

# The pretraining objective of each architecture: next-token prediction for the decoders,
# BERT's masked language modelling, and T5's span corruption for the encoder-decoder.
OBJECTIVES: dict[str, str] = {
    "llama": "causalLM",
    "gpt2": "causalLM",
    "bert": "maskedLM",
    "t5": "spanCorruption",
}


@dataclass(frozen=True)
class ModelDimensions:
    """The sizes of a model: a preset with the explicitly given fields applied over it."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int


# Published dimensions behind spec.model.preset. The feed-forward size is 4 x hidden for the
# GPT presets and Llama 2's own 11008 for 7b. Sources: the GPT-2 `config.json` files (124M:
# n_embd 768, n_layer 12, n_head 12; 355M: 1024, 24, 16) which match GPT-3 Small and Medium in
# Brown et al. 2020, Table 2.1; GPT-3 XL (1.3B) in that table with d_model 2048, 24 layers and
# heads of 128 dimensions, so 16 heads (the table's "24 heads" does not divide 2048, and
# GPT-Neo 1.3B also uses 16); Llama 2 7B's `config.json` (Touvron et al. 2023). Context length
# is GPT-3's 2048 for the GPT presets and Llama 2's 4096 for 7b. A preset fixes dimensions,
# not parameter counts: with the Llama MLP (three matrices) a preset has more parameters than
# with the GPT-2 MLP (two), and the vocabulary always comes from the Tokenizer.
MODEL_PRESETS: dict[str, ModelDimensions] = {
    "tiny": ModelDimensions(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                            max_position_embeddings=512),
    "125m": ModelDimensions(hidden_size=768, num_layers=12, num_heads=12,
                            intermediate_size=3072, max_position_embeddings=2048),
    "350m": ModelDimensions(hidden_size=1024, num_layers=24, num_heads=16,
                            intermediate_size=4096, max_position_embeddings=2048),
    "1.3b": ModelDimensions(hidden_size=2048, num_layers=24, num_heads=16,
                            intermediate_size=8192, max_position_embeddings=2048),
    "7b": ModelDimensions(hidden_size=4096, num_layers=32, num_heads=32,
                          intermediate_size=11008, max_position_embeddings=4096),
}


def _cel_model_size(attribute: str, wire_name: str, model: str = "self") -> str:
    """Return a CEL expression for a size of `model`: its field `wire_name` when set, else the
    preset's (MODEL_PRESETS), so that the API server checks the sizes the job trains with."""
    sizes = ", ".join(f"'{name}': {getattr(dimensions, attribute)}"
                      for name, dimensions in MODEL_PRESETS.items())
    preset = f"(has({model}.preset) ? {model}.preset : 'tiny')"
    return f"(has({model}.{wire_name}) ? {model}.{wire_name} : {{{sizes}}}[{preset}])"


def _spec_path(location: Location) -> str:
    return field_path(("spec", *location))


class ModelArchitectureSpec(ApiModel):
    """The model to build from a `transformers` config."""

    architecture: Architecture = Field(
        default="llama",
        description="Architecture family: llama or gpt2 (decoder-only, causal LM), bert "
        "(encoder-only, masked LM) or t5 (encoder-decoder, span corruption).",
    )
    objective: Objective | None = Field(
        default=None,
        description="Pretraining objective; it follows from the architecture (causalLM for "
        "llama and gpt2, maskedLM for bert, spanCorruption for t5) and, if given, must match it.",
    )
    preset: Literal["tiny", "125m", "350m", "1.3b", "7b"] = Field(
        default="tiny",
        description="Size preset: tiny (128 hidden, 2 layers), 125m, 350m and 1.3b (GPT-2 and "
        "GPT-3 dimensions) or 7b (Llama 2 dimensions). The size fields below override it.",
    )
    hidden_size: int | None = Field(
        default=None, ge=16, description="Hidden size; overrides the preset's."
    )
    num_layers: int | None = Field(
        default=None, ge=1,
        description="Transformer layers (for t5, in the encoder and in the decoder each); "
        "overrides the preset's.",
    )
    num_heads: int | None = Field(
        default=None, ge=1, description="Attention heads; overrides the preset's."
    )
    intermediate_size: int | None = Field(
        default=None, ge=16, description="MLP inner size; overrides the preset's."
    )
    max_position_embeddings: int | None = Field(
        default=None, ge=16,
        description="Maximum positions; overrides the preset's. t5 uses relative positions "
        "and checks sequence lengths against this value only.",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule=f"{_cel_model_size('hidden_size', 'hiddenSize')} % "
            f"{_cel_model_size('num_heads', 'numHeads')} == 0",
            message="spec.model.hiddenSize must be a multiple of spec.model.numHeads (each is "
            "the preset's when unset); pick a numHeads that divides hiddenSize",
            # NB: with a preset size, _check_resolved_heads rejects it instead, with the
            # numbers and the field that was set.
            check=lambda model: (
                model.hidden_size is None or model.num_heads is None
                or model.hidden_size % model.num_heads == 0
            ),
            field="hiddenSize",
        ),
        CelRule(
            rule="(has(self.architecture) && self.architecture != 'llama') || "
            f"{_cel_model_size('hidden_size', 'hiddenSize')} % "
            f"{_cel_model_size('num_heads', 'numHeads')} != 0 || "
            f"({_cel_model_size('hidden_size', 'hiddenSize')} / "
            f"{_cel_model_size('num_heads', 'numHeads')}) % 2 == 0",
            message="spec.model: a llama model's head size, hiddenSize / numHeads (each is the "
            "preset's when unset), must be even, because rotary position embeddings rotate "
            "pairs of dimensions; pick a numHeads that leaves an even head size",
            # NB: _check_resolved_heads rejects it instead, preset sizes included, with the
            # numbers and a numHeads that fits.
            check=lambda model: True,
            field="numHeads",
        ),
        CelRule(
            rule="!has(self.objective) || self.objective == "
            "{'llama': 'causalLM', 'gpt2': 'causalLM', 'bert': 'maskedLM', "
            "'t5': 'spanCorruption'}[has(self.architecture) ? self.architecture : 'llama']",
            message="spec.model.objective must match spec.model.architecture: causalLM for "
            "llama and gpt2, maskedLM for bert, spanCorruption for t5; remove objective to "
            "take the architecture's",
            check=lambda model: (
                model.objective is None or model.objective == OBJECTIVES[model.architecture]
            ),
            field="objective",
        ),
    )

    @model_validator(mode="after")
    def _check_resolved_heads(self) -> ModelArchitectureSpec:
        # NB: the CEL rule above checks the same sizes; this message gives the numbers.
        dimensions = self.dimensions()
        if dimensions.hidden_size % dimensions.num_heads:
            # Blame numHeads when only it overrides the preset, otherwise hiddenSize.
            field = "numHeads" if self.hidden_size is None else "hiddenSize"
            message = (
                f"hidden size {dimensions.hidden_size} (preset {self.preset!r} with overrides) "
                f"is not a multiple of {dimensions.num_heads} heads; set hiddenSize and "
                "numHeads so that numHeads divides hiddenSize"
            )
            raise rule_error(type(self), [((field,), self.value_at((field,)), message)])
        head_size = dimensions.hidden_size // dimensions.num_heads
        if self.architecture == "llama" and head_size % 2:
            field = "hiddenSize" if self.num_heads is None else "numHeads"
            fitting = [heads for heads in range(1, dimensions.hidden_size + 1)
                       if dimensions.hidden_size % heads == 0
                       and (dimensions.hidden_size // heads) % 2 == 0]
            nearest = sorted(fitting, key=lambda heads: abs(heads - dimensions.num_heads))[:2]
            message = (
                f"head size {head_size} (hidden size {dimensions.hidden_size} / "
                f"{dimensions.num_heads} heads) is odd, and llama's rotary position "
                "embeddings rotate pairs of dimensions"
            )
            if nearest:
                message += ("; set numHeads to "
                            f"{' or '.join(str(heads) for heads in sorted(nearest))}")
            else:
                field = "hiddenSize"
                message += (f"; no numHeads fits an odd hidden size, so set hiddenSize to an "
                            f"even number such as {dimensions.hidden_size + 1}")
            raise rule_error(type(self), [((field,), self.value_at((field,)), message)])
        return self

    def dimensions(self) -> ModelDimensions:
        """Return the preset's dimensions with every explicitly given size field applied."""
        overrides = {
            name: getattr(self, name)
            for name in ModelDimensions.__dataclass_fields__
            if getattr(self, name) is not None
        }
        return replace(MODEL_PRESETS[self.preset], **overrides)

    def training_objective(self) -> str:
        return self.objective or OBJECTIVES[self.architecture]


class CurriculumStageSpec(ApiModel):
    """One stage of a training curriculum: a sequence length and a document quality floor."""

    until_step: int | None = Field(
        default=None, ge=1,
        description="Last optimizer step of this stage; the next stage starts after it. "
        "Required on every stage but the last, which runs to training.maxSteps.",
    )
    sequence_length: int | None = Field(
        default=None, ge=8,
        description="Tokens per training sequence in this stage; defaults to "
        "spec.sequenceLength. Short sequences first is the usual order.",
    )
    min_quality: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Train only on documents whose Corpus `quality` score (0 to 1) is at "
        "least this; unset trains on every document. A high floor first (clean text) and a "
        "lower one later (noisier text) is the usual order.",
    )


class CurriculumSpec(ApiModel):
    """Training stages run in order, each from its own packing of the train split."""

    stages: list[CurriculumStageSpec] = Field(
        min_length=1, max_length=16, description="The stages, in training order."
    )

    @model_validator(mode="after")
    def _check_boundaries(self) -> CurriculumSpec:
        previous = 0
        for index, curriculum_stage in enumerate(self.stages):
            until = curriculum_stage.until_step
            last = index == len(self.stages) - 1
            location = ("stages", index, "untilStep")
            if until is None and not last:
                message = (
                    f"spec.curriculum.stages[{index}].untilStep is missing; every stage but "
                    "the last needs the step it ends at"
                )
                raise rule_error(type(self), [(location, until, message)])
            if until is not None and until <= previous:
                message = (
                    f"spec.curriculum.stages[{index}].untilStep {until} is not after the "
                    f"previous stage's end at step {previous}; list stages with increasing "
                    "untilStep"
                )
                raise rule_error(type(self), [(location, until, message)])
            previous = until or previous
        return self


class PretrainJobSpec(ApiModel):
    """Desired state of a PretrainJob."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.sequenceLength) || self.sequenceLength <= (has(self.model) ? "
            f"{_cel_model_size('max_position_embeddings', 'maxPositionEmbeddings', 'self.model')}"
            f" : {MODEL_PRESETS['tiny'].max_position_embeddings})",
            message="spec.sequenceLength must not exceed spec.model.maxPositionEmbeddings (the "
            "preset's when unset); lower sequenceLength or raise maxPositionEmbeddings",
            # NB: with a preset limit, _check_sequence_lengths rejects it instead, with the
            # limit in its message.
            check=lambda spec: (
                spec.model.max_position_embeddings is None
                or spec.sequence_length <= spec.model.max_position_embeddings
            ),
            field="sequenceLength",
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
    curriculum: CurriculumSpec | None = Field(
        default=None,
        description="Training stages by sequence length and document quality; unset trains "
        "on every document at sequenceLength throughout. Validation always uses "
        "sequenceLength and every document.",
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
    scheduling: Scheduling = Field(
        default_factory=Scheduling,
        description="Node selector, tolerations and priority of the training pods.",
    )

    @model_validator(mode="after")
    def _check_sequence_lengths(self) -> PretrainJobSpec:
        # NB: the CEL rule checks spec.sequenceLength only; this check also covers the
        # sequence lengths of the curriculum stages, and its message gives the limit.
        limit = self.model.dimensions().max_position_embeddings
        problems = [
            (location, length,
             f"{_spec_path(location)} {length} exceeds the model's maximum positions {limit} "
             f"(preset {self.model.preset!r} with overrides); lower {_spec_path(location)} or "
             "raise spec.model.maxPositionEmbeddings")
            for location, length in self._sequence_length_locations()
            if length > limit
        ]
        if problems:
            raise rule_error(type(self), problems)
        return self

    @model_validator(mode="after")
    def _check_curriculum_steps(self) -> PretrainJobSpec:
        if self.curriculum is None:
            return self
        for index, curriculum_stage in enumerate(self.curriculum.stages[:-1]):
            until = curriculum_stage.until_step
            if until >= self.training.max_steps:
                message = (
                    f"spec.curriculum.stages[{index}].untilStep {until} is not below "
                    f"training.maxSteps {self.training.max_steps}, so the later stages would "
                    "never run; lower untilStep or raise maxSteps"
                )
                location = ("curriculum", "stages", index, "untilStep")
                raise rule_error(type(self), [(location, until, message)])
        return self

    def _sequence_length_locations(self) -> list[tuple[Location, int]]:
        """Return every sequence length the job trains or validates at, by wire location."""
        lengths: list[tuple[Location, int]] = [(("sequenceLength",), self.sequence_length)]
        for index, curriculum_stage in enumerate(self.curriculum.stages if self.curriculum else []):
            if curriculum_stage.sequence_length is not None:
                location = ("curriculum", "stages", index, "sequenceLength")
                lengths.append((location, curriculum_stage.sequence_length))
        return lengths

    def sequence_lengths(self) -> dict[str, int]:
        """Return every sequence length the job trains or validates at, by field path."""
        return {
            _spec_path(location): length for location, length in self._sequence_length_locations()
        }


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
