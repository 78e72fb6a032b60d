"""Checks between resources: the PubMed example files, modified in memory, fail `lathe validate`
and the start of `lathe run` when a stage would fail on a setting of another resource."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from lathe import cli, consistency, loader
from lathe.api import Resource
from lathe.errors import InvalidResourceError
from lathe.local.runner import LocalRunner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "pubmed"
BODIES = {path.name: next(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
          for path in sorted(EXAMPLES.glob("*.yaml"))}  # fmt: skip


def examples() -> dict[str, dict]:
    """Return a copy of the five example documents by file name, to modify in memory."""
    return copy.deepcopy(BODIES)


def parse_all(bodies: dict[str, dict]) -> list[Resource]:
    return [loader.parse_resource(body, name) for name, body in bodies.items()]


def rejection(bodies: dict[str, dict], data_dir: Path) -> InvalidResourceError:
    with pytest.raises(InvalidResourceError) as raised:
        consistency.check_references(parse_all(bodies), data_dir)
    return raised.value


def model(bodies: dict[str, dict]) -> dict:
    return bodies["03-pretrain.yaml"]["spec"]["model"]


def lora(bodies: dict[str, dict]) -> dict:
    return bodies["04-finetune.yaml"]["spec"]["lora"]


def export(bodies: dict[str, dict]) -> dict:
    return bodies["05-deployment.yaml"]["spec"]["export"]


# Layers of each architecture for spec.lora.targetModules; the example's targets are Llama's.
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
                "t5": ["q", "v"]}


def set_architecture(bodies: dict[str, dict], architecture: str, **fields) -> None:
    """Give the PretrainJob another architecture, and the FineTune LoRA targets that it has."""
    model(bodies).update(architecture=architecture, **fields)
    lora(bodies)["targetModules"] = LORA_TARGETS[architecture]


def test_examples_pass(data_dir):
    consistency.check_references(parse_all(examples()), data_dir)


# -- masked language modelling needs <mask> ------------------------------------------------------


def test_bert_without_mask_token_rejected(data_dir):
    bodies = examples()
    set_architecture(bodies, "bert")
    error = rejection(bodies, data_dir)
    assert error.resource == "Tokenizer/default/pubmed"
    assert error.field == "spec.specialTokens"
    assert "['<|endoftext|>', '<pad>', '<unk>']" in error.detail
    assert "mask token '<mask>'" in error.detail
    assert "PretrainJob 'pubmed-lm'" in error.detail
    assert "architecture is bert" in error.detail
    assert "add '<mask>' to specialTokens" in error.detail


def test_bert_with_mask_token_accepted(data_dir):
    bodies = examples()
    set_architecture(bodies, "bert")
    bodies["02-tokenizer.yaml"]["spec"]["specialTokens"].append("<mask>")
    consistency.check_references(parse_all(bodies), data_dir)


@pytest.mark.parametrize("architecture", ["gpt2", "t5"])
def test_other_architectures_need_no_mask(data_dir, architecture):
    bodies = examples()
    set_architecture(bodies, architecture)
    consistency.check_references(parse_all(bodies), data_dir)


# -- LoRA targets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "layers"),
    [
        ("bert", ["dense", "key", "position_embeddings", "query", "token_type_embeddings",
                  "value", "word_embeddings"]),
        ("t5", ["embed_tokens", "k", "o", "q", "relative_attention_bias", "shared", "v", "wi",
                "wo"]),
    ],
)
def test_lora_without_default_targets_lists_layers(data_dir, architecture, layers):
    bodies = examples()
    model(bodies)["architecture"] = architecture
    bodies["02-tokenizer.yaml"]["spec"]["specialTokens"].append("<mask>")
    del lora(bodies)["targetModules"]
    error = rejection(bodies, data_dir)
    assert error.resource == "FineTune/default/pubmed-ner"
    assert error.field == "spec.lora.targetModules"
    assert f"no default LoRA targets for model type {architecture!r}" in error.detail
    assert "PretrainJob 'pubmed-lm'" in error.detail
    assert f"some of the model's layers: {layers}" in error.detail


def test_listed_layers_are_what_trainer_adapts():
    """The names come from the token classifier that the FineTune stage builds on the base."""
    import torch
    from transformers import AutoModelForTokenClassification

    from lathe.api.pretrain import ModelArchitectureSpec
    from lathe_trainer.finetune.model import adaptable_layers, config_layers
    from lathe_trainer.pretrain.model import architecture_config

    special = {"vocab_size": 300, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    config = architecture_config(ModelArchitectureSpec(architecture="bert"), special)
    config.num_labels = 3
    torch.manual_seed(0)
    built = AutoModelForTokenClassification.from_config(config)
    assert config_layers(config) == adaptable_layers(built)
    assert "classifier" not in adaptable_layers(built)


@pytest.mark.parametrize("change", [
    {"targetModules": ["q", "v"]},
    {"method": "full"},
])
def test_lora_targets_given_or_unused_accepted(data_dir, change):
    bodies = examples()
    model(bodies)["architecture"] = "t5"
    if "method" in change:
        del bodies["04-finetune.yaml"]["spec"]["lora"]
        bodies["04-finetune.yaml"]["spec"]["method"] = change["method"]
    else:
        lora(bodies).update(change)
    consistency.check_references(parse_all(bodies), data_dir)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_default_lora_targets_accepted(data_dir, architecture):
    bodies = examples()
    model(bodies)["architecture"] = architecture
    del lora(bodies)["targetModules"]
    consistency.check_references(parse_all(bodies), data_dir)


def test_misspelt_lora_target_rejected(data_dir):
    """A misspelt name among valid ones fails validate as it would fail the stage."""
    bodies = examples()
    lora(bodies)["targetModules"] = ["qproj", "k_proj", "v_proj", "o_proj"]
    error = rejection(bodies, data_dir)
    assert error.resource == "FineTune/default/pubmed-ner"
    assert error.field == "spec.lora.targetModules"
    assert error.detail.startswith("['qproj'] match no module of the base model ")
    assert "(from PretrainJob 'pubmed-lm')" in error.detail
    assert "use names of its linear or embedding layers: ['down_proj', " in error.detail
    assert "'q_proj'" in error.detail


@pytest.mark.parametrize("targets", [
    ["self_attn.q_proj", "embed_tokens"],  # a suffix after a dot
    ["model.layers.0.mlp.up_proj"],  # a full module name
])
def test_lora_target_matching_peft_accepted(data_dir, targets):
    bodies = examples()
    lora(bodies)["targetModules"] = targets
    consistency.check_references(parse_all(bodies), data_dir)


@pytest.mark.parametrize(("targets", "rejected"), [
    (["layers"], "'layers' (ModuleList)"),
    (["q_proj", "self_attn", "mlp"], "'self_attn' (LlamaAttention), 'mlp' (LlamaMLP)"),
    (["norm"], "'norm' (LlamaRMSNorm)"),
])
def test_non_layer_lora_target_rejected(data_dir, targets, rejected):
    """peft 0.21 raises for a target module it cannot wrap, so validate rejects it first."""
    bodies = examples()
    lora(bodies)["targetModules"] = targets
    error = rejection(bodies, data_dir)
    assert error.field == "spec.lora.targetModules"
    assert error.detail.startswith(f"LoRA cannot adapt what {rejected} match in the base "
                                   "model "), error.detail
    assert "use names of its linear or embedding layers: ['down_proj', " in error.detail


@pytest.mark.parametrize(("targets", "unmatched"), [
    (["proj"], ["proj"]),  # not a whole name
    (["q_proj", "attn.q_proj"], ["attn.q_proj"]),  # not a whole name after the dot
    (["Q_PROJ", "all-linear"], ["Q_PROJ", "all-linear"]),  # no shorthand in a list
])
def test_lora_target_partial_name_rejected(data_dir, targets, unmatched):
    bodies = examples()
    lora(bodies)["targetModules"] = targets
    error = rejection(bodies, data_dir)
    assert error.detail.startswith(f"{unmatched} match no module of the base model")


def test_lora_targets_with_full_method_rejected():
    """Method full ignores spec.lora, so the API models reject its targets before any check."""
    bodies = examples()
    lora(bodies)["targetModules"] = ["qproj"]
    bodies["04-finetune.yaml"]["spec"]["method"] = "full"
    with pytest.raises(InvalidResourceError) as raised:
        parse_all(bodies)
    assert raised.value.field == "spec.lora"


@pytest.mark.parametrize("targets", [
    ["q_proj"], ["self_attn.q_proj"], ["model.layers.1.self_attn.q_proj"], ["proj"],
    ["attn.q_proj"], ["layers.1"], ["score"], ["embed_tokens"], ["qproj"], ["model"],
])
def test_target_matching_agrees_with_peft(targets):
    """unmatched_targets finds no match exactly where peft adapts no module."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from lathe.api.pretrain import ModelArchitectureSpec
    from lathe_trainer.finetune.model import meta_classifier, unmatched_targets
    from lathe_trainer.pretrain.model import architecture_config

    special = {"vocab_size": 300, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    spec = ModelArchitectureSpec(architecture="llama", preset="tiny")
    built = meta_classifier(architecture_config(spec, special))
    config = LoraConfig(target_modules=targets)
    peft_matches = any(check_target_module_exists(config, name)
                       for name, _ in built.named_modules() if name)
    assert (unmatched_targets(built, targets) == []) == peft_matches


def bert_directory(path: Path, **sizes) -> Path:
    """Write a Hugging Face model directory's config.json for a small BERT."""
    from transformers import BertConfig

    path.mkdir()
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               vocab_size=300, **sizes).save_pretrained(path)
    return path


