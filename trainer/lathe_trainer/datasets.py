"""Readers for the formats that stages hand to each other.

A Corpus writes `train/shard-NNNNN.jsonl` and `validation/shard-NNNNN.jsonl` under its output
directory, one JSON object per line with at least `id`, `source` and `text`. Tokenizer,
PretrainJob and the benchmarks read them through `iter_documents`.
"""

from __future__ import annotations

import json
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


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Read `token<TAB>tag` lines with blank lines between sentences.

    Returns (tokens, tags) per sentence. A line without exactly one tab raises ValueError with
    the file and line number, because a silently skipped line would shift every later label.
    The message ends without a period or a fix, because each caller adds its own.
    """
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                if tokens:
                    sentences.append((tokens, tags))
                    tokens, tags = [], []
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{number}: expected `token<TAB>tag`, got {line!r}")
            tokens.append(parts[0])
            tags.append(parts[1])
    if tokens:
        sentences.append((tokens, tags))
    return sentences
