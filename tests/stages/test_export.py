"""The export stage of a ModelDeployment on tiny token classifiers and real held-out sentences.

The FineTune output is written here in its format (a random-weight classifier with a byte-level
BPE trained on NCBI-disease abstracts), so these tests do not depend on the FineTune stage.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from tiny_ner_model import build_model

from lathe_trainer.export import stage, window_graph
from lathe_trainer.export.onnx_export import check_inputs
from lathe_trainer.serving.reference import load_model
from lathe_trainer.stage import ResolvedInput, StageError, read_manifest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pubmed" / "05-deployment.yaml"

pytestmark = pytest.mark.slow


def example_resource(**export_overrides) -> dict:
    resource = yaml.safe_load(EXAMPLE.read_text())
    resource["spec"]["export"].update(export_overrides)
    return resource


def finetune_output(root: Path, architecture: str = "llama", fragile: bool = False) -> Path:
    """Write a FineTune-style output (`root/model`); `fragile` makes INT8 ruin the weights."""
    model_dir = build_model(shared_data(), root / "model", architecture)
    if fragile:
        make_quantization_fragile(model_dir)
    return root


def shared_data() -> Path:
    """The real data: $LATHE_DATA_DIR, else ../shared/data beside the repository."""
    repo = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("LATHE_DATA_DIR", repo.parent / "shared" / "data")).resolve()


def make_quantization_fragile(model_dir: Path) -> None:
    """Put one outlier in every Linear weight.

    Per-tensor INT8 quantization then spends its 255 levels on the outlier and rounds almost
    every other weight to zero, while the FP32 model changes in one channel only.
    """
    model = load_model(model_dir)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[0, 0] = 100 * module.weight.abs().max()
    model.save_pretrained(model_dir)


def model_input(root: Path) -> dict[str, ResolvedInput]:
    return {"model": ResolvedInput(kind="FineTune", name="pubmed-ner", uri=f"file://{root}",
                                   digest="sha256:f")}


def weights(path: Path) -> dict[str, bytes]:
    graph = onnx.load(str(path)).graph
    return {item.name: onnx.numpy_helper.to_array(item).tobytes() for item in graph.initializer}


def assert_serves_with_window_axis(repository_model: Path, exported: Path) -> None:
    """The repository's model is `exported` with a window axis: same weights, same logits."""
    assert weights(repository_model) == weights(exported)
    input_ids = np.arange(2 * 3 * 7).reshape(2, 3, 7) % 900 + 3
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 2, 4:] = 0
    attention_mask[1, 1, 1:] = 0
    windowed = onnxruntime.InferenceSession(str(repository_model)).run(
        None, {"input_ids": input_ids, "attention_mask": attention_mask}
    )[0]
    rows = onnxruntime.InferenceSession(str(exported)).run(
        None, {"input_ids": input_ids.reshape(6, 7), "attention_mask": attention_mask.reshape(6, 7)}
    )[0]
    assert windowed.shape == (2, 3, 7, 3)
    np.testing.assert_allclose(windowed.reshape(6, 7, 3), rows, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def llama_output(tmp_path_factory):
    return finetune_output(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, llama_output, data_dir):
    """Run the stage once with the committed example spec."""
    from lathe.api import KINDS
    from lathe.plans import stage_config

    output = tmp_path_factory.mktemp("export")
    resource = example_resource()
    model = KINDS["ModelDeployment"].model_validate(resource)
    config = stage_config(model, model_input(llama_output), f"file://{output}", str(data_dir))
    metrics = stage.run(config, resume=False)
    return output, metrics, json.loads((output / "report.json").read_text())


def test_example_writes_every_output(example_run):
    output, metrics, _ = example_run
    manifest = read_manifest(f"file://{output}")
    assert manifest is not None
    assert manifest["metrics"] == metrics
    assert "model.onnx" in manifest["outputs"]
    assert "report.json" in manifest["outputs"]
    for model in ("pubmed_ner", "pubmed_ner_tokenizer", "pubmed_ner_model",
                  "pubmed_ner_postprocess"):
        assert f"model_repository/{model}/config.pbtxt" in manifest["outputs"]
    # The ensemble's version directory contains a file, so it survives object stores.
    assert "model_repository/pubmed_ner/1/README.txt" in manifest["outputs"]
    # The postprocess step reads the sub-token that the FineTune labelled (a Llama: the last).
    settings = output / "model_repository" / "pubmed_ner_postprocess" / "1" / "decoding.json"
    assert json.loads(settings.read_text()) == {"labelSubtoken": "last"}
    assert json.loads((output / "report.json").read_text())["labelSubtoken"] == "last"


def test_example_checks_every_shape(example_run):
    _, metrics, report = example_run
    shapes = {(item["sequenceLength"], item["batchSize"]) for item in report["checks"]}
    assert shapes == {(length, batch) for length in (3, 20, 200) for batch in (1, 8)}
    assert set(metrics["maxAbsDiffByLength"]) == {"3", "20", "200"}
    assert metrics["maxAbsDiff"] <= report["tolerance"]
    for item in report["checks"]:
        assert item["outputShape"] == [item["batchSize"], item["sequenceLength"], 3]


@pytest.mark.parametrize("length", [3, 200])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_onnx_answers_beyond_example_length(example_run, llama_output, length, batch_size):
    """Exported at length 20, the graph matches PyTorch at other lengths and batch sizes."""
    output, _, report = example_run
    assert report["exampleSequenceLength"] == 20
    session = onnxruntime.InferenceSession(str(output / "model.onnx"))
    stream = np.arange(3, 3 + 997) % 997 + 3
    input_ids, attention_mask = check_inputs(stream, length, batch_size, pad_id=1)
    (logits,) = session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
    model = load_model(llama_output / "model")
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(input_ids),
                         attention_mask=torch.from_numpy(attention_mask)).logits.numpy()
    real = attention_mask.astype(bool)
    assert logits.shape == (batch_size, length, 3)
    assert np.abs(logits - expected)[real].max() < 1e-4


