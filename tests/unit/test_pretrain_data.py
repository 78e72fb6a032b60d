"""Token files of the PretrainJob's corpus splits: written once per node, mapped, packed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tiny_ner_model import build_tokenizer, read_abstracts

from lathe_trainer.pretrain import data

LENGTH = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, data_dir):
    return build_tokenizer(data_dir, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def corpus(tmp_path, data_dir):
    """A finished Corpus of real abstracts in two shards, with a quality on every record."""
    corpus_file = data_dir / "pubmed" / "ncbi-disease" / "corpus" / "NCBItestset_corpus.txt"
    texts = read_abstracts(corpus_file, 40)
    root = tmp_path / "corpus"
    (root / "train").mkdir(parents=True)
    for shard in range(2):
        lines = [json.dumps({"text": text, "quality": (index % 4) / 4})
                 for index, text in enumerate(texts) if index % 2 == shard]
        (root / "train" / f"shard-{shard:05d}.jsonl").write_text("\n".join(lines) + "\n")
    return root, texts


def reference_stream(tokenizer, texts: list[str], keep=lambda index: True) -> list[int]:
    """Return the stream as the stage built it in memory: each document's ids, then eos."""
    eos = tokenizer.convert_tokens_to_ids(data.END_OF_TEXT)
    stream: list[int] = []
    for shard in range(2):
        for index, text in enumerate(texts):
            if index % 2 == shard and keep(index):
                stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    return stream


def test_packed_sequences_match_reference(tokenizer, corpus, tmp_path):
    root, texts = corpus
    tokenized = data.tokenize_split(tokenizer, f"file://{root}", "train", tmp_path / "cache")
    packed = data.pack(tokenized, LENGTH)
    stream = reference_stream(tokenizer, texts)
    usable = len(stream) // LENGTH * LENGTH
    assert tokenized.documents == len(texts)
    assert tokenized.tokens == len(stream)
    assert packed.tokens == len(stream)
    assert packed.sequences.shape == (usable // LENGTH, LENGTH)
    assert packed.sequences.flatten().tolist() == stream[:usable]
    # The ids are mapped from the file, not copied into the process.
    assert isinstance(tokenized.ids, np.memmap)


def test_quality_filter_packs_kept_documents(tokenizer, corpus, tmp_path):
    root, texts = corpus
    tokenized = data.tokenize_split(tokenizer, f"file://{root}", "train", tmp_path / "cache")
    packed = data.pack(tokenized, LENGTH, min_quality=0.5)
    # Documents with index % 4 in (2, 3) have quality 0.5 or 0.75.
    stream = reference_stream(tokenizer, texts, keep=lambda index: index % 4 >= 2)
    usable = len(stream) // LENGTH * LENGTH
    assert packed.documents == sum(1 for index in range(len(texts)) if index % 4 >= 2)
    assert packed.sequences.flatten().tolist() == stream[:usable]


def test_files_reused_until_shard_changes(tokenizer, corpus, tmp_path):
    root, texts = corpus
    cache = tmp_path / "cache"
    data.tokenize_split(tokenizer, f"file://{root}", "train", cache)
    ids_file = cache / "train" / data.IDS_FILE
    written = ids_file.stat().st_mtime_ns
    data.tokenize_split(tokenizer, f"file://{root}", "train", cache)
    assert ids_file.stat().st_mtime_ns == written

    shard = root / "train" / "shard-00001.jsonl"
    shard.write_text(json.dumps({"text": "Cystic fibrosis."}) + "\n")
    os.utime(shard, ns=(written + 10**9, written + 10**9))
    tokenized = data.tokenize_split(tokenizer, f"file://{root}", "train", cache)
    assert tokenized.documents == len(range(0, len(texts), 2)) + 1


def test_unfinished_files_written_again(tokenizer, corpus, tmp_path):
    """Files without the completion marker (a crash while writing) are not used."""
    root, texts = corpus
    cache = tmp_path / "cache"
    data.tokenize_split(tokenizer, f"file://{root}", "train", cache)
    (cache / "train" / data.COMPLETE).unlink()
    (cache / "train" / data.IDS_FILE).write_bytes(b"")
    tokenized = data.tokenize_split(tokenizer, f"file://{root}", "train", cache)
    assert tokenized.tokens == len(reference_stream(tokenizer, texts))


def test_empty_split_packs_nothing(tokenizer, tmp_path):
    root = tmp_path / "corpus"
    (root / "validation").mkdir(parents=True)
    (root / "validation" / "shard-00000.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    tokenized = data.tokenize_split(tokenizer, f"file://{root}", "validation", tmp_path / "c")
    packed = data.pack(tokenized, LENGTH)
    assert tokenized.skipped == {"emptyText": 1}
    assert len(packed) == 0
    assert data.pack(tokenized, LENGTH, min_quality=0.0).sequences.shape == (0, LENGTH)


def test_batches_taken_as_int64(tokenizer, corpus, tmp_path):
    root, _ = corpus
    tokenized = data.tokenize_split(tokenizer, f"file://{root}", "train", tmp_path / "cache")
    packed = data.pack(tokenized, LENGTH)
    batches = data.validation_batches(packed, micro_batch_size=2, rank=0, world_size=1,
                                      max_sequences=4)
    assert [batch.dtype for batch in batches] == [torch.int64, torch.int64]


def test_filter_keeping_all_writes_no_copy(tokenizer, corpus, tmp_path):
    root, _ = corpus
    tokenized = data.tokenize_split(tokenizer, f"file://{root}", "train", tmp_path / "cache")
    packed = data.pack(tokenized, LENGTH, min_quality=0.0)
    assert torch.equal(packed.sequences, data.pack(tokenized, LENGTH).sequences)
    assert not list((tmp_path / "cache" / "train").glob("min-quality-*"))


def test_truncated_ids_written_again(tokenizer, corpus, tmp_path):
    """An ids file cut short under a completion marker (a machine crash) is not used."""
    root, texts = corpus
    cache = tmp_path / "cache"
    data.tokenize_split(tokenizer, f"file://{root}", "train", cache)
    ids_file = cache / "train" / data.IDS_FILE
    ids_file.write_bytes(ids_file.read_bytes()[:100])
    tokenized = data.tokenize_split(tokenizer, f"file://{root}", "train", cache)
    assert len(tokenized.ids) == tokenized.tokens == len(reference_stream(tokenizer, texts))
