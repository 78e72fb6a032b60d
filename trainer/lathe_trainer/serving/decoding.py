"""Text in, entities out: the tokenization and IOB decoding shared by every NER runtime.

The Triton tokenizer and postprocess steps, the in-process PyTorch reference
(`lathe_trainer.serving.reference`) and the export stage's quantization check all call these
functions, so that the served model and the in-process model cannot drift apart. The module
needs only numpy and a `tokenizers.Tokenizer`, because the repository writer copies it next to
each Triton Python model (`ner_decoding.py`) and the serving image needs no Lathe package.

Text is encoded with the FineTune stage's convention (`lathe_trainer.finetune.data`), so the
model sees at serving time what it saw in training; a unit test compares the two encoders.
Character offsets are Python string indices (Unicode code points).

A text longer than the model's maximum sequence length is split into windows of whole words that
overlap by up to `stride` tokens of left context (`split_windows`), and each word takes its
label from one window, so no part of a long text goes unlabelled.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# Word id of tokens whose label is not used: special and padding tokens, which belong to no
# word of the input text, and context tokens, whose words another window labels.
NO_WORD = -1

# Words as the FineTune stage splits them (lathe_trainer.finetune.data.WORD_PATTERN): runs of
# letters, digits and `_`, or one other non-space character.
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")

# The sub-token of a word that carries its label: the first or the last
# (lathe_trainer.finetune.data explains the choice). The FineTune stage records it in the
# model's config.json under LABEL_SUBTOKEN_KEY. A model without the key was fine-tuned before
# the key existed, when every model labelled the first.
FIRST_SUBTOKEN = "first"
LAST_SUBTOKEN = "last"
LABEL_SUBTOKENS = (FIRST_SUBTOKEN, LAST_SUBTOKEN)
LABEL_SUBTOKEN_KEY = "lathe_label_subtoken"


@dataclass(frozen=True)
class SpecialIds:
    """Token ids that encoding inserts: `bos` starts every sequence (None: no bos token)."""

    bos: int | None
    unk: int
    pad: int


def default_stride(max_length: int) -> int:
    """Return the default stride: a quarter of the window, so 128 tokens of a 512-token window.

    Every window after the first then spends at most a quarter of its tokens on left context,
    and a long text costs the model at most about 4/3 of its own tokens.
    """
    return max_length // 4


def largest_stride(max_length: int, bos: bool) -> int:
    """Return the largest stride that leaves one new token in a window of max_length tokens,
    which starts with the bos token when `bos` is set."""
    return max_length - int(bos) - 1


def check_window(special: SpecialIds, max_length: int, stride: int) -> int:
    """Return the number of text tokens a window can contain besides bos.

    Raises ValueError unless a window contains at least one new token after its `stride`
    tokens of context, because otherwise the split would not advance through the text.
    """
    budget = max_length - (special.bos is not None)
    if budget < 1:
        raise ValueError(
            f"max_length {max_length} leaves no room for text after the bos token; use at "
            "least 2."
        )
    largest = largest_stride(max_length, special.bos is not None)
    if not 0 <= stride <= largest:
        raise ValueError(
            f"stride {stride} must be in 0..{largest}, so that each window of {max_length} "
            "tokens also holds new text."
        )
    return budget


@dataclass(frozen=True)
class Window:
    """Words [context_start, end) of a text, encoded as one model sequence.

    Words [context_start, start) are left context that an earlier window has labelled. Words
    [start, end) take their labels from this window.
    """

    context_start: int
    start: int
    end: int


def split_windows(token_counts: list[int], budget: int, stride: int) -> list[Window]:
    """Split words of `token_counts` tokens each into windows of at most `budget` tokens.

    Each window after the first repeats the last whole words before it, up to `stride` tokens,
    as left context. Every word is labelled in exactly one window, the first that contains it.
    The model is causal, so a word's logits depend only on the tokens before it. That first
    window gives the word the most left context, because each window starts at a later word
    than the one before: its context is shorter than the text of the window before it. A word
    of more than `budget` tokens fills a window alone and is cut to `budget` tokens.
    """
    windows: list[Window] = []
    start = 0
    while start < len(token_counts):
        # Context must leave room for the first new word, cut to the budget if need be.
        room = min(stride, budget - min(token_counts[start], budget))
        context_start, used = start, 0
        while context_start > 0 and used + token_counts[context_start - 1] <= room:
            context_start -= 1
            used += token_counts[context_start]
        end = start
        while end < len(token_counts) and (
            end == start or used + token_counts[end] <= budget
        ):
            used += token_counts[end]
            end += 1
        windows.append(Window(context_start, start, end))
        start = end
    return windows


@dataclass(frozen=True)
class TokenRow:
    """One model sequence: token ids, the index of the word each token labels, word spans.

    `word_ids` is NO_WORD for bos and for context tokens, whose words another window labels,
    so that concatenating the rows of a text yields each word's kept tokens exactly once.
    """

    ids: list[int]
    word_ids: list[int]
    spans: list[tuple[int, int]]


@dataclass(frozen=True)
class EncodedText:
    """A text as model sequences (at least one, even for an empty text)."""

    rows: list[TokenRow]
    # Tokens dropped from words longer than a window. The word keeps its first tokens, and its
    # label comes from the first or the last of those kept (LABEL_SUBTOKENS), as in training.
    cut_tokens: int


def encode_words(
    tokenizer: Any, text: str, special: SpecialIds
) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Encode each word of `text` as the FineTune stage does: `" " + word`, no special tokens.

    Returns the character span and the token ids of every word. A word whose encoding is empty
    becomes `unk`.
    """
    words = list(WORD_PATTERN.finditer(text))
    if not words:
        return [], []
    pieces = tokenizer.encode_batch([" " + word.group() for word in words], add_special_tokens=False)
    return [word.span() for word in words], [piece.ids or [special.unk] for piece in pieces]


