"""Encoding and IOB decoding shared by the Triton steps and the in-process NER reference."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_ner_model import build_tokenizer
from transformers import AutoTokenizer

from lathe_trainer.finetune import data as finetune_data
from lathe_trainer.serving import decoding

LABELS = ["O", "B-Disease", "I-Disease", "B-Chemical", "I-Chemical"]
TEXTS = [
    "Ataxia-telangiectasia (A-T) is a recessive disorder.",
    "α-thalassaemia responds to 5 µg/kg; 🤒 Ménière's disease.",
    "   leading spaces and\ttabs\n",
    "",
    "中文 текст",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, data_dir):
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(data_dir, directory)
    fast = AutoTokenizer.from_pretrained(directory)
    raw = decoding.load_tokenizer(str(directory / "tokenizer.json"))
    special = decoding.SpecialIds(bos=fast.bos_token_id, unk=fast.unk_token_id,
                                  pad=fast.pad_token_id)
    return fast, raw, special


def conll_texts(data_dir, count: int) -> list[str]:
    from lathe_trainer.datasets import read_conll

    sentences = read_conll(data_dir / "pubmed" / "ncbi-disease" / "conll" / "test.tsv")
    return [" ".join(words) for words, _ in sentences[:count]]


def test_encoding_matches_finetune(tokenizers, data_dir):
    """Serving encodes text exactly as the FineTune stage encoded its training sentences."""
    fast, raw, special = tokenizers
    for text in TEXTS + conll_texts(data_dir, 200):
        ids, word_index, spans = decoding.encode_row(raw, text, special, max_length=10_000)
        expected_ids, expected_words, word_spans = finetune_data.encode_text(fast, text)
        assert ids == expected_ids, text
        assert word_index == expected_words, text
        assert [spans[i] for i, w in enumerate(word_index) if w >= 0] == [
            word_spans[w] for w in expected_words if w >= 0
        ], text


def test_encoding_pads_right_and_truncates(tokenizers):
    _, raw, special = tokenizers
    encoded = decoding.encode_texts(raw, ["Breast cancer.", "", "x " * 50], special, 16)
    assert encoded["input_ids"].shape == (3, 16)
    assert encoded["attention_mask"][1].tolist() == [1] + [0] * 15
    assert encoded["input_ids"][1, 1:].tolist() == [special.pad] * 15
    assert (encoded["word_ids"][1] == decoding.NO_WORD).all()
    assert encoded["attention_mask"][2].sum() == 16


def test_empty_batch_has_one_column(tokenizers):
    _, raw, special = tokenizers
    no_bos = decoding.SpecialIds(bos=None, unk=special.unk, pad=special.pad)
    encoded = decoding.encode_texts(raw, ["", ""], no_bos, 8)
    assert encoded["input_ids"].shape == (2, 1)
    assert encoded["attention_mask"].sum() == 0


def decode(words: list[str], tags: list[str]) -> list[tuple]:
    text = " ".join(words)
    offsets, position = [], 0
    for word in words:
        offsets.append((position, position + len(word)))
        position += len(word) + 1
    label_ids = np.array([LABELS.index(tag) for tag in tags])
    entities = decoding.decode_entities(
        text, label_ids, np.array(offsets), np.arange(len(words)), LABELS
    )
    return [(entity["text"], entity["label"]) for entity in entities]


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["O", "O", "O", "O"], []),
        (["B-Disease", "I-Disease", "O", "O"], [("a b", "Disease")]),
        (["B-Disease", "B-Disease", "O", "O"], [("a", "Disease"), ("b", "Disease")]),
        (["I-Disease", "I-Disease", "O", "I-Disease"], [("a b", "Disease"), ("d", "Disease")]),
        (["B-Disease", "I-Chemical", "I-Chemical", "O"],
         [("a", "Disease"), ("b c", "Chemical")]),
        (["O", "O", "B-Chemical", "I-Chemical"], [("c d", "Chemical")]),
    ],
)
def test_iob_decoding(tags, expected):
    assert decode(["a", "b", "c", "d"], tags) == expected


def test_first_subtoken_labels_the_word():
    text = "Huntington chorea"
    offsets = np.array([[0, 0], [0, 10], [0, 10], [11, 17], [0, 0]])
    word_ids = np.array([-1, 0, 0, 1, -1])
    label_ids = np.array([1, 1, 0, 2, 1])  # special and padding labels are ignored
    entities = decoding.decode_entities(text, label_ids, offsets, word_ids, LABELS)
    assert entities == [{"start": 0, "end": 17, "text": "Huntington chorea", "label": "Disease"}]


@pytest.mark.parametrize(
    ("label", "expected"),
    [("O", ("O", "")), ("B-Disease", ("B", "Disease")), ("I-Chemical", ("I", "Chemical")),
     ("Disease", ("I", "Disease"))],
)
def test_split_label(label, expected):
    assert decoding.split_label(label) == expected
