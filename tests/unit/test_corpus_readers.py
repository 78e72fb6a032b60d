"""Source readers: real files parse whole, and broken records are counted with locations."""

from __future__ import annotations

import json

import pytest

from lathe_trainer.corpus.readers import SourceFormatError, read_source
from lathe_trainer.corpus.records import MAX_EXAMPLES

PUBMED = "pubmed"


@pytest.mark.parametrize(
    ("path", "source_format", "documents"),
    [
        ("bc5cdr/CDR_TrainingSet.PubTator.txt", "pubtator", 500),
        ("bc5cdr/CDR_TestSet.PubTator.txt", "pubtator", 500),
        ("ncbi-disease/corpus/NCBItestset_corpus.txt", "ncbiDisease", 100),
        ("ncbi-disease/corpus/NCBItrainset_corpus.txt", "ncbiDisease", 593),
        ("pubmedqa/ori_pqal.json", "pubmedqa", 1000),
        ("ncbi-disease/conll/test.tsv", "conll", 940),
        ("bc5cdr-ner/test.tsv", "conll", 4797),
    ],
)
def test_real_source_reads_without_malformed(data_dir, path, source_format, documents):
    read = read_source(data_dir / PUBMED / path, source_format, "real")
    assert len(read.documents) == documents
    assert read.malformed_count == 0


def test_pubtator_document_is_title_and_abstract(data_dir):
    path = data_dir / PUBMED / "bc5cdr" / "CDR_TrainingSet.PubTator.txt"
    first = read_source(path, "pubtator", "bc5cdr").documents[0]
    assert first.record_id == "227508"
    assert first.text.startswith("Naloxone reverses the antihypertensive effect of clonidine.\n")
    assert "5 to 20 micrograms/kg" in first.text
    assert "\t" not in first.text


def _pubtator_blocks(data_dir) -> list[list[str]]:
    text = (data_dir / PUBMED / "bc5cdr" / "CDR_TrainingSet.PubTator.txt").read_text()
    return [block.split("\n") for block in text.strip().split("\n\n")]


def test_pubtator_malformed_records_are_counted(data_dir, tmp_path):
    blocks = _pubtator_blocks(data_dir)[:20]
    missing_abstract = blocks[3][0].split("|")[0]
    del blocks[3][1]
    bad_annotation = blocks[7][0].split("|")[0]
    blocks[7].insert(3, "this line is not an annotation")
    del blocks[11][0]  # abstract without its title
    path = tmp_path / "broken.PubTator.txt"
    path.write_text("\n\n".join("\n".join(block) for block in blocks) + "\n")

    read = read_source(path, "pubtator", "broken")

    assert len(read.documents) == 17
    assert read.malformed_count == 3
    assert read.records == 20
    examples = [example.record_id for example in read.malformed_examples]
    assert examples == [missing_abstract, bad_annotation, None]
    assert all(example.line for example in read.malformed_examples)
    assert "no `" in read.malformed_examples[0].reason


def test_pubtator_missing_blank_line_still_splits(data_dir, tmp_path):
    blocks = _pubtator_blocks(data_dir)[:3]
    path = tmp_path / "joined.PubTator.txt"
    path.write_text("\n".join("\n".join(block) for block in blocks) + "\n")
    read = read_source(path, "pubtator", "joined")
    assert len(read.documents) == 3
    assert read.malformed_count == 0


def test_pubtator_invalid_utf8_is_malformed(data_dir, tmp_path):
    blocks = _pubtator_blocks(data_dir)[:2]
    data = "\n\n".join("\n".join(block) for block in blocks).encode()
    path = tmp_path / "latin1.PubTator.txt"
    path.write_bytes(data.replace(b"reverses", b"r\xe9verses", 1))
    read = read_source(path, "pubtator", "latin1")
    assert len(read.documents) == 1
    assert read.malformed_examples[0].reason == "the line is not valid UTF-8"


