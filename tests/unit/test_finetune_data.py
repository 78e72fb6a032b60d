"""Tokenization convention and batching of the FineTune stage, with a real byte-level BPE."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import ByteLevelBPETokenizer, Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lathe_trainer.finetune.data import (
    IGNORE_INDEX,
    TaskDataError,
    encode_sentence,
    encode_text,
    encode_words,
    label_list,
    read_sentences,
    split_words,
    step_indices,
    words_split_at_serving,
)
from lathe_trainer.serving.decoding import label_subtoken_mask

TEXTS = [
    "Adenomatous polyposis coli (APC) is a tumour suppressor.",
    "Ataxia-telangiectasia is a recessive disorder with 5 mg/kg doses.",
    "Myotonic dystrophy and Huntington disease are inherited.",
] * 20


def fast_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<pad>", unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The same vocabulary with add_prefix_space off and on."""
    directory = tmp_path_factory.mktemp("tok")
    trainer = ByteLevelBPETokenizer(add_prefix_space=False)
    trainer.train_from_iterator(
        TEXTS, vocab_size=400, special_tokens=["<|endoftext|>", "<pad>", "<unk>"],
        show_progress=False,
    )
    trainer.save(str(directory / "off.json"))
    with_prefix = Tokenizer.from_file(str(directory / "off.json"))
    with_prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with_prefix.save(str(directory / "on.json"))
    return fast_tokenizer(directory / "off.json"), fast_tokenizer(directory / "on.json")


def test_encode_words_starts_with_bos(tokenizers):
    tokenizer, _ = tokenizers
    ids, word_index = encode_words(tokenizer, ["Adenomatous", "polyposis"])
    assert ids[0] == tokenizer.bos_token_id
    assert word_index[0] == -1
    assert sorted(set(word_index[1:])) == [0, 1]


def test_encode_words_prefixes_every_word_with_space(tokenizers):
    tokenizer, _ = tokenizers
    ids, word_index = encode_words(tokenizer, ["polyposis", "polyposis"])
    first = [i for i, w in zip(ids, word_index) if w == 0]
    second = [i for i, w in zip(ids, word_index) if w == 1]
    assert first == second
    assert first == tokenizer(" polyposis", add_special_tokens=False)["input_ids"]


def test_encode_words_ignores_add_prefix_space(tokenizers):
    """The ids do not depend on the tokenizer's add_prefix_space setting."""
    without, with_prefix = tokenizers
    assert without("is")["input_ids"] != with_prefix("is")["input_ids"]
    words = ["Ataxia", "-", "telangiectasia", "is", "recessive", "."]
    assert encode_words(without, words)[0] == encode_words(with_prefix, words)[0]


def test_encode_words_empty_sentence(tokenizers):
    tokenizer, _ = tokenizers
    assert encode_words(tokenizer, []) == ([tokenizer.bos_token_id], [-1])


def test_encode_text_matches_encode_words(tokenizers):
    """Raw text split by WORD_PATTERN encodes like the CoNLL words of the same sentence."""
    tokenizer, _ = tokenizers
    text = "Ataxia-telangiectasia (A-T) is a recessive disorder."
    words = ["Ataxia", "-", "telangiectasia", "(", "A", "-", "T", ")", "is", "a", "recessive",
             "disorder", "."]
    ids, word_index, spans = encode_text(tokenizer, text)
    assert (ids, word_index) == encode_words(tokenizer, words)
    assert [text[start:end] for start, end in spans] == words


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("5 mg/kg", ["5", "mg", "/", "kg"]),
        ("  leading  spaces ", ["leading", "spaces"]),
        # `µ` is a letter in Unicode, so `µg` is one word.
        ("café µg Ωmega", ["café", "µg", "Ωmega"]),
        ("", []),
    ],
)
def test_split_words_table(text, words):
    assert [word for word, _, _ in split_words(text)] == words


@pytest.mark.parametrize(
    ("word_index", "first", "last"),
    [
        ([-1, 0, 0, 1, 2, 2, 2], [False, True, False, True, True, False, False],
         [False, False, True, True, False, False, True]),
        ([0, 1, 1], [True, True, False], [True, False, True]),
        ([0, 0, -1, -1], [True, False, False, False], [False, True, False, False]),
        ([-1], [False], [False]),
        ([], [], []),
    ],
)
def test_label_subtoken_mask_table(word_index, first, last):
    assert label_subtoken_mask(word_index, "first") == first
    assert label_subtoken_mask(word_index, "last") == last


