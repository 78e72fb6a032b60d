"""Held-out sentences for the export checks, read from a labelled CoNLL file.

The words of a sentence are joined with single spaces into its text, and the gold IOB tags
become character spans of that text through the same decoder the served model uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lathe_trainer.datasets import read_conll
from lathe_trainer.export.quantize import HeldOutSentence
from lathe_trainer.serving import decoding


def sentence_from_words(words: list[str], tags: list[str]) -> HeldOutSentence:
    text = " ".join(words)
    offsets, position = [], 0
    for word in words:
        offsets.append((position, position + len(word)))
        position += len(word) + 1
    labels = sorted(set(tags) | {"O"})
    label_ids = np.array([labels.index(tag) for tag in tags])
    # One "token" per word here, so its first sub-token is also its last.
    gold = decoding.decode_entities(
        text, label_ids, np.array(offsets).reshape(-1, 2), np.arange(len(words)), labels,
        decoding.FIRST_SUBTOKEN,
    )
    return HeldOutSentence(text=text, gold=gold)


def read_held_out(path: Path, limit: int) -> list[HeldOutSentence]:
    """Read up to `limit` sentences. Raises ValueError for a missing or malformed file."""
    if not path.is_file():
        raise ValueError(f"the file {path} does not exist")
    sentences = read_conll(path)
    if not sentences:
        raise ValueError(f"the file {path} contains no sentences")
    return [sentence_from_words(words, tags) for words, tags in sentences[:limit]]