def test_pubmedqa_entry_without_contexts_is_malformed(data_dir, tmp_path):
    data = json.loads((data_dir / PUBMED / "pubmedqa" / "ori_pqal.json").read_text())
    pmids = list(data)[:10]
    sample = {pmid: data[pmid] for pmid in pmids}
    del sample[pmids[2]]["CONTEXTS"]
    sample[pmids[5]]["CONTEXTS"] = "not a list"
    sample[pmids[6]] = ["not", "an", "object"]
    path = tmp_path / "pqal.json"
    path.write_text(json.dumps(sample))

    read = read_source(path, "pubmedqa", "pubmedqa")

    assert len(read.documents) == 7
    assert read.malformed_count == 3
    assert [example.record_id for example in read.malformed_examples] == [
        pmids[2], pmids[5], pmids[6],
    ]
    assert read.documents[0].text == "\n".join(data[pmids[0]]["CONTEXTS"])


def test_pubmedqa_file_that_is_not_json_raises(tmp_path):
    path = tmp_path / "pqal.json"
    path.write_text("{not json")
    with pytest.raises(SourceFormatError, match=r"pqal.json' is not UTF-8 JSON"):
        read_source(path, "pubmedqa", "pubmedqa")


def test_jsonl_bad_lines_are_counted(tmp_path):
    lines = [
        json.dumps({"id": "a", "text": "first document"}),
        "{truncated",
        "",
        json.dumps({"id": 7, "body": "no text field"}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "second document"}),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")

    read = read_source(path, "jsonl", "docs")

    assert [d.record_id for d in read.documents] == ["a", "line-6"]
    assert read.malformed_count == 3
    assert [(e.line, e.record_id) for e in read.malformed_examples] == [
        (2, None), (4, "7"), (5, None),
    ]


def test_malformed_examples_are_capped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" * 12)
    read = read_source(path, "jsonl", "bad")
    assert read.malformed_count == 12
    assert len(read.malformed_examples) == MAX_EXAMPLES


