"""Entry point of the Corpus workload: `python -m lathe_trainer corpus --config FILE`.

Runs the steps in order: read and normalize every source, drop short documents, exact and
near duplicates and documents that overlap the evaluation sets, redact PII, split and write the
shards, then stats.json, data_card.md and the manifest. The stage is deterministic, so `resume`
reruns it from the start.

With `spec.workers` above 1, the stage runs once per worker (an Indexed Job's pods, or local
processes), and the workers share the per-document work (lathe_trainer.corpus.workers).
Worker 0 then compares the documents with each other and writes every output, so the output
is the same for any number of workers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lathe.api.corpus import CorpusSpec, Source
from lathe_trainer.corpus import datacard, dedup, split, workers
from lathe_trainer.corpus.decontaminate import EvalIndex, EvalSetCounts
from lathe_trainer.corpus.normalize import normalize_text, word_count
from lathe_trainer.corpus.readers import SourceFormatError, read_source
from lathe_trainer.corpus.records import Document, SourceRead
from lathe_trainer.corpus.sniff import format_mismatch, mismatch_message
from lathe_trainer.corpus.stats import (
    DECONTAMINATION,
    EXACT_DUPLICATES,
    MIN_WORDS,
    NEAR_DUPLICATES,
    CorpusStats,
    SourceStats,
)
from lathe_trainer.datasets import SPLITS
from lathe_trainer.stage import (
    MANIFEST,
    ProgressReporter,
    StageConfig,
    StageError,
    data_file_digest,
    local_path,
    resolve_data_path,
    write_manifest,
)

log = logging.getLogger(__name__)

STATS = "stats.json"
DATA_CARD = "data_card.md"
STEPS = ("read", MIN_WORDS, EXACT_DUPLICATES, NEAR_DUPLICATES, DECONTAMINATION, "pii", "write")


def run(config: StageConfig, resume: bool = False) -> dict[str, Any]:
    """Build the corpus described by `config.spec` and return its metrics.

    A worker other than 0 returns no metrics: it writes its share of the features and ends.
    """
    spec = _parse_spec(config)
    output_dir = local_path(config.output_uri)
    worker, count = workers.worker_index(), spec.workers
    if worker >= count:
        raise StageError(config, "spec.workers",
                         f"this is worker {worker}, but spec.workers is {count}; run "
                         f"{count} workers with indexes 0 to {count - 1}.")  # fmt: skip
    leader = worker == 0
    if leader:
        _clear_outputs(output_dir)
    progress = ProgressReporter(config, total=len(STEPS), unit="steps") if leader else None
    stats = CorpusStats()

    _check_unique_names(config, spec.sources, "spec.sources")
    documents = _read_all(config, spec, spec.sources, "spec.sources", stats.sources,
                          normalize=False)  # fmt: skip
    index = _eval_index(config, spec, stats)
    positions = workers.own_positions(len(documents), worker, count)
    workers.normalize(documents, positions, spec)
    features = workers.compute(documents, positions, spec, index)
    run_id = os.environ.get("LATHE_RUN_ID", "local")
    if not leader:
        workers.write_part(config, run_id, worker, features)
        return {}
    if count > 1:
        features += workers.read_parts(config, run_id, count)
    features.sort(key=lambda item: item.position)
    if [item.position for item in features] != list(range(len(documents))):
        raise RuntimeError(f"The workers returned features for {len(features)} of "
                           f"{len(documents)} documents.")  # fmt: skip
    _report(progress, 1, f"Read {len(documents)} documents from {len(spec.sources)} sources.")

    remaining = _filter_min_words(documents, features, spec.min_words, stats)
    _report(progress, 2, f"{len(remaining)} documents have at least {spec.min_words} words.")
    remaining = _filter_exact(documents, remaining, spec.dedup.exact, stats)
    _report(progress, 3, f"{len(remaining)} documents remain after exact deduplication.")
    remaining = _filter_near(documents, remaining, spec, stats)
    _report(progress, 4, f"{len(remaining)} documents remain after near-duplicate removal.")
    remaining = _filter_contaminated(documents, remaining, index, stats)
    _report(progress, 5, f"{len(remaining)} documents remain after decontamination.")
    kept_documents = _redact(documents, remaining, stats)
    _report(progress, 6, f"Redacted {sum(stats.pii_redactions.values())} PII spans.")

    _write_splits(output_dir, kept_documents, spec, stats)
    stats.check()
    stats_json = stats.to_json()
    _write_reports(config.name, spec, output_dir, stats_json)
    _report(progress, 7, f"Wrote {stats.documents_out} documents in {spec.shards} shards per "
                         "split.")  # fmt: skip
    if stats.documents_out == 0:
        field, cause = _emptied_by(spec, stats)
        records = _count(stats.documents_in, "record", "records")
        raise StageError(
            config,
            field,
            f"no documents remain after filtering {records}: {cause} {output_dir / STATS} has "
            "the counts of each filter.",
        )
    if count > 1:
        workers.remove_parts(config)
    metrics = _metrics(stats)
    write_manifest(config, metrics)
    log.info("Corpus %s finished with %d documents.", config.name, stats.documents_out)
    return metrics


def _emptied_by(spec: CorpusSpec, stats: CorpusStats) -> tuple[str, str]:
    """Return the field to change when no document remains, and the cause with the fix.

    Deduplication keeps one document of each cluster, so only unread or malformed records, the
    minWords filter and decontamination can remove every document.
    """
    if stats.documents_in == 0:
        return "spec.sources", "the sources hold no records; check their paths and formats."
    by_words = stats.filters[MIN_WORDS].removed
    by_overlap = stats.filters[DECONTAMINATION].removed
    largest = max(stats.malformed, by_words, by_overlap)
    if largest == stats.malformed:
        return ("spec.sources", f"{_count(stats.malformed, 'is', 'are')} malformed; check each "
                "source's format against its files.")
    if largest == by_words:
        return ("spec.minWords", f"{_count(by_words, 'is', 'are')} shorter than minWords "
                f"({spec.min_words} words); lower minWords or add sources with longer documents.")
    return ("spec.decontamination.evalSets", f"{_count(by_overlap, 'overlaps', 'overlap')} the "
            "evaluation sets; add sources that the evaluation sets do not contain.")


def _count(number: int, singular: str, plural: str) -> str:
    """Return the number with the word that agrees with it: "1 is", "2 are", "1 record"."""
    return f"{number} {singular if number == 1 else plural}"


def _report(progress: ProgressReporter | None, step: int, message: str) -> None:
    if progress is not None:
        progress.update(step, message)


def _parse_spec(config: StageConfig) -> CorpusSpec:
    try:
        return CorpusSpec.model_validate(config.spec)
    except ValidationError as error:
        raise StageError(config, "spec", f"invalid Corpus spec: {error}") from error


def _clear_outputs(output_dir: Path) -> None:
    """Remove what an earlier attempt left, so no stale shard or manifest survives the rerun."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, STATS, DATA_CARD):
        (output_dir / name).unlink(missing_ok=True)
    for split_name in SPLITS:
        shutil.rmtree(output_dir / split_name, ignore_errors=True)


