"""Format guess: real files are recognized, and plain text is guessed as nothing."""

from __future__ import annotations

import json

import pytest

from lathe_trainer.corpus import sniff
from lathe_trainer.corpus.sniff import format_mismatch, guess_format

PUBMED = "pubmed"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("ncbi-disease/conll/test.tsv", "conll"),
        ("bc5cdr-ner/train.tsv", "conll"),
        ("ncbi-disease/corpus/NCBItestset_corpus.txt", "pubtator"),
        ("bc5cdr/CDR_TrainingSet.PubTator.txt", "pubtator"),
        ("pubmedqa/ori_pqal.json", "pubmedqa"),
        # An object keyed by PMID too, but its values are yes/no/maybe labels, not PubMedQA entries.
        ("pubmedqa/test_ground_truth.json", None),
    ],
)
def test_real_file_guess(data_dir, path, expected):
    guess = guess_format(data_dir / PUBMED / path)
    assert (guess.format if guess else None) == expected


def test_jsonl_and_text_guess(tmp_path):
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": f"note {i}"}) + "\n" for i in range(3)))
    text = tmp_path / "notes.txt"
    text.write_text("First note.\nSecond line\tafter a tab.\n\nSecond note.\n")
    assert guess_format(jsonl).format == "jsonl"
    assert guess_format(text) is None


def test_few_conll_lines_are_not_evidence(tmp_path):
    path = tmp_path / "short.tsv"
    lines = ["IL\tO", "-\tO", "2\tO"] * 3
    path.write_text("\n".join(lines) + "\n")
    assert len(lines) < sniff.MIN_CONLL_LINES
    assert guess_format(path) is None
    path.write_text("\n".join([*lines, "receptor\tO"]) + "\n")
    assert guess_format(path).format == "conll"


def test_mixed_lines_below_share(tmp_path):
    """A text file with some tab-separated lines stays `text`."""
    path = tmp_path / "mixed.txt"
    lines = [f"token{i}\tO" for i in range(80)] + [f"A sentence number {i}." for i in range(20)]
    path.write_text("\n".join(lines) + "\n")
    assert guess_format(path) is None


def test_sample_stops_at_byte_limit(tmp_path, monkeypatch):
    # 128 bytes hold 10 lines of 9 bytes, 3 of 10 and part of the 14th, which is cut off.
    monkeypatch.setattr(sniff, "SAMPLE_BYTES", 128)
    path = tmp_path / "long.tsv"
    path.write_text("".join(f"token{i}\tO\n" for i in range(20)) + "not conll at all\n" * 50)
    guess = guess_format(path)
    assert guess is not None
    assert guess.format == "conll"
    assert guess.evidence.startswith("13 of the 13 non-blank lines in its first 13 lines")


@pytest.mark.parametrize(
    ("declared", "mismatch"),
    [("conll", False), ("text", True), ("jsonl", True), ("pubtator", True)],
)
def test_conll_file_mismatch(data_dir, declared, mismatch):
    path = data_dir / PUBMED / "ncbi-disease" / "conll" / "test.tsv"
    assert (format_mismatch(path, declared) is not None) == mismatch


def test_ncbi_disease_is_pubtator(data_dir):
    path = data_dir / PUBMED / "ncbi-disease" / "corpus" / "NCBItestset_corpus.txt"
    assert format_mismatch(path, "ncbiDisease") is None
    assert format_mismatch(path, "pubtator") is None
    assert format_mismatch(path, "text").format == "pubtator"


def pubmedqa_entry(number: int) -> dict:
    return {
        "QUESTION": f"Question {number}?",
        "CONTEXTS": [f"Background of study {number}.", "Results."],
        "LONG_ANSWER": "Yes.",
        "final_decision": "yes",
    }


def test_pubmedqa_file_mismatch(data_dir):
    """The PubMedQA JSON, which is larger than the sample, is recognized from its start."""
    path = data_dir / PUBMED / "pubmedqa" / "ori_pqal.json"
    assert path.stat().st_size > sniff.SAMPLE_BYTES
    assert format_mismatch(path, "pubmedqa") is None
    for declared in ("text", "jsonl", "conll", "pubtator", "ncbiDisease"):
        guess = format_mismatch(path, declared)
        assert guess is not None, declared
        assert guess.format == "pubmedqa"
    evidence = guess_format(path).evidence
    assert evidence.startswith("it is a JSON object, and ")
    assert evidence.endswith(" PubMedQA entries with a `CONTEXTS` list")


