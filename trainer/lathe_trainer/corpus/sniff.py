"""A guess at a file's format from its first lines, to catch a wrong `format` field.

The `text` reader accepts any file, so a CoNLL or PubTator file declared as `text` parses
without a malformed record. Its documents are then sentences with a tag after every token, or
titles mixed with annotation lines, and an evaluation set read that way matches nothing while
the stage reports success. The stage compares this guess with the declared format before it reads a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lathe_trainer.corpus.readers import PUBTATOR_TEXT, pubmedqa_contexts
from lathe_trainer.datasets import is_docstart

# Lines, and bytes at most, read from the start of the file, so that the guess costs the same
# for any file size.
SAMPLE_LINES = 1000
SAMPLE_BYTES = 1 << 20
# Share of the sampled lines (or blocks, for PubTator) that must fit a format.
MIN_SHARE = 0.9
# Fewer CoNLL lines than this are too little evidence against a declared format.
MIN_CONLL_LINES = 10

# One token without spaces, then tab-separated columns without spaces (the tag, and others).
_CONLL_LINE = re.compile(r"^[^\s]+(?:\t[^\s]+)+$")
# The same with single spaces, as CoNLL-2003 is published. An IOB tag must end it, because
# lines of prose have single spaces between words too.
_CONLL_SPACED_LINE = re.compile(r"^[^\s]+(?: [^\s]+)* (?:O|[BIES]-[^\s]+)$")
# JSON whitespace, skipped between the tokens of the PubMedQA object.
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")

# Declared formats that a guessed format agrees with. `ncbiDisease` is PubTator text.
COMPATIBLE = {
    "conll": {"conll"},
    "pubtator": {"pubtator", "ncbiDisease"},
    "jsonl": {"jsonl"},
    "pubmedqa": {"pubmedqa"},
}


@dataclass(frozen=True)
class FormatGuess:
    """A format the file looks like, and the evidence in words for an error message."""

    format: str
    evidence: str


def _sample(path: Path) -> list[str]:
    with path.open("rb") as handle:
        data = handle.read(SAMPLE_BYTES)
    raw_lines = data.split(b"\n")
    if len(data) == SAMPLE_BYTES and len(raw_lines) > 1:
        raw_lines.pop()  # cut off inside a line
    sample = raw_lines[:SAMPLE_LINES]
    return [raw.decode("utf-8", errors="replace").rstrip("\r") for raw in sample]


def _block_first_lines(lines: list[str]) -> list[str]:
    firsts = []
    previous_blank = True
    for line in lines:
        blank = not line.strip()
        if previous_blank and not blank:
            firsts.append(line)
        previous_blank = blank
    return firsts


def _is_jsonl_record(line: str) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and isinstance(record.get("text"), str)


def _pubmedqa_entries(text: str) -> tuple[int, int]:
    """Count the entries of the JSON object that text starts with, and those with `CONTEXTS`.

    Returns (entries, entries whose value is an object with a `CONTEXTS` list of strings, as
    the PubMedQA reader requires). Counting stops at the first entry that does not parse,
    which in a sample cut from a larger file is the entry cut off at its end. Text that does
    not start with `{` has no entries.
    """
    decoder = json.JSONDecoder()
    index = _skip_whitespace(text, 0)
    if not text.startswith("{", index):
        return 0, 0
    index += 1
    entries = with_contexts = 0
    try:
        while True:
            key, index = decoder.raw_decode(text, _skip_whitespace(text, index))
            index = _skip_whitespace(text, index)
            if not isinstance(key, str) or not text.startswith(":", index):
                break
            value, index = decoder.raw_decode(text, _skip_whitespace(text, index + 1))
            entries += 1
            if pubmedqa_contexts(value) is not None:
                with_contexts += 1
            index = _skip_whitespace(text, index)
            if not text.startswith(",", index):
                break
            index += 1
    except json.JSONDecodeError:
        pass
    return entries, with_contexts


def _skip_whitespace(text: str, index: int) -> int:
    return _JSON_WHITESPACE.match(text, index).end()


def _guess_pubmedqa(path: Path) -> FormatGuess | None:
    with path.open("rb") as handle:
        data = handle.read(SAMPLE_BYTES)
    # A multi-byte character cut off at the end of the sample becomes U+FFFD, inside the entry
    # that is cut off anyway.
    entries, with_contexts = _pubmedqa_entries(data.decode("utf-8", errors="replace"))
    if entries == 0 or with_contexts < MIN_SHARE * entries:
        return None
    return FormatGuess(
        "pubmedqa",
        f"it is a JSON object, and {with_contexts} of the {entries} entries in its first "
        f"{len(data)} bytes are PubMedQA entries with a `CONTEXTS` list",
    )


def guess_format(path: Path) -> FormatGuess | None:
    """Return the format that the first lines of path fit, or None when none fits.

    Only `pubmedqa`, `pubtator`, `conll` and `jsonl` are guessed, because `text` fits any
    file. A PubMedQA object is recognized only when its first entry is complete within the
    first SAMPLE_BYTES bytes.
    """
    pubmedqa = _guess_pubmedqa(path)
    if pubmedqa is not None:
        return pubmedqa
    lines = _sample(path)
    non_blank = [line for line in lines if line.strip()]
    if not non_blank:
        return None
    firsts = _block_first_lines(lines)
    titles = sum(1 for line in firsts if _is_pubtator_title(line))
    if titles >= MIN_SHARE * len(firsts):
        return FormatGuess(
            "pubtator",
            f"{titles} of the {len(firsts)} blocks in its first {len(lines)} lines start with a "
            "PubTator `PMID|t|title` line",
        )
    conll = sum(1 for line in non_blank if _CONLL_LINE.match(line)
                or _CONLL_SPACED_LINE.match(line) or is_docstart(line))
    if conll >= MIN_CONLL_LINES and conll >= MIN_SHARE * len(non_blank):
        return FormatGuess(
            "conll",
            f"{conll} of the {len(non_blank)} non-blank lines in its first {len(lines)} lines are "
            "CoNLL lines (`token<TAB>tag`, or space-separated columns ending with an IOB tag)",
        )
    records = sum(1 for line in non_blank if _is_jsonl_record(line))
    if records >= MIN_SHARE * len(non_blank):
        return FormatGuess(
            "jsonl",
            f"{records} of the {len(non_blank)} non-blank lines in its first {len(lines)} lines "
            "are JSON objects with a `text` field",
        )
    return None


def _is_pubtator_title(line: str) -> bool:
    match = PUBTATOR_TEXT.match(line)
    return bool(match and match.group(2) == "t")


def format_mismatch(path: Path, declared: str) -> FormatGuess | None:
    """Return the guess for path when it contradicts the declared format, else None."""
    guess = guess_format(path)
    if guess is None or declared in COMPATIBLE[guess.format]:
        return None
    return guess


def mismatch_message(entry: str, path: Path | str, declared: str, guess: FormatGuess) -> str:
    """Word a format mismatch for a Corpus source or evaluation set, `entry` being its role and
    name, such as "source 'notes'"."""
    return (
        f"{entry} ('{path}') has format {declared!r}, but {guess.evidence}; use format: "
        f"{guess.format}."
    )


def conll_mismatch_message(path: Path | str, guess: FormatGuess) -> str:
    """Word a mismatch for a file that only CoNLL can be, such as a FineTune split."""
    return (
        f"'{path}' is read as format 'conll' (`token<TAB>tag` or `token tag` lines, a blank "
        f"line between sentences), but {guess.evidence}, so it looks like format {guess.format!r}; point "
        "it at a CoNLL file instead."
    )


def has_content(path: Path) -> bool:
    """Return True when the file contains a character other than whitespace."""
    with path.open("rb") as handle:
        while chunk := handle.read(SAMPLE_BYTES):
            if chunk.strip():
                return True
    return False