def encode_text(
    tokenizer: Any, text: str, special: SpecialIds, max_length: int, stride: int
) -> EncodedText:
    """Encode one text as windows of at most `max_length` tokens, counting bos.

    Each window is encoded with the FineTune stage's convention: `bos` first, then its words.
    `split_windows` decides which words each window contains and labels.
    """
    budget = check_window(special, max_length, stride)
    spans, pieces = encode_words(tokenizer, text, special)
    prefix = [] if special.bos is None else [special.bos]
    rows: list[TokenRow] = []
    cut_tokens = 0
    for window in split_windows([len(piece) for piece in pieces], budget, stride):
        ids, word_ids = list(prefix), [NO_WORD] * len(prefix)
        token_spans = [(0, 0)] * len(prefix)
        for word in range(window.context_start, window.end):
            piece = pieces[word]
            if len(piece) > budget:
                cut_tokens += len(piece) - budget
                piece = piece[:budget]
            ids += piece
            word_ids += [word if word >= window.start else NO_WORD] * len(piece)
            token_spans += [spans[word]] * len(piece)
        rows.append(TokenRow(ids, word_ids, token_spans))
    if not rows:
        rows.append(TokenRow(list(prefix), [NO_WORD] * len(prefix), [(0, 0)] * len(prefix)))
    return EncodedText(rows, cut_tokens)


