"""Training helpers: special-token literals, protected term counts, added vocabulary entries."""

from __future__ import annotations

from collections import Counter

import pytest

from lathe.api.tokenizer import ProtectedPattern, TokenizerSpec
from lathe_trainer.tokenizer import evaluation, patterns, training

SPECIALS = ["<|endoftext|>", "<pad>", "<unk>", "[SEP]"]
ICD10 = ProtectedPattern(name="icd10", regex=r"\b[A-TV-Z][0-9][0-9AB](?:\.?[0-9A-KXZ][0-9A-TV-Z]{0,3})?\b")


@pytest.mark.parametrize(
    ("text", "pieces", "found"),
    [
        ("plain text", ["plain text"], {}),
        ("a [SEP] b<|endoftext|>", ["a ", " b"], {"[SEP]": 1, "<|endoftext|>": 1}),
        ("[SEP][SEP]", [], {"[SEP]": 2}),
        ("lowercase [sep] stays", ["lowercase [sep] stays"], {}),
    ],
)
def test_special_literals_removed(text, pieces, found):
    counts: Counter = Counter()
    assert list(training.without_special_literals([text], SPECIALS, counts)) == pieces
    assert counts == Counter(found)


def test_frequent_terms_ranked_and_capped():
    counts = Counter({"E11.9": 5, "I10": 5, "Z79.4": 2, "A00": 1})
    assert training.frequent_terms(counts, 2, 10) == ["E11.9", "I10", "Z79.4"]
    assert training.frequent_terms(counts, 2, 2) == ["E11.9", "I10"]


@pytest.mark.parametrize("lowercase", [False, True])
def test_count_protected_terms(lowercase):
    matcher = patterns.ProtectedMatcher([ICD10], lowercase)
    counts = training.count_protected_terms(["E11.9 and E11.9, I10"], matcher, lowercase)
    expected = {"E11.9": 2, "I10": 1}
    assert counts == Counter({k.lower() if lowercase else k: v for k, v in expected.items()})


def tiny_tokenizer(lowercase: bool = False):
    spec = TokenizerSpec.model_validate(
        {"corpusRef": {"name": "c"}, "vocabSize": 600, "lowercase": lowercase}
    )
    matcher = patterns.ProtectedMatcher([ICD10], lowercase)
    tokenizer = training.build_tokenizer(spec, matcher)
    texts = ["Patients with E11.9 and hypertension were treated."] * 20
    training.train(tokenizer, lambda: iter(texts), spec, 600, progress=lambda done: None)
    return tokenizer


def test_added_terms_are_one_token():
    tokenizer, added = training.add_terms(tiny_tokenizer(), ["Z79.4", "E119"])
    assert added == 2
    for text in ["Z79.4", "on Z79.4.", "(E119)"]:
        tokens = tokenizer.encode(text).tokens
        assert "Z79.4" in tokens or "E119" in tokens, tokens


def test_added_terms_skip_existing_entries():
    tokenizer, _ = training.add_terms(tiny_tokenizer(), ["Z79.4"])
    size = tokenizer.get_vocab_size()
    again, added = training.add_terms(tokenizer, ["Z79.4"])
    assert added == 0
    assert again.get_vocab_size() == size


def test_split_examples_distinct():
    """A term split in many documents is listed once, leaving room for other terms."""
    matcher = patterns.ProtectedMatcher([ICD10], False)
    texts = ["Unseen Q21.3 here."] * 3 + ["And Q22.1 too."]
    report = evaluation.evaluate(tiny_tokenizer(), texts, matcher)
    icd10 = report["protected_patterns"]["icd10"]
    assert icd10["matches"] == 4
    assert icd10["split_examples"] == ["Q21.3", "Q22.1"]


def test_special_token_checks():
    tokenizer = tiny_tokenizer()
    ids = evaluation.special_token_ids(tokenizer, training_specials())
    assert all(len(value) == 1 for value in ids.values())
    assert evaluation.special_token_fragments(tokenizer, training_specials()) == []


def training_specials() -> list[str]:
    return TokenizerSpec.model_validate({"corpusRef": {"name": "c"}}).special_tokens


def test_evaluation_counts_whole_and_apart():
    matcher = patterns.ProtectedMatcher([ICD10], False)
    tokenizer, _ = training.add_terms(tiny_tokenizer(), ["E11.9"])
    report = evaluation.evaluate(tokenizer, ["Seen E11.9 and unseen Q21.3 here."], matcher)
    icd10 = report["protected_patterns"]["icd10"]
    assert icd10["matches"] == 2
    assert icd10["kept_whole"] == 1
    assert icd10["kept_apart"] == 2
    assert icd10["split_examples"] == ["Q21.3"]
    assert report["words"] == 6
    assert report["bytes_per_token"] == pytest.approx(report["bytes"] / report["tokens"])