def with_base_uri(bodies: dict[str, dict], uri: str) -> dict[str, dict]:
    """Point the FineTune at a model directory and drop the PretrainJob stages."""
    bodies["04-finetune.yaml"]["spec"]["baseModel"] = {"uri": uri}
    return {name: body for name, body in bodies.items()
            if name in ("04-finetune.yaml", "05-deployment.yaml")}


def test_lora_on_bert_directory_lists_layers(data_dir, tmp_path):
    directory = bert_directory(tmp_path / "bert")
    bodies = examples()
    del lora(bodies)["targetModules"]
    error = rejection(with_base_uri(bodies, str(directory)), data_dir)
    assert error.field == "spec.lora.targetModules"
    assert "model type 'bert'" in error.detail
    assert str(directory / "config.json") in error.detail
    assert "'query'" in error.detail


def test_misspelt_lora_target_on_bert_directory(data_dir, tmp_path):
    directory = bert_directory(tmp_path / "bert")
    bodies = examples()
    lora(bodies)["targetModules"] = ["query", "valeu"]
    error = rejection(with_base_uri(bodies, str(directory)), data_dir)
    assert error.field == "spec.lora.targetModules"
    assert error.detail.startswith("['valeu'] match no module of the base model ")
    assert f"(from '{directory / 'config.json'}')" in error.detail
    assert "'value'" in error.detail