def test_label_subtoken_mask_rejects_other_names():
    with pytest.raises(ValueError, match="label_subtoken is 'middle'; use one of first, last"):
        label_subtoken_mask([0], "middle")


@pytest.mark.parametrize("label_subtoken", ["first", "last"])
def test_encode_sentence_labels_one_subtoken(tokenizers, label_subtoken):
    tokenizer, _ = tokenizers
    label2id = {"O": 0, "B-Disease": 1, "I-Disease": 2}
    sentence = (["Adenomatous", "polyposis", "coli"], ["B-Disease", "I-Disease", "I-Disease"])
    encoded = encode_sentence(tokenizer, sentence, label2id, 64, label_subtoken)
    positions = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    assert [encoded.labels[i] for i in positions] == [1, 2, 2]
    assert encoded.labels[0] == IGNORE_INDEX
    assert not encoded.truncated
    # "Adenomatous" is several sub-tokens; the label sits on the first or on the last of them.
    first_word = [i for i, word in enumerate(encoded.word_index) if word == 0]
    assert len(first_word) > 1
    expected = first_word[0] if label_subtoken == "first" else first_word[-1]
    assert positions[0] == expected


def test_truncated_word_labelled_on_last_kept_token(tokenizers):
    tokenizer, _ = tokenizers
    sentence = (["Adenomatous"], ["B-Disease"])
    whole = encode_sentence(tokenizer, sentence, {"O": 0, "B-Disease": 1}, 64, "last")
    cut = encode_sentence(tokenizer, sentence, {"O": 0, "B-Disease": 1}, 2, "last")
    assert len(whole.input_ids) > 2
    assert cut.truncated
    assert cut.labels == [IGNORE_INDEX, 1]


def test_encode_sentence_truncates(tokenizers):
    tokenizer, _ = tokenizers
    label2id = {"O": 0}
    sentence = (["disorder"] * 20, ["O"] * 20)
    encoded = encode_sentence(tokenizer, sentence, label2id, max_length=8)
    assert encoded.truncated
    assert len(encoded.input_ids) == 8
    assert encoded.num_words == 20


def test_label_list_orders_types():
    splits = [([["a", "b"], ["B-Disease", "I-Disease"]]), ([["c"], ["B-Chemical"]])]
    assert label_list(splits) == ["O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cancer\tDisease\n", r"tag 'Disease'.*IOB"),
        ("cancer\tB-\n", r"tag 'B-'"),
        ("cancer\n", r"expected `token<TAB>tag` or `token tag`"),
        ("\n\n", r"contains no sentences"),
    ],
)
def test_read_sentences_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(TaskDataError, match=message):
        read_sentences(path, None)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("cancer", "expected `token<TAB>tag` or `token tag`, got 'cancer' without a tag column"),
        ("cancer\t", "expected `token<TAB>tag` or `token tag`, got 'cancer\\t' without a tag "
         "column"),
        (" B-Disease", "expected one token without spaces in the first column, got ''"),
        ("two words\tO", "expected one token without spaces in the first column, got 'two words'"),
        ("\tB-Disease", "expected one token without spaces in the first column, got ''"),
    ],
)
def test_read_sentences_malformed_line(tmp_path, line, reason):
    """A malformed line names the file, its line number and the line, and stops the read."""
    path = tmp_path / "bad.tsv"
    path.write_text(f"Ataxia\tB-Disease\n\n{line}\nis\tO\n")
    with pytest.raises(TaskDataError) as raised:
        read_sentences(path, None)
    assert str(raised.value) == f"{path}:3: {reason}"


# The same two sentences in the layouts of NCBI-disease, CoNLL-2003 with tabs and exports with
# Windows line ends, trailing tabs or empty middle columns.
CONLL_LAYOUTS = {
    "two columns": "Ataxia\tB-Disease\n-\tI-Disease\nis\tO\n\nIL\tO\n",
    "four columns": "Ataxia\tNN\tB-NP\tB-Disease\n-\t:\tI-NP\tI-Disease\nis\tVBZ\tB-VP\tO\n"
    "\nIL\tNN\tB-NP\tO\n",
    "crlf and trailing tabs": "Ataxia\tB-Disease\t\r\n-\tI-Disease\r\nis\tO\r\n\r\nIL\tO\r\n",
    "empty middle column": "Ataxia\t\tB-Disease\n-\t\tI-Disease\nis\t\tO\n\nIL\t\tO\n",
    "four columns with spaces": "Ataxia NN B-NP B-Disease\n- : I-NP I-Disease\nis VBZ B-VP O\n"
    "\nIL NN B-NP O\n",
    "two columns with spaces": "Ataxia B-Disease\n- I-Disease\nis O\n\nIL O\n",
    "spaces around tabs": "Ataxia \tB-Disease\n- \t I-Disease\nis\t O \n\nIL \tO\n",
}


