"""The Corpus resource: collect, clean, deduplicate, redact and split domain text."""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar, Literal

from pydantic import Field, Strict, field_validator

from lathe.api.common import (
    NAMED_LIST_SCHEMA,
    SET_LIST_SCHEMA,
    ApiModel,
    DataPath,
    PodMetadata,
    PrinterColumn,
    Resource,
    ResourceRequirements,
    Scheduling,
    StageStatus,
    StorageSpec,
    canonical_set,
)


class SourceFormat(str, enum.Enum):
    PUBTATOR = "pubtator"
    PUBMEDQA = "pubmedqa"
    NCBI_DISEASE = "ncbiDisease"
    JSONL = "jsonl"
    TEXT = "text"
    CONLL = "conll"


class Source(ApiModel):
    """One input file in its published format."""

    name: str = Field(min_length=1, max_length=63,
                      description="Short name of the source, used in statistics and lineage.")
    format: SourceFormat = Field(
        strict=False,
        description="Published format: `pubtator` (BioCreative PubTator), `pubmedqa` (the "
        "PubMedQA JSON), `ncbiDisease` (NCBI disease corpus), `jsonl` (one JSON object per line "
        "with a `text` field), `text` (one document per blank-line-separated block) or `conll` "
        "(one `token<TAB>tag` or `token tag` line per token, blank lines between sentences; "
        "each sentence is "
        "one document, its tokens joined with spaces). `lathe validate` (for local files) and the "
        "stage reject a file whose start looks like `pubtator`, `pubmedqa`, `conll` or `jsonl` "
        "when this field says otherwise."
    )
    path: DataPath = Field(
        description="File path or URI. A relative path is resolved against the data directory "
        "(`lathe run --data-dir`, or the data volume in the cluster). An empty file, or one "
        "without records in the declared format, fails the stage (and `lathe validate`, for an "
        "empty local file)."
    )


class NormalizationSpec(ApiModel):
    """Text normalization. Domain codes and numbers are never rewritten."""

    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        default="NFC", description="Unicode normalization form applied to every document."
    )
    collapse_whitespace: bool = Field(
        default=True,
        description="Collapse each run of spaces, tabs and other horizontal whitespace (such as "
        "U+00A0) to one space, strip the ends of lines and keep at most one blank line between "
        "paragraphs. Line breaks, letters, digits and punctuation are kept.",
    )


class NearDuplicateSpec(ApiModel):
    """MinHash near-duplicate removal. One document is kept per cluster."""

    enabled: bool = Field(
        default=True, description="Remove near duplicates. Default: true."
    )
    threshold: float = Field(
        default=0.8, gt=0.0, le=1.0, description="Jaccard similarity of two documents' "
        "word-shingle sets at or above which they are near duplicates. MinHash LSH finds the "
        "candidate pairs and the exact Jaccard similarity of their shingle sets confirms them."
    )
    num_perm: int = Field(
        default=128, ge=16, le=1024,
        description="MinHash permutations per document; more estimate the similarity more "
        "closely and cost more time. Default: 128.",
    )
    shingle_size: int = Field(
        default=5, ge=1, le=32, description="Words per shingle. Each differing word changes this "
        "many shingles, so a larger size separates templated documents with different findings "
        "more clearly."
    )


class DedupSpec(ApiModel):
    """Duplicate removal."""

    exact: bool = Field(default=True, description="Remove documents whose normalized text repeats.")
    near: NearDuplicateSpec = Field(
        default_factory=NearDuplicateSpec, description="Near-duplicate removal."
    )


class PiiKind(str, enum.Enum):
    EMAIL = "email"
    PHONE = "phone"
    SSN = "ssn"
    MRN = "mrn"


class PiiSpec(ApiModel):
    """Redaction of structured personal identifiers."""

    redact: list[Annotated[PiiKind, Strict(False)]] = Field(
        default_factory=lambda: list(PiiKind),
        json_schema_extra=SET_LIST_SCHEMA,
        description="Identifier kinds to replace with a placeholder such as `<EMAIL>`, each "
        "listed once. Their order does not matter: they apply in a fixed order (e-mail, MRN, "
        "SSN, phone).",
    )

    @field_validator("redact")
    @classmethod
    def _canonical_redact(cls, value: list[PiiKind]) -> list[PiiKind]:
        # The declaration order, which is the default order, so that a default spec keeps its
        # stage key.
        order = list(PiiKind)
        return canonical_set(value, key=order.index)