def _resolve(config: StageConfig, source: Source, field: str) -> Path:
    path = resolve_data_path(config, source.path)
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise StageError(
            config,
            field,
            f"file '{path}' {problem}; fix the path (a relative path resolves against the data "
            f"directory '{config.data_dir}') or remove the entry.",
        )
    return path


def _read_all(
    config: StageConfig,
    spec: CorpusSpec,
    sources: Sequence[Source],
    field: str,
    into: list[SourceStats],
    normalize: bool = True,
) -> list[Document]:
    """Read and name the documents of every source, normalized unless `normalize` is False;
    record their stats in `into`."""
    paths = [_resolve(config, source, f"{field}[{i}].path") for i, source in enumerate(sources)]
    documents: list[Document] = []
    seen_ids: Counter[str] = Counter()
    for i, (source, path) in enumerate(zip(sources, paths, strict=True)):
        _check_format(config, source, f"{field}[{i}]", path)
        try:
            read = read_source(path, source.format, source.name)
        except SourceFormatError as error:
            raise StageError(
                config, f"{field}[{i}].format", f"{error}; fix the file or the format."
            ) from error
        for document in read.documents:
            if normalize:
                document.text = normalize_text(
                    document.text,
                    spec.normalization.unicode_form,
                    spec.normalization.collapse_whitespace,
                )
            document.id = _unique_id(f"{source.name}:{document.record_id}", seen_ids)
        documents.extend(read.documents)
        into.append(
            SourceStats(
                source.name, source.format, source.path, data_file_digest(path),
                path.stat().st_size, read,
            )
        )
        _check_yield(config, source, f"{field}[{i}]", read, path)
        if read.malformed_count:
            log.warning(
                "Source %s has %d malformed records (first: %s); they are counted in %s.",
                source.name, read.malformed_count, read.malformed_examples[0].to_json(), STATS,
            )
    return documents


