"""Training data of the PretrainJob stage: tokenize, pack, and deal out sequences to ranks.

Every document of a split is tokenized, followed by `<|endoftext|>`, and the concatenated
stream is cut into sequences of exactly `sequenceLength` tokens (the tail that does not fill a
sequence is dropped). Sequences may therefore span a document boundary, as in GPT-2's packing,
and the end-of-text token marks where one document stops.

A split is tokenized once per node into memory-mapped files (`tokenize_split`), so the processes
of a node share one copy and no process keeps the corpus in its own memory. It is packed
(`pack`) once per curriculum stage, each stage with its own sequence length and minimum
document quality (see pretrain.curriculum).

Each epoch visits the sequences in an order drawn from (seed, epoch). One micro-batch step of
all ranks consumes the next `microBatchSize * world_size` sequences of that order, rank r taking
the r-th block. The data position is therefore (epoch, cursor) counted in sequences, which is
independent of the world size, so a run can resume on a different number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from lathe_trainer import datasets
from lathe_trainer.corpus.quality import quality_score
from lathe_trainer.remote import node_lock

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
# Documents per tokenizer call: large enough for the fast tokenizer's batching, small enough to
# keep the intermediate lists of ids modest.
ENCODE_BATCH = 256
# The files of a tokenized split (see TokenizedSplit), written once per node.
TOKEN_DTYPE = np.int32
IDS_FILE = "ids.bin"
OFFSETS_FILE = "offsets.npy"
QUALITIES_FILE = "qualities.npy"
SKIPPED_FILE = "skipped.json"
SOURCE_FILE = "source.json"
COMPLETE = ".complete"


@dataclass
class PackedSplit:
    """The sequences of one split, with what was skipped on the way."""

    # int32, shape (num_sequences, sequence_length), a view of the memory-mapped token ids;
    # batches are converted to int64 as they are taken.
    sequences: torch.Tensor
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
    """The token ids of every document of a split, each ending in `<|endoftext|>`.

    The ids lie back to back in a memory-mapped file of int32 (`ids`), so the processes of a
    node share one copy in the page cache, and a split larger than memory can be trained on.
    """

    directory: Path
    ids: np.ndarray  # int32, all documents back to back
    offsets: np.ndarray  # int64, where each document starts, then the end of the last
    qualities: np.ndarray  # float32 per document, from the text where the record has none
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])


def tokenize_split(
    tokenizer: PreTrainedTokenizerFast, corpus_uri: str, split: str, cache: Path
) -> TokenizedSplit:
    """Tokenize every document of a split once per node into `cache/<split>`, and map it.

    The first process of a node to take the lock on `cache` writes the files, and the others
    wait, then map the same files. Files written from other shards or by another tokenizer
    are written anew. Each curriculum stage packs its own sequences from them.
    """
    directory = cache / split
    cache.mkdir(parents=True, exist_ok=True)
    source = _source(tokenizer, corpus_uri, split)
    with node_lock(cache):
        if not _written_from(directory, source):
            _write_tokens(tokenizer, corpus_uri, split, directory)
            (directory / SOURCE_FILE).write_text(source)
            (directory / COMPLETE).touch()
    tokenized = _open_tokens(directory)
    if tokenized.skipped:
        log.warning("Skipped documents of the %s split without usable text: %s.", split,
                    tokenized.skipped)
    return tokenized


def _write_tokens(
    tokenizer: PreTrainedTokenizerFast, corpus_uri: str, split: str, directory: Path
) -> None:
    # A crash leaves no COMPLETE marker, so the next attempt writes the files anew. The files
    # of the quality filters (_quality_stream) go too, because they are cut from these.
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    # Typed arrays take 12 bytes per document. Lists of Python numbers took 73 MB per million
    # documents under tracemalloc.
    offsets, qualities = array("q", [0]), array("f")
    skipped: dict[str, int] = {}
    with (directory / IDS_FILE).open("wb") as handle:
        batch: list[tuple[str, float | None]] = []
        for document in iter_checked_documents(corpus_uri, split, skipped):
            batch.append(document)
            if len(batch) == ENCODE_BATCH:
                _encode_batch(tokenizer, batch, eos_id, handle, offsets, qualities)
                batch = []
        _encode_batch(tokenizer, batch, eos_id, handle, offsets, qualities)
    np.save(directory / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    np.save(directory / QUALITIES_FILE, np.asarray(qualities, dtype=np.float32))
    (directory / SKIPPED_FILE).write_text(json.dumps(skipped))


def _source(tokenizer: PreTrainedTokenizerFast, corpus_uri: str, split: str) -> str:
    """Describe what a split's token files come from: its shards (path, size, modification
    time) and the tokenizer's own definition."""
    shards = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
              for path in datasets.shard_paths(corpus_uri, split)]
    definition = tokenizer.backend_tokenizer.to_str()
    return json.dumps({
        "shards": shards,
        "tokenizer": hashlib.sha256(definition.encode("utf-8")).hexdigest(),
        "dtype": np.dtype(TOKEN_DTYPE).name,
    })


