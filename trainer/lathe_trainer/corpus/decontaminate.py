"""Evaluation-set decontamination, after deduplication and before PII redaction.

A training document is dropped when it shares at least one word n-gram (13 words by default)
with any document of an evaluation set. Tokens are the case-folded words of
`shingles.word_tokens`, so punctuation and case changes do not hide a copy. An evaluation
document shorter than the n-gram size is matched as a whole: a training document contaminates
it when the document's tokens are exactly the evaluation document's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lathe_trainer.corpus.records import Document
from lathe_trainer.corpus.shingles import word_ngrams, word_tokens


class EvalIndex:
    """The n-grams of every evaluation document, each mapped to the first document with it."""

    def __init__(self, documents: Iterable[Document], ngram_size: int):
        self.ngram_size = ngram_size
        self.owner: dict[str, str] = {}
        self.documents = 0
        for document in documents:
            self.documents += 1
            for ngram in word_ngrams(word_tokens(document.text), ngram_size):
                self.owner.setdefault(ngram, document.id)

    def first_overlap(self, text: str) -> str | None:
        """Return the id of an evaluation document that shares an n-gram with text, if any."""
        tokens = word_tokens(text)
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
