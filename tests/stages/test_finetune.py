"""FineTune stage on the real NCBI-disease data, with a tiny base model built in the test.

The base model is a 64-wide, 2-layer Llama with a byte-level BPE tokenizer trained on real
abstracts, pretrained for a few dozen causal-LM steps so its embeddings carry some signal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lathe.api.finetune import FineTuneSpec
from lathe_trainer.finetune import stage
from lathe_trainer.finetune.data import encode_sentences
from lathe_trainer.finetune.metrics import predict_local
from lathe_trainer.stage import ResolvedInput, StageError

pytestmark = pytest.mark.slow

CONLL = "pubmed/ncbi-disease/conll"
PUBTATOR_TEST = "pubmed/bc5cdr/CDR_TestSet.PubTator.txt"
ABSTRACTS = 300
PRETRAIN_STEPS = 60


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two intra-op threads on a 2-core machine shared with other work made a step about ten
    # times slower than one thread (spin-waiting), so stage tests run single-threaded.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def read_abstracts(data_dir: Path, count: int) -> list[str]:
    texts = []
    path = data_dir / "pubmed/ncbi-disease/corpus/NCBItrainset_corpus.txt"
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3 and parts[1] == "a":
            texts.append(parts[2])
    return texts[:count]


def build_tokenizer(texts: list[str], directory: Path) -> PreTrainedTokenizerFast:
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(
        texts, vocab_size=2000, special_tokens=["<|endoftext|>", "<pad>", "<unk>"],
        show_progress=False,
    )
    trainer.save(str(directory / "tokenizer.json"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>",
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def pretrain(model: LlamaForCausalLM, tokenizer, texts: list[str], steps: int) -> None:
    ids: list[int] = []
    for text in texts:
        ids += [tokenizer.bos_token_id] + tokenizer(" " + text)["input_ids"]
    rows = len(ids) // 64
    data = torch.tensor(ids[:rows * 64]).view(rows, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = data[torch.randint(0, rows, (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def base_output(tmp_path_factory, data_dir) -> Path:
    """A PretrainJob-like output directory with the tiny base model in `model/`."""
    output = tmp_path_factory.mktemp("base")
    directory = output / "model"
    directory.mkdir()
    texts = read_abstracts(data_dir, ABSTRACTS)
    tokenizer = build_tokenizer(texts, directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, texts, PRETRAIN_STEPS)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return output


def base_input(base_output: Path) -> dict[str, ResolvedInput]:
    return {
        "baseModel": ResolvedInput(
            kind="PretrainJob", name="tiny-lm", uri=f"file://{base_output}", digest="sha256:0"
        )
    }


def resource(**overrides) -> dict:
    spec = {
        "baseModel": {"pretrainJobRef": {"name": "tiny-lm"}},
        "data": {
            "train": f"{CONLL}/train.tsv",
            "validation": f"{CONLL}/devel.tsv",
            "test": f"{CONLL}/test.tsv",
        },
        "maxTrainSentences": 1000,
        "maxEvalSentences": 150,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": {
            "maxSteps": 120, "microBatchSize": 16, "learningRate": 0.01, "warmupSteps": 5,
            "checkpointInterval": 60, "evalInterval": 1000,
        },
    }
    spec.update(overrides)
    return {"kind": "FineTune", "metadata": {"name": "ner"}, "spec": spec}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base_output, data_dir):
    """One LoRA run with the from-scratch comparison: (config, metrics, output directory)."""
    from lathe.api import KINDS
    from lathe.plans import stage_config

    output = tmp_path_factory.mktemp("finetune")
    model = KINDS["FineTune"].model_validate(resource())
    config = stage_config(model, base_input(base_output), f"file://{output}", str(data_dir))
    metrics = stage.run(config, resume=False)
    return config, metrics, output


def test_lora_beats_learned_nothing(finished):
    """An all-O tagger scores F1 0; the LoRA model must find real entities."""
    _, metrics, _ = finished
    assert metrics["f1"] > 0.05
    assert metrics["precision"] > 0.05
    assert metrics["recall"] > 0.05


def test_report_has_both_figures(finished):
    _, metrics, output = finished
    report = json.loads((output / "report.json").read_text())
    for key in ("precision", "recall", "f1"):
        assert report["test"][key] == metrics[key]
        assert report["fromScratch"][key] == metrics["fromScratch"][key]
    assert report["sentences"] == {"train": 1000, "validation": 150, "test": 150}
    assert report["f1GainFromPretraining"] == pytest.approx(
        metrics["f1"] - metrics["fromScratch"]["f1"]
    )


def test_outputs_and_manifest_written(finished):
    _, metrics, output = finished
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["metrics"]["f1"] == metrics["f1"]
    assert "model/model.safetensors" in manifest["outputs"]
    assert "model/tokenizer.json" in manifest["outputs"]
    assert (output / "adapter" / "adapter_config.json").is_file()
    assert (output / "checkpoints" / "lora" / "step-00000120").is_dir()
    assert (output / "checkpoints" / "scratch" / "step-00000120").is_dir()
    # Serving tags long texts in windows of the length the model was fine-tuned on.
    tokenizer_config = json.loads((output / "model" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 128  # the default spec.maxLength


def test_adapter_trains_the_head(finished):
    """The new head must be saved with the adapter, or it stayed at its random init."""
    _, _, output = finished
    adapter_config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert "score" in adapter_config["modules_to_save"]
    from safetensors.torch import load_file

    weights = load_file(output / "adapter" / "adapter_model.safetensors")
    assert any(".score." in name for name in weights)
    assert any("embed_tokens.lora_embedding_A" in name for name in weights)


def test_merged_model_reproduces_predictions(finished, data_dir):
    """model/ reloads as a plain token classifier and tags the test words as in the stage."""
    _, _, output = finished
    model = AutoModelForTokenClassification.from_pretrained(output / "model")
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    assert model.config.id2label == {0: "O", 1: "B-Disease", 2: "I-Disease"}
    assert model.config.label2id == {"O": 0, "B-Disease": 1, "I-Disease": 2}
    # A causal model's label sits on the last sub-token of each word, and serving reads it here.
    assert model.config.lathe_label_subtoken == "last"
    records = [
        json.loads(line)
        for line in (output / "test_predictions.jsonl").read_text().splitlines()
    ]
    sentences = [(record["words"], record["gold"]) for record in records]
    encoded = encode_sentences(tokenizer, sentences, model.config.label2id, 128, "last")
    predicted = predict_local(model, encoded, 32, tokenizer.pad_token_id, model.config.id2label)
    assert predicted == [record["predicted"] for record in records]
    assert any("B-Disease" in tags for tags in predicted)


def test_resume_skips_finished_phases(finished):
    config, metrics, _ = finished
    again = stage.run(config, resume=True)
    assert again == metrics


def test_resume_continues_from_checkpoint(make_config, base_output):
    """A run killed after its step-60 checkpoint continues from step 60, not from 0."""
    config = make_config(
        resource(compareFromScratch=False, maxTrainSentences=200, maxEvalSentences=40),
        base_input(base_output),
    )
    first = stage.run(config, resume=False)
    output = Path(config.output_uri.removeprefix("file://"))
    # Simulate a crash between the step-60 checkpoint and the end of the phase.
    for path in ("checkpoints/lora/result.json", "manifest.json"):
        (output / path).unlink()
    shutil.rmtree(output / "checkpoints/lora/step-00000120")
    resumed = stage.run(config, resume=True)
    report = json.loads((output / "report.json").read_text())
    assert report["test"]["resumedFromStep"] == 60
    assert resumed["steps"] == 120
    assert (output / "manifest.json").is_file()
    # Without dropout the resumed run sees the same batches and optimizer state as the first.
    assert resumed["f1"] == pytest.approx(first["f1"], abs=1e-6)


def test_reduced_precision_finetune_follows_fp32(make_config, base_output, tmp_path):
    """bf16 autocast, and fp16 autocast with loss scaling, train the LoRA model from the same
    start as fp32. Evaluation runs in fp32, so the test figures describe the weights that the
    export serves."""
    reports, losses = {}, {}
    for precision in ("fp32", "bf16", "fp16"):
        training = {**resource()["spec"]["training"], "precision": precision}
        config = make_config(resource(compareFromScratch=False, training=training),
                             base_input(base_output), output=tmp_path / precision)
        metrics = stage.run(config, resume=False)
        assert metrics["trainingPrecision"] == precision
        output = tmp_path / precision
        reports[precision] = json.loads((output / "report.json").read_text())
        records = [json.loads(line) for line in (output / "progress.jsonl").read_text()
                   .splitlines()]
        losses[precision] = [record["loss"] for record in records if "loss" in record]
    for precision in ("bf16", "fp16"):
        assert reports[precision]["trainingPrecision"] == precision
        assert reports[precision]["test"]["f1"] > 0.05
        # The same weights and batch: the first loss differs only by rounding.
        assert losses[precision][0] == pytest.approx(losses["fp32"][0], rel=0.01)
        assert losses[precision] != losses["fp32"]
    # fp16 overflows of the loss scale were skipped without counting as non-finite steps.
    assert reports["fp16"]["test"]["nonFiniteSteps"] == 0
    assert len(losses["fp16"]) == resource()["spec"]["training"]["maxSteps"]


def test_compiled_lora_finetune_follows_eager(make_config, base_output, tmp_path):
    """spec.training.compile runs the LoRA training steps through torch.compile, from the
    same start and to about the same losses as eager steps."""
    losses = {}
    for compiled in (False, True):
        training = {**resource()["spec"]["training"], "maxSteps": 20, "compile": compiled}
        output = tmp_path / str(compiled)
        config = make_config(resource(compareFromScratch=False, training=training),
                             base_input(base_output), output=output)
        stage.run(config, resume=False)
        records = [json.loads(line) for line in (output / "progress.jsonl").read_text()
                   .splitlines()]
        losses[compiled] = [record["loss"] for record in records if "loss" in record]
    assert len(losses[True]) == 20
    # Inductor draws its dropout masks from another generator than eager PyTorch, so even the
    # first losses differ a little.
    assert losses[True][0] == pytest.approx(losses[False][0], rel=0.02)
    assert losses[True][-1] == pytest.approx(losses[False][-1], rel=0.1)
    assert losses[True][-1] < losses[True][0]


def test_non_finite_step_skipped_in_stage(make_config, base_output, tmp_path, monkeypatch):
    """With nonFinite skip, a NaN loss in step 5 costs one batch, not the run: the stage still
    trains maxSteps updates and reports the skipped step in its metrics and progress."""
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", "5")
    training = {**resource()["spec"]["training"], "nonFinite": "skip"}
    config = make_config(resource(compareFromScratch=False, training=training),
                         base_input(base_output), output=tmp_path)
    metrics = stage.run(config, resume=False)
    assert metrics["nonFiniteSteps"] == 1
    assert metrics["steps"] == training["maxSteps"]
    records = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text()
               .splitlines()]
    assert any("non-finite step 5 (skip)" in record["message"] for record in records)
    assert records[-2]["nonFiniteSteps"] == 1


def test_bf16_without_gpu_support_rejected(make_config, base_output, monkeypatch):
    """A GPU without bf16 fails the stage at once, naming the field and the fix."""
    def no_bf16(device, value):
        return "the GPU 'Tesla V100' has no bf16 support"

    monkeypatch.setattr(stage.precision, "check_supported", no_bf16)
    training = {**resource()["spec"]["training"], "precision": "bf16"}
    config = make_config(resource(training=training), base_input(base_output))
    with pytest.raises(StageError, match="spec.training.precision") as caught:
        stage.run(config, resume=False)
    assert "'bf16' cannot run here: the GPU 'Tesla V100' has no bf16 support; set fp32." in \
        str(caught.value)


def test_resume_of_another_spec_starts_over(make_config, base_output):
    """--resume skips only phases and continues only checkpoints of the same spec and inputs:
    the operator passes --resume to every attempt, and a changed spec must be trained anew."""
    small = dict(compareFromScratch=False, maxTrainSentences=200, maxEvalSentences=40)
    config = make_config(resource(**small), base_input(base_output))
    stage.run(config, resume=False)
    output = Path(config.output_uri.removeprefix("file://"))
    # The key also names the sub-token that the checkpoints were trained to label.
    assert (output / "checkpoints" / "resume-key").read_text() == config.resume_key + "/last"

    changed = make_config(
        resource(**small, training={"maxSteps": 20, "microBatchSize": 8, "learningRate": 0.01,
                                    "warmupSteps": 2, "checkpointInterval": 10}),
        base_input(base_output), output=output,
    )
    assert changed.resume_key != config.resume_key
    again = stage.run(changed, resume=True)
    report = json.loads((output / "report.json").read_text())
    assert again["steps"] == 20
    assert not report["test"].get("resumedFromStep")
    assert not (output / "checkpoints" / "lora" / "step-00000120").exists()
    assert (output / "checkpoints" / "resume-key").read_text() == changed.resume_key + "/last"


def test_resume_of_first_subtoken_starts_over(make_config, base_output):
    """Checkpoints of an earlier release, which labelled the first sub-token, are not resumed."""
    config = make_config(
        resource(compareFromScratch=False, maxTrainSentences=200, maxEvalSentences=40),
        base_input(base_output),
    )
    stage.run(config, resume=False)
    output = Path(config.output_uri.removeprefix("file://"))
    for path in ("checkpoints/lora/result.json", "manifest.json"):
        (output / path).unlink()
    # An earlier release recorded the bare resume key.
    (output / "checkpoints" / "resume-key").write_text(config.resume_key)
    stage.run(config, resume=True)
    report = json.loads((output / "report.json").read_text())
    assert not report["test"].get("resumedFromStep")
    assert report["labelSubtoken"] == "last"
    assert set(report["wordsSplitAtServing"].values()) == {0}


@pytest.mark.parametrize(
    ("field", "data"),
    [
        ("spec.data.train", {"train": "missing/train.tsv", "test": f"{CONLL}/test.tsv"}),
        ("spec.data.validation", {"train": f"{CONLL}/train.tsv", "validation": "nope.tsv",
                                  "test": f"{CONLL}/test.tsv"}),
        ("spec.data.test", {"train": f"{CONLL}/train.tsv", "test": "missing/test.tsv"}),
    ],
)
def test_missing_data_file_rejected(make_config, base_output, field, data):
    config = make_config(resource(data=data), base_input(base_output))
    with pytest.raises(StageError, match=rf"{field}: .*does not exist"):
        stage.run(config, resume=False)


def test_malformed_tag_rejected(make_config, base_output, tmp_path, data_dir):
    bad = tmp_path / "bad.tsv"
    lines = (data_dir / CONLL / "train.tsv").read_text().splitlines()[:40]
    lines[5] = lines[5].split("\t")[0] + "\tDisease"
    bad.write_text("\n".join(lines) + "\n")
    data = {"train": str(bad), "test": f"{CONLL}/test.tsv"}
    config = make_config(resource(data=data), base_input(base_output))
    with pytest.raises(StageError, match=r"spec.data.train: .*tag 'Disease'.*IOB"):
        stage.run(config, resume=False)


def test_pubtator_split_rejected(make_config):
    """A PubTator file given as CoNLL data names both formats, before any model is loaded."""
    data = {"train": f"{CONLL}/train.tsv", "test": PUBTATOR_TEST}
    config = make_config(resource(data=data))
    with pytest.raises(StageError) as raised:
        stage.read_splits(config, FineTuneSpec.model_validate(config.spec))
    message = str(raised.value)
    assert "spec.data.test:" in message
    assert "is read as format 'conll'" in message
    assert "looks like format 'pubtator'" in message
    assert ".." not in message


def test_conll2003_layout_reads_as_two_columns(make_config, tmp_path, data_dir):
    """POS and chunk columns are ignored, and `-DOCSTART-` lines separate documents."""
    sentences = (data_dir / CONLL / "train.tsv").read_text().split("\n\n")[:8]
    narrow = tmp_path / "narrow.tsv"
    narrow.write_text("\n\n".join(sentences) + "\n")
    wide_sentences = [
        "\n".join(line.replace("\t", "\tNN\tB-NP\t") for line in sentence.splitlines())
        for sentence in sentences
    ]
    wide = tmp_path / "wide.tsv"
    wide.write_text(
        "-DOCSTART- -X- -X- O\n\n" + "\n\n".join(wide_sentences[:4]) + "\n\n"
        "-DOCSTART-\t-X-\t-X-\tO\n" + "\n\n".join(wide_sentences[4:]) + "\n"
    )
    config = make_config(resource(data={"train": str(wide), "test": str(narrow)}))

    splits = stage.read_splits(config, FineTuneSpec.model_validate(config.spec))

    assert len(splits["test"]) == 8
    assert splits["train"] == splits["test"]


def test_pubmedqa_split_rejected(make_config):
    data = {"train": f"{CONLL}/train.tsv", "test": "pubmed/pubmedqa/ori_pqal.json"}
    config = make_config(resource(data=data))
    with pytest.raises(StageError) as raised:
        stage.read_splits(config, FineTuneSpec.model_validate(config.spec))
    message = str(raised.value)
    assert "spec.data.test:" in message
    assert "looks like format 'pubmedqa'" in message


def test_malformed_line_message_ends_once(make_config, tmp_path, data_dir):
    bad = tmp_path / "bad.tsv"
    lines = (data_dir / CONLL / "train.tsv").read_text().splitlines()[:40]
    # A token without its tag column.
    lines[5] = lines[5].split("\t")[0]
    bad.write_text("\n".join(lines) + "\n")
    config = make_config(resource(data={"train": str(bad), "test": f"{CONLL}/test.tsv"}))
    with pytest.raises(StageError) as raised:
        stage.read_splits(config, FineTuneSpec.model_validate(config.spec))
    message = str(raised.value)
    assert f"{bad}:6: expected `token<TAB>tag`" in message
    assert "; fix the file or the path" in message
    assert ".." not in message


def test_bert_without_lora_targets_lists_layers():
    from transformers import AutoModelForTokenClassification, BertConfig

    from lathe_trainer.finetune.model import BaseModelError, lora_targets

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, vocab_size=300, num_labels=3)
    model = AutoModelForTokenClassification.from_config(config)
    with pytest.raises(BaseModelError) as raised:
        lora_targets(model, [])
    message = str(raised.value)
    assert "no default LoRA targets for model type 'bert'" in message
    assert "'query'" in message
    assert "'word_embeddings'" in message
    assert "'classifier'" not in message


def test_missing_base_model_rejected(make_config, tmp_path):
    config = make_config(resource(), base_input(tmp_path / "never-finished"))
    with pytest.raises(
        StageError, match=r"spec.baseModel.pretrainJobRef: the input baseModel .*tiny-lm.* has "
        r"no Hugging Face model"
    ):
        stage.run(config, resume=False)


def test_missing_base_uri_rejected(make_config, tmp_path):
    config = make_config(resource(baseModel={"uri": str(tmp_path / "nowhere")}))
    with pytest.raises(StageError, match=r"spec.baseModel.uri: .*nowhere.*config.json"):
        stage.run(config, resume=False)


def test_unknown_lora_target_rejected(make_config, base_output):
    spec = resource(lora={"targetModules": ["c_attn"]})
    config = make_config(spec, base_input(base_output))
    with pytest.raises(StageError, match=r"spec.lora.targetModules: \['c_attn'\].*q_proj"):
        stage.run(config, resume=False)


def test_max_length_above_base_positions_rejected(make_config, base_output):
    """In a cluster no validate runs first, so the stage rejects it before training."""
    config = make_config(resource(maxLength=300), base_input(base_output))
    with pytest.raises(StageError) as raised:
        stage.run(config, resume=False)
    assert str(raised.value).endswith(
        "spec.maxLength: 300 is above the maximum positions 256 of the base model, so longer "
        "sentences would run past the positions it was built for; set maxLength to at most 256.")


def test_misspelt_lora_target_rejected(make_config, base_output):
    """A misspelt name next to valid ones fails, though peft would adapt the valid ones only."""
    spec = resource(lora={"targetModules": ["qproj", "k_proj"]})
    config = make_config(spec, base_input(base_output))
    with pytest.raises(StageError, match=r"spec.lora.targetModules: \['qproj'\] match no module"
                       r".*'q_proj'"):
        stage.run(config, resume=False)


def run_two_processes(make_config, base_output, tmp_path: Path, strategy: str) -> Path:
    """Run a small FineTune, with its from-scratch phase, under torchrun with 2 gloo processes
    and `strategy`; return its output directory."""
    spec = resource(
        maxTrainSentences=200, maxEvalSentences=40,
        distributed={"procsPerNode": 2, "backend": "gloo", "strategy": strategy},
        training={"maxSteps": 10, "microBatchSize": 8, "learningRate": 0.01, "warmupSteps": 2,
                  "checkpointInterval": 5},
    )
    config = make_config(spec, base_input(base_output), output=tmp_path / strategy / "output")
    config_path = tmp_path / strategy / "config.json"
    config_path.write_text(config.model_dump_json())
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lathe_trainer", "finetune", "--config", str(config_path),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(config.output_uri.removeprefix("file://"))


def test_two_processes_under_torchrun(make_config, base_output, tmp_path):
    """procsPerNode 2: two gloo processes train together and rank 0 writes the outputs. With
    strategy fsdp they train the sharded model to the same test figures, for LoRA and from
    scratch, and write the same whole model."""
    reports = {}
    for strategy in ("ddp", "fsdp"):
        output = run_two_processes(make_config, base_output, tmp_path, strategy)
        report = json.loads((output / "report.json").read_text())
        assert report["processes"] == 2
        assert report["strategy"] == strategy
        assert report["test"]["steps"] == 10
        assert (output / "model" / "model.safetensors").is_file()
        assert (output / "checkpoints" / "lora" / "step-00000010").is_dir()
        reports[strategy] = report
    for phase in ("test", "fromScratch"):
        for key in ("f1", "finalLoss"):
            assert reports["fsdp"][phase][key] == pytest.approx(reports["ddp"][phase][key],
                                                               abs=1e-4), (phase, key)
    assert reports["fsdp"]["test"]["mergedWordsChanged"] == 0


def run_in_process(config, hash_seed: str) -> dict:
    """Run the stage with `python -m lathe_trainer` and return its manifest."""
    config_path = Path(config.output_uri.removeprefix("file://")).parent / "config.json"
    config_path.write_text(config.model_dump_json())
    command = [sys.executable, "-m", "lathe_trainer", "finetune", "--config", str(config_path)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": hash_seed}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((config_path.parent / "output" / "manifest.json").read_text())


def test_same_inputs_give_same_digest(make_config, base_output, tmp_path):
    """Two runs on copies of the base model at other paths, in processes with other string
    hash seeds (which order sets), write artifacts with the same digest."""
    spec = resource(
        maxTrainSentences=64, maxEvalSentences=16, lora={"r": 4, "alpha": 8, "dropout": 0.1},
        training={"maxSteps": 4, "microBatchSize": 8, "learningRate": 0.01, "warmupSteps": 1,
                  "checkpointInterval": 2},
    )
    manifests = []
    for run, hash_seed in (("a", "1"), ("b", "2")):
        base = tmp_path / run / "base"
        shutil.copytree(base_output, base)
        config = make_config(dict(spec), base_input(base), output=tmp_path / run / "output")
        manifests.append(run_in_process(config, hash_seed))
    first, second = manifests
    differing = sorted(path for path in first["outputs"]
                       if first["outputs"][path] != second["outputs"].get(path))
    assert differing == ["report.json"]  # a run record: timings and the base model's path
    assert first["digest"] == second["digest"]
    assert "adapter/adapter_model.safetensors" in first["outputs"]
    assert "adapter/README.md" not in first["outputs"]
    adapter_config = json.loads((tmp_path / "a/output/adapter/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] is None
    assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"])


def test_adapter_loads_on_base_model(finished, base_output):
    """adapter/ names no base model path; PeftModel loads it on the base given."""
    from peft import PeftModel

    _, _, output = finished
    merged = AutoModelForTokenClassification.from_pretrained(output / "model")
    base = AutoModelForTokenClassification.from_pretrained(
        base_output / "model", id2label=merged.config.id2label,
        label2id=merged.config.label2id,
    )
    adapted = PeftModel.from_pretrained(base, output / "adapter").merge_and_unload()
    merged_weights = merged.state_dict()
    for name, weight in adapted.state_dict().items():
        assert torch.allclose(weight, merged_weights[name], atol=1e-5), name


def run_loop_worker(tmp_path: Path, processes: int, resume_from: int, *options: str,
                    fault_steps: str = "") -> dict:
    """Run finetune_loop_worker.py with `processes` gloo processes and return its JSON."""
    worker = Path(__file__).with_name("finetune_loop_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(processes), str(worker),
               "--phase-dir", str(tmp_path / "phase"), "--resume-from", str(resume_from),
               *options]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "LATHE_FAULT_NAN_STEPS": fault_steps}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("processes", [1, 2])
def test_loop_resume_repeats_losses(tmp_path, processes):
    """A phase resumed from step 2 repeats steps 3 and 4 of the uninterrupted run exactly, also
    when each process's dropout draws a different amount of randomness."""
    runs = run_loop_worker(tmp_path, processes, resume_from=2)
    uninterrupted, resumed = runs["uninterrupted"], runs["resumed"]
    assert resumed["result"]["resumedFromStep"] == 2
    assert sorted(resumed["losses"]) == ["3", "4"]
    for step in ("3", "4"):
        assert resumed["losses"][step] == uninterrupted["losses"][step], step
    assert resumed["result"]["finalLoss"] == uninterrupted["result"]["finalLoss"]
    assert resumed["result"]["tokensSeen"] == uninterrupted["result"]["tokensSeen"]


