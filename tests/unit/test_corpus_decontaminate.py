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
    index = EvalIndex(size)
    index.add([_document(f"eval:{i}", t) for i, t in enumerate(texts)])
    return index


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
    # A hyphen separates tokens like a space, so train:1 has the same two tokens.
    assert [d.id for d, _ in result.removed] == ["train:1", "train:2"]


def test_conll_spacing_matches_abstract_text():
    """CoNLL tokens joined with spaces give the tokens of the original punctuation."""
    conll = "Mutations in the ATM gene cause ataxia - telangiectasia ( A - T ) , a recessive " \
        "disorder of IL - 2 signalling ."
    abstract = "Background: mutations in the ATM gene cause ataxia-telangiectasia (A-T), a " \
        "recessive disorder of IL-2 signalling. We studied 40 families."
    result = remove_contaminated([_document("train:1", abstract)], _index(conll))
    assert [d.id for d, _ in result.removed] == ["train:1"]


def test_codes_still_differ_after_split():
    index = _index("Patients coded E11.9 received 5 mg/kg of the drug once daily for 12 weeks.")
    same = "patients coded e11 9 received 5 mg kg of the drug once daily for 12 weeks"
    other = "Patients coded E11.8 received 5 mg/kg of the drug once daily for 12 weeks."
    result = remove_contaminated([_document("same", same), _document("other", other)], index)
    assert [d.id for d, _ in result.removed] == ["same"]
    assert [d.id for d in result.kept] == ["other"]


def test_index_counts_documents():
    assert _index(EVAL_TEXT, "another evaluation document").documents == 2


def test_add_counts_indexed_and_short_documents():
    index = EvalIndex(13)
    documents = [_document("eval:0", EVAL_TEXT), _document("eval:1", EVAL_TEXT),
                 _document("eval:2", "too short"), _document("eval:3", "")]
    counts = index.add(documents)
    tokens = 20  # EVAL_TEXT has 20 tokens, so 8 distinct 13-token n-grams.
    assert counts.documents_indexed == 2
    assert counts.documents_too_short == 2
    assert counts.documents == 4
    assert counts.ngrams == tokens - 13 + 1
    assert counts.max_tokens == tokens