def test_example_quantization_decision_is_consistent(example_run):
    output, metrics, report = example_run
    quantization = report["quantization"]
    assert quantization["enabled"] is True
    assert quantization["deployed"] == (quantization["f1Drop"] <= 0.02)
    assert (output / "model.int8.onnx").exists() == quantization["deployed"]
    assert metrics["servedModel"] == report["servedModel"]
    served = output / report["servedModel"]
    repository_model = output / "model_repository" / "pubmed_ner_model" / "1" / "model.onnx"
    assert_serves_with_window_axis(repository_model, served)
    assert report["windowStride"] == 128
    assert 0.0 <= quantization["tokenAgreement"] <= 1.0
    assert "goldF1Fp32" in quantization


def test_broken_quantization_is_not_deployed(tmp_path, make_config):
    root = finetune_output(tmp_path / "fragile", fragile=True)
    # The outliers scale the logits up, so float rounding alone exceeds the example's 1e-3.
    config = make_config(example_resource(tolerance=1.0), inputs=model_input(root))
    metrics = stage.run(config, resume=False)
    output = Path(config.output_uri.removeprefix("file://"))
    report = json.loads((output / "report.json").read_text())
    assert metrics["quantization"] == "rejected"
    assert metrics["servedModel"] == "model.onnx"
    assert metrics["int8F1Drop"] > 0.02
    assert "so the FP32 model is served" in metrics["quantizationReason"]
    assert not (output / "model.int8.onnx").exists()
    assert report["quantization"]["deployed"] is False
    repository_model = output / "model_repository" / "pubmed_ner_model" / "1" / "model.onnx"
    assert_serves_with_window_axis(repository_model, output / "model.onnx")


def run_tolerant_int8_gpt2(tmp_path: Path, make_config) -> tuple[Path, dict]:
    """Export a GPT-2 classifier with a quantization check that any INT8 model passes."""
    root = finetune_output(tmp_path / "gpt2", architecture="gpt2")
    resource = example_resource(quantization={"enabled": True, "maxF1Drop": 1.0})
    config = make_config(resource, inputs=model_input(root))
    metrics = stage.run(config, resume=False)
    return Path(config.output_uri.removeprefix("file://")), metrics


def test_tolerant_quantization_serves_int8_gpt2(tmp_path, make_config):
    output, metrics = run_tolerant_int8_gpt2(tmp_path, make_config)
    assert metrics["quantization"] == "deployed"
    assert metrics["servedModel"] == "model.int8.onnx"
    assert metrics["int8SizeBytes"] < metrics["onnxSizeBytes"]
    repository_model = output / "model_repository" / "pubmed_ner_model" / "1" / "model.onnx"
    assert_serves_with_window_axis(repository_model, output / "model.int8.onnx")


