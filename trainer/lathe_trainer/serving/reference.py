"""The in-process NER model: the answer that Triton's answer is compared with.

`predict_entities` runs a FineTune output (`model/`, an `AutoModelForTokenClassification` with
its tokenizer files) in PyTorch, with the same tokenization and IOB decoding
(`lathe_trainer.serving.decoding`) as the Triton ensemble. Tests and `lathe run` use it to check
that a served model returns what the trained model returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lathe_trainer.serving import decoding

# Sequence-length limit for configs that name none (RoPE models have no hard limit).
DEFAULT_MAX_LENGTH = 512


# Hugging Face writes int(1e30) as tokenizer_config.json's model_max_length when no limit is
# set, so any value from here up means no limit.
_NO_LIMIT = 10**12


@dataclass(frozen=True)
class ModelSettings:
    """Labels, special token ids and lengths that serving reads from a model directory.

    `max_length` is the window that serving tags a text in: the length the FineTune trained
    on (its tokenizer's `model_max_length`), at most `max_positions`, the model's own limit.
    """

    id2label: list[str]
    special: decoding.SpecialIds
    max_length: int
    max_positions: int
    label_subtoken: str


class ModelFormatError(ValueError):
    """A model directory that is not a FineTune token-classification output."""


def read_model_settings(model_dir: Path) -> ModelSettings:
    """Read labels, padding id and maximum length from `model_dir/config.json`."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelFormatError(
            f"{config_file} is missing; the model directory must be a FineTune output in "
            "Hugging Face format."
        )
    config = json.loads(config_file.read_text())
    raw = config.get("id2label") or {}
    try:
        id2label = [raw[str(index)] for index in range(len(raw))]
    except KeyError as missing:
        raise ModelFormatError(
            f"{config_file}: id2label has no label for id {missing}; the ids must be 0..N-1."
        ) from None
    if len(id2label) < 2 or "O" not in id2label:
        raise ModelFormatError(
            f"{config_file}: id2label {raw!r} is not an IOB label set with `O`; export a "
            "token-classification FineTune."
        )
    label_subtoken = config.get(decoding.LABEL_SUBTOKEN_KEY, decoding.FIRST_SUBTOKEN)
    if label_subtoken not in decoding.LABEL_SUBTOKENS:
        raise ModelFormatError(
            f"{config_file}: {decoding.LABEL_SUBTOKEN_KEY} is {label_subtoken!r}; it must be one "
            f"of {', '.join(decoding.LABEL_SUBTOKENS)}, as the FineTune stage writes it."
        )
    max_positions = config_max_positions(config)
    # A causal model tags best in windows no longer than the sentences it was fine-tuned on,
    # because it never learned positions beyond them.
    trained = _tokenizer_max_length(model_dir)
    max_length = min(max_positions, trained) if trained else max_positions
    return ModelSettings(
        id2label, read_special_ids(model_dir), max_length, max_positions, label_subtoken
    )


# The config.json key in which each PretrainJob architecture stores spec.model's maximum
# positions, as lathe_trainer.pretrain.model writes it (tests/unit/test_consistency.py compares
# them). T5's relative positions have no limit, although older t5 configs carry an
# `n_positions` that no layer reads, so the export limits t5 models to DEFAULT_MAX_LENGTH.
POSITION_KEYS: dict[str, str | None] = {
    "llama": "max_position_embeddings",
    "gpt2": "n_positions",
    "bert": "max_position_embeddings",
    "t5": None,
}


def position_limit(config: dict[str, Any]) -> int | None:
    """Return the maximum positions that a model's config.json contents declare, or None when
    the architecture has no limit or the value is no positive integer."""
    model_type = config.get("model_type")
    if model_type in POSITION_KEYS:
        key = POSITION_KEYS[model_type]
        keys = (key,) if key else ()
    else:
        keys = ("max_position_embeddings", "n_positions")
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def config_max_positions(config: dict[str, Any]) -> int:
    """Return the maximum sequence length of a model from its config.json contents."""
    return position_limit(config) or DEFAULT_MAX_LENGTH


def _tokenizer_max_length(model_dir: Path) -> int | None:
    """Return tokenizer_config.json's model_max_length, or None when it sets no limit."""
    try:
        value = json.loads((model_dir / "tokenizer_config.json").read_text())["model_max_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if 1 < value < _NO_LIMIT else None


def read_special_ids(model_dir: Path) -> decoding.SpecialIds:
    """Read bos, unk and pad ids from the saved tokenizer, as the FineTune stage uses them."""
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise ModelFormatError(
            f"{model_dir / 'tokenizer.json'} is missing; the FineTune output must include its "
            "tokenizer files."
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.unk_token_id is None:
        raise ModelFormatError(
            f"The tokenizer in {model_dir} has no unk token; Lathe tokenizers define `<unk>`."
        )
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return decoding.SpecialIds(bos=tokenizer.bos_token_id, unk=tokenizer.unk_token_id, pad=pad)


def load_model(model_dir: Path, attn_implementation: str | None = None) -> Any:
    """Load the token classifier in eval mode on the CPU."""
    from transformers import AutoModelForTokenClassification

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForTokenClassification.from_pretrained(model_dir, **kwargs)
    return model.eval()


def predict_entities(
    model_dir: Path, texts: list[str], batch_size: int = 8, stride: int | None = None
) -> list[list[dict[str, Any]]]:
    """Return the entities of each text as `{"start", "end", "text", "label"}` dicts.

    Texts longer than the model's maximum length are split into windows that overlap by
    `stride` tokens (default: `decoding.default_stride`), as in the Triton ensemble.
    """
    import torch

    model_dir = Path(model_dir)
    settings = read_model_settings(model_dir)
    tokenizer = decoding.load_tokenizer(str(model_dir / "tokenizer.json"))
    model = load_model(model_dir)

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = model(
                input_ids=torch.from_numpy(input_ids),
                attention_mask=torch.from_numpy(attention_mask),
            ).logits
        return logits.float().numpy()

    results: list[list[dict[str, Any]]] = []
    for first in range(0, len(texts), batch_size):
        chunk = texts[first:first + batch_size]
        encoded = decoding.encode_texts(
            tokenizer, chunk, settings.special, settings.max_length, stride
        )
        logits = decoding.run_windows(
            run, encoded["input_ids"], encoded["attention_mask"], len(settings.id2label)
        )
        results += decoding.entities_from_logits(
            chunk, logits, encoded["offsets"], encoded["word_ids"], settings.id2label,
            settings.label_subtoken,
        )
    return results
