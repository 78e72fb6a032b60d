"""Write the Triton model repository that serves an exported NER model: text in, entities out.

The export stage calls `write_repository` after the ONNX check. The repository holds an ensemble
named after `spec.modelName` and its three steps:

    <name>_tokenizer   Python backend: TEXT -> input_ids, attention_mask, OFFSETS, WORD_IDS
    <name>_model       input_ids, attention_mask -> logits, in one of two forms:
                         "python":      a Python-backend model that calls ONNX Runtime, for
                                        Triton builds with only the Python backend, such as
                                        the one in the `nvidia-pytriton` wheel;
                         "onnxruntime": Triton's own ONNX Runtime backend, for the cluster
                                        image that ships it (same file, same tensor names)
    <name>_postprocess Python backend: logits, OFFSETS, WORD_IDS, TEXT -> ENTITIES
    <name>             ensemble:       TEXT (TYPE_STRING) -> ENTITIES (TYPE_STRING, JSON spans)

The tokenizer splits a text longer than `max_length` tokens into windows that overlap by
`stride` tokens of left context, so the tensors between the steps are [batch, windows,
sequence] (OFFSETS and logits add a last axis), and `model.onnx` is the exported graph with a
window axis added (`lathe_trainer.export.window_graph`).

`config.pbtxt` files are rendered from plain dicts by `render_pbtxt`. NB: when
`max_batch_size > 0`, Triton adds the batch dimension itself, so `dims` must leave it out;
when it is 0, `dims` is the full shape and starts with the batch dimension (-1). Either way a
request sends TEXT as [batch, 1] and gets ENTITIES back as [batch, 1].
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lathe_trainer.export import window_graph
from lathe_trainer.serving import decoding

MODELS_DIR = Path(__file__).resolve().parent.parent / "serving" / "models"
DECODING_FILE = MODELS_DIR.parent / "decoding.py"
# The name under which the shared decoding module is copied beside each Python model.
DECODING_MODULE = "ner_decoding.py"
MODEL_BACKENDS = ("python", "onnxruntime")
# Decoding settings of the postprocess step, beside its labels.json.
POSTPROCESS_SETTINGS = "decoding.json"


class Enum(str):
    """A protobuf enum value, rendered without quotes (TYPE_STRING, KIND_CPU)."""


@dataclass(frozen=True)
class RepositorySettings:
    """What the repository needs to know about the model and the server."""

    model_name: str
    id2label: list[str]
    max_length: int
    bos_id: int | None
    unk_id: int
    pad_id: int
    max_batch_size: int = 8
    model_backend: str = "python"
    instance_count: int = 1
    # The sub-token whose logits label a word (decoding.LABEL_SUBTOKENS); "first" for models
    # fine-tuned before the FineTune stage recorded it.
    label_subtoken: str = decoding.FIRST_SUBTOKEN
    # Tokens of left context that each window after the first repeats; None: the default,
    # decoding.default_stride(max_length).
    stride: int | None = None

    @property
    def window_stride(self) -> int:
        return decoding.default_stride(self.max_length) if self.stride is None else self.stride

    @property
    def special_ids(self) -> decoding.SpecialIds:
        return decoding.SpecialIds(bos=self.bos_id, unk=self.unk_id, pad=self.pad_id)


def render_value(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON string escapes (\", \\, \n) are valid in protobuf text format; other characters
    # stay UTF-8, which Triton's parser reads as is.
    return json.dumps(str(value), ensure_ascii=False)


def render_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """Render a dict as protobuf text format.

    Values: scalars, Enum, nested dicts (messages), lists of scalars (`dims: [1, 2]`) and lists
    of dicts (repeated messages, also used for map fields as `{"key": ..., "value": ...}`).
    """
    pad = "  " * indent
    lines = []
    for field, value in message.items():
        if isinstance(value, dict):
            lines += [f"{pad}{field} {{", render_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += [f"{pad}{field} {{", render_pbtxt(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{field}: [{', '.join(render_value(v) for v in value)}]")
        else:
            lines.append(f"{pad}{field}: {render_value(value)}")
    return "\n".join(line for line in lines if line)


def tensor(name: str, data_type: str, dims: list[int], max_batch_size: int) -> dict[str, Any]:
    """A model input or output. Prepends the batch dimension only when batching is off."""
    full_dims = dims if max_batch_size > 0 else [-1] + dims
    return {"name": name, "data_type": Enum(data_type), "dims": full_dims}


def parameters(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": key, "value": {"string_value": str(value)}} for key, value in values.items()]


def cpu_instances(count: int) -> list[dict[str, Any]]:
    return [{"count": count, "kind": Enum("KIND_CPU")}]


def tokenizer_config(settings: RepositorySettings) -> dict[str, Any]:
    batch = settings.max_batch_size
    return {
        "name": f"{settings.model_name}_tokenizer",
        "backend": "python",
        "max_batch_size": batch,
        "input": [tensor("TEXT", "TYPE_STRING", [1], batch)],
        "output": [
            tensor("input_ids", "TYPE_INT64", [-1, -1], batch),
            tensor("attention_mask", "TYPE_INT64", [-1, -1], batch),
            tensor("OFFSETS", "TYPE_INT64", [-1, -1, 2], batch),
            tensor("WORD_IDS", "TYPE_INT64", [-1, -1], batch),
        ],
        "instance_group": cpu_instances(settings.instance_count),
        "parameters": parameters({
            "max_length": settings.max_length,
            "stride": settings.window_stride,
            "bos_id": -1 if settings.bos_id is None else settings.bos_id,
            "unk_id": settings.unk_id,
            "pad_id": settings.pad_id,
        }),
    }


def model_config(settings: RepositorySettings) -> dict[str, Any]:
    batch = settings.max_batch_size
    config: dict[str, Any] = {
        "name": f"{settings.model_name}_model",
        "backend": settings.model_backend,
        "max_batch_size": batch,
        "input": [
            tensor("input_ids", "TYPE_INT64", [-1, -1], batch),
            tensor("attention_mask", "TYPE_INT64", [-1, -1], batch),
        ],
        "output": [tensor("logits", "TYPE_FP32", [-1, -1, len(settings.id2label)], batch)],
        "instance_group": cpu_instances(settings.instance_count),
    }
    if settings.model_backend == "onnxruntime":
        # NOTE: this form is checked against Triton's schema in the unit tests, but no server
        # here loads it, because the local wheel has no ONNX Runtime backend.
        config["default_model_filename"] = "model.onnx"
    else:
        config["parameters"] = parameters({"onnx_file": "model.onnx", "intra_op_num_threads": 0})
    return config


def postprocess_config(settings: RepositorySettings) -> dict[str, Any]:
    batch = settings.max_batch_size
    return {
        "name": f"{settings.model_name}_postprocess",
        "backend": "python",
        "max_batch_size": batch,
        "input": [
            tensor("logits", "TYPE_FP32", [-1, -1, len(settings.id2label)], batch),
            tensor("OFFSETS", "TYPE_INT64", [-1, -1, 2], batch),
            tensor("WORD_IDS", "TYPE_INT64", [-1, -1], batch),
            tensor("TEXT", "TYPE_STRING", [1], batch),
        ],
        "output": [tensor("ENTITIES", "TYPE_STRING", [1], batch)],
        "instance_group": cpu_instances(settings.instance_count),
    }


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, Any]:
    """An ensemble step; maps go from the step's tensor names to the ensemble's."""
    return {
        "model_name": model,
        "model_version": -1,
        "input_map": [{"key": key, "value": value} for key, value in inputs.items()],
        "output_map": [{"key": key, "value": value} for key, value in outputs.items()],
    }


def ensemble_config(settings: RepositorySettings) -> dict[str, Any]:
    name, batch = settings.model_name, settings.max_batch_size
    tokens = {n: n for n in ("input_ids", "attention_mask", "OFFSETS", "WORD_IDS")}
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": batch,
        "input": [tensor("TEXT", "TYPE_STRING", [1], batch)],
        "output": [tensor("ENTITIES", "TYPE_STRING", [1], batch)],
        "ensemble_scheduling": {
            "step": [
                step(f"{name}_tokenizer", {"TEXT": "TEXT"}, tokens),
                step(
                    f"{name}_model",
                    {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                    {"logits": "logits"},
                ),
                step(
                    f"{name}_postprocess",
                    {"logits": "logits", "OFFSETS": "OFFSETS", "WORD_IDS": "WORD_IDS",
                     "TEXT": "TEXT"},
                    {"ENTITIES": "ENTITIES"},
                ),
            ]
        },
    }


def model_configs(settings: RepositorySettings) -> dict[str, dict[str, Any]]:
    """Return {model directory name: config dict} for the four models of the repository.

    Raises ValueError for an unknown model backend or a stride that leaves a window no room.
    """
    if settings.model_backend not in MODEL_BACKENDS:
        raise ValueError(
            f"Model backend {settings.model_backend!r} is not supported; use one of "
            f"{MODEL_BACKENDS}."
        )
    decoding.check_window(settings.special_ids, settings.max_length, settings.window_stride)
    configs = [
        tokenizer_config(settings),
        model_config(settings),
        postprocess_config(settings),
        ensemble_config(settings),
    ]
    return {config["name"]: config for config in configs}


def write_config(model_dir: Path, config: dict[str, Any]) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(render_pbtxt(config) + "\n", encoding="utf-8")


def install_python_model(version_dir: Path, step_name: str) -> None:
    """Copy a Python-backend model and the shared decoding module into a version directory."""
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODELS_DIR / step_name / "model.py", version_dir / "model.py")
    shutil.copyfile(DECODING_FILE, version_dir / DECODING_MODULE)


# The one file in the ensemble's version directory.
ENSEMBLE_PLACEHOLDER = "README.txt"


def write_repository(
    repository: Path, settings: RepositorySettings, onnx_file: Path, tokenizer_file: Path
) -> dict[str, Path]:
    """Write the four models under `repository` (replacing it) and return their directories.

    `onnx_file` is the exported graph ([batch, sequence] inputs); the repository gets a copy
    with a window axis.
    """
    if repository.exists():
        shutil.rmtree(repository)
    configs = model_configs(settings)
    names = list(configs)
    tokenizer_name, model_name, postprocess_name, ensemble_name = names
    directories = {name: repository / name for name in names}
    for name, config in configs.items():
        write_config(directories[name], config)

    tokenizer_version = directories[tokenizer_name] / "1"
    install_python_model(tokenizer_version, "tokenizer")
    shutil.copyfile(tokenizer_file, tokenizer_version / "tokenizer.json")

    model_version = directories[model_name] / "1"
    model_version.mkdir(parents=True)
    window_graph.write_windowed(onnx_file, model_version / "model.onnx")
    if settings.model_backend == "python":
        install_python_model(model_version, "onnx_model")

    postprocess_version = directories[postprocess_name] / "1"
    install_python_model(postprocess_version, "postprocess")
    (postprocess_version / "labels.json").write_text(
        json.dumps(settings.id2label, ensure_ascii=False), encoding="utf-8"
    )
    (postprocess_version / POSTPROCESS_SETTINGS).write_text(
        json.dumps({"labelSubtoken": settings.label_subtoken}), encoding="utf-8"
    )

    # An ensemble has no files, but Triton requires its version directory. Object stores keep
    # no empty directories, so a file keeps it through an upload to s3:// and the copy back.
    ensemble_version = directories[ensemble_name] / "1"
    ensemble_version.mkdir(parents=True)
    (ensemble_version / ENSEMBLE_PLACEHOLDER).write_text(
        "The steps of this ensemble are in ../config.pbtxt. Triton requires this version "
        "directory, and this file keeps it in object stores, which have no empty directories.\n",
        encoding="utf-8",
    )
    return directories