def _written_from(directory: Path, source: str) -> bool:
    """Return whether the files in `directory` are complete and were written from `source`.

    The size check catches an ids file cut short by a crash of the machine, which can leave
    the marker of a write that never reached the disk.
    """
    marker, recorded = directory / COMPLETE, directory / SOURCE_FILE
    if not (marker.exists() and recorded.is_file() and recorded.read_text() == source):
        return False
    offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r")
    expected = int(offsets[-1]) * np.dtype(TOKEN_DTYPE).itemsize
    return (directory / IDS_FILE).stat().st_size == expected


def _encode_batch(
    tokenizer: PreTrainedTokenizerFast,
    documents: list[tuple[str, float | None]],
    eos_id: int,
    handle,
    offsets: array,
    qualities: array,
) -> None:
    if not documents:
        return
    texts = [text for text, _ in documents]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for ids, (text, quality) in zip(encoded, documents):
        handle.write(np.asarray([*ids, eos_id], dtype=TOKEN_DTYPE).tobytes())
        offsets.append(offsets[-1] + len(ids) + 1)
        qualities.append(quality_score(text) if quality is None else quality)


def _open_tokens(directory: Path) -> TokenizedSplit:
    return TokenizedSplit(
        directory,
        map_ids(directory / IDS_FILE),
        np.load(directory / OFFSETS_FILE, mmap_mode="r"),
        np.load(directory / QUALITIES_FILE, mmap_mode="r"),
        json.loads((directory / SKIPPED_FILE).read_text()),
    )


def map_ids(path: Path) -> np.ndarray:
    """Map a file of int32 token ids; an empty file gives an empty array (mmap rejects it)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    # Copy-on-write keeps the array writable, as torch.from_numpy expects, while the pages
    # stay shared until a process writes to one, which no stage does.
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="c")


def pack(
    tokenized: TokenizedSplit, sequence_length: int, min_quality: float | None = None
) -> PackedSplit:
    """Cut the documents with quality >= min_quality into sequences of sequence_length."""
    if min_quality is None:
        stream, documents = tokenized.ids, tokenized.documents
    else:
        stream, documents = _quality_stream(tokenized, min_quality)
    usable = len(stream) // sequence_length * sequence_length
    sequences = torch.from_numpy(stream[:usable].reshape(-1, sequence_length))
    return PackedSplit(sequences, documents, len(stream), dict(tokenized.skipped))


def _quality_stream(tokenized: TokenizedSplit, min_quality: float) -> tuple[np.ndarray, int]:
    """Return the ids of the documents with quality >= min_quality, back to back, and their
    count. The first process of a node writes them to a file beside the split's ids, unless
    every document passes and the split's own ids serve."""
    selected = np.flatnonzero(tokenized.qualities >= min_quality)
    if len(selected) == tokenized.documents:
        return tokenized.ids, tokenized.documents
    path = tokenized.directory / f"min-quality-{min_quality!r}.bin"
    marker = path.with_name(path.name + COMPLETE)
    # The lock of tokenize_split, which deletes this directory when it writes the split anew.
    with node_lock(tokenized.directory.parent):
        if not marker.exists():
            with path.open("wb") as handle:
                for document in selected:
                    start, end = tokenized.offsets[document], tokenized.offsets[document + 1]
                    handle.write(tokenized.ids[start:end].tobytes())
            marker.touch()
    return map_ids(path), len(selected)


def pack_split(
    tokenizer: PreTrainedTokenizerFast,
    corpus_uri: str,
    split: str,
    sequence_length: int,
    cache: Path,
) -> PackedSplit:
    """Tokenize one split into `cache` and cut it into sequences of sequence_length tokens."""
    return pack(tokenize_split(tokenizer, corpus_uri, split, cache), sequence_length)


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
    mine = split.sequences[:max_sequences][rank::world_size].long()
    return list(torch.split(mine, micro_batch_size)) if len(mine) else []
