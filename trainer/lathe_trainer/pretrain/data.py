"""Training data of the PretrainJob stage: tokenize, pack, and deal out sequences to ranks.

Every document of a split is tokenized, followed by `<|endoftext|>`, and the concatenated
stream is cut into sequences of exactly `sequenceLength` tokens (the tail that does not fill a
sequence is dropped). Sequences may therefore span a document boundary, as in GPT-2's packing,
and the end-of-text token marks where one document stops.

A split is tokenized once (`tokenize_split`) and packed (`pack`) once per curriculum stage, each
stage with its own sequence length and minimum document quality (see pretrain.curriculum).

Each epoch visits the sequences in an order drawn from (seed, epoch). One micro-batch step of
all ranks consumes the next `microBatchSize * world_size` sequences of that order, rank r taking
the r-th block. The data position is therefore (epoch, cursor) counted in sequences, which is
independent of the world size, so a run can resume on a different number of processes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerFast

from lathe_trainer import datasets
from lathe_trainer.corpus.quality import quality_score

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
# Documents per tokenizer call: large enough for the fast tokenizer's batching, small enough to
# keep the intermediate lists of ids modest.
ENCODE_BATCH = 256


@dataclass
class PackedSplit:
    """The sequences of one split, with what was skipped on the way."""

    sequences: torch.Tensor  # int64, shape (num_sequences, sequence_length)
    documents: int
    tokens: int
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.sequences.size(0))


class MalformedCorpusError(ValueError):
    """A corpus shard contains a line that is not valid JSON."""


def iter_checked_documents(
    corpus_uri: str, split: str, skipped: dict[str, int]
) -> Iterator[tuple[str, float | None]]:
    """Yield (text, quality) of the documents of a split with a non-empty text.

    Documents without a usable text are counted in `skipped`. The quality is the Corpus
    record's `quality` field, or None in the output of a Corpus that predates the field.
    """
    documents = datasets.iter_documents(corpus_uri, split)
    while True:
        try:
            document = next(documents)
        except StopIteration:
            return
        except json.JSONDecodeError as error:
            raise MalformedCorpusError(
                f"a line of the {split} split is not valid JSON ({error})"
            ) from error
        text = document.get("text") if isinstance(document, dict) else None
        if not isinstance(text, str):
            skipped["missingText"] = skipped.get("missingText", 0) + 1
        elif not text.strip():
            skipped["emptyText"] = skipped.get("emptyText", 0) + 1
        else:
            quality = document.get("quality")
            yield text, float(quality) if isinstance(quality, (int, float)) else None


def iter_checked_texts(corpus_uri: str, split: str, skipped: dict[str, int]) -> Iterator[str]:
    """Yield the non-empty texts of a split and count documents without a usable text."""
    for text, _ in iter_checked_documents(corpus_uri, split, skipped):
        yield text


@dataclass
class TokenizedSplit:
    """The token ids of every document of a split, each ending in `<|endoftext|>`."""

    documents: list[list[int]]
    # Quality score per document, computed from the text where the Corpus record has none.
    qualities: list[float]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.documents)


def tokenize_split(
    tokenizer: PreTrainedTokenizerFast, corpus_uri: str, split: str
) -> TokenizedSplit:
    """Tokenize every document of a split once, so each curriculum stage can pack its own."""
    # NOTE: the whole split is tokenized in memory on every rank. That takes about a second for
    # the example corpora; corpora of billions of tokens need pre-tokenized shards instead.
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    tokenized = TokenizedSplit([], [])
    batch: list[tuple[str, float | None]] = []
    for document in iter_checked_documents(corpus_uri, split, tokenized.skipped):
        batch.append(document)
        if len(batch) == ENCODE_BATCH:
            _encode_into(tokenizer, batch, eos_id, tokenized)
            batch = []
    _encode_into(tokenizer, batch, eos_id, tokenized)
    if tokenized.skipped:
        log.warning("Skipped documents of the %s split without usable text: %s.", split,
                    tokenized.skipped)
    return tokenized


def pack(
    tokenized: TokenizedSplit, sequence_length: int, min_quality: float | None = None
) -> PackedSplit:
    """Cut the documents with quality >= min_quality into sequences of sequence_length."""
    stream: list[int] = []
    documents = 0
    for ids, quality in zip(tokenized.documents, tokenized.qualities):
        if min_quality is None or quality >= min_quality:
            stream.extend(ids)
            documents += 1
    usable = len(stream) // sequence_length * sequence_length
    sequences = torch.tensor(stream[:usable], dtype=torch.long).view(-1, sequence_length)
    return PackedSplit(sequences, documents, len(stream), dict(tokenized.skipped))


def pack_split(
    tokenizer: PreTrainedTokenizerFast,
    corpus_uri: str,
    split: str,
    sequence_length: int,
) -> PackedSplit:
    """Tokenize one split and cut it into sequences of sequence_length tokens."""
    return pack(tokenize_split(tokenizer, corpus_uri, split), sequence_length)


def _encode_into(
    tokenizer: PreTrainedTokenizerFast,
    documents: list[tuple[str, float | None]],
    eos_id: int,
    tokenized: TokenizedSplit,
) -> None:
    if not documents:
        return
    texts = [text for text, _ in documents]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for ids, (text, quality) in zip(encoded, documents):
        tokenized.documents.append([*ids, eos_id])
        tokenized.qualities.append(quality_score(text) if quality is None else quality)


@dataclass
class DataPosition:
    """Start of the next micro-batch: an epoch and a sequence offset in that epoch's order."""

    epoch: int = 0
    cursor: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    @classmethod
    def from_dict(cls, value: dict[str, int]) -> DataPosition:
        return cls(epoch=int(value["epoch"]), cursor=int(value["cursor"]))


def epoch_order(num_sequences: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_sequences, generator=generator)


class SequenceSampler:
    """Deal out micro-batches of sequence indices to one rank, epoch after epoch, forever.

    The sampler never runs dry: when the current epoch cannot fill another micro-batch for all
    ranks, it starts the next epoch in a new order. So a resumed run whose data position sits
    at the end of an epoch continues into the next one instead of stopping with no steps.
    """

    def __init__(
        self,
        num_sequences: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        position: DataPosition | None = None,
    ):
        self.global_batch = micro_batch_size * world_size
        if num_sequences < self.global_batch:
            raise ValueError(
                f"{num_sequences} sequences cannot fill one micro-batch of {micro_batch_size} "
                f"sequences on each of {world_size} processes"
            )
        self.num_sequences = num_sequences
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.seed = seed
        self.position = position or DataPosition()
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def next_indices(self) -> torch.Tensor:
        """Return this rank's sequence indices for the next micro-batch and advance."""
        if self.position.cursor + self.global_batch > self.num_sequences:
            self.position = DataPosition(self.position.epoch + 1, 0)
        if self._order_epoch != self.position.epoch:
            self._order = epoch_order(self.num_sequences, self.seed, self.position.epoch)
            self._order_epoch = self.position.epoch
        start = self.position.cursor + self.rank * self.micro_batch_size
        indices = self._order[start:start + self.micro_batch_size]
        self.position = DataPosition(self.position.epoch, self.position.cursor + self.global_batch)
        return indices


def validation_batches(
    split: PackedSplit, micro_batch_size: int, rank: int, world_size: int, max_sequences: int
) -> list[torch.Tensor]:
    """Return this rank's validation micro-batches: the first max_sequences, dealt round-robin."""
    mine = split.sequences[:max_sequences][rank::world_size]
    return list(torch.split(mine, micro_batch_size)) if len(mine) else []