def test_lora_targets_on_bert_directory_accepted(data_dir, tmp_path):
    directory = bert_directory(tmp_path / "bert")
    bodies = examples()
    lora(bodies)["targetModules"] = ["query", "value", "attention.output.dense"]
    consistency.check_references(parse_all(with_base_uri(bodies, str(directory))), data_dir)


def test_unknown_model_type_targets_skipped(data_dir, tmp_path):
    """A config.json that transformers cannot build leaves the targets to the stage."""
    directory = tmp_path / "custom"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    bodies = examples()
    lora(bodies)["targetModules"] = ["qproj"]
    consistency.check_references(parse_all(with_base_uri(bodies, str(directory))), data_dir)


# -- export sequence lengths ---------------------------------------------------------------------


def test_export_length_above_max_positions_rejected(data_dir):
    bodies = examples()
    export(bodies)["checkSequenceLengths"] = [3, 20, 600]
    error = rejection(bodies, data_dir)
    assert error.resource == "ModelDeployment/default/pubmed-ner"
    assert error.field == "spec.export.checkSequenceLengths"
    assert "[3, 20, 600] includes 600" in error.detail
    assert "maximum positions 512" in error.detail
    assert "FineTune 'pubmed-ner'" in error.detail
    assert "use lengths of at most 512" in error.detail
    assert "raise spec.model.maxPositionEmbeddings of PretrainJob 'pubmed-lm'" in error.detail


