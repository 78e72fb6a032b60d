"""The per-document work of a Corpus, split across workers (Job pods or local processes).

Every worker reads every source, so that all of them agree on the document ids and order.
Worker i of W then takes the documents at positions i, i + W, i + 2W, ... and computes what the
filters need from each: the word count, the exact-duplicate digest, the near-duplicate
fingerprint, the first overlap with an evaluation set and the redacted text. Worker 0 applies
the filters over every worker's results in document order, so the kept documents do not depend
on the number of workers.

Workers other than 0 write their results under `<output>/parts/<run id>/` as one JSON-lines
file and then a `.done` marker. With a staged s3:// output that is the remote output, which
every pod can read. Worker 0 waits for every marker, and deletes `parts/` once it has read them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from lathe.api.corpus import CorpusSpec
from lathe_trainer.corpus import dedup, pii
from lathe_trainer.corpus.decontaminate import EvalIndex
from lathe_trainer.corpus.normalize import normalize_text, word_count
from lathe_trainer.corpus.records import Document
from lathe_trainer.stage import StageConfig, StageError
from lathe_trainer.training import storage

log = logging.getLogger(__name__)

PARTS = "parts"
# Seconds between checks for the other workers' markers, and the default wait for all of them.
POLL_SECONDS = 2.0
DEFAULT_WAIT_SECONDS = 6 * 3600.0


@dataclass
class Features:
    """The filter inputs of one document, computed by the worker that owns it."""

    position: int
    words: int
    # The rest stays empty for a document below spec.minWords, which no later filter reads.
    digest: str = ""
    fingerprint: dedup.Fingerprint | None = None
    overlap: str | None = None
    redacted: str = ""
    redactions: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        record: dict = {"position": self.position, "words": self.words}
        if self.digest:
            record |= {"digest": self.digest, "overlap": self.overlap,
                       "redacted": self.redacted, "redactions": self.redactions}  # fmt: skip
        if self.fingerprint is not None:
            record["shingles"] = sorted(self.fingerprint.shingles)
            signature = self.fingerprint.signature
            record["signature"] = signature.hex() if signature is not None else None
        return record

    @classmethod
    def from_json(cls, record: dict) -> Features:
        fingerprint = None
        if "shingles" in record:
            signature = record["signature"]
            fingerprint = dedup.Fingerprint(frozenset(record["shingles"]),
                                            bytes.fromhex(signature) if signature else None)
        return cls(record["position"], record["words"], record.get("digest", ""), fingerprint,
                   record.get("overlap"), record.get("redacted", ""),
                   record.get("redactions", {}))  # fmt: skip


def worker_index() -> int:
    """Return this worker's index: the Job's completion index, 0 outside an Indexed Job."""
    return int(os.environ.get("JOB_COMPLETION_INDEX", "0"))


def own_positions(count: int, worker: int, workers: int) -> range:
    return range(worker, count, workers)


def normalize(documents: Sequence[Document], positions: range, spec: CorpusSpec) -> None:
    """Normalize the text of the documents at `positions`, in place."""
    for position in positions:
        document = documents[position]
        document.text = normalize_text(document.text, spec.normalization.unicode_form,
                                       spec.normalization.collapse_whitespace)  # fmt: skip


def compute(
    documents: Sequence[Document], positions: range, spec: CorpusSpec, index: EvalIndex | None
) -> list[Features]:
    """Return the features of the (normalized) documents at `positions`."""
    features = [Features(position, word_count(documents[position].text)) for position in positions]
    passing = [item for item in features if item.words >= spec.min_words]
    near = spec.dedup.near
    prints = (
        dedup.fingerprints((documents[item.position].text for item in passing), near.num_perm,
                           near.shingle_size)  # fmt: skip
        if near.enabled else [None] * len(passing)
    )
    kinds = [str(kind) for kind in spec.pii.redact]
    for item, fingerprint in zip(passing, prints, strict=True):
        text = documents[item.position].text
        item.digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        item.fingerprint = fingerprint
        item.overlap = index.first_overlap(text) if index is not None else None
        if kinds:
            item.redacted, counts = pii.redact(text, kinds)
            item.redactions = dict(counts)
        else:
            item.redacted = text
    return features


def parts_uri(config: StageConfig, run_id: str) -> str:
    """Return where the workers of one run exchange their features: in the remote output when
    the output is staged, because each pod stages its own local copy."""
    output = config.staged_from.get(config.output_uri, config.output_uri)
    return f"{output.rstrip('/')}/{PARTS}/{run_id}"


def write_part(config: StageConfig, run_id: str, worker: int, features: Sequence[Features]) -> None:
    """Write one worker's features, then the marker that shows worker 0 the part is complete."""
    filesystem, base = storage.resolve(parts_uri(config, run_id))
    filesystem.makedirs(base, exist_ok=True)
    lines = "".join(json.dumps(item.to_json()) + "\n" for item in features)
    filesystem.pipe_file(f"{base}/worker-{worker:05d}.jsonl", lines.encode("utf-8"))
    filesystem.pipe_file(f"{base}/worker-{worker:05d}.done", b"")
    log.info("Worker %d wrote the features of %d documents to %s.", worker, len(features),
             parts_uri(config, run_id))  # fmt: skip


def read_parts(config: StageConfig, run_id: str, workers: int) -> Iterator[Features]:
    """Yield the features that workers 1 to W-1 wrote, waiting for each worker's marker.

    Raises StageError when a marker is still missing after LATHE_CORPUS_WAIT_SECONDS.
    """
    filesystem, base = storage.resolve(parts_uri(config, run_id))
    wait = float(os.environ.get("LATHE_CORPUS_WAIT_SECONDS", DEFAULT_WAIT_SECONDS))
    deadline = time.monotonic() + wait
    for worker in range(1, workers):
        marker = f"{base}/worker-{worker:05d}.done"
        while not filesystem.exists(marker):
            if time.monotonic() > deadline:
                raise StageError(
                    config, "spec.workers",
                    f"worker {worker} of {workers} wrote no results to {parts_uri(config, run_id)} "
                    f"within {wait:.0f} s; see that worker's log, or lower spec.workers.",
                )
            time.sleep(POLL_SECONDS)
            filesystem.invalidate_cache()
        text = filesystem.cat_file(f"{base}/worker-{worker:05d}.jsonl").decode("utf-8")
        for line in text.splitlines():
            yield Features.from_json(json.loads(line))


def remove_parts(config: StageConfig) -> None:
    """Delete every run's parts, which are no part of the artifact."""
    output = config.staged_from.get(config.output_uri, config.output_uri)
    filesystem, base = storage.resolve(f"{output.rstrip('/')}/{PARTS}")
    storage.remove_tree(filesystem, base)
