"""Encoding and IOB decoding shared by the Triton steps and the in-process NER reference."""

from __future__ import annotations

import json

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
        encoded = decoding.encode_text(raw, text, special, max_length=10_000, stride=0)
        assert len(encoded.rows) == 1, text
        row = encoded.rows[0]
        ids, word_index, spans = row.ids, row.word_ids, row.spans
        expected_ids, expected_words, word_spans = finetune_data.encode_text(fast, text)
        assert ids == expected_ids, text
        assert word_index == expected_words, text
        assert [spans[i] for i, w in enumerate(word_index) if w >= 0] == [
            word_spans[w] for w in expected_words if w >= 0
        ], text


def test_encoding_pads_right_and_splits_windows(tokenizers):
    _, raw, special = tokenizers
    encoded = decoding.encode_texts(raw, ["Breast cancer.", "", "x " * 50], special, 16)
    _, windows, length = encoded["input_ids"].shape
    assert windows > 1
    assert length <= 16
    assert encoded["attention_mask"][1, 0].tolist() == [1] + [0] * (length - 1)
    assert encoded["input_ids"][1, 0, 1:].tolist() == [special.pad] * (length - 1)
    assert (encoded["word_ids"][1] == decoding.NO_WORD).all()
    # Texts with fewer windows than the longest get windows without tokens.
    assert encoded["attention_mask"][0, 1:].sum() == 0
    assert encoded["attention_mask"][1, 1:].sum() == 0
    assert encoded["attention_mask"][2, 0].sum() == length
    assert (encoded["attention_mask"][2].sum(axis=-1) > 1).all()
    labelled = encoded["word_ids"][2][encoded["word_ids"][2] != decoding.NO_WORD]
    assert np.unique(labelled).tolist() == list(range(50))
    assert (np.diff(labelled) >= 0).all()
    assert encoded["cut_tokens"].tolist() == [0, 0, 0]


def test_empty_batch_has_one_column(tokenizers):
    _, raw, special = tokenizers
    no_bos = decoding.SpecialIds(bos=None, unk=special.unk, pad=special.pad)
    encoded = decoding.encode_texts(raw, ["", ""], no_bos, 8)
    assert encoded["input_ids"].shape == (2, 1, 1)
    assert encoded["attention_mask"].sum() == 0


