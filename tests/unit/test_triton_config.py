"""The generated Triton model configs, parsed with Triton's own protobuf schema."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from lathe_trainer.export import repository

LABELS = ["O", "B-Disease", "I-Disease"]


def settings(max_batch_size: int = 8, backend: str = "python") -> repository.RepositorySettings:
    return repository.RepositorySettings(
        model_name="pubmed_ner", id2label=LABELS, max_length=512, bos_id=0, unk_id=2, pad_id=1,
        max_batch_size=max_batch_size, model_backend=backend,
    )


def parse(config: dict) -> model_config_pb2.ModelConfig:
    return text_format.Parse(repository.render_pbtxt(config), model_config_pb2.ModelConfig())


def all_tensors(config: model_config_pb2.ModelConfig) -> list:
    return list(config.input) + list(config.output)


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
@pytest.mark.parametrize("max_batch_size", [0, 1, 8])
def test_every_config_parses(max_batch_size, backend):
    for name, config in repository.model_configs(settings(max_batch_size, backend)).items():
        parsed = parse(config)
        assert parsed.name == name
        assert parsed.max_batch_size == max_batch_size


# Expected dims per tensor with batching on: the batch dimension is left out. Token tensors
# are [windows, sequence] per text.
BATCHED_DIMS = {
    "TEXT": [1], "ENTITIES": [1], "input_ids": [-1, -1], "attention_mask": [-1, -1],
    "OFFSETS": [-1, -1, 2], "WORD_IDS": [-1, -1], "logits": [-1, -1, len(LABELS)],
}


@pytest.mark.parametrize("max_batch_size", [1, 8])
def test_batched_dims_leave_out_batch(max_batch_size):
    for config in repository.model_configs(settings(max_batch_size)).values():
        for tensor in all_tensors(parse(config)):
            assert list(tensor.dims) == BATCHED_DIMS[tensor.name], (config["name"], tensor.name)


def test_unbatched_dims_start_with_batch():
    for config in repository.model_configs(settings(0)).values():
        for tensor in all_tensors(parse(config)):
            assert list(tensor.dims) == [-1] + BATCHED_DIMS[tensor.name], tensor.name


def test_ensemble_wires_three_steps():
    parsed = parse(repository.ensemble_config(settings()))
    steps = parsed.ensemble_scheduling.step
    assert parsed.platform == "ensemble"
    assert [step.model_name for step in steps] == [
        "pubmed_ner_tokenizer", "pubmed_ner_model", "pubmed_ner_postprocess"
    ]
    assert dict(steps[2].input_map)["TEXT"] == "TEXT"
    assert dict(steps[2].output_map) == {"ENTITIES": "ENTITIES"}
    assert parsed.input[0].data_type == model_config_pb2.TYPE_STRING
    assert parsed.output[0].data_type == model_config_pb2.TYPE_STRING


@pytest.mark.parametrize(
    ("backend", "filename", "parameters"),
    [
        ("python", "", {"onnx_file": "model.onnx", "intra_op_num_threads": "0"}),
        ("onnxruntime", "model.onnx", {}),
    ],
)
def test_model_step_backends(backend, filename, parameters):
    parsed = parse(repository.model_config(settings(backend=backend)))
    assert parsed.backend == backend
    assert parsed.default_model_filename == filename
    assert {key: value.string_value for key, value in parsed.parameters.items()} == parameters


def test_tokenizer_parameters_carry_special_ids():
    parsed = parse(repository.tokenizer_config(settings()))
    values = {key: value.string_value for key, value in parsed.parameters.items()}
    assert values == {"max_length": "512", "stride": "128", "bos_id": "0", "unk_id": "2",
                      "pad_id": "1"}


def test_stride_setting_is_checked():
    custom = repository.RepositorySettings("m", LABELS, 64, bos_id=0, unk_id=2, pad_id=1,
                                           stride=8)
    parsed = parse(repository.tokenizer_config(custom))
    assert parsed.parameters["stride"].string_value == "8"
    too_long = repository.RepositorySettings("m", LABELS, 64, bos_id=0, unk_id=2, pad_id=1,
                                             stride=63)
    with pytest.raises(ValueError, match="stride 63 must be in 0..62"):
        repository.model_configs(too_long)


def test_missing_bos_renders_minus_one():
    config = repository.tokenizer_config(
        repository.RepositorySettings("m", LABELS, 64, bos_id=None, unk_id=2, pad_id=1)
    )
    assert parse(config).parameters["bos_id"].string_value == "-1"


def test_unknown_model_backend_is_rejected():
    with pytest.raises(ValueError, match="'tensorrt' is not supported"):
        repository.model_configs(settings(backend="tensorrt"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("a\"b", '"a\\"b"'), ("µg", '"µg"'), (True, "true"), (3, "3"),
     (repository.Enum("KIND_CPU"), "KIND_CPU")],
)
def test_render_value_quotes_strings(value, expected):
    assert repository.render_value(value) == expected


def test_render_escapes_parse_back():
    config = {"name": "x", "parameters": [{"key": "k", "value": {"string_value": "µg \"q\""}}]}
    parsed = parse(config)
    assert parsed.parameters["k"].string_value == "µg \"q\""