@pytest.mark.parametrize("options", [
    ("--precision", "fp16"),
    ("--non-finite", "skip"),
    ("--non-finite", "rollback"),
], ids=" ".join)
def test_loop_resume_repeats_losses_after_recovery(tmp_path, options):
    """Two processes train with fp16 loss scaling, or recover from a NaN loss in step 4 by
    skipping it or rolling back to the checkpoint of step 2. An attempt resumed from step 2
    repeats the uninterrupted run's losses exactly, because the loss scale and the data
    position are part of the checkpoint."""
    fault_steps = "" if "--precision" in options else "4"
    runs = run_loop_worker(tmp_path, 2, 2, *options, "--steps", "6", fault_steps=fault_steps)
    uninterrupted, resumed = runs["uninterrupted"], runs["resumed"]
    assert sorted(uninterrupted["losses"], key=int) == [str(step) for step in range(1, 7)]
    assert resumed["result"]["resumedFromStep"] == 2
    for step in ("3", "4", "5", "6"):
        assert resumed["losses"][step] == uninterrupted["losses"][step], step
    for key in ("finalLoss", "tokensSeen", "nonFiniteSteps", "scalerSkippedSteps"):
        assert resumed["result"][key] == uninterrupted["result"][key], key
    assert uninterrupted["result"]["nonFiniteSteps"] == (1 if fault_steps else 0)