def decode(words: list[str], tags: list[str]) -> list[tuple]:
    text = " ".join(words)
    offsets, position = [], 0
    for word in words:
        offsets.append((position, position + len(word)))
        position += len(word) + 1
    label_ids = np.array([LABELS.index(tag) for tag in tags])
    entities = decoding.decode_entities(
        text, label_ids, np.array(offsets), np.arange(len(words)), LABELS, "first"
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


@pytest.mark.parametrize(
    ("label_ids", "label_subtoken"),
    [
        ([1, 1, 0, 2, 1], "first"),  # special and padding labels are ignored
        ([1, 0, 1, 2, 1], "last"),
    ],
)
def test_labelled_subtoken_labels_the_word(label_ids, label_subtoken):
    text = "Huntington chorea"
    offsets = np.array([[0, 0], [0, 10], [0, 10], [11, 17], [0, 0]])
    word_ids = np.array([-1, 0, 0, 1, -1])
    entities = decoding.decode_entities(
        text, np.array(label_ids), offsets, word_ids, LABELS, label_subtoken
    )
    assert entities == [{"start": 0, "end": 17, "text": "Huntington chorea", "label": "Disease"}]


def test_other_subtoken_is_not_read():
    """The sub-token that training left unlabelled does not decide the word's tag."""
    text = "Huntington chorea"
    offsets = np.array([[0, 10], [0, 10], [11, 17]])
    word_ids = np.array([0, 0, 1])
    label_ids = np.array([0, 1, 0])  # only the last sub-token of "Huntington" predicts B-Disease
    first = decoding.decode_entities(text, label_ids, offsets, word_ids, LABELS, "first")
    last = decoding.decode_entities(text, label_ids, offsets, word_ids, LABELS, "last")
    assert first == []
    assert [entity["text"] for entity in last] == ["Huntington"]


@pytest.mark.parametrize(
    ("label", "expected"),
    [("O", ("O", "")), ("B-Disease", ("B", "Disease")), ("I-Chemical", ("I", "Chemical")),
     ("Disease", ("I", "Disease"))],
)
def test_split_label(label, expected):
    assert decoding.split_label(label) == expected


@pytest.mark.parametrize(
    ("counts", "budget", "stride", "expected"),
    [
        ([], 5, 2, []),
        ([1, 1, 1], 5, 2, [(0, 0, 3)]),
        # Context: whole words before the window, up to the stride.
        ([2, 2, 2, 2], 5, 2, [(0, 0, 2), (1, 2, 3), (2, 3, 4)]),
        ([1, 1, 1, 1, 1, 1, 1], 4, 2, [(0, 0, 4), (2, 4, 6), (4, 6, 7)]),
        ([2, 2, 2, 2], 5, 0, [(0, 0, 2), (2, 2, 4)]),
        # A word over the budget fills a window alone, without context.
        ([1, 9, 1], 5, 2, [(0, 0, 1), (1, 1, 2), (2, 2, 3)]),
        # Context leaves room for the first new word.
        ([1, 1, 1, 4], 5, 3, [(0, 0, 3), (2, 3, 4)]),
    ],
)
def test_split_windows(counts, budget, stride, expected):
    windows = decoding.split_windows(counts, budget, stride)
    assert [(w.context_start, w.start, w.end) for w in windows] == expected


def test_split_windows_invariants():
    """On random word sizes: every word labelled once, windows fit, context starts advance."""
    generator = np.random.default_rng(0)
    for _ in range(300):
        counts = generator.integers(1, 12, size=generator.integers(0, 40)).tolist()
        budget = int(generator.integers(1, 20))
        stride = int(generator.integers(0, budget))
        windows = decoding.split_windows(counts, budget, stride)
        labelled = [word for window in windows for word in range(window.start, window.end)]
        assert labelled == list(range(len(counts)))
        for before, window in zip(windows, windows[1:]):
            assert window.context_start > before.context_start
        for window in windows:
            context = sum(counts[window.context_start:window.start])
            sizes = [min(count, budget) for count in counts[window.context_start:window.end]]
            assert context <= stride
            assert sum(sizes) <= budget
            assert window.start < window.end


@pytest.mark.parametrize(("max_length", "stride"), [(16, 15), (16, -1), (1, 0)])
def test_window_without_new_tokens_is_rejected(tokenizers, max_length, stride):
    _, raw, special = tokenizers
    with pytest.raises(ValueError, match="max_length|stride"):
        decoding.encode_text(raw, "Breast cancer.", special, max_length, stride)


def pubtator_documents(data_dir, count: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """Return (title + " " + abstract, mention spans) of the first NCBI-disease test documents."""
    corpus = data_dir / "pubmed" / "ncbi-disease" / "corpus" / "NCBItestset_corpus.txt"
    documents: list[tuple[str, list[tuple[int, int]]]] = []
    parts: list[str] = []
    mentions: list[tuple[int, int]] = []
    for line in corpus.read_text(encoding="utf-8").splitlines() + [""]:
        fields = line.split("|", 2)
        if len(fields) == 3 and fields[1] in ("t", "a"):
            parts.append(fields[2])
        elif line.count("\t") >= 4:
            start, end = line.split("\t")[1:3]
            mentions.append((int(start), int(end)))
        elif not line and parts:
            documents.append((" ".join(parts), mentions))
            parts, mentions = [], []
            if len(documents) == count:
                break
    return documents


def gold_label_ids(text: str, mentions: list[tuple[int, int]], word_ids: np.ndarray) -> np.ndarray:
    """Label each token with its word's IOB tag from the mentions that cover whole words.

    Tokens that no window labels get `B-Disease`, so decoding them would add false entities.
    """
    spans = [match.span() for match in decoding.WORD_PATTERN.finditer(text)]
    tags = ["O"] * len(spans)
    for start, end in mentions:
        inside = [i for i, (a, b) in enumerate(spans) if start <= a and b <= end]
        for position, word in enumerate(inside):
            tags[word] = "B-Disease" if position == 0 else "I-Disease"
    label_ids = np.full(word_ids.shape, LABELS.index("B-Disease"))
    labelled = word_ids != decoding.NO_WORD
    label_ids[labelled] = [LABELS.index(tags[word]) for word in word_ids[labelled]]
    return label_ids


def test_windows_find_mentions_beyond_first_window(tokenizers, data_dir):
    """Decoding gold tags through 64-token windows of real abstracts returns every mention."""
    _, raw, special = tokenizers
    beyond_first_window = 0
    for text, mentions in pubtator_documents(data_dir, 5):
        encoded = decoding.encode_texts(raw, [text], special, max_length=64, stride=16)
        word_ids = encoded["word_ids"][0]
        label_ids = gold_label_ids(text, mentions, word_ids)
        entities = decoding.decode_entities(
            text, label_ids, encoded["offsets"][0], word_ids, LABELS, "last"
        )
        word_starts = {match.start() for match in decoding.WORD_PATTERN.finditer(text)}
        word_ends = {match.end() for match in decoding.WORD_PATTERN.finditer(text)}
        expected = sorted(
            (start, end) for start, end in set(mentions) if start in word_starts and end in word_ends
        )
        assert [(entity["start"], entity["end"]) for entity in entities] == expected, text
        for entity in entities:
            assert entity["text"] == text[entity["start"]:entity["end"]]
        first_window_end = encoded["offsets"][0, 0][word_ids[0] != decoding.NO_WORD].max()
        beyond_first_window += sum(start >= first_window_end for start, _ in expected)
    assert beyond_first_window > 0


def test_windows_cover_each_word_once(tokenizers, data_dir):
    """Each window is a slice of the whole encoding that labels the words after its context."""
    _, raw, special = tokenizers
    text, _ = pubtator_documents(data_dir, 1)[0]
    whole = decoding.encode_text(raw, text, special, max_length=100_000, stride=0).rows[0]
    encoded = decoding.encode_text(raw, text, special, max_length=64, stride=16)
    assert len(encoded.rows) > 2
    assert encoded.cut_tokens == 0
    labelled_ids, labelled_words, labelled_spans = [], [], []
    for index, row in enumerate(encoded.rows):
        assert len(row.ids) <= 64
        assert row.ids[0] == special.bos
        body = row.ids[1:]
        context = sum(word == decoding.NO_WORD for word in row.word_ids[1:])
        assert (context > 0) == (index > 0)
        assert context <= 16
        # Context tokens come first, then the labelled ones.
        assert all(word == decoding.NO_WORD for word in row.word_ids[1:1 + context])
        assert decoding.NO_WORD not in row.word_ids[1 + context:]
        # The position in the whole encoding where this window's context begins.
        start = whole.word_ids.index(row.word_ids[1 + context]) - context
        assert (start == 1) == (index == 0)
        assert body == whole.ids[start:start + len(body)]
        labelled_ids += body[context:]
        labelled_words += row.word_ids[1 + context:]
        labelled_spans += row.spans[1 + context:]
    assert labelled_ids == whole.ids[1:]
    assert labelled_words == whole.word_ids[1:]
    assert labelled_spans == whole.spans[1:]


def test_word_longer_than_window_is_cut(tokenizers):
    _, raw, special = tokenizers
    long_word = "ACGT" * 100
    text = f"Cystic {long_word} fibrosis"
    pieces = raw.encode_batch([" Cystic", " " + long_word, " fibrosis"], add_special_tokens=False)
    sizes = [len(piece.ids) for piece in pieces]
    assert sizes[1] > 15
    encoded = decoding.encode_texts(raw, [text], special, max_length=16, stride=4)
    assert encoded["cut_tokens"].tolist() == [sizes[1] - 15]
    # Neither neighbour gets the long word as context: it does not fit into the stride.
    assert encoded["attention_mask"][0].sum(axis=-1).tolist() == [1 + sizes[0], 16, 1 + sizes[2]]
    label_ids = np.full(encoded["word_ids"].shape, LABELS.index("B-Disease"))
    entities = decoding.entities_from_logits(
        [text], np.eye(len(LABELS))[label_ids], encoded["offsets"], encoded["word_ids"], LABELS,
        "last",
    )
    assert [entity["text"] for entity in entities[0]] == ["Cystic", long_word, "fibrosis"]


def test_run_windows_skips_padding_windows():
    input_ids = np.array([[[5, 6, 0], [7, 0, 0]], [[8, 0, 0], [0, 0, 0]]])
    attention_mask = (input_ids > 0).astype(np.int64)
    calls = []

    def run(ids, mask):
        calls.append(ids.shape)
        return np.stack([ids, mask], axis=-1).astype(np.float32)

    logits = decoding.run_windows(run, input_ids, attention_mask, num_labels=2)
    assert calls == [(3, 3)]
    assert logits.shape == (2, 2, 3, 2)
    assert logits[..., 0].tolist() == [[[5, 6, 0], [7, 0, 0]], [[8, 0, 0], [0, 0, 0]]]
    assert (logits[1, 1] == 0).all()


@pytest.mark.parametrize("trained, window", [(160, 160), (None, 512), (4096, 512)])
def test_window_is_the_finetuned_length(tmp_path, data_dir, trained, window):
    """Serving windows are as long as the FineTune's sentences (its tokenizer's
    model_max_length), at most the model's positions, which is 512 here."""
    from tiny_ner_model import build_model

    from lathe_trainer.serving.reference import read_model_settings

    model_dir = build_model(data_dir, tmp_path / "model")
    if trained is not None:
        fast = AutoTokenizer.from_pretrained(model_dir)
        fast.model_max_length = trained
        fast.save_pretrained(model_dir)
    settings = read_model_settings(model_dir)
    assert settings.max_length == window
    assert settings.max_positions == 512


@pytest.mark.parametrize(
    ("recorded", "expected"),
    [(None, "first"), ("first", "first"), ("last", "last")],
)
def test_labelled_subtoken_read_from_config(tmp_path, data_dir, recorded, expected):
    """A model fine-tuned before the FineTune stage recorded the sub-token labelled the first."""
    from tiny_ner_model import build_model

    from lathe_trainer.serving.reference import read_model_settings

    model_dir = build_model(data_dir, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config.pop(decoding.LABEL_SUBTOKEN_KEY)
    if recorded is not None:
        config[decoding.LABEL_SUBTOKEN_KEY] = recorded
    (model_dir / "config.json").write_text(json.dumps(config))
    assert read_model_settings(model_dir).label_subtoken == expected


def test_unknown_labelled_subtoken_rejected(tmp_path, data_dir):
    from tiny_ner_model import build_model

    from lathe_trainer.serving.reference import ModelFormatError, read_model_settings

    model_dir = build_model(data_dir, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config[decoding.LABEL_SUBTOKEN_KEY] = "middle"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="lathe_label_subtoken is 'middle'; it must be "
                       "one of first, last"):
        read_model_settings(model_dir)
