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
        ("pubmedqa/ori_pqal.json", None),
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