def test_window_axis_needs_named_inputs():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT64, ["b", "s"])],
    )
    with pytest.raises(ValueError, match="needs inputs \\['input_ids', 'attention_mask'\\]"):
        window_graph.add_window_axis(onnx.helper.make_model(graph))


def test_difference_above_tolerance_fails(tmp_path, make_config, llama_output):
    resource = example_resource(tolerance=1e-12, quantization={"enabled": False})
    config = make_config(resource, inputs=model_input(llama_output))
    with pytest.raises(StageError, match=r"spec.export.tolerance: ONNX Runtime differs from "
                                         r"PyTorch by .* above the tolerance 1e-12"):
        stage.run(config, resume=False)
    assert read_manifest(config.output_uri) is None


def broken_spec(resource: dict, field: str, value) -> dict:
    resource = copy.deepcopy(resource)
    resource["spec"]["export"][field] = value
    return resource


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("heldOutData", "pubmed/ncbi-disease/conll/missing.tsv",
         r"spec.export.heldOutData: .*missing.tsv.* does not exist"),
        ("heldOutData", "pubmed/ncbi-disease/corpus/NCBItestset_corpus.txt",
         r"spec.export.heldOutData: .*NCBItestset_corpus.txt' is read as format 'conll' .* so "
         r"it looks like format 'pubtator'; point it at a CoNLL file"),
        ("checkSequenceLengths", [3, 4096],
         r"spec.export.checkSequenceLengths: the length 4096 is outside 1..512"),
    ],
)
def test_bad_spec_is_rejected(make_config, llama_output, field, value, message):
    resource = broken_spec(example_resource(), field, value)
    config = make_config(resource, inputs=model_input(llama_output))
    with pytest.raises(StageError, match=message):
        stage.run(config, resume=False)


def test_missing_input_is_rejected(make_config):
    config = make_config(example_resource())
    with pytest.raises(StageError, match=r"spec.model.fineTuneRef: no finished FineTune"):
        stage.run(config, resume=False)


def test_model_without_tokenizer_is_rejected(tmp_path, make_config, llama_output):
    root = tmp_path / "incomplete"
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text((llama_output / "model" / "config.json")
                                                .read_text())
    config = make_config(example_resource(), inputs=model_input(root))
    with pytest.raises(StageError, match=r"has no tokenizer.json in .*Rerun the FineTune"):
        stage.run(config, resume=False)


def test_external_data_int8_served_from_its_files(tmp_path, make_config, monkeypatch):
    """With the weights beside the graph, quantization writes its own data file, and the
    repository copies the served model's file."""
    monkeypatch.setattr(stage, "EXTERNAL_DATA_BYTES", 0)
    output, metrics = run_tolerant_int8_gpt2(tmp_path, make_config)
    assert metrics["servedModel"] == "model.int8.onnx"
    assert (output / "model.onnx.data").is_file()
    assert (output / "model.int8.onnx.data").is_file()
    version = output / "model_repository" / "pubmed_ner_model" / "1"
    assert (version / "model.int8.onnx.data").is_file()
    assert not (version / "model.onnx.data").exists()
    assert_serves_with_window_axis(version / "model.onnx", output / "model.int8.onnx")
    manifest = read_manifest(f"file://{output}")
    assert "model.int8.onnx.data" in manifest["outputs"]


def test_window_stride_reaches_repository(tmp_path, make_config, llama_output):
    config = make_config(example_resource(windowStride=16, quantization={"enabled": False}),
                         inputs=model_input(llama_output))
    stage.run(config, resume=False)
    output = Path(config.output_uri.removeprefix("file://"))
    assert json.loads((output / "report.json").read_text())["windowStride"] == 16
    tokenizer_config = (output / "model_repository" / "pubmed_ner_tokenizer" / "config.pbtxt")
    assert 'key: "stride"\n  value {\n    string_value: "16"\n  }' in tokenizer_config.read_text()


def test_window_stride_without_new_text_rejected(make_config, llama_output):
    """The tiny model's window is 512 tokens with bos, so a stride of 511 leaves no new text."""
    config = make_config(example_resource(windowStride=511), inputs=model_input(llama_output))
    with pytest.raises(StageError, match=r"spec.export.windowStride: 511 leaves no new text in "
                       r"a window of 512 tokens .*set it to at most 510, or leave it unset "
                       r"for 128"):
        stage.run(config, resume=False)
