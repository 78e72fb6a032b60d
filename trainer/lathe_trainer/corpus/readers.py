"""Readers for the published source formats, the first step of the Corpus stage.

Each reader turns one file into `Document`s and counts the records it cannot parse, with the
line number and record id of the first few, so that a broken file shows up in stats.json
instead of silently shrinking the corpus. A file that cannot be read at all (not UTF-8 JSON,
for example) raises `SourceFormatError`, which the stage reports against the source's field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from lathe_trainer.corpus.records import Document, Malformed, SourceRead
from lathe_trainer.datasets import conll_columns, excerpt, is_docstart

# `PMID|t|title` and `PMID|a|abstract`. The id is numeric in PubMed but any id without `|`
# or tabs is accepted, as PubTator tools accept it.
PUBTATOR_TEXT = re.compile(r"^([^|\t]+)\|([ta])\|(.*)$")


class SourceFormatError(ValueError):
    """The file as a whole is not in the declared format."""


def _numbered_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """Yield (line number, text) per line; text is None where the line is not valid UTF-8."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield number, None


def _blocks(path: Path) -> Iterator[list[tuple[int, str | None]]]:
    """Yield the runs of non-blank lines between blank lines."""
    block: list[tuple[int, str | None]] = []
    for number, text in _numbered_lines(path):
        if text is not None and not text.strip():
            if block:
                yield block
            block = []
            continue
        block.append((number, text))
    if block:
        yield block


def _split_pubtator_block(
    block: list[tuple[int, str | None]],
) -> Iterator[list[tuple[int, str | None]]]:
    """Split a block at every title line after its first line.

    Some PubTator exports omit the blank line between documents; a new `|t|` line starts a
    new document either way.
    """
    current: list[tuple[int, str | None]] = []
    for number, text in block:
        starts_document = text is not None and _is_title(text)
        if starts_document and current:
            yield current
            current = []
        current.append((number, text))
    if current:
        yield current


def _is_title(line: str) -> bool:
    match = PUBTATOR_TEXT.match(line)
    return bool(match and match.group(2) == "t")


def _parse_pubtator_document(
    lines: list[tuple[int, str | None]], source: str
) -> Document | Malformed:
    """Parse title, abstract and annotation lines of one document."""
    first_line = lines[0][0]
    if lines[0][1] is None:
        return Malformed(first_line, None, "the line is not valid UTF-8")
    title = PUBTATOR_TEXT.match(lines[0][1])
    if not title or title.group(2) != "t":
        return Malformed(
            first_line, None, f"expected `PMID|t|title`, got {excerpt(lines[0][1])!r}"
        )
    pmid = title.group(1)
    if len(lines) < 2 or lines[1][1] is None or not lines[1][1].startswith(f"{pmid}|a|"):
        return Malformed(
            first_line, pmid, f"document {pmid} has no `{pmid}|a|abstract` line after its title"
        )
    abstract = lines[1][1][len(pmid) + 3:]
    for number, line in lines[2:]:
        # Annotation and relation lines: `PMID<TAB>start<TAB>end...` or `PMID<TAB>CID<TAB>...`.
        if line is None or not line.startswith(f"{pmid}\t"):
            got = "a line that is not valid UTF-8" if line is None else repr(excerpt(line))
            return Malformed(
                number, pmid, f"expected an annotation line `{pmid}<TAB>...`, got {got}"
            )
    text = f"{title.group(3)}\n{abstract}" if abstract.strip() else title.group(3)
    return Document(id="", source=source, record_id=pmid, text=text)


def read_pubtator(path: Path, source: str) -> SourceRead:
    """Read PubTator text: title line, abstract line, annotation lines, blank line."""
    result = SourceRead()
    for block in _blocks(path):
        for lines in _split_pubtator_block(block):
            parsed = _parse_pubtator_document(lines, source)
            if isinstance(parsed, Malformed):
                result.add_malformed(parsed)
            else:
                result.documents.append(parsed)
    return result


def pubmedqa_contexts(entry: object) -> list[str] | None:
    """Return the `CONTEXTS` passages of a PubMedQA entry, or None when it has no non-empty
    list of strings there."""
    contexts = entry.get("CONTEXTS") if isinstance(entry, dict) else None
    valid = (
        isinstance(contexts, list)
        and contexts
        and all(isinstance(passage, str) for passage in contexts)
    )
    return contexts if valid else None


