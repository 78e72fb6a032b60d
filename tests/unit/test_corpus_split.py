"""Train/validation split: stable per document id, close to the fraction, both splits exist."""

from __future__ import annotations

import json

import pytest

from lathe_trainer.corpus import split
from lathe_trainer.corpus.records import Document


def _documents(count: int, prefix: str = "src") -> list[Document]:
    return [Document(f"{prefix}:{i}", prefix, str(i), f"text {i}") for i in range(count)]


def test_assignment_depends_only_on_id():
    documents = _documents(300)
    alone = split.assign(documents, 0.1, seed=0, shards=4)
    mixed = split.assign(_documents(50, "other") + documents[::-1], 0.1, seed=0, shards=4)
    assert alone == mixed[50:][::-1]


def test_validation_share_is_near_fraction():
    assignments = split.assign(_documents(4000), 0.05, seed=0, shards=2)
    validation = sum(a.split == split.VALIDATION for a in assignments)
    assert 150 <= validation <= 250


def test_seed_changes_assignment():
    documents = _documents(500)
    assert split.assign(documents, 0.1, 0, 1) != split.assign(documents, 0.1, 1, 1)


@pytest.mark.parametrize("count", [2, 3])
def test_small_corpus_gets_both_splits(count):
    assignments = split.assign(_documents(count), 0.05, seed=0, shards=1)
    assert {a.split for a in assignments} == {split.TRAIN, split.VALIDATION}


def test_every_shard_is_written(tmp_path):
    documents = _documents(3)
    assignments = split.assign(documents, 0.05, seed=0, shards=4)
    counts = split.write_shards(tmp_path, documents, assignments, shards=4)
    paths = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert len(paths) == 8
    assert sum(counts["train"]) + sum(counts["validation"]) == 3
    records = [json.loads(line) for path in tmp_path.rglob("*.jsonl") for line in path.open()]
    assert sorted(r["id"] for r in records) == ["src:0", "src:1", "src:2"]
    assert set(records[0]) == {"id", "source", "recordId", "text", "quality"}
