"""Train/validation assignment and shard writing, the last step of the Corpus stage.

A document's split and shard follow from a hash of the seed and its id alone. They do not
depend on the order of sources or on which other documents survived the filters, so adding a
source moves no existing document from train to validation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lathe_trainer.corpus.quality import quality_score
from lathe_trainer.corpus.records import Document
from lathe_trainer.datasets import SPLITS

TRAIN, VALIDATION = SPLITS


def _unit_hash(seed: int, document_id: str) -> tuple[float, int]:
    """Return a uniform number in [0, 1) for the split and an integer for the shard."""
    digest = hashlib.sha256(f"{seed}\0{document_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big")


@dataclass
class Assignment:
    split: str
    shard: int


def assign(
    documents: Sequence[Document], validation_fraction: float, seed: int, shards: int
) -> list[Assignment]:
    """Assign each document a split and a shard.

    When the hash leaves one split empty and there are at least two documents, the document
    whose hash is nearest to the cut moves across, so both splits exist for small corpora.
    """
    hashes = [_unit_hash(seed, document.id) for document in documents]
    assignments = [
        Assignment(VALIDATION if unit < validation_fraction else TRAIN, number % shards)
        for unit, number in hashes
    ]
    splits = {assignment.split for assignment in assignments}
    if len(documents) >= 2 and len(splits) == 1:
        missing = VALIDATION if TRAIN in splits else TRAIN
        nearest = min(range(len(hashes)), key=lambda i: abs(hashes[i][0] - validation_fraction))
        assignments[nearest].split = missing
    return assignments


def shard_path(output_dir: Path, split: str, shard: int) -> Path:
    return output_dir / split / f"shard-{shard:05d}.jsonl"


def write_shards(
    output_dir: Path,
    documents: Sequence[Document],
    assignments: Sequence[Assignment],
    shards: int,
) -> dict[str, list[int]]:
    """Write every shard of both splits, empty ones included; return documents per shard.

    Each file is written under a temporary name and renamed, so a shard is either whole or
    absent.
    """
    lines: dict[tuple[str, int], list[str]] = {
        (split, shard): [] for split in SPLITS for shard in range(shards)
    }
    for document, assignment in zip(documents, assignments, strict=True):
        record = {
            "id": document.id,
            "source": document.source,
            "recordId": document.record_id,
            "text": document.text,
            "quality": quality_score(document.text),
        }
        lines[(assignment.split, assignment.shard)].append(json.dumps(record, ensure_ascii=False))
    for (split, shard), records in lines.items():
        path = shard_path(output_dir, split, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in records), encoding="utf-8")
        os.replace(tmp, path)
    return {split: [len(lines[(split, shard)]) for shard in range(shards)] for split in SPLITS}