def _check_unique_names(sources: list[Source], noun: str) -> None:
    """Raise ValueError when two of `sources` share a name, as the CRD's list-map key does.

    `noun` names one item in the message, such as "source".
    """
    names = [source.name for source in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{noun} names {duplicates!r} are used more than once; give each "
                         f"{noun} its own name")


class DecontaminationSpec(ApiModel):
    """Removal of documents that overlap evaluation sets."""

    eval_sets: list[Source] = Field(
        default_factory=list, max_length=64, json_schema_extra=NAMED_LIST_SCHEMA,
        description="Evaluation sets whose documents must not appear in the training corpus, "
        "each with its own name.",
    )
    ngram_size: int = Field(
        default=13, ge=4, le=50, description="Tokens per n-gram. A token is a run of letters and "
        "digits, so `IL-2` is two tokens and punctuation spacing does not matter. A document "
        "that shares one n-gram with an evaluation document is dropped. An evaluation set whose "
        "documents are all shorter than this fails the stage."
    )

    @field_validator("eval_sets")
    @classmethod
    def _unique_eval_set_names(cls, eval_sets: list[Source]) -> list[Source]:
        _check_unique_names(eval_sets, "evaluation set")
        return eval_sets


class SplitSpec(ApiModel):
    """Train/validation split."""

    validation_fraction: float = Field(
        default=0.05, gt=0.0, lt=0.5, description="Share of documents in the validation split."
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1,
                      description="Seed of the split, so reruns give the same split.")


class CorpusSpec(ApiModel):
    """Desired state of a Corpus."""

    # NB: with more items, the API server's cost estimate of the CEL rules on each source's
    # path would exceed its budget (see DATA_PATH_MAX_LENGTH). The stage config of a Corpus,
    # which lists every source, must also fit a 1 MiB ConfigMap.
    sources: list[Source] = Field(
        min_length=1, max_length=10000, json_schema_extra=NAMED_LIST_SCHEMA,
        description="Input files, each with its own name. Statistics and document ids are "
        "keyed by source name.",
    )
    normalization: NormalizationSpec = Field(
        default_factory=NormalizationSpec, description="Text normalization."
    )
    dedup: DedupSpec = Field(default_factory=DedupSpec, description="Duplicate removal.")
    pii: PiiSpec = Field(default_factory=PiiSpec, description="PII redaction.")
    decontamination: DecontaminationSpec = Field(
        default_factory=DecontaminationSpec, description="Evaluation-set decontamination."
    )
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train/validation split.")
    min_words: int = Field(
        default=5, ge=0, description="Drop documents with fewer whitespace-separated words."
    )
    shards: int = Field(
        default=1, ge=1, le=1024, description="Output files (shards) per split. Default: 1."
    )
    workers: int = Field(
        default=1, ge=1, le=256,
        description="Pods (local processes for `lathe run`) that share the per-document work: "
        "normalization, fingerprints, decontamination checks and PII redaction. Worker 0 then "
        "removes duplicates and writes every shard; the output does not depend on this number.",
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Output location.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Compute resources per worker."
    )
    scheduling: Scheduling = Field(
        default_factory=Scheduling,
        description="Node selector, tolerations and priority of the Corpus pods.",
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Labels and annotations for the Corpus pods."
    )

    @field_validator("sources")
    @classmethod
    def _unique_source_names(cls, sources: list[Source]) -> list[Source]:
        _check_unique_names(sources, "source")
        return sources


class Corpus(Resource):
    """A cleaned, deduplicated, PII-redacted and split domain corpus."""

    kind_name: ClassVar[str] = "Corpus"
    plural: ClassVar[str] = "corpora"
    short_names: ClassVar[tuple[str, ...]] = ("corp",)
    printer_columns: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn(name="Phase", json_path=".status.phase"),
        PrinterColumn(name="Documents", json_path=".status.metrics.documentsOut", type="integer"),
        PrinterColumn(name="Age", json_path=".metadata.creationTimestamp", type="date"),
    )

    kind: Literal["Corpus"] = "Corpus"
    spec: CorpusSpec
    status: StageStatus | None = None
