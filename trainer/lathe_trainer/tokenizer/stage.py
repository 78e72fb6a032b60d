"""Workload entry of the Tokenizer stage: `python -m lathe_trainer tokenizer --config FILE`.

Reads the train split of the input Corpus, trains a byte-level BPE with the spec's special
tokens and protected patterns, saves it in the Tokenizer output format (tokenizer.json plus the
`transformers` files), evaluates it on the validation split into report.json, and writes the
manifest last.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator

from pydantic import ValidationError

from lathe.api.common import quote_value
from lathe.api.tokenizer import TokenizerSpec
from lathe.loader import field_path
from lathe_trainer import datasets
from lathe_trainer.stage import (
    ProgressReporter,
    ResolvedInput,
    StageConfig,
    StageError,
    local_path,
    write_manifest,
)
from lathe_trainer.tokenizer import evaluation, patterns, training

log = logging.getLogger(__name__)

REPORT = "report.json"
PHASES = ("counting protected terms", "training", "saving", "evaluating")


class CorpusReader:
    """Texts of one Corpus split, counting records without a string `text` field.

    NB: malformed records are skipped but counted, and the counts land in report.json. A
    Corpus written by the Corpus stage has none.
    """

    def __init__(self, config: StageConfig, corpus: ResolvedInput, split: str):
        self.config = config
        self.corpus = corpus
        self.split = split
        self.documents = 0
        self.malformed = 0

    def __call__(self) -> Iterator[str]:
        self.documents = self.malformed = 0
        try:
            for document in datasets.iter_documents(self.corpus.uri, self.split):
                text = document.get("text") if isinstance(document, dict) else None
                if not isinstance(text, str):
                    self.malformed += 1
                    continue
                self.documents += 1
                yield text
        except json.JSONDecodeError as error:
            raise StageError(
                self.config, "spec.corpusRef",
                f"Corpus {self.corpus.name!r} at {self.corpus.uri} has a {self.split} line that "
                f"is not valid JSON ({error}); rebuild the Corpus.",
            ) from None
        if self.malformed:
            log.warning(
                "Skipped %d %s records of Corpus %s without a string `text` field.",
                self.malformed, self.split, self.corpus.name,
            )


def parse_spec(config: StageConfig) -> TokenizerSpec:
    try:
        return TokenizerSpec.model_validate(config.spec)
    except ValidationError as error:
        first = error.errors()[0]
        field = field_path(("spec", *first["loc"]))
        if first["type"] == "value_error":
            # The spec's validators write the problem and the fix but not the value, so a scalar
            # value goes first, as lathe.loader writes it.
            message = first["msg"].removeprefix("Value error, ").rstrip(".") + "."
            value = first.get("input")
            if isinstance(value, (str, int, float, bool)):
                message = f"invalid value {quote_value(value)}: {message}"
        else:
            message = f"invalid value {first.get('input')!r}: {first['msg']}; correct the value."
        raise StageError(config, field, message) from None


def corpus_input(config: StageConfig) -> ResolvedInput:
    corpus = config.inputs.get("corpus")
    if corpus is None:
        raise StageError(
            config, "spec.corpusRef",
            "no resolved Corpus input named 'corpus' reached the stage; run the Tokenizer "
            "through its plan so that the Corpus it names is resolved first.",
        )
    if not datasets.shard_paths(corpus.uri, "train"):
        raise StageError(
            config, "spec.corpusRef",
            f"Corpus {corpus.name!r} at {corpus.uri} has no train/shard-*.jsonl files; point "
            "corpusRef at a Corpus that finished with a non-empty train split.",
        )
    return corpus


def protected_terms(
    config: StageConfig, spec: TokenizerSpec, matcher: patterns.ProtectedMatcher,
    train_texts: CorpusReader,
) -> tuple[list[str], list[patterns.Vocabulary]]:
    """Return the frequent protected terms of the train split and the vocabulary files."""
    vocabularies = [
        patterns.load_vocabulary(config, index, pattern, spec.lowercase)
        for index, pattern in enumerate(spec.protected_patterns)
    ]
    vocabularies = [vocabulary for vocabulary in vocabularies if vocabulary is not None]
    if not matcher:
        return [], vocabularies
    counts = training.count_protected_terms(train_texts(), matcher, spec.lowercase)
    # Half of the vocabulary stays for the byte tokens and learned merges.
    limit = min(spec.max_protected_terms, spec.vocab_size // 2)
    seen = training.frequent_terms(counts, spec.min_frequency, limit)
    log.info(
        "Found %d distinct protected terms in the train split; %d occur at least %d times and "
        "get their own token.", len(counts), len(seen), spec.min_frequency,
    )
    return seen, vocabularies


def run(config: StageConfig, resume: bool) -> dict:
    spec = parse_spec(config)
    corpus = corpus_input(config)
    output_dir = local_path(config.output_uri)
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        log.info("Tokenizer training keeps no checkpoints; training again from the start.")
    progress = ProgressReporter(config, total=len(PHASES), unit="phases")
    matcher = patterns.compile_patterns(config, spec.protected_patterns, spec.lowercase)
    train_texts = CorpusReader(config, corpus, "train")

    progress.update(0, PHASES[0])
    seen_terms, vocabularies = protected_terms(config, spec, matcher, train_texts)

    progress.update(1, PHASES[1])
    tokenizer = training.build_tokenizer(spec, matcher)
    literals: Counter = Counter()
    training.train(
        tokenizer,
        lambda: training.without_special_literals(train_texts(), spec.special_tokens, literals),
        spec,
        vocab_size=spec.vocab_size - len(seen_terms),
        progress=lambda done: progress.update(1, PHASES[1], documents=done),
    )
    if train_texts.documents == 0:
        raise StageError(
            config, "spec.corpusRef",
            f"Corpus {corpus.name!r} at {corpus.uri} has no usable training documents "
            f"({train_texts.malformed} malformed); rebuild the Corpus.",
        )
    learned = tokenizer.get_vocab_size()
    if learned < spec.vocab_size - len(seen_terms):
        # BPE stops when no pair of tokens is left to merge, so a small corpus gives fewer.
        log.warning("The tokenizer learned %d tokens, fewer than the %d that spec.vocabSize "
                    "(%d) leaves after %d protected terms, because the training split has no "
                    "more pairs to merge; lower vocabSize or add training text.", learned,
                    spec.vocab_size - len(seen_terms), spec.vocab_size, len(seen_terms))
    file_terms = [term for vocabulary in vocabularies for term in vocabulary.terms]
    terms = [*seen_terms, *file_terms]
    tokenizer, added = training.add_terms(tokenizer, terms)
    if terms:
        log.info("Added %d protected terms to the vocabulary; the other %d were tokens of the "
                 "learned vocabulary already.", added, len(set(terms)) - added)

    progress.update(2, PHASES[2])
    training.save(tokenizer, output_dir)

    progress.update(3, PHASES[3])
    validation_texts = CorpusReader(config, corpus, "validation")
    measured = evaluation.evaluate(tokenizer, validation_texts(), matcher)
    if validation_texts.documents == 0:
        log.warning("Corpus %s has no validation documents; the report has no figures.",
                    corpus.name)
    report = {
        "vocab_size": tokenizer.get_vocab_size(),
        "requested_vocab_size": spec.vocab_size,
        "learned_vocab_size": learned,
        "protected_terms_added": added,
        "protected_terms_from_training": len(seen_terms),
        "vocabulary_files": {v.pattern: v.summary() for v in vocabularies},
        "lowercase": spec.lowercase,
        "normalization": "lowercase" if spec.lowercase else "none",
        "train": {
            "documents": train_texts.documents,
            "malformed_records": train_texts.malformed,
            "special_token_literals_removed": dict(literals),
        },
        "validation": {**measured, "malformed_records": validation_texts.malformed},
        "special_token_ids": evaluation.special_token_ids(tokenizer, spec.special_tokens),
        "special_token_fragments": evaluation.special_token_fragments(
            tokenizer, spec.special_tokens
        ),
    }
    (output_dir / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    metrics = summary_metrics(report)
    progress.update(len(PHASES), "done", **metrics)
    write_manifest(config, metrics)
    return metrics


def summary_metrics(report: dict) -> dict:
    """The headline figures for status and the manifest, in the camelCase of the API."""
    validation = report["validation"]
    return {
        "vocabSize": report["vocab_size"],
        "fertility": validation["fertility_tokens_per_word"],
        "bytesPerToken": validation["bytes_per_token"],
        "protectedKeptWholeShare": validation["protected_kept_whole_share"],
        "protectedKeptApartShare": validation["protected_kept_apart_share"],
        "protectedMatches": validation["protected_matches"],
        "validationDocuments": validation["documents"],
        "trainDocuments": report["train"]["documents"],
        # Tokens that BPE fell short of its budget (spec.vocabSize less the protected terms
        # it saw in training), because the training split had no more pairs to merge.
        "vocabShortfall": max(0, report["requested_vocab_size"]
                              - report["protected_terms_from_training"]
                              - report["learned_vocab_size"]),
    }
