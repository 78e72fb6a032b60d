"""Per-filter statistics of a Corpus run, written to stats.json and returned as metrics.

The counts are kept so that they add up: documents read minus malformed records minus the
documents each filter removed equals the documents written, and each evaluation set's
documents are either indexed by their n-grams or too short for one. `CorpusStats.check`
enforces both before anything is reported.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lathe_trainer.corpus.decontaminate import EvalSetCounts
from lathe_trainer.corpus.records import SourceRead

# Filters in the order the stage runs them; stats.json lists them in this order.
MIN_WORDS = "minWords"
EXACT_DUPLICATES = "exactDuplicates"
NEAR_DUPLICATES = "nearDuplicates"
DECONTAMINATION = "decontamination"
FILTERS = (MIN_WORDS, EXACT_DUPLICATES, NEAR_DUPLICATES, DECONTAMINATION)

# Removed documents listed per filter as examples, so a surprising count can be checked.
MAX_REMOVED_EXAMPLES = 5


@dataclass
class SourceStats:
    """Counts, malformed examples and digest of one source or evaluation-set file."""

    name: str
    format: str
    path: str
    digest: str
    size_bytes: int
    read: SourceRead
    # Counts of an evaluation set in the decontamination index, or None for a source.
    index: EvalSetCounts | None = None

    def to_json(self) -> dict[str, Any]:
        result = {
            "name": self.name,
            "format": self.format,
            "path": self.path,
            "sha256": self.digest,
            "bytes": self.size_bytes,
            "documentsIn": self.read.records,
            "malformed": self.read.malformed_count,
            "malformedExamples": [record.to_json() for record in self.read.malformed_examples],
        }
        if self.index is not None:
            result |= {
                "documentsIndexed": self.index.documents_indexed,
                "documentsTooShort": self.index.documents_too_short,
                "ngrams": self.index.ngrams,
            }
        return result


@dataclass
class FilterStats:
    """Documents one filter removed, in total, per source, and a few examples."""

    name: str
    removed: int = 0
    removed_by_source: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, source: str, example: dict[str, Any]) -> None:
        self.removed += 1
        self.removed_by_source[source] += 1
        if len(self.examples) < MAX_REMOVED_EXAMPLES:
            self.examples.append(example)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "removed": self.removed,
            "removedBySource": dict(sorted(self.removed_by_source.items())),
            "examples": self.examples,
        }


@dataclass
class CorpusStats:
    """Everything stats.json reports about one run."""

    sources: list[SourceStats] = field(default_factory=list)
    eval_sets: list[SourceStats] = field(default_factory=list)
    filters: dict[str, FilterStats] = field(
        default_factory=lambda: {name: FilterStats(name) for name in FILTERS}
    )
    pii_redactions: Counter[str] = field(default_factory=Counter)
    pii_documents: int = 0
    documents_per_shard: dict[str, list[int]] = field(default_factory=dict)
    words_per_split: dict[str, int] = field(default_factory=dict)
    documents_out_by_source: Counter[str] = field(default_factory=Counter)

    @property
    def documents_in(self) -> int:
        return sum(source.read.records for source in self.sources)

    @property
    def malformed(self) -> int:
        return sum(source.read.malformed_count for source in self.sources)

    @property
    def removed(self) -> int:
        return sum(stats.removed for stats in self.filters.values())

    def split_documents(self, split: str) -> int:
        return sum(self.documents_per_shard.get(split, []))

    @property
    def documents_out(self) -> int:
        return sum(sum(counts) for counts in self.documents_per_shard.values())

    def check(self) -> None:
        """Raise if the counts do not add up, which would mean a step lost documents."""
        expected = self.documents_in - self.malformed - self.removed
        if expected != self.documents_out:
            raise RuntimeError(
                f"Corpus counts do not add up: {self.documents_in} read - {self.malformed} "
                f"malformed - {self.removed} removed = {expected}, but {self.documents_out} "
                "were written. This is a bug in the Corpus stage."
            )
        for eval_set in self.eval_sets:
            parsed = eval_set.read.records - eval_set.read.malformed_count
            if eval_set.index is not None and eval_set.index.documents != parsed:
                raise RuntimeError(
                    f"Evaluation set {eval_set.name!r} has {parsed} documents, but "
                    f"{eval_set.index.documents_indexed} indexed + "
                    f"{eval_set.index.documents_too_short} too short = "
                    f"{eval_set.index.documents}. This is a bug in the Corpus stage."
                )

    def source_digests(self) -> dict[str, str]:
        return {item.name: item.digest for item in self.sources + self.eval_sets}

    def to_json(self) -> dict[str, Any]:
        return {
            "documentsIn": self.documents_in,
            "malformed": self.malformed,
            "removed": {name: stats.removed for name, stats in self.filters.items()},
            "documentsOut": self.documents_out,
            "splits": {
                split: {
                    "documents": sum(counts),
                    "words": self.words_per_split.get(split, 0),
                    "documentsPerShard": counts,
                }
                for split, counts in self.documents_per_shard.items()
            },
            "piiRedactions": dict(sorted(self.pii_redactions.items())),
            "piiDocuments": self.pii_documents,
            "filters": [stats.to_json() for stats in self.filters.values()],
            "sources": [
                {**source.to_json(), "documentsOut": self.documents_out_by_source[source.name]}
                for source in self.sources
            ],
            "evalSets": [source.to_json() for source in self.eval_sets],
            "sourceDigests": self.source_digests(),
        }
