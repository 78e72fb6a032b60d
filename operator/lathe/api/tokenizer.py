"""The Tokenizer resource: train a tokenizer on a Corpus, with protected domain patterns."""

from __future__ import annotations

import enum
from typing import ClassVar, Literal

from pydantic import Field

from lathe.api.common import (
    ApiModel,
    LocalObjectReference,
    PrinterColumn,
    Resource,
    ResourceRequirements,
    StageStatus,
    StorageSpec,
)


class TokenizerModel(str, enum.Enum):
    BYTE_LEVEL_BPE = "byteLevelBPE"


class ProtectedPattern(ApiModel):
    """A regular expression whose matches are always kept as one token."""

    name: str = Field(description="Name of the pattern, used in the evaluation report.")
    regex: str = Field(description="Python regular expression, such as an ICD-10 code pattern.")


class TokenizerSpec(ApiModel):
    """Desired state of a Tokenizer."""

    corpus_ref: LocalObjectReference = Field(description="The Corpus to train on.")
    model: TokenizerModel = Field(
        default=TokenizerModel.BYTE_LEVEL_BPE, description="Tokenization model."
    )
    vocab_size: int = Field(default=8000, ge=256, le=262144, description="Vocabulary size.")
    min_frequency: int = Field(default=2, ge=1, description="Minimum pair frequency to merge.")
    lowercase: bool = Field(default=False, description="Lowercase text before tokenizing.")
    special_tokens: list[str] = Field(
        default_factory=lambda: ["<|endoftext|>", "<pad>", "<unk>"],
        description="Special tokens, each encoded as a single id. The first marks document ends.",
    )
    protected_patterns: list[ProtectedPattern] = Field(
        default_factory=list, description="Patterns whose matches are never split."
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Output location.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Compute resources."
    )


class Tokenizer(Resource):
    """A trained tokenizer and its evaluation report."""

    kind_name: ClassVar[str] = "Tokenizer"
    plural: ClassVar[str] = "tokenizers"
    short_names: ClassVar[tuple[str, ...]] = ("tok",)
    printer_columns: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn(name="Phase", json_path=".status.phase"),
        PrinterColumn(name="Corpus", json_path=".spec.corpusRef.name"),
        PrinterColumn(name="Vocab", json_path=".spec.vocabSize", type="integer"),
        PrinterColumn(name="Age", json_path=".metadata.creationTimestamp", type="date"),
    )

    kind: Literal["Tokenizer"] = "Tokenizer"
    spec: TokenizerSpec
    status: StageStatus | None = None

    def references(self) -> dict[str, tuple[str, str]]:
        return {"corpus": ("Corpus", self.spec.corpus_ref.name)}