def _check_format(config: StageConfig, source: Source, field: str, path: Path) -> None:
    """Raise StageError when the file's first lines fit another format than the declared one.

    The `text` reader parses any file, so a CoNLL or PubTator file declared as `text` would
    give wrong documents without a malformed record, and as an evaluation set remove nothing.
    """
    guess = format_mismatch(path, source.format)
    if guess is None:
        return
    role = "evaluation set" if field.startswith("spec.decontamination") else "source"
    raise StageError(
        config, f"{field}.format",
        mismatch_message(f"{role} {source.name!r}", path, source.format, guess),
    )


def _check_yield(config: StageConfig, source: Source, field: str, read: SourceRead,
                 path: Path) -> None:
    """Raise StageError when a source gives no document at all.

    Every record malformed almost always means the wrong `format`. An evaluation set without
    documents would remove nothing, so its test documents would stay in the training split
    without any error. A source without records is almost always a wrong or truncated path,
    and the corpus would otherwise succeed without its text.
    """
    if read.documents:
        return
    if read.malformed_count:
        first = read.malformed_examples[0].to_json()
        raise StageError(
            config, f"{field}.format",
            f"all {read.malformed_count} records of {source.name!r} ('{path}') are malformed "
            f"for format {source.format!r} (first: {first}); set the format the file is "
            "written in, or fix the file.",
        )
    if field.startswith("spec.decontamination"):
        raise StageError(
            config, f"{field}.path",
            f"evaluation set {source.name!r} ('{path}') contains no documents, so nothing "
            "would be removed for it; point the path at the evaluation data, or remove the entry.",
        )
    raise StageError(
        config, f"{field}.path",
        f"source {source.name!r} ('{path}') contains no records for format "
        f"{source.format!r}, so it would add nothing to the corpus; point the path at the "
        "source data, or remove the entry.",
    )


def _unique_id(candidate: str, seen: Counter[str]) -> str:
    """Return candidate, or candidate~N for its Nth repeat, so output ids are unique."""
    seen[candidate] += 1
    return candidate if seen[candidate] == 1 else f"{candidate}~{seen[candidate]}"


def _check_unique_names(config: StageConfig, sources: Sequence[Source], field: str) -> None:
    names: set[str] = set()
    for i, source in enumerate(sources):
        if source.name in names:
            raise StageError(
                config,
                f"{field}[{i}].name",
                f"source name {source.name!r} is used twice; give every source its own name, "
                "because statistics and document ids are keyed by it.",
            )
        names.add(source.name)


def _filter_min_words(
    documents: list[Document], features: list[workers.Features], min_words: int,
    stats: CorpusStats,
) -> list[workers.Features]:
    kept = []
    for item in features:
        if item.words >= min_words:
            kept.append(item)
        else:
            document = documents[item.position]
            stats.filters[MIN_WORDS].add(document.source, {"id": document.id, "words": item.words})
    return kept


def _filter_exact(
    documents: list[Document], features: list[workers.Features], enabled: bool,
    stats: CorpusStats,
) -> list[workers.Features]:
    """Keep the first document of each group with identical (normalized) text."""
    if not enabled:
        return features
    kept = []
    first_by_digest: dict[str, int] = {}
    for item in features:
        first = first_by_digest.setdefault(item.digest, item.position)
        if first == item.position:
            kept.append(item)
        else:
            removed = documents[item.position]
            stats.filters[EXACT_DUPLICATES].add(
                removed.source, {"id": removed.id, "duplicateOf": documents[first].id}
            )
    return kept


def _filter_near(
    documents: list[Document], features: list[workers.Features], spec: CorpusSpec,
    stats: CorpusStats,
) -> list[workers.Features]:
    near = spec.dedup.near
    if not near.enabled:
        return features
    candidates = [documents[item.position] for item in features]
    result = dedup.remove_near_duplicates_by_fingerprint(
        candidates, [item.fingerprint for item in features], near.threshold, near.num_perm
    )
    for removed, kept in result.removed:
        stats.filters[NEAR_DUPLICATES].add(
            removed.source, {"id": removed.id, "duplicateOf": kept.id}
        )
    kept_ids = {document.id for document in result.kept}
    return [item for item in features if documents[item.position].id in kept_ids]