@pytest.mark.parametrize(("architecture", "positions"), [("llama", 1024), ("gpt2", 1024),
                                                         ("bert", 1024)])
def test_export_length_within_raised_limit_accepted(data_dir, architecture, positions):
    bodies = examples()
    set_architecture(bodies, architecture, maxPositionEmbeddings=positions)
    bodies["02-tokenizer.yaml"]["spec"]["specialTokens"].append("<mask>")
    export(bodies)["checkSequenceLengths"] = [3, 600]
    consistency.check_references(parse_all(bodies), data_dir)


def test_export_length_on_t5_limited_to_default(data_dir):
    """A t5 config names no maximum positions, so the export checks against 512."""
    bodies = examples()
    set_architecture(bodies, "t5", maxPositionEmbeddings=1024)
    export(bodies)["checkSequenceLengths"] = [3, 600]
    error = rejection(bodies, data_dir)
    assert "maximum positions 512" in error.detail
    assert "a t5 config names no maximum positions" in error.detail
    assert "maxPositionEmbeddings" not in error.detail


def test_export_length_against_model_directory(data_dir, tmp_path):
    directory = bert_directory(tmp_path / "bert", max_position_embeddings=128)
    bodies = examples()
    lora(bodies)["targetModules"] = LORA_TARGETS["bert"]
    bodies["04-finetune.yaml"]["spec"]["maxLength"] = 128
    bodies = with_base_uri(bodies, str(directory))
    export(bodies)["checkSequenceLengths"] = [3, 20, 200]
    error = rejection(bodies, data_dir)
    assert "[3, 20, 200] includes 200" in error.detail
    assert "maximum positions 128" in error.detail
    assert str(directory / "config.json") in error.detail


@pytest.mark.parametrize(("stride", "accepted"), [(158, True), (159, False), (None, True)])
def test_window_stride_checked_against_max_length(data_dir, stride, accepted):
    """The example's window is its FineTune's maxLength of 160 tokens, bos included."""
    bodies = examples()
    export(bodies)["windowStride"] = stride
    if accepted:
        consistency.check_references(parse_all(bodies), data_dir)
        return
    error = rejection(bodies, data_dir)
    assert error.field == "spec.export.windowStride"
    assert error.detail == (
        "159 leaves no new text in a window of 160 tokens (spec.maxLength of FineTune "
        "'pubmed-ner'); set it to at most 158, or leave it unset for a quarter of the window."
    )


# -- FineTune maxLength --------------------------------------------------------------------------


def test_finetune_max_length_above_positions_rejected(data_dir):
    bodies = examples()
    bodies["04-finetune.yaml"]["spec"]["maxLength"] = 600
    error = rejection(bodies, data_dir)
    assert error.resource == "FineTune/default/pubmed-ner"
    assert error.field == "spec.maxLength"
    assert error.detail.startswith("600 is above the maximum positions 512 of the base model "
                                   "(from PretrainJob 'pubmed-lm')"), error.detail
    assert error.detail.endswith("set maxLength to at most 512, or raise "
                                 "spec.model.maxPositionEmbeddings of PretrainJob 'pubmed-lm'.")


def test_finetune_max_length_at_positions_accepted(data_dir):
    bodies = examples()
    bodies["04-finetune.yaml"]["spec"]["maxLength"] = 512
    consistency.check_references(parse_all(bodies), data_dir)


def test_finetune_max_length_on_t5_unchecked(data_dir):
    """A t5 config names no maximum positions, so no maxLength is too long for it."""
    bodies = examples()
    set_architecture(bodies, "t5")
    bodies["04-finetune.yaml"]["spec"]["maxLength"] = 600
    consistency.check_references(parse_all(bodies), data_dir)


def test_max_length_against_model_directory(data_dir, tmp_path):
    directory = bert_directory(tmp_path / "bert", max_position_embeddings=128)
    bodies = examples()
    lora(bodies)["targetModules"] = LORA_TARGETS["bert"]
    bodies["04-finetune.yaml"]["spec"]["maxLength"] = 160  # as in the example
    error = rejection(with_base_uri(bodies, str(directory)), data_dir)
    assert error.field == "spec.maxLength"
    assert "maximum positions 128" in error.detail
    assert str(directory / "config.json") in error.detail
    assert error.detail.endswith("set maxLength to at most 128.")