def test_text_blocks_are_documents(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first note\nsecond line\n\n\nsecond note\n")
    read = read_source(path, "text", "notes")
    assert [(d.record_id, d.text) for d in read.documents] == [
        ("line-1", "first note\nsecond line"), ("line-5", "second note"),
    ]


def _conll_lines(data_dir, sentences: int) -> list[str]:
    """The lines of the first sentences of the NCBI CoNLL test split, blank lines included."""
    text = (data_dir / PUBMED / "ncbi-disease" / "conll" / "test.tsv").read_text()
    blocks = text.strip().split("\n\n")[:sentences]
    return "\n\n".join(blocks).split("\n")


def test_conll_sentence_is_document(data_dir, tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("\n".join(_conll_lines(data_dir, 2)) + "\n")
    read = read_source(path, "conll", "ncbi")
    assert [d.record_id for d in read.documents] == ["line-1", "line-20"]
    assert read.documents[0].text == (
        "Clustering of missense mutations in the ataxia - telangiectasia gene in a sporadic "
        "T - cell leukaemia ."
    )
    assert read.malformed_count == 0


def test_conll_malformed_lines_are_counted(data_dir, tmp_path):
    lines = _conll_lines(data_dir, 10)
    starts = [0] + [i + 1 for i, line in enumerate(lines) if not line]
    latin1 = lines.index("recessive\tB-Disease")
    assert starts[1] < latin1 < starts[2]
    lines[starts[2] + 3] = lines[starts[2] + 3].split("\t")[0]  # no tag column
    lines[starts[5]] = "two words\tO"  # a space inside the token
    lines[starts[8] + 1] = "\tO"  # no token
    encoded = [line.encode() for line in lines]
    encoded[latin1] = "r\u00e9cessive\tB-Disease".encode("latin-1")
    path = tmp_path / "broken.tsv"
    path.write_bytes(b"\n".join(encoded) + b"\n")

    read = read_source(path, "conll", "broken")

    assert read.records == 10
    assert len(read.documents) == 6
    assert read.malformed_count == 4
    examples = read.malformed_examples
    # Line numbers count from 1; each record is named by its sentence's first line.
    assert [e.line for e in examples] == [latin1 + 1, starts[2] + 4, starts[5] + 1, starts[8] + 2]
    assert [e.record_id for e in examples] == [f"line-{starts[i] + 1}" for i in (1, 2, 5, 8)]
    assert examples[0].reason == "the line is not valid UTF-8"
    assert "without a tag column" in examples[1].reason
    assert "got 'two words'" in examples[2].reason
    assert "got ''" in examples[3].reason


def test_conll_extra_columns_ignored(data_dir, tmp_path):
    """POS and chunk columns between the token and the tag do not reach the text."""
    lines = _conll_lines(data_dir, 2)
    two_columns = tmp_path / "two.tsv"
    two_columns.write_text("\n".join(lines) + "\n")
    four_columns = tmp_path / "four.tsv"
    four_columns.write_text(
        "\n".join(line.replace("\t", "\tNN\tB-NP\t") if line else "" for line in lines) + "\n"
    )
    assert "\tNN\tB-NP\t" in four_columns.read_text()

    expected = read_source(two_columns, "conll", "ncbi")
    read = read_source(four_columns, "conll", "ncbi")

    assert read.malformed_count == 0
    assert [(d.record_id, d.text) for d in read.documents] == [
        (d.record_id, d.text) for d in expected.documents
    ]


def test_conll_docstart_is_boundary(tmp_path):
    """`-DOCSTART-` lines split sentences and are neither documents nor malformed records."""
    path = tmp_path / "conll2003.tsv"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n"  # 1-2
        "EU\tNNP\tB-NP\tB-ORG\nrejects\tVBZ\tB-VP\tO\n\n"  # 3-5
        "-DOCSTART-\tO\n"  # 6
        "Peter\tNNP\tB-NP\tB-PER\n"  # 7
        "-DOCSTART-\n"  # 8
        "Blackburn\tNNP\tI-NP\tB-PER\n\n"  # 9-10
        "-DOCSTART-\t-X-\t-X-\tO\n"  # 11
    )
    read = read_source(path, "conll", "conll2003")
    assert [(d.record_id, d.text) for d in read.documents] == [
        ("line-3", "EU rejects"), ("line-7", "Peter"), ("line-9", "Blackburn"),
    ]
    assert read.malformed_count == 0
    assert read.records == 3


def test_conll_space_separated_columns_read(tmp_path):
    """CoNLL-2003 as published separates its columns with spaces."""
    path = tmp_path / "spaces.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
                    "Peter NNP B-NP B-PER\n")
    read = read_source(path, "conll", "spaces")
    assert [document.text for document in read.documents] == ["EU rejects", "Peter"]
    assert read.malformed_count == 0


def test_conll_line_without_tag_is_malformed(tmp_path):
    path = tmp_path / "spaces.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU\nrejects VBZ B-VP O\n")
    read = read_source(path, "conll", "spaces")
    assert read.documents == []
    assert read.malformed_count == 1
    example = read.malformed_examples[0]
    assert (example.line, example.record_id) == (3, "line-3")
    assert example.reason == (
        "expected `token<TAB>tag` or `token tag`, got 'EU' without a tag column"
    )


def test_conll_prose_is_malformed(tmp_path):
    """Prose declared as CoNLL has spaces between its words but no tag at the end of a line,
    so its records are malformed instead of read as a first word and a tag."""
    path = tmp_path / "notes.txt"
    path.write_text("The patient was admitted with chest pain.\nShe recovered.\n\n"
                    "Follow-up after two weeks.\n")
    read = read_source(path, "conll", "notes")
    assert read.documents == []
    assert read.malformed_count == 2
    assert read.malformed_examples[0].reason.startswith(
        "expected `token<TAB>tag`, or columns separated by spaces that end with an IOB tag")