@pytest.mark.parametrize("options", [
    (),
    ("--precision", "fp16"),
    ("--non-finite", "rollback"),
], ids=lambda options: " ".join(options) or "fp32")
def test_fsdp_loop_matches_ddp(tmp_path, options):
    """Two processes train the FSDP-sharded model to the same losses as the replicated one,
    and an FSDP attempt resumed from step 2 repeats them exactly, also after a rollback."""
    fault_steps = "4" if "--non-finite" in options else ""
    runs = {strategy: run_loop_worker(tmp_path / strategy, 2, 2, *options, "--steps", "6",
                                      "--strategy", strategy, fault_steps=fault_steps)
            for strategy in ("ddp", "fsdp")}
    for step, loss in runs["ddp"]["uninterrupted"]["losses"].items():
        assert runs["fsdp"]["uninterrupted"]["losses"][step] == pytest.approx(loss, abs=2e-4)
    fsdp = runs["fsdp"]
    for step in ("3", "4", "5", "6"):
        assert fsdp["resumed"]["losses"][step] == fsdp["uninterrupted"]["losses"][step], step


def test_loop_resumed_at_end_keeps_figures(tmp_path):
    """An attempt that finds the last step's checkpoint runs no step and still reports the
    run's final loss and token count."""
    runs = run_loop_worker(tmp_path, 1, resume_from=4)
    uninterrupted, resumed = runs["uninterrupted"], runs["resumed"]
    assert resumed["losses"] == {}
    assert resumed["result"]["resumedFromStep"] == 4
    assert resumed["result"]["finalLoss"] == uninterrupted["result"]["finalLoss"]
    assert resumed["result"]["tokensSeen"] == uninterrupted["result"]["tokensSeen"]
    assert uninterrupted["result"]["tokensSeen"] > 0


def test_base_load_logs_no_transformers_table(base_output, caplog):
    """Loading the base under a new head logs one line, not transformers' coloured table of
    the LM head left out and the head added, once per process."""
    from lathe_trainer.finetune.model import load_pretrained

    with caplog.at_level("INFO"):
        load_pretrained(base_output / "model", ["O", "B-Disease", "I-Disease"])
    messages = [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if "LOAD REPORT" in message]
    assert [message for message in messages if "the new head score starts from random" in message]