def full_finetune_of(directory: Path, max_length: int) -> dict[str, dict]:
    """Return the example FineTune alone, fully fine-tuning the model directory."""
    bodies = examples()
    bodies["04-finetune.yaml"]["spec"].update(method="full", maxLength=max_length)
    del bodies["04-finetune.yaml"]["spec"]["lora"]
    bodies = with_base_uri(bodies, str(directory))
    del bodies["05-deployment.yaml"]
    return bodies


def test_hub_t5_max_length_unchecked(data_dir, tmp_path):
    """Hub t5 configs carry a legacy n_positions of 512 that no t5 layer reads."""
    from transformers import T5Config

    directory = tmp_path / "t5"
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=300,
             n_positions=512).save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["n_positions"] == 512
    consistency.check_references(parse_all(full_finetune_of(directory, max_length=600)), data_dir)


@pytest.mark.parametrize("value", ["n/a", [512], None, True, 0])
def test_malformed_position_limit_not_checked(data_dir, tmp_path, value):
    """A config.json whose limit is no positive integer crashes no check; the stage reports
    the broken config when it loads the model."""
    directory = bert_directory(tmp_path / "bert")
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = value
    (directory / "config.json").write_text(json.dumps(config))
    consistency.check_references(parse_all(full_finetune_of(directory, max_length=600)), data_dir)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "bert", "t5"])
def test_position_keys_match_trainer_configs(architecture):
    """POSITION_KEYS names the config key of each architecture's maximum positions."""
    from lathe.api.pretrain import ModelArchitectureSpec
    from lathe_trainer.pretrain.model import architecture_config
    from lathe_trainer.serving.reference import DEFAULT_MAX_LENGTH, config_max_positions

    spec = ModelArchitectureSpec(architecture=architecture, max_position_embeddings=777)
    special = {"vocab_size": 300, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    written = json.loads(architecture_config(spec, special).to_json_string())
    expected = 777 if consistency.POSITION_KEYS[architecture] else DEFAULT_MAX_LENGTH
    assert config_max_positions(written) == expected


# -- lathe run and lathe validate ----------------------------------------------------------------


def test_run_check_rejects_before_workspace(data_dir, tmp_path):
    bodies = examples()
    export(bodies)["checkSequenceLengths"] = [3, 600]
    runner = LocalRunner(tmp_path / "workspace", data_dir)
    with pytest.raises(InvalidResourceError) as raised:
        runner.check(parse_all(bodies))
    assert raised.value.field == "spec.export.checkSequenceLengths"
    assert not (tmp_path / "workspace").exists()


def validate(bodies: dict, tmp_path, data_dir) -> int:
    """Write `bodies` to a folder and run `lathe validate -f` on it; return the exit code."""
    folder = tmp_path / "specs"
    folder.mkdir()
    for name, body in bodies.items():
        (folder / name).write_text(yaml.safe_dump(body))
    return cli.main(["validate", "-f", str(folder), "--workspace", str(tmp_path / "workspace"),
                     "--data-dir", str(data_dir)])


def test_validate_command_reports_error(data_dir, tmp_path, capsys):
    """`lathe validate -f folder/` fails with the error instead of "5 resources are valid"."""
    bodies = examples()
    bodies["01-corpus.yaml"]["spec"]["sources"][0]["format"] = "pubmedqa"
    code = validate(bodies, tmp_path, data_dir)
    captured = capsys.readouterr()
    assert code == 1
    assert "resources are valid" not in captured.out
    assert "spec.sources[0].format" in captured.err
    assert "has format 'pubmedqa'" in captured.err
    assert "use format: pubtator" in captured.err


def test_validate_command_rejects_misspelt_target(data_dir, tmp_path, capsys):
    bodies = examples()
    lora(bodies)["targetModules"] = ["qproj", "k_proj", "v_proj", "o_proj"]
    code = validate(bodies, tmp_path, data_dir)
    captured = capsys.readouterr()
    assert code == 1
    assert "resources are valid" not in captured.out
    assert "FineTune/default/pubmed-ner" in captured.err
    assert "spec.lora.targetModules: ['qproj'] match no module" in captured.err
