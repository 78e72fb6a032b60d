"""Word-level tags and entity-level scores of the FineTune stage."""

from __future__ import annotations

import pytest

from lathe_trainer.finetune.data import IGNORE_INDEX, EncodedSentence
from lathe_trainer.finetune.metrics import entity_scores, word_tags

ID2LABEL = {0: "O", 1: "B-Disease", 2: "I-Disease"}


X = IGNORE_INDEX


@pytest.mark.parametrize(
    ("predictions", "word_index", "labels", "num_words", "tags"),
    [
        # The first sub-token carries the label ...
        ([0, 1, 0, 2], [-1, 0, 0, 1], [X, 1, X, 2], 2, ["B-Disease", "I-Disease"]),
        # ... or the last: the prediction at the labelled token decides.
        ([0, 1, 0, 2], [-1, 0, 0, 1], [X, X, 1, 2], 2, ["O", "I-Disease"]),
        ([0, 1], [-1, 0], [X, 1], 3, ["B-Disease", "O", "O"]),
        ([0], [-1], [X], 0, []),
    ],
)
def test_word_tags_table(predictions, word_index, labels, num_words, tags):
    item = EncodedSentence([7] * len(word_index), labels, word_index, num_words, False)
    assert word_tags(predictions, item, ID2LABEL) == tags


def test_all_outside_scores_zero():
    gold = [["B-Disease", "I-Disease", "O"], ["O", "B-Disease"]]
    scores = entity_scores(gold, [["O"] * 3, ["O"] * 2])
    assert scores["f1"] == 0.0
    assert scores["goldEntities"] == 2


def test_entity_boundaries_must_match():
    gold = [["B-Disease", "I-Disease", "O", "B-Disease"]]
    predicted = [["B-Disease", "O", "O", "B-Disease"]]
    scores = entity_scores(gold, predicted)
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["perType"]["Disease"]["support"] == 2


def test_gold_entities_count_i_after_o():
    """An entity that starts with I- after O counts, as seqeval's support counts it."""
    gold = [["O", "I-Disease", "I-Disease", "O", "B-Disease"]]
    scores = entity_scores(gold, [["O"] * 5])
    assert scores["goldEntities"] == 2
    assert scores["perType"]["Disease"]["support"] == 2
