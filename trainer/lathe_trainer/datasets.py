"""Readers for the formats that stages hand to each other.

A Corpus writes `train/shard-NNNNN.jsonl` and `validation/shard-NNNNN.jsonl` under its output
directory, one JSON object per line with at least `id`, `source` and `text`. Tokenizer,
PretrainJob and the benchmarks read them through `iter_documents`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from lathe_trainer.stage import local_path

SPLITS = ("train", "validation")


def shard_paths(corpus_uri: str, split: str) -> list[Path]:
    if split not in SPLITS:
        raise ValueError(f"Unknown corpus split {split!r}; expected one of {SPLITS}.")
    return sorted((local_path(corpus_uri) / split).glob("shard-*.jsonl"))


def iter_documents(corpus_uri: str, split: str) -> Iterator[dict]:
    """Yield the documents of one split of a finished Corpus, in shard order."""
    for path in shard_paths(corpus_uri, split):
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)


def iter_texts(corpus_uri: str, split: str) -> Iterator[str]:
    for document in iter_documents(corpus_uri, split):
        yield document["text"]


# CoNLL-2003 starts each document with a line whose first column is this marker, such as
# `-DOCSTART- -X- -X- O`. It separates documents and is neither a token nor a sentence.
DOCSTART = "-DOCSTART-"


def is_docstart(line: str) -> bool:
    """Return True when a CoNLL line is a `-DOCSTART-` document separator.

    The marker is matched as the first field split at any whitespace, so the space-separated
    line of the CoNLL-2003 files counts as a separator in a tab-separated file too.
    """
    fields = line.split(maxsplit=1)
    return bool(fields) and fields[0] == DOCSTART


# The last column of a CoNLL line whose columns are separated by spaces: O, or a B-, I-, E- or
# S- prefix and an entity type.
IOB_TAG = re.compile(r"^(?:O|[BIES]-\S+)$")


def is_iob_tag(tag: str) -> bool:
    """Return whether `tag` is one that a FineTune trains on: `O`, `B-<type>` or `I-<type>`."""
    return tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)


def conll_columns(line: str) -> tuple[str, str]:
    """Split a non-blank CoNLL line into (token, tag): its first and last columns.

    Columns are separated by tabs, or by spaces in a line without a tab, as CoNLL-2003 is
    published. Columns between the first and the last, such as the POS and chunk tags of
    CoNLL-2003, are ignored, and whitespace around a tab-separated column is dropped, as
    `str.split()` would drop it. Raises ValueError with the reason for a line without a tag
    column or whose token is empty or contains whitespace. The reason ends without a period.
    """
    stripped = line.rstrip()
    spaced = "\t" not in stripped
    columns = (stripped.split(" ") if spaced
               else [column.strip(" ") for column in stripped.split("\t")])
    if len(columns) < 2:
        raise ValueError(
            f"expected `token<TAB>tag` or `token tag`, got {excerpt(line)!r} without a tag "
            "column"
        )
    if spaced and not IOB_TAG.match(columns[-1]):
        # Prose has spaces between its words too, so a line split at spaces counts as CoNLL
        # only when it ends with a tag.
        raise ValueError(
            f"expected `token<TAB>tag`, or columns separated by spaces that end with an IOB tag "
            f"such as O or B-Disease, got {excerpt(line)!r}"
        )
    token = columns[0]
    if not token or any(character.isspace() for character in token):
        raise ValueError(
            f"expected one token without spaces in the first column, got {excerpt(token)!r}"
        )
    return token, columns[-1]


def excerpt(line: str, limit: int = 60) -> str:
    """Return line, cut to `limit` characters and marked with `...` when it is longer."""
    return line if len(line) <= limit else line[:limit] + "..."


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Read CoNLL token-classification lines, with blank lines between sentences.

    Each line has columns separated by tabs or spaces, the token first and the tag last (see
    `conll_columns`). A `-DOCSTART-` line ends the current sentence and is skipped. Returns
    (tokens, tags) per sentence. Any other malformed line raises ValueError with the file, the
    line number and the reason, because a silently skipped line would shift every later
    label. The message ends without a period or a fix, because each caller adds its own.
    """
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or is_docstart(line):
                if tokens:
                    sentences.append((tokens, tags))
                    tokens, tags = [], []
                continue
            try:
                token, tag = conll_columns(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
            tokens.append(token)
            tags.append(tag)
    if tokens:
        sentences.append((tokens, tags))
    return sentences
