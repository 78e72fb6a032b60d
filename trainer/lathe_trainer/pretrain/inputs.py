"""Parsing and checks of the PretrainJob's inputs: spec, Tokenizer output and Corpus output.

Every check raises StageError naming the field, the bad value and the fix, before any process
starts training.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from transformers import PreTrainedTokenizerFast

from lathe.api.pretrain import PretrainJobSpec
from lathe_trainer import datasets
from lathe_trainer.pretrain import objectives
from lathe_trainer.pretrain.data import END_OF_TEXT
from lathe_trainer.pretrain.model import PAD
from lathe_trainer.stage import StageConfig, StageError, local_path

# The tokenizer files that `PreTrainedTokenizerFast.save_pretrained` writes (transformers 5);
# the ones present are copied next to the final model so that it loads on its own.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def parse_spec(config: StageConfig) -> PretrainJobSpec:
    """Parse config.spec, including the cross-field rules that the API server checks too."""
    try:
        spec = PretrainJobSpec.model_validate(config.spec)
    except ValidationError as error:
        raise StageError(config, "spec", f"invalid PretrainJob spec: {error}") from error
    return spec


def input_uri(config: StageConfig, role: str, field: str) -> str:
    if role not in config.inputs:
        raise StageError(
            config, field,
            f"the stage config has no resolved `{role}` input (inputs: "
            f"{sorted(config.inputs)}); the plan must resolve {field} before the stage runs.",
        )
    return config.inputs[role].uri


def load_tokenizer(config: StageConfig) -> tuple[PreTrainedTokenizerFast, Path]:
    """Load the Tokenizer output directory and check that it has the end-of-text token."""
    uri = input_uri(config, "tokenizer", "spec.tokenizerRef")
    directory = local_path(uri)
    name = config.inputs["tokenizer"].name
    if not (directory / "tokenizer.json").is_file():
        raise StageError(
            config, "spec.tokenizerRef",
            f"the output of Tokenizer {name!r} at {directory} has no tokenizer.json; run the "
            "Tokenizer to completion or point tokenizerRef at a finished one.",
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
    if END_OF_TEXT not in tokenizer.get_vocab():
        raise StageError(
            config, "spec.tokenizerRef",
            f"Tokenizer {name!r} has no {END_OF_TEXT!r} token, which separates documents in "
            f"packed sequences; add {END_OF_TEXT!r} to the Tokenizer's specialTokens.",
        )
    return tokenizer, directory


def corpus_uri(config: StageConfig) -> str:
    uri = input_uri(config, "corpus", "spec.corpusRef")
    if not datasets.shard_paths(uri, "train"):
        raise StageError(
            config, "spec.corpusRef",
            f"the output of Corpus {config.inputs['corpus'].name!r} at {local_path(uri)} has "
            "no train/shard-*.jsonl files; run the Corpus to completion first.",
        )
    return uri


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def build_objective(
    config: StageConfig, spec: PretrainJobSpec, tokenizer: PreTrainedTokenizerFast,
    model_vocab_size: int,
) -> objectives.Objective:
    """Return the objective of spec.model, checking the tokens it needs."""
    name = spec.model.training_objective()
    if name == "maskedLM":
        mask_id = tokenizer.get_vocab().get(tokenizer.mask_token or objectives.MASK)
        if mask_id is None:
            raise StageError(
                config, "spec.tokenizerRef",
                f"Tokenizer {config.inputs['tokenizer'].name!r} has no mask token "
                f"{objectives.MASK!r}, which architecture bert needs for masked language "
                f"modelling; add {objectives.MASK!r} to the Tokenizer's specialTokens and run "
                "the Tokenizer again.",
            )
        # NB: the Tokenizer stage's output declares only its first special tokens as such, so
        # the mask token is added here: a literal `<mask>` in the corpus is never masked.
        special_ids = sorted({*tokenizer.all_special_ids, mask_id})
        return objectives.MaskedLM(mask_id, len(tokenizer), special_ids)
    if name == "spanCorruption":
        _check_span_counts(config, spec)
        vocab = tokenizer.get_vocab()
        if PAD not in vocab:
            raise StageError(
                config, "spec.tokenizerRef",
                f"Tokenizer {config.inputs['tokenizer'].name!r} has no {PAD!r} token, which "
                f"architecture t5 uses to start decoding; add {PAD!r} to the Tokenizer's "
                "specialTokens and run the Tokenizer again.",
            )
        return objectives.SpanCorruption(model_vocab_size, vocab[END_OF_TEXT], vocab[PAD])
    return objectives.CausalLM()


def _check_span_counts(config: StageConfig, spec: PretrainJobSpec) -> None:
    for field, length in spec.sequence_lengths().items():
        _, spans = objectives.span_counts(length)
        if spans > objectives.T5_SENTINELS:
            raise StageError(
                config, field,
                f"{length} tokens hold {spans} noise spans under span corruption, more than "
                f"the {objectives.T5_SENTINELS} sentinel tokens of architecture t5; lower "
                f"{field}.",
            )
