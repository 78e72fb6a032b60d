"""INT8 dynamic quantization of the exported model and its check against the FP32 model.

The export stage quantizes `model.onnx` when `spec.export.quantization.enabled`, runs both
models on the held-out sentences and scores the INT8 entities against the FP32 entities. The
drop (1 - F1 against FP32) must stay within `maxF1Drop`, or the FP32 model is served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lathe_trainer.serving import decoding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOutSentence:
    """A held-out sentence as text, with its gold entities when the data is labelled."""

    text: str
    gold: list[dict[str, Any]]


def quantize(fp32_path: Path, int8_path: Path, external_data: bool = False) -> None:
    """Quantize the constant weights of MatMul and Gemm ops to signed INT8, per tensor.

    Activations are quantized at run time (dynamic quantization), so no calibration data is
    needed. ONNX Runtime logs a warning that recommends shape-inference preprocessing; it is
    skipped, and `compare_quantized` measures the result either way. With `external_data`, the
    weights go to `<int8_path>.data`, as for the FP32 model.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("Quantizing %s to INT8 as %s.", fp32_path.name, int8_path.name)
    # ONNX Runtime logs a line per skipped MatMul at INFO through the root logger. Only its
    # warnings reach stage.log, so the stage's own lines stay readable.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
                         use_external_data_format=external_data)
    finally:
        root.setLevel(level)


def run_onnx(
    path: Path, encoded_batches: list[dict[str, np.ndarray]], num_labels: int
) -> list[np.ndarray]:
    """Return the [batch, windows, sequence, labels] logits of each encoded batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    return [
        decoding.run_windows(run, batch["input_ids"], batch["attention_mask"], num_labels)
        for batch in encoded_batches
    ]


def span_key(entity: dict[str, Any]) -> tuple:
    return entity["start"], entity["end"], entity["label"]


def entity_f1(predicted: list[list[dict]], reference: list[list[dict]]) -> float:
    """Exact-match entity F1 of `predicted` against `reference` (1.0 when both are empty)."""
    true_positives = predicted_count = reference_count = 0
    for mine, theirs in zip(predicted, reference):
        mine_keys = {span_key(entity) for entity in mine}
        theirs_keys = {span_key(entity) for entity in theirs}
        true_positives += len(mine_keys & theirs_keys)
        predicted_count += len(mine_keys)
        reference_count += len(theirs_keys)
    if predicted_count == 0 and reference_count == 0:
        return 1.0
    return 2 * true_positives / (predicted_count + reference_count)


def compare_quantized(
    fp32_path: Path,
    int8_path: Path,
    sentences: list[HeldOutSentence],
    encode: Any,
    id2label: list[str],
    label_subtoken: str,
    max_f1_drop: float,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Score the INT8 model against the FP32 model and decide whether INT8 is served.

    `encode(texts)` returns the arrays of `decoding.encode_texts`. Returns the report record:
    agreement figures, gold F1 of both models when the sentences are labelled, and the decision.
    """
    texts = [sentence.text for sentence in sentences]
    chunks = [texts[first:first + batch_size] for first in range(0, len(texts), batch_size)]
    batches = [encode(chunk) for chunk in chunks]
    predictions: dict[str, list[list[dict]]] = {"fp32": [], "int8": []}
    token_labels: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        for chunk, batch, logits in zip(chunks, batches, run_onnx(path, batches, len(id2label))):
            predictions[name] += decoding.entities_from_logits(
                chunk, logits, batch["offsets"], batch["word_ids"], id2label, label_subtoken
            )
            real = batch["word_ids"] != decoding.NO_WORD
            token_labels[name].append(logits.argmax(-1)[real])
    agreement = entity_f1(predictions["int8"], predictions["fp32"])
    fp32_tokens = np.concatenate(token_labels["fp32"])
    int8_tokens = np.concatenate(token_labels["int8"])
    drop = 1.0 - agreement
    record: dict[str, Any] = {
        "sentences": len(sentences),
        "fp32Entities": sum(len(items) for items in predictions["fp32"]),
        "int8Entities": sum(len(items) for items in predictions["int8"]),
        "entityF1VsFp32": agreement,
        "f1Drop": drop,
        "maxF1Drop": max_f1_drop,
        "tokenAgreement": float((fp32_tokens == int8_tokens).mean()) if len(fp32_tokens) else 1.0,
    }
    gold = [sentence.gold for sentence in sentences]
    if any(gold):
        record["goldF1Fp32"] = entity_f1(predictions["fp32"], gold)
        record["goldF1Int8"] = entity_f1(predictions["int8"], gold)
    record["deployed"] = drop <= max_f1_drop
    if record["deployed"]:
        record["reason"] = (
            f"The INT8 model agrees with the FP32 model at entity F1 {agreement:.4f} (drop "
            f"{drop:.4f} <= maxF1Drop {max_f1_drop}), so it is served."
        )
    else:
        record["reason"] = (
            f"The INT8 model agrees with the FP32 model only at entity F1 {agreement:.4f} (drop "
            f"{drop:.4f} > maxF1Drop {max_f1_drop}), so the FP32 model is served."
        )
    log.info(record["reason"])
    return record