def encode_texts(
    tokenizer: Any,
    texts: list[str],
    special: SpecialIds,
    max_length: int,
    stride: int | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize texts into right-padded int64 arrays of shape [batch, windows, sequence].

    Returns `input_ids`, `attention_mask`, `offsets` ([batch, windows, sequence, 2], the
    character span of each token's word), `word_ids` (NO_WORD for special, context and padding
    tokens) and `cut_tokens` ([batch], see EncodedText). A text with fewer windows than the
    longest one gets windows without tokens. Right padding leaves the logits of real tokens
    unchanged in a causal model. `stride` defaults to `default_stride(max_length)`.
    """
    if stride is None:
        stride = default_stride(max_length)
    encoded = [encode_text(tokenizer, text, special, max_length, stride) for text in texts]
    # NB: at least one window and one column, so that an empty batch still has a valid shape.
    windows = max([len(item.rows) for item in encoded] + [1])
    length = max([len(row.ids) for item in encoded for row in item.rows] + [1])
    shape = (len(texts), windows, length)
    input_ids = np.full(shape, special.pad, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    offsets = np.zeros(shape + (2,), dtype=np.int64)
    word_ids = np.full(shape, NO_WORD, dtype=np.int64)
    for text_index, item in enumerate(encoded):
        for window_index, row in enumerate(item.rows):
            size = len(row.ids)
            if not size:
                continue
            position = (text_index, window_index, slice(0, size))
            input_ids[position] = row.ids
            attention_mask[position] = 1
            word_ids[position] = row.word_ids
            offsets[position] = row.spans
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "offsets": offsets,
        "word_ids": word_ids,
        "cut_tokens": np.array([item.cut_tokens for item in encoded], dtype=np.int64),
    }


def run_windows(
    run: Callable[[np.ndarray, np.ndarray], np.ndarray],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    num_labels: int,
) -> np.ndarray:
    """Run a model on the windows of a [batch, windows, sequence] batch that contain tokens.

    `run(input_ids, attention_mask)` takes [rows, sequence] arrays and returns [rows, sequence,
    labels] logits. Returns [batch, windows, sequence, labels] float32 logits, with zeros for
    windows without tokens, which are only padding and are not run.
    """
    logits = np.zeros(input_ids.shape + (num_labels,), dtype=np.float32)
    filled = attention_mask.any(axis=-1)
    if filled.any():
        logits[filled] = run(input_ids[filled], attention_mask[filled])
    return logits


def split_label(label: str) -> tuple[str, str]:
    """Split an IOB label into (prefix, type): `B-Disease` -> (`B`, `Disease`), `O` -> (`O`, ``).

    A label without a `B-` or `I-` prefix (IO tagging) counts as `I` of its own type.
    """
    if label == "O":
        return "O", ""
    if label[:2] in ("B-", "I-"):
        return label[0], label[2:]
    return "I", label


def label_subtoken_mask(word_ids, label_subtoken: str) -> list[bool]:
    """Mark the tokens that carry a word's label: its first or last sub-token.

    `word_ids` contains each token's word, NO_WORD (or any negative id) for tokens of no word.
    """
    if label_subtoken not in LABEL_SUBTOKENS:
        raise ValueError(
            f"label_subtoken is {label_subtoken!r}; use one of {', '.join(LABEL_SUBTOKENS)}"
        )
    ids = [int(word) for word in word_ids]
    neighbours = [NO_WORD] + ids[:-1] if label_subtoken == FIRST_SUBTOKEN else ids[1:] + [NO_WORD]
    return [word >= 0 and word != neighbour for word, neighbour in zip(ids, neighbours)]


def word_spans(
    label_ids: np.ndarray, offsets: np.ndarray, word_ids: np.ndarray, label_subtoken: str
) -> list[tuple]:
    """Group tokens into words: [(start, end, label id of the word)] in order.

    The word's label is that of its `label_subtoken` ("first" or "last"), the one sub-token
    that the FineTune stage trained on the word's label.
    """
    labelled = label_subtoken_mask(word_ids, label_subtoken)
    words: dict[int, list] = {}
    for label_id, (start, end), word, carries in zip(label_ids, offsets, word_ids, labelled):
        if word == NO_WORD:
            continue
        span = words.setdefault(int(word), [int(start), int(end), None])
        span[0] = min(span[0], int(start))
        span[1] = max(span[1], int(end))
        if carries:
            span[2] = int(label_id)
    return [tuple(words[word]) for word in sorted(words)]


def make_entity(text: str, start: int, end: int, label: str) -> dict[str, Any]:
    return {"start": start, "end": end, "text": text[start:end], "label": label}


def decode_entities(
    text: str,
    label_ids: np.ndarray,
    offsets: np.ndarray,
    word_ids: np.ndarray,
    id2label: list[str],
    label_subtoken: str,
) -> list[dict[str, Any]]:
    """Decode the per-token label ids of one text into character spans of `text`.

    The arrays may hold the text's windows ([windows, sequence]); they are read in order as
    one sequence, in which each word's tokens occur once, because context tokens are NO_WORD.
    IOB rules as in conlleval: `B-X` starts an entity, `I-X` continues an open entity of type X
    and otherwise starts one, `O` closes the open entity.
    """
    entities: list[dict[str, Any]] = []
    current: list | None = None  # [start, end, type] of the open entity
    words = word_spans(
        np.reshape(label_ids, -1), np.reshape(offsets, (-1, 2)), np.reshape(word_ids, -1),
        label_subtoken,
    )
    for start, end, label_id in words:
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
    label_subtoken: str,
) -> list[list[dict[str, Any]]]:
    """Take the argmax over labels of [batch, windows, sequence, labels] logits; decode each text.

    `offsets` and `word_ids` are the arrays of `encode_texts` for the same texts.
    """
    label_ids = np.asarray(logits).argmax(axis=-1)
    return [
        decode_entities(text, label_ids[row], offsets[row], word_ids[row], id2label,
                        label_subtoken)
        for row, text in enumerate(texts)
    ]


def load_tokenizer(tokenizer_file: str) -> Any:
    """Load a `tokenizer.json` with padding and truncation off (encode_text splits texts into windows)."""
    from tokenizers import Tokenizer  # imported here so that decoding needs only numpy

    tokenizer = Tokenizer.from_file(tokenizer_file)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