def read_pubmedqa(path: Path, source: str) -> SourceRead:
    """Read the PubMedQA JSON object keyed by PMID; the joined CONTEXTS form the document."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceFormatError(f"file '{path}' is not UTF-8 JSON ({error})") from error
    if not isinstance(data, dict):
        raise SourceFormatError(
            f"file '{path}' contains a JSON {type(data).__name__}, but PubMedQA is an object keyed "
            "by PMID"
        )
    result = SourceRead()
    for pmid, entry in data.items():
        contexts = pubmedqa_contexts(entry)
        if contexts is not None:
            text = "\n".join(contexts)
            result.documents.append(Document(id="", source=source, record_id=pmid, text=text))
        else:
            reason = "the entry has no CONTEXTS list of strings"
            result.add_malformed(Malformed(None, pmid, reason))
    return result


def _jsonl_record(line: str, number: int, source: str) -> Document | Malformed:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return Malformed(number, None, f"the line is not JSON ({error.msg})")
    if not isinstance(record, dict):
        return Malformed(number, None, f"expected a JSON object, got {type(record).__name__}")
    record_id = record.get("id")
    record_id = str(record_id) if isinstance(record_id, (str, int)) else f"line-{number}"
    text = record.get("text")
    if not isinstance(text, str):
        return Malformed(number, record_id, "the object has no string field `text`")
    return Document(id="", source=source, record_id=record_id, text=text)


def read_jsonl(path: Path, source: str) -> SourceRead:
    """Read one JSON object per line with a `text` field and an optional `id`."""
    result = SourceRead()
    for number, line in _numbered_lines(path):
        if line is None:
            result.add_malformed(Malformed(number, None, "the line is not valid UTF-8"))
            continue
        if not line.strip():
            continue
        parsed = _jsonl_record(line, number, source)
        if isinstance(parsed, Malformed):
            result.add_malformed(parsed)
        else:
            result.documents.append(parsed)
    return result


def read_text(path: Path, source: str) -> SourceRead:
    """Read plain text, one document per block of lines between blank lines."""
    result = SourceRead()
    for block in _blocks(path):
        first_line = block[0][0]
        record_id = f"line-{first_line}"
        bad = [number for number, text in block if text is None]
        if bad:
            result.add_malformed(Malformed(bad[0], record_id, "the line is not valid UTF-8"))
            continue
        text = "\n".join(text for _, text in block if text is not None)
        result.documents.append(Document(id="", source=source, record_id=record_id, text=text))
    return result


def _conll_sentences(
    block: list[tuple[int, str | None]],
) -> Iterator[list[tuple[int, str | None]]]:
    """Split a block into sentences at its `-DOCSTART-` lines, and drop those lines."""
    sentence: list[tuple[int, str | None]] = []
    for number, line in block:
        if line is not None and is_docstart(line):
            if sentence:
                yield sentence
            sentence = []
            continue
        sentence.append((number, line))
    if sentence:
        yield sentence


def _parse_conll_sentence(
    sentence: list[tuple[int, str | None]], source: str
) -> Document | Malformed:
    """Join the tokens of one sentence, or locate its first malformed line."""
    record_id = f"line-{sentence[0][0]}"
    tokens = []
    for number, line in sentence:
        if line is None:
            return Malformed(number, record_id, "the line is not valid UTF-8")
        try:
            token, _ = conll_columns(line)
        except ValueError as error:
            return Malformed(number, record_id, str(error))
        tokens.append(token)
    return Document(id="", source=source, record_id=record_id, text=" ".join(tokens))


def read_conll(path: Path, source: str) -> SourceRead:
    """Read CoNLL text: one `token<TAB>tag` line per token, or with the columns separated by
    spaces, and a blank line after each sentence.

    Each sentence becomes one document, its tokens joined with spaces. Columns after the token
    (the tag, and the POS and chunk tags of CoNLL-2003) are ignored. A `-DOCSTART-` line is a
    document separator, neither a document nor a malformed record. A sentence with a line that
    has no tag column, a token with spaces or invalid UTF-8 is one malformed record, located at
    that line.
    """
    result = SourceRead()
    for block in _blocks(path):
        for sentence in _conll_sentences(block):
            parsed = _parse_conll_sentence(sentence, source)
            if isinstance(parsed, Malformed):
                result.add_malformed(parsed)
            else:
                result.documents.append(parsed)
    return result


# Format name (lathe.api.corpus.SourceFormat values) -> reader. The NCBI disease corpus is
# PubTator text with its own annotation columns, which the PubTator reader accepts as they are.
READERS: dict[str, Callable[[Path, str], SourceRead]] = {
    "pubtator": read_pubtator,
    "ncbiDisease": read_pubtator,
    "pubmedqa": read_pubmedqa,
    "jsonl": read_jsonl,
    "text": read_text,
    "conll": read_conll,
}


def read_source(path: Path, source_format: str, source: str) -> SourceRead:
    """Read one file with the reader of its format."""
    return READERS[source_format](path, source)
