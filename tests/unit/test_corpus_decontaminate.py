"""Decontamination: any shared word n-gram with an evaluation document drops a document."""

from __future__ import annotations

from lathe_trainer.corpus.decontaminate import EvalIndex, remove_contaminated
from lathe_trainer.corpus.records import Document

EVAL_TEXT = (
    "Mutations in the ATM gene are responsible for the autosomal recessive disorder "
    "ataxia-telangiectasia, which is characterized by cerebellar degeneration."
)


def _document(identifier: str, text: str) -> Document:
    return Document(identifier, "test", identifier, text)


def _index(*texts: str, size: int = 13) -> EvalIndex:
    return EvalIndex([_document(f"eval:{i}", t) for i, t in enumerate(texts)], size)


def test_shared_ngram_drops_document():
    text = "Background. " + EVAL_TEXT.upper().replace(",", " ;") + " We studied 40 families."
    result = remove_contaminated([_document("train:1", text)], _index(EVAL_TEXT))
    assert result.kept == []
    assert [(d.id, owner) for d, owner in result.removed] == [("train:1", "eval:0")]


def test_shorter_overlap_is_kept():
    # Twelve of the evaluation words in a row: one short of the 13-word n-gram.
    text = "Mutations in the ATM gene are responsible for the autosomal recessive disorder X."
    result = remove_contaminated([_document("train:1", text)], _index(EVAL_TEXT))
    assert [d.id for d in result.kept] == ["train:1"]


def test_short_eval_document_matches_whole_text():
    index = _index("Ataxia telangiectasia.", size=13)
    documents = [
        _document("train:1", "ataxia-telangiectasia"),
        _document("train:2", "Ataxia telangiectasia!"),
        _document("train:3", "Ataxia telangiectasia in 40 families."),
    ]
    result = remove_contaminated(documents, index)
    assert [d.id for d, _ in result.removed] == ["train:2"]


def test_index_counts_documents():
    assert _index(EVAL_TEXT, "another evaluation document").documents == 2
