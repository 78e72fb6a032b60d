"""Task data of a FineTune: CoNLL sentences turned into token ids and token labels.

The FineTune stage reads `token<TAB>tag` files (IOB tags), encodes each sentence with the base
model's tokenizer and trains a token classifier on the result. The serving step (a Triton
Python-backend tokenizer) must encode raw text the same way, so it reuses `encode_text` or
`encode_words` from this module.

Encoding convention, for byte-level BPE tokenizers such as the Tokenizer stage's:

- The sequence starts with the tokenizer's `bos_token` (`<|endoftext|>` in Lathe), which marks a
  document boundary in pretraining, so the first word is encoded in a context the model has seen.
- Each word is encoded on its own as `" " + word` (one leading space, for every word including
  the first) with `add_special_tokens=False`. A byte-level BPE pre-tokenizer with
  `add_prefix_space` adds a space only when the text does not start with one, so the ids are the
  same whatever that setting is. Encoding word by word also keeps a sub-token from spanning
  two words.
- One sub-token of each word carries the word's label: the last one for a causal model, the
  first for a bidirectional one (`label_subtoken_for`). The other sub-tokens and the `bos`
  token get the label -100, which the loss ignores. `word_index_per_token` is the word's
  position for every sub-token of a word and -1 for special tokens.
- A word that encodes to no ids at all gets the `unk` token, so every word keeps a prediction.

Raw text is split into words with `WORD_PATTERN` (runs of letters, digits and `_`, or one other
non-space character). Every token of the NCBI-disease CoNLL files is exactly one match of it.

A causal model attends only to the left, so the first sub-token of a word has not seen the rest
of the word, and its last sub-token has. On the PubMed example (`lathe run` on a 2-core CPU, the
learning rate 0.003 for both), labelling the last sub-token raised the test F1 of the Llama
tagger from 0.523 to 0.558. A bidirectional model (BERT) sees the whole word from either, and
keeps the first, the convention of Hugging Face's token-classification examples. The choice is stored in the model's config.json (`decoding.LABEL_SUBTOKEN_KEY`),
so serving reads the same sub-token that training labelled.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lathe_trainer.datasets import is_iob_tag, read_conll
from lathe_trainer.serving.decoding import FIRST_SUBTOKEN, label_subtoken_mask

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
OUTSIDE = "O"
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")

Sentence = tuple[list[str], list[str]]


class TaskDataError(ValueError):
    """Task data that cannot be used; the stage turns it into a StageError naming the field."""


def encode_words(tokenizer, words: list[str], add_bos: bool = True) -> tuple[list[int], list[int]]:
    """Encode pre-split words; return (input_ids, word_index_per_token).

    `word_index_per_token[i]` is the index in `words` of the word that token i belongs to, or -1
    for the `bos` token. See the module docstring for the convention.
    """
    input_ids: list[int] = []
    word_index: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        word_index.append(-1)
    if not words:
        return input_ids, word_index
    encoded = tokenizer([" " + word for word in words], add_special_tokens=False)["input_ids"]
    for position, ids in enumerate(encoded):
        if not ids:
            ids = [tokenizer.unk_token_id]
        input_ids.extend(ids)
        word_index.extend([position] * len(ids))
    return input_ids, word_index


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Split raw text into (word, start, end) with WORD_PATTERN; offsets are characters."""
    return [(match.group(), match.start(), match.end()) for match in WORD_PATTERN.finditer(text)]


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Encode raw text; return (input_ids, word_index_per_token, character span per word)."""
    words = split_words(text)
    input_ids, word_index = encode_words(tokenizer, [word for word, _, _ in words])
    return input_ids, word_index, [(start, end) for _, start, end in words]


def read_sentences(path: Path, limit: int | None) -> list[Sentence]:
    """Read a CoNLL split and check its tags; keep the first `limit` sentences if set."""
    if not path.is_file():
        raise TaskDataError(f"the file {path} does not exist")
    try:
        sentences = read_conll(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise TaskDataError(str(error)) from error
    if not sentences:
        raise TaskDataError(f"the file {path} contains no sentences")
    for number, (_, tags) in enumerate(sentences, start=1):
        for tag in tags:
            if not is_iob_tag(tag):
                raise TaskDataError(
                    f"sentence {number} of {path} has the tag {tag!r}; tags must be `O`, "
                    "`B-<type>` or `I-<type>` (IOB)"
                )
    return sentences[:limit] if limit else sentences


def words_split_at_serving(sentences: list[Sentence]) -> list[str]:
    """Return the words that are not one match of WORD_PATTERN, in order, once each.

    Serving splits raw text with WORD_PATTERN, so it splits such a word (`IL-2` written as one
    CoNLL token) into several words, which the model was not trained to tag.
    """
    found: dict[str, None] = {}
    for words, _ in sentences:
        for word in words:
            if WORD_PATTERN.fullmatch(word) is None:
                found.setdefault(word)
    return list(found)


def label_list(*splits: list[Sentence]) -> list[str]:
    """Return `O` then `B-` and `I-` of every entity type seen in any split, types sorted."""
    types = {tag[2:] for sentences in splits for _, tags in sentences for tag in tags if tag != "O"}
    return [OUTSIDE] + [f"{prefix}-{kind}" for kind in sorted(types) for prefix in ("B", "I")]


@dataclass(frozen=True)
class EncodedSentence:
    """One sentence as model input: token ids, token labels and the word of each token."""

    input_ids: list[int]
    labels: list[int]
    word_index: list[int]
    num_words: int
    truncated: bool


def encode_sentence(
    tokenizer, sentence: Sentence, label2id: dict[str, int], max_length: int,
    label_subtoken: str = FIRST_SUBTOKEN,
) -> EncodedSentence:
    """Encode one sentence; `label_subtoken` ("first" or "last") picks the labelled sub-token.

    With "last", a word cut by truncation is labelled on its last token kept.
    """
    words, tags = sentence
    input_ids, word_index = encode_words(tokenizer, words)
    truncated = len(input_ids) > max_length
    input_ids, word_index = input_ids[:max_length], word_index[:max_length]
    mask = label_subtoken_mask(word_index, label_subtoken)
    labels = [
        label2id[tags[index]] if labelled else IGNORE_INDEX
        for index, labelled in zip(word_index, mask)
    ]
    return EncodedSentence(input_ids, labels, word_index, len(words), truncated)


def encode_sentences(
    tokenizer, sentences: list[Sentence], label2id: dict[str, int], max_length: int,
    label_subtoken: str = FIRST_SUBTOKEN,
) -> list[EncodedSentence]:
    encoded = [encode_sentence(tokenizer, item, label2id, max_length, label_subtoken)
               for item in sentences]
    truncated = sum(item.truncated for item in encoded)
    if truncated:
        # The words cut off get no prediction; evaluation counts them as `O`.
        log.warning(
            "%d of %d sentences are longer than maxLength=%d tokens and were truncated; raise "
            "spec.maxLength to keep them whole.", truncated, len(encoded), max_length,
        )
    return encoded


def collate(batch: list[EncodedSentence], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest sentence."""
    length = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        size = len(item.input_ids)
        input_ids[row, :size] = torch.tensor(item.input_ids)
        attention_mask[row, :size] = 1
        labels[row, :size] = torch.tensor(item.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def step_indices(num_items: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Return the dataset indices of one optimizer step, across all processes.

    Each epoch is a fresh permutation seeded by (seed, epoch), and steps take consecutive
    slices of the concatenated epochs. So the data of any step follows from its number alone,
    and a resumed run continues with exactly the batches it would have seen.
    """
    start = step * global_batch
    indices: list[int] = []
    while len(indices) < global_batch:
        epoch, offset = divmod(start + len(indices), num_items)
        order = list(range(num_items))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        indices.extend(order[offset:offset + global_batch - len(indices)])
    return indices
