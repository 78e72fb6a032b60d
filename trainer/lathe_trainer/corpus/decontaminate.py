"""Evaluation-set decontamination, after deduplication and before PII redaction.

A training document is dropped when it shares at least one n-gram (13 tokens by default) with
any document of an evaluation set. Tokens are the case-folded runs of letters and digits of
`shingles.alphanumeric_tokens`, so punctuation, its spacing and case do not hide a copy: a
CoNLL sentence whose tokens are joined with spaces matches the abstract it was cut from. An
evaluation document shorter than the n-gram size is matched as a whole: a training document
contaminates it when the document's tokens are exactly the evaluation document's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lathe_trainer.corpus.records import Document
from lathe_trainer.corpus.shingles import alphanumeric_tokens, word_ngrams


@dataclass
class EvalSetCounts:
    """Document and n-gram counts of one evaluation set in an `EvalIndex`.

    Every document of the set is counted once. A document in `documents_indexed` had at least
    `ngram_size` tokens and added its n-grams. One in `documents_too_short` had fewer and is
    matched only as a whole text.
    """

    documents_indexed: int = 0
    documents_too_short: int = 0
    # Distinct n-grams of this set, whether or not another set has them too.
    ngrams: int = 0
    max_tokens: int = 0

    @property
    def documents(self) -> int:
        return self.documents_indexed + self.documents_too_short


class EvalIndex:
    """The n-grams of every evaluation document, each mapped to the first document with it."""

    def __init__(self, ngram_size: int):
        self.ngram_size = ngram_size
        self.owner: dict[str, str] = {}
        self.documents = 0

    def add(self, documents: Iterable[Document]) -> EvalSetCounts:
        """Index the n-grams of one evaluation set and return what it added."""
        counts = EvalSetCounts()
        ngrams: set[str] = set()
        for document in documents:
            self.documents += 1
            tokens = alphanumeric_tokens(document.text)
            counts.max_tokens = max(counts.max_tokens, len(tokens))
            document_ngrams = word_ngrams(tokens, self.ngram_size)
            if len(tokens) < self.ngram_size:
                # The one entry (if any) is the whole text, not an n-gram.
                counts.documents_too_short += 1
            else:
                counts.documents_indexed += 1
                ngrams |= document_ngrams
            for ngram in document_ngrams:
                self.owner.setdefault(ngram, document.id)
        counts.ngrams = len(ngrams)
        return counts

    def first_overlap(self, text: str) -> str | None:
        """Return the id of an evaluation document that shares an n-gram with text, if any."""
        tokens = alphanumeric_tokens(text)
        if len(tokens) < self.ngram_size:
            # NB: a short document yields one n-gram of all its tokens, which only equals a
            # stored entry when an evaluation document has exactly those tokens.
            return self.owner.get(" ".join(tokens))
        for start in range(len(tokens) - self.ngram_size + 1):
            owner = self.owner.get(" ".join(tokens[start:start + self.ngram_size]))
            if owner is not None:
                return owner
        return None


@dataclass
class Decontaminated:
    """Documents kept, and each dropped document with the evaluation document it overlaps."""

    kept: list[Document] = field(default_factory=list)
    removed: list[tuple[Document, str]] = field(default_factory=list)


def remove_contaminated(documents: Sequence[Document], index: EvalIndex) -> Decontaminated:
    result = Decontaminated()
    for document in documents:
        owner = index.first_overlap(document.text)
        if owner is None:
            result.kept.append(document)
        else:
            result.removed.append((document, owner))
    return result
