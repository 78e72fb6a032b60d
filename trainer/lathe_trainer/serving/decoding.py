"""Text in, entities out: the tokenization and IOB decoding shared by every NER runtime.

The Triton tokenizer and postprocess steps, the in-process PyTorch reference
(`lathe_trainer.serving.reference`) and the export stage's quantization check all call these
functions, so that the served model and the in-process model cannot drift apart. The module
needs only numpy and a `tokenizers.Tokenizer`, because the repository writer copies it next to
each Triton Python model (`ner_decoding.py`) and the serving image needs no Lathe package.

Text is encoded with the FineTune stage's convention (`lathe_trainer.finetune.data`), so the
model sees at serving time what it saw in training; a unit test compares the two encoders.
Character offsets are Python string indices (Unicode code points).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

# Word id of special and padding tokens, which belong to no word of the input text.
NO_WORD = -1

# Words as the FineTune stage splits them (lathe_trainer.finetune.data.WORD_PATTERN): runs of
# letters, digits and `_`, or one other non-space character.
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class SpecialIds:
    """Token ids that encoding inserts: `bos` starts every sequence (None: no bos token)."""

    bos: int | None
    unk: int
    pad: int


def encode_row(
    tokenizer: Any, text: str, special: SpecialIds, max_length: int
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Encode one text as the FineTune stage encodes training sentences.

    Returns (input ids, word index per token or NO_WORD, character span of each token's word).
    The convention: `bos` first, then each word encoded on its own as `" " + word` without
    special tokens (an empty encoding becomes `unk`), cut to `max_length` tokens.
    """
    ids: list[int] = []
    word_index: list[int] = []
    spans: list[tuple[int, int]] = []
    if special.bos is not None:
        ids.append(special.bos)
        word_index.append(NO_WORD)
        spans.append((0, 0))
    words = list(WORD_PATTERN.finditer(text))
    if words:
        pieces = tokenizer.encode_batch(
            [" " + word.group() for word in words], add_special_tokens=False
        )
        for position, (word, piece) in enumerate(zip(words, pieces)):
            piece_ids = piece.ids or [special.unk]
            ids += piece_ids
            word_index += [position] * len(piece_ids)
            spans += [word.span()] * len(piece_ids)
    return ids[:max_length], word_index[:max_length], spans[:max_length]


def encode_texts(
    tokenizer: Any, texts: list[str], special: SpecialIds, max_length: int
) -> dict[str, np.ndarray]:
    """Tokenize texts into right-padded int64 arrays of shape [batch, sequence].

    Returns `input_ids`, `attention_mask`, `offsets` ([batch, sequence, 2], the character span
    of each token's word) and `word_ids` (NO_WORD for special and padding tokens). Right
    padding leaves the logits of real tokens unchanged in a causal model.
    """
    rows = [encode_row(tokenizer, text, special, max_length) for text in texts]
    # NB: at least one column, so that a batch of empty texts still has a valid shape.
    length = max([len(ids) for ids, _, _ in rows] + [1])
    batch = len(texts)
    input_ids = np.full((batch, length), special.pad, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    offsets = np.zeros((batch, length, 2), dtype=np.int64)
    word_ids = np.full((batch, length), NO_WORD, dtype=np.int64)
    for row, (ids, word_index, spans) in enumerate(rows):
        size = len(ids)
        input_ids[row, :size] = ids
        attention_mask[row, :size] = 1
        word_ids[row, :size] = word_index
        if size:
            offsets[row, :size] = spans
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "offsets": offsets,
        "word_ids": word_ids,
    }


def split_label(label: str) -> tuple[str, str]:
    """Split an IOB label into (prefix, type): `B-Disease` -> (`B`, `Disease`), `O` -> (`O`, ``).

    A label without a `B-` or `I-` prefix (IO tagging) counts as `I` of its own type.
    """
    if label == "O":
        return "O", ""
    if label[:2] in ("B-", "I-"):
        return label[0], label[2:]
    return "I", label


def word_spans(label_ids: np.ndarray, offsets: np.ndarray, word_ids: np.ndarray) -> list[tuple]:
    """Group tokens into words: [(start, end, label id of the word's first token)] in order.

    The first sub-token decides a word's label, because the FineTune stage trains only that
    one on the word's label.
    """
    words: dict[int, list] = {}
    for label_id, (start, end), word in zip(label_ids, offsets, word_ids):
        if word == NO_WORD:
            continue
        if word not in words:
            words[int(word)] = [int(start), int(end), int(label_id)]
        else:
            words[int(word)][0] = min(words[int(word)][0], int(start))
            words[int(word)][1] = max(words[int(word)][1], int(end))
    return [tuple(words[word]) for word in sorted(words)]


def make_entity(text: str, start: int, end: int, label: str) -> dict[str, Any]:
    return {"start": start, "end": end, "text": text[start:end], "label": label}


def decode_entities(
    text: str,
    label_ids: np.ndarray,
    offsets: np.ndarray,
    word_ids: np.ndarray,
    id2label: list[str],
) -> list[dict[str, Any]]:
    """Decode one row of per-token label ids into character spans of `text`.

    IOB rules as in conlleval: `B-X` starts an entity, `I-X` continues an open entity of type X
    and otherwise starts one, `O` closes the open entity.
    """
    entities: list[dict[str, Any]] = []
    current: list | None = None  # [start, end, type] of the open entity
    for start, end, label_id in word_spans(label_ids, offsets, word_ids):
        prefix, kind = split_label(id2label[label_id])
        if prefix == "I" and current is not None and current[2] == kind:
            current[1] = end
            continue
        if current is not None:
            entities.append(make_entity(text, *current))
            current = None
        if prefix != "O":
            current = [start, end, kind]
    if current is not None:
        entities.append(make_entity(text, *current))
    return entities


def entities_from_logits(
    texts: list[str],
    logits: np.ndarray,
    offsets: np.ndarray,
    word_ids: np.ndarray,
    id2label: list[str],
) -> list[list[dict[str, Any]]]:
    """Take the argmax over labels of [batch, sequence, labels] logits and decode every row."""
    label_ids = np.asarray(logits).argmax(axis=-1)
    return [
        decode_entities(text, label_ids[row], offsets[row], word_ids[row], id2label)
        for row, text in enumerate(texts)
    ]


def load_tokenizer(tokenizer_file: str) -> Any:
    """Load a `tokenizer.json` with padding and truncation off (encode_row cuts sequences)."""
    from tokenizers import Tokenizer  # imported here so that decoding needs only numpy

    tokenizer = Tokenizer.from_file(tokenizer_file)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
