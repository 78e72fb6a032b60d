"""The export stage of a ModelDeployment: FineTune model -> ONNX (+ INT8) -> Triton repository.

Runs as `python -m lathe_trainer export --config FILE` in the export Job (or `lathe run`), after
the FineTune it references has finished. Steps:

1. Read the FineTune output (`model/`: token classifier, tokenizer files, id2label) and the
   held-out sentences (`spec.export.heldOutData`).
2. Export `model.onnx` with dynamic batch and sequence axes, then compare ONNX Runtime with
   PyTorch at each `spec.export.checkSequenceLengths` and batch sizes 1 and 8. A difference
   above `spec.export.tolerance` fails the stage.
3. If `spec.export.quantization.enabled`: write `model.int8.onnx` and score it against the FP32
   model. It is served only when its F1 drop is within `maxF1Drop`; otherwise it is deleted and
   the report says why.
4. Write `model_repository/` (see lathe_trainer.export.repository), `report.json`, and the
   manifest with the metrics.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydantic

from lathe.api.deployment import ModelDeploymentSpec
from lathe_trainer.corpus.sniff import conll_mismatch_message, format_mismatch
from lathe_trainer.export import heldout, onnx_export, quantize, repository
from lathe_trainer.serving import decoding, reference
from lathe_trainer.stage import (
    MANIFEST,
    ProgressReporter,
    StageConfig,
    StageError,
    local_path,
    resolve_data_path,
    write_manifest,
)

log = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPOSITORY_DIR = "model_repository"
REPORT_FILE = "report.json"
# A model file is one protobuf, which is capped at 2 GiB. Models with more parameter bytes
# than this keep their weights in `<file>.data` beside the graph (ONNX external data), with
# room left for the graph and the small tensors that stay inside it.
EXTERNAL_DATA_BYTES = 1024**3
STEPS = ("read", "export", "check", "quantize", "repository")


def parse_spec(config: StageConfig) -> ModelDeploymentSpec:
    try:
        return ModelDeploymentSpec.model_validate(config.spec)
    except pydantic.ValidationError as error:
        raise StageError(config, "spec", f"the spec is invalid: {error}") from None


def model_directory(config: StageConfig) -> Path:
    """Return the FineTune's `model/` directory, checking that it looks like one."""
    item = config.inputs.get("model")
    if item is None:
        raise StageError(
            config, "spec.model.fineTuneRef", "no finished FineTune was resolved as the input "
            "`model`; reference a FineTune that has succeeded."
        )
    directory = local_path(item.uri) / "model"
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise StageError(
                config, "spec.model.fineTuneRef", f"{item.kind} {item.name!r} has no {name} in "
                f"{directory}; its output is not a FineTune model. Rerun the FineTune."
            )
    return directory


def read_settings(config: StageConfig, model_dir: Path) -> reference.ModelSettings:
    try:
        return reference.read_model_settings(model_dir)
    except reference.ModelFormatError as error:
        raise StageError(config, "spec.model.fineTuneRef", str(error)) from None


def read_sentences(config: StageConfig, spec: ModelDeploymentSpec) -> list:
    path = resolve_data_path(config, spec.export.held_out_data)
    guess = format_mismatch(path, "conll") if path.is_file() else None
    if guess is not None:
        raise StageError(config, "spec.export.heldOutData", conll_mismatch_message(path, guess))
    try:
        sentences = heldout.read_held_out(path, spec.export.held_out_sentences)
    except (ValueError, UnicodeDecodeError) as error:
        raise StageError(
            config, "spec.export.heldOutData", f"{spec.export.held_out_data!r} cannot be used: "
            f"{error}. Point it at a CoNLL file (`token<TAB>tag` lines) under the data directory."
        ) from None
    return sentences


def window_stride(
    config: StageConfig, spec: ModelDeploymentSpec, settings: reference.ModelSettings
) -> int:
    """Return spec.export.windowStride, or the default for the model's window."""
    stride = spec.export.window_stride
    if stride is None:
        return decoding.default_stride(settings.max_length)
    try:
        decoding.check_window(settings.special, settings.max_length, stride)
    except ValueError:
        largest = decoding.largest_stride(settings.max_length, settings.special.bos is not None)
        raise StageError(
            config, "spec.export.windowStride", f"{stride} leaves no new text in a window of "
            f"{settings.max_length} tokens (the FineTune's maxLength); set it to at most "
            f"{largest}, or leave it unset for {decoding.default_stride(settings.max_length)}."
        ) from None
    return stride