@pytest.mark.parametrize(
    "path",
    ["ncbi-disease/conll/test.tsv", "bc5cdr/CDR_TrainingSet.PubTator.txt",
     "ncbi-disease/corpus/NCBItestset_corpus.txt"],
)
def test_other_format_declared_pubmedqa(data_dir, path):
    guess = format_mismatch(data_dir / PUBMED / path, "pubmedqa")
    assert guess is not None
    assert guess.format in {"conll", "pubtator"}


def test_compact_pubmedqa_cut_by_sample(tmp_path, monkeypatch):
    """One-line JSON is counted up to the entry that the byte limit cuts off."""
    monkeypatch.setattr(sniff, "SAMPLE_BYTES", 1000)
    parts = [f'"{10_000 + i}": {json.dumps(pubmedqa_entry(i))}' for i in range(50)]
    path = tmp_path / "compact.json"
    path.write_text("{" + ", ".join(parts) + "}")
    # Entry i ends after "{", the entries before it and their ", " separators, and itself.
    ends = [1 + sum(len(part) + 2 for part in parts[:i]) + len(parts[i]) for i in range(50)]
    complete = sum(1 for end in ends if end <= 1000)
    assert 1 < complete < 50

    guess = guess_format(path)

    assert guess is not None
    assert guess.format == "pubmedqa"
    assert f"{complete} of the {complete} entries in its first 1000 bytes" in guess.evidence


@pytest.mark.parametrize(
    "content",
    [
        # Entries without CONTEXTS, as in the PubMedQA ground-truth file.
        {"12377809": "yes", "26163474": "no"},
        # CONTEXTS that is not a list of strings.
        {"1": {"CONTEXTS": "one passage"}, "2": {"CONTEXTS": [1, 2]}},
        {"1": {"CONTEXTS": []}},
        {},
        [pubmedqa_entry(1)],
    ],
)
def test_json_that_is_not_pubmedqa(tmp_path, content):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(content, indent=4))
    assert guess_format(path) is None


def test_pubmedqa_entry_longer_than_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(sniff, "SAMPLE_BYTES", 100)
    path = tmp_path / "long.json"
    entry = {"CONTEXTS": ["x" * 200]}
    path.write_text(json.dumps({"1": entry, "2": entry}))
    assert guess_format(path) is None


def test_jsonl_is_not_pubmedqa(tmp_path):
    """A JSON lines file starts with an object too, but it is one record, not a PubMedQA map."""
    path = tmp_path / "notes.jsonl"
    lines = [json.dumps({"id": str(i), "CONTEXTS": ["a"], "text": "note"}) for i in range(5)]
    path.write_text("\n".join(lines) + "\n")
    assert guess_format(path).format == "jsonl"


def test_space_separated_docstart_counts_as_conll(tmp_path):
    path = tmp_path / "conll2003.tsv"
    lines = []
    for document in range(5):
        lines += ["-DOCSTART- -X- -X- O", "", "EU\tNNP\tB-NP\tB-ORG", "rejects\tVBZ\tB-VP\tO", ""]
    path.write_text("\n".join(lines))
    guess = guess_format(path)
    assert guess is not None
    assert guess.format == "conll"
    assert guess.evidence.startswith("15 of the 15 non-blank lines")


def test_space_separated_conll_guessed(tmp_path):
    """CoNLL-2003 as published, with spaces between the columns, is guessed as CoNLL."""
    path = tmp_path / "conll2003.txt"
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(6):
        lines += ["EU NNP B-NP B-ORG", "rejects VBZ B-VP O", "German JJ B-NP B-MISC", ""]
    path.write_text("\n".join(lines))
    guess = guess_format(path)
    assert guess is not None
    assert guess.format == "conll"


def test_prose_is_not_spaced_conll(tmp_path):
    """Lines of prose have spaces between words but do not end with an IOB tag."""
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(["The patient was admitted with chest pain."] * 20) + "\n")
    assert guess_format(path) is None
