"""Give an exported token classifier a window axis, for the Triton model repository.

The exported graph takes [batch, sequence] inputs. The ensemble splits each text into windows
(`lathe_trainer.serving.decoding.split_windows`), so its tensors are [batch, windows, sequence]
and the batch axis stays the request's batch, as Triton requires of every step. The served
copy of the graph flattens the first two axes, runs the original graph on
[batch * windows, sequence] and restores them on the logits. Both model backends (the Python
step and Triton's ONNX Runtime backend) serve this one file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import helper

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
# Internal names for the original graph's inputs and output, which the new ones replace.
ROWS_PREFIX = "lathe_rows_"


def rename_values(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename values in every node of `graph`, including subgraphs that read outer values."""
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                rename_values(attribute.g, renames)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    rename_values(subgraph, renames)
    for value in graph.value_info:
        value.name = renames.get(value.name, value.name)


def windowed_value(value: onnx.ValueInfoProto, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, dims)


def add_window_axis(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return `model` changed to take [batch, windows, sequence] inputs (modified in place)."""
    graph = model.graph
    inputs = {value.name: value for value in graph.input}
    outputs = {value.name: value for value in graph.output}
    missing = [name for name in INPUT_NAMES if name not in inputs]
    if missing or OUTPUT_NAME not in outputs:
        raise ValueError(
            f"The ONNX graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}; a window "
            f"axis needs inputs {list(INPUT_NAMES)} and the output {OUTPUT_NAME!r}."
        )
    renames = {name: ROWS_PREFIX + name for name in INPUT_NAMES + (OUTPUT_NAME,)}
    rename_values(graph, renames)

    label_dim = outputs[OUTPUT_NAME].type.tensor_type.shape.dim[-1]
    labels = label_dim.dim_value or label_dim.dim_param or "labels"
    window_dims = ["batch", "windows", "sequence"]
    new_inputs = [windowed_value(inputs[name], window_dims) for name in INPUT_NAMES]
    new_output = windowed_value(outputs[OUTPUT_NAME], window_dims + [labels])
    for name, value in zip(INPUT_NAMES, new_inputs):
        inputs[name].CopyFrom(value)
    outputs[OUTPUT_NAME].CopyFrom(new_output)

    # Flatten(axis=2) turns [batch, windows, sequence] into [batch * windows, sequence].
    flatten = [
        helper.make_node("Flatten", [name], [renames[name]], axis=2) for name in INPUT_NAMES
    ]
    rows_logits = renames[OUTPUT_NAME]
    restore = [
        helper.make_node("Shape", [INPUT_NAMES[0]], [ROWS_PREFIX + "window_shape"], end=2),
        helper.make_node("Shape", [rows_logits], [ROWS_PREFIX + "token_shape"], start=1),
        helper.make_node(
            "Concat", [ROWS_PREFIX + "window_shape", ROWS_PREFIX + "token_shape"],
            [ROWS_PREFIX + "logits_shape"], axis=0,
        ),
        helper.make_node("Reshape", [rows_logits, ROWS_PREFIX + "logits_shape"], [OUTPUT_NAME]),
    ]
    nodes = flatten + list(graph.node) + restore
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def external_files(model: onnx.ModelProto) -> list[str]:
    """Return the files, relative to the model file, that hold its external tensor data."""
    return sorted({
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    })


def write_windowed(source: Path, target: Path) -> None:
    """Write the graph at `source` with a window axis to `target`, and check it.

    External tensor data stays in its files, which are copied beside `target` under their
    names, so a model over 2 GiB never passes through one protobuf.
    """
    model = add_window_axis(onnx.load(str(source), load_external_data=False))
    onnx.save(model, str(target))
    for name in external_files(model):
        shutil.copyfile(source.parent / name, target.parent / name)
    # onnx checks a model over 2 GiB only from its path, which also covers the data files.
    onnx.checker.check_model(str(target))