def check_lengths(config: StageConfig, lengths: list[int], max_length: int) -> None:
    for length in lengths:
        if not 1 <= length <= max_length:
            raise StageError(
                config, "spec.export.checkSequenceLengths", f"the length {length} is outside "
                f"1..{max_length}, the model's maximum sequence length; use lengths in that range."
            )


def load_model(model_dir: Path):
    # Eager attention exports to plain ONNX ops; the fused SDPA kernel is no faster on ONNX
    # Runtime and only adds a second code path to check.
    return reference.load_model(model_dir, attn_implementation="eager")


def needs_external_data(model) -> bool:
    """Return whether the model's weights must go beside the ONNX graph (EXTERNAL_DATA_BYTES)."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return parameter_bytes > EXTERNAL_DATA_BYTES


def data_file(model_file: str) -> str:
    """Return the name of the external data file that the exporters write beside a model."""
    return f"{model_file}.data"


def file_bytes(output: Path, model_file: str) -> int:
    """Return the size of a model file with its external data file, if it has one."""
    extra = output / data_file(model_file)
    return (output / model_file).stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def token_stream(encoded: dict[str, np.ndarray]) -> np.ndarray:
    """Concatenate the real tokens of an encoded batch into one id sequence."""
    return encoded["input_ids"][encoded["attention_mask"].astype(bool)]


def export_and_check(
    config: StageConfig, spec: ModelDeploymentSpec, model, output: Path, stream: np.ndarray,
    pad_id: int, progress: ProgressReporter,
) -> dict[str, Any]:
    fp32_path = output / FP32_FILE
    external = needs_external_data(model)
    if external:
        log.info("The weights are over %d MiB, so they go to %s beside the graph.",
                 EXTERNAL_DATA_BYTES // 1024**2, data_file(FP32_FILE))
    onnx_export.export_onnx(model, fp32_path, spec.export.opset, model.config.vocab_size,
                            external_data=external)
    opset = onnx_export.exported_opset(fp32_path)
    if opset != spec.export.opset:
        raise StageError(
            config, "spec.export.opset", f"the exporter wrote opset {opset} instead of "
            f"{spec.export.opset}; set spec.export.opset to {opset}."
        )
    progress.update(2, "Exported the model to ONNX.")
    checks = onnx_export.compare_with_pytorch(
        model, fp32_path, stream, spec.export.check_sequence_lengths, pad_id
    )
    worst = worst_check(checks)
    # NB: `not <=` so that a NaN difference fails too.
    if not worst["maxAbsDiff"] <= spec.export.tolerance:
        raise StageError(
            config, "spec.export.tolerance", f"ONNX Runtime differs from PyTorch by "
            f"{worst['maxAbsDiff']:.3g} at sequence length {worst['sequenceLength']} and batch "
            f"size {worst['batchSize']}, above the tolerance {spec.export.tolerance}. The "
            "exported graph is wrong at that shape; check the exporter's warnings in the log "
            "before raising the tolerance."
        )
    progress.update(3, "ONNX Runtime matches PyTorch.", maxAbsDiff=worst["maxAbsDiff"])
    return {"opset": opset, "checks": checks}


def worst_check(checks: list[dict]) -> dict:
    """Return the check with the largest difference, or the first with a NaN difference.

    NB: max() alone would pass over a NaN after the first item, because every comparison
    with NaN is false.
    """
    return max(checks, key=lambda item: (math.isnan(item["maxAbsDiff"]), item["maxAbsDiff"]))


def max_diff_by_length(checks: list[dict]) -> dict[str, float]:
    by_length: dict[str, list[dict]] = {}
    for item in checks:
        by_length.setdefault(str(item["sequenceLength"]), []).append(item)
    return {length: worst_check(items)["maxAbsDiff"] for length, items in by_length.items()}


def run_quantization(
    spec: ModelDeploymentSpec, output: Path, sentences: list, encode,
    model: reference.ModelSettings,
) -> dict[str, Any]:
    settings = spec.export.quantization
    if not settings.enabled:
        return {"enabled": False, "deployed": False,
                "reason": "Quantization is disabled in spec.export.quantization."}
    int8_path = output / INT8_FILE
    quantize.quantize(output / FP32_FILE, int8_path,
                      external_data=(output / data_file(FP32_FILE)).exists())
    record = quantize.compare_quantized(
        output / FP32_FILE, int8_path, sentences, encode, model.id2label, model.label_subtoken,
        settings.max_f1_drop,
    )
    record["enabled"] = True
    record["sizeBytes"] = file_bytes(output, INT8_FILE)
    if not record["deployed"]:
        # Only the served model stays in the output, so no one deploys the rejected file.
        int8_path.unlink()
        (output / data_file(INT8_FILE)).unlink(missing_ok=True)
    return record


def clear_outputs(output: Path) -> None:
    """Remove what an earlier attempt left, so that every output comes from this attempt.

    The manifest goes first: it must not vouch for a repository this attempt is rewriting,
    which Triton pods that start meanwhile would copy.
    """
    for name in (MANIFEST, FP32_FILE, data_file(FP32_FILE), INT8_FILE, data_file(INT8_FILE),
                 REPORT_FILE):
        (output / name).unlink(missing_ok=True)
    shutil.rmtree(output / REPOSITORY_DIR, ignore_errors=True)


def run(config: StageConfig, resume: bool) -> dict:
    """Export, check, optionally quantize and write the Triton repository; return metrics.

    `resume` changes nothing: the stage takes minutes at most, so a retry starts over.
    """
    spec = parse_spec(config)
    output = local_path(config.output_uri)
    output.mkdir(parents=True, exist_ok=True)
    clear_outputs(output)
    progress = ProgressReporter(config, total=len(STEPS), unit="steps")

    model_dir = model_directory(config)
    settings = read_settings(config, model_dir)
    check_lengths(config, spec.export.check_sequence_lengths, settings.max_positions)
    stride = window_stride(config, spec, settings)
    sentences = read_sentences(config, spec)
    tokenizer = decoding.load_tokenizer(str(model_dir / "tokenizer.json"))

    # The checks see texts in the windows that Triton will cut.
    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        return decoding.encode_texts(tokenizer, texts, settings.special, settings.max_length,
                                     stride)

    model = load_model(model_dir)
    progress.update(1, f"Read the model and {len(sentences)} held-out sentences.")

    stream = token_stream(encode([sentence.text for sentence in sentences]))
    exported = export_and_check(config, spec, model, output, stream, settings.special.pad,
                                progress)
    quantization = run_quantization(spec, output, sentences, encode, settings)
    served = INT8_FILE if quantization["deployed"] else FP32_FILE
    progress.update(4, quantization["reason"])

    repository_settings = repository.RepositorySettings(
        model_name=spec.model_name,
        id2label=settings.id2label,
        label_subtoken=settings.label_subtoken,
        max_length=settings.max_length,
        bos_id=settings.special.bos,
        unk_id=settings.special.unk,
        pad_id=settings.special.pad,
        max_batch_size=spec.serving.max_batch_size,
        model_backend=spec.serving.model_backend,
        stride=stride,
    )
    repository.write_repository(
        output / REPOSITORY_DIR, repository_settings, output / served, model_dir / "tokenizer.json"
    )
    progress.update(5, f"Wrote the Triton repository for {spec.model_name!r} serving {served}.")

    report = {
        "modelName": spec.model_name,
        "exporter": "torch.onnx dynamo",
        "opset": exported["opset"],
        "exampleSequenceLength": onnx_export.EXAMPLE_SEQUENCE_LENGTH,
        "tolerance": spec.export.tolerance,
        "checks": exported["checks"],
        "quantization": quantization,
        "servedModel": served,
        "modelBackend": spec.serving.model_backend,
        "maxBatchSize": spec.serving.max_batch_size,
        "maxSequenceLength": settings.max_positions,
        "windowLength": settings.max_length,
        "windowStride": repository_settings.window_stride,
        "labels": settings.id2label,
        "labelSubtoken": settings.label_subtoken,
        "heldOutSentences": len(sentences),
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    metrics = {
        "maxAbsDiffByLength": max_diff_by_length(exported["checks"]),
        "maxAbsDiff": worst_check(exported["checks"])["maxAbsDiff"],
        "quantization": "deployed" if quantization["deployed"] else (
            "rejected" if quantization["enabled"] else "disabled"),
        "quantizationReason": quantization["reason"],
        "servedModel": served,
        "onnxSizeBytes": file_bytes(output, FP32_FILE),
        "modelName": spec.model_name,
    }
    if quantization["enabled"]:
        metrics["int8SizeBytes"] = quantization["sizeBytes"]
        metrics["int8F1Drop"] = quantization["f1Drop"]
    write_manifest(config, metrics)
    return metrics