@pytest.mark.parametrize("layout", sorted(CONLL_LAYOUTS))
def test_read_sentences_column_layouts(tmp_path, layout):
    """The token is the first column and the tag the last, whatever lies between them."""
    path = tmp_path / "split.tsv"
    path.write_bytes(CONLL_LAYOUTS[layout].encode())
    assert read_sentences(path, None) == [
        (["Ataxia", "-", "is"], ["B-Disease", "I-Disease", "O"]),
        (["IL"], ["O"]),
    ]


def test_read_sentences_docstart_separates(tmp_path):
    """`-DOCSTART-` lines end a sentence and are neither tokens nor sentences."""
    path = tmp_path / "conll2003.tsv"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "EU\tNNP\tB-NP\tB-ORG\nrejects\tVBZ\tB-VP\tO\n\n"
        "-DOCSTART-\t-X-\t-X-\tO\n"
        "Peter\tNNP\tB-NP\tB-PER\n"
        "-DOCSTART-\tO\n"
        "Blackburn\tNNP\tI-NP\tB-PER\n\n"
        "-DOCSTART-\n"
    )
    assert read_sentences(path, None) == [
        (["EU", "rejects"], ["B-ORG", "O"]),
        (["Peter"], ["B-PER"]),
        (["Blackburn"], ["B-PER"]),
    ]


def test_read_sentences_only_docstart(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("-DOCSTART- -X- -X- O\n\n-DOCSTART-\tO\n")
    with pytest.raises(TaskDataError, match="contains no sentences"):
        read_sentences(path, None)


def test_read_sentences_missing_file(tmp_path):
    with pytest.raises(TaskDataError, match="does not exist"):
        read_sentences(tmp_path / "none.tsv", None)


def test_read_sentences_limit(data_dir):
    path = data_dir / "pubmed/ncbi-disease/conll/devel.tsv"
    assert len(read_sentences(path, 7)) == 7


def test_step_indices_deterministic_and_cover_epoch():
    steps = [step_indices(10, step, 4, seed=3) for step in range(5)]
    assert steps == [step_indices(10, step, 4, seed=3) for step in range(5)]
    flat = [index for batch in steps for index in batch]
    assert sorted(flat[:10]) == list(range(10))
    assert sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]


def test_phase_named_in_progress():
    """The progress share counts both phases, so each message names its phase."""
    from lathe_trainer.finetune.stage import progress_callback

    updates = []
    reporter = SimpleNamespace(update=lambda step, message, **metrics: updates.append(
        (step, message)))
    progress_callback(reporter, 300, "2 of 2")(171, "scratch: step 171/300")
    progress_callback(reporter, 0)(5, "lora: step 5/300")
    assert updates == [(471, "scratch: step 171/300 (phase 2 of 2)"), (5, "lora: step 5/300")]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "llama"}, "last"),
        ({"model_type": "gpt2"}, "last"),
        ({"model_type": "mistral"}, "last"),
        ({"model_type": "bert"}, "first"),
        ({"model_type": "roberta"}, "first"),
        ({"model_type": "t5"}, "first"),
    ],
)
def test_label_subtoken_by_model_type(config, expected):
    from lathe_trainer.finetune.model import label_subtoken_for

    assert label_subtoken_for(config["model_type"]) == expected


def test_words_split_at_serving_listed_once():
    sentences = [(["IL-2", "levels", "rose", "."], ["B-X", "O", "O", "O"]),
                 (["IL-2", "and", "TNF‑alpha"], ["B-X", "O", "B-X"])]
    assert words_split_at_serving(sentences) == ["IL-2", "TNF‑alpha"]


@pytest.mark.parametrize("split", ["train.tsv", "devel.tsv", "test.tsv"])
def test_ncbi_words_are_serving_words(data_dir, split):
    """Every token of the NCBI-disease CoNLL files is one word as serving splits text."""
    sentences = read_sentences(data_dir / "pubmed" / "ncbi-disease" / "conll" / split, None)
    assert len(sentences) > 900
    assert words_split_at_serving(sentences) == []