def _eval_index(config: StageConfig, spec: CorpusSpec, stats: CorpusStats) -> EvalIndex | None:
    """Read the evaluation sets and index their n-grams; None when the spec names none."""
    eval_sets = spec.decontamination.eval_sets
    if not eval_sets:
        return None
    field = "spec.decontamination.evalSets"
    _check_unique_names(config, eval_sets, field)
    eval_documents = _read_all(config, spec, eval_sets, field, stats.eval_sets)
    by_set: dict[str, list[Document]] = {eval_set.name: [] for eval_set in eval_sets}
    for document in eval_documents:
        by_set[document.source].append(document)
    index = EvalIndex(spec.decontamination.ngram_size)
    for i, (eval_set, set_stats) in enumerate(zip(eval_sets, stats.eval_sets, strict=True)):
        set_stats.index = index.add(by_set[eval_set.name])
        _check_ngrams(config, eval_set, f"{field}[{i}]", set_stats.index, index.ngram_size)
    return index


def _check_ngrams(config: StageConfig, eval_set: Source, field: str, counts: EvalSetCounts,
                  ngram_size: int) -> None:
    """Raise StageError when every document of an evaluation set is shorter than an n-gram.

    Such a set removes only training documents whose tokens equal one of its documents, which
    almost never happens, so its test text would stay in training.
    """
    if counts.documents_indexed:
        return
    raise StageError(
        config, field,
        f"all {counts.documents} documents of evaluation set {eval_set.name!r} "
        f"('{eval_set.path}') are shorter than spec.decontamination.ngramSize ({ngram_size}) "
        f"tokens (the longest has {counts.max_tokens}), so it contributes no n-grams and "
        "removes only training documents identical to one of its documents; set a smaller "
        f"ngramSize, or check that format {eval_set.format!r} is how the file is written.",
    )


def _filter_contaminated(
    documents: list[Document], features: list[workers.Features], index: EvalIndex | None,
    stats: CorpusStats,
) -> list[workers.Features]:
    if index is None:
        return features
    kept = []
    for item in features:
        if item.overlap is None:
            kept.append(item)
        else:
            removed = documents[item.position]
            stats.filters[DECONTAMINATION].add(
                removed.source, {"id": removed.id, "overlaps": item.overlap}
            )
    return kept


def _redact(
    documents: list[Document], features: list[workers.Features], stats: CorpusStats
) -> list[Document]:
    """Return the kept documents with their redacted text, and count the redactions."""
    kept = []
    for item in features:
        document = documents[item.position]
        document.text = item.redacted
        if item.redactions:
            stats.pii_redactions.update(item.redactions)
            stats.pii_documents += 1
        kept.append(document)
    return kept


def _write_splits(
    output_dir: Path, documents: list[Document], spec: CorpusSpec, stats: CorpusStats
) -> None:
    assignments = split.assign(
        documents, spec.split.validation_fraction, spec.split.seed, spec.shards
    )
    stats.documents_per_shard = split.write_shards(output_dir, documents, assignments, spec.shards)
    stats.words_per_split = {name: 0 for name in SPLITS}
    for document, assignment in zip(documents, assignments, strict=True):
        stats.words_per_split[assignment.split] += word_count(document.text)
        stats.documents_out_by_source[document.source] += 1


def _write_reports(
    name: str, spec: CorpusSpec, output_dir: Path, stats_json: dict[str, Any]
) -> None:
    (output_dir / STATS).write_text(json.dumps(stats_json, indent=2) + "\n", encoding="utf-8")
    card = datacard.render(name, spec.model_dump(mode="json", by_alias=True), stats_json)
    (output_dir / DATA_CARD).write_text(card, encoding="utf-8")


def _metrics(stats: CorpusStats) -> dict[str, Any]:
    return {
        "documentsIn": stats.documents_in,
        "malformed": stats.malformed,
        "removed": {name: item.removed for name, item in stats.filters.items()},
        "documentsOut": stats.documents_out,
        "trainDocuments": stats.split_documents(split.TRAIN),
        "validationDocuments": stats.split_documents(split.VALIDATION),
        "trainWords": stats.words_per_split[split.TRAIN],
        "piiRedactions": dict(sorted(stats.pii_redactions.items())),
        "sourceDigests": stats.source_digests(),
    }
